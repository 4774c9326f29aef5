"""Handler settings given as text (``--handler-option key=value``) turned into typed values."""

from __future__ import annotations

__all__ = ["flag"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def flag(value: bool | str) -> bool:
    """A yes/no setting: a bool, or text such as ``yes``/``no``, ``true``/``false``, ``1``/``0``, ``on``/``off``."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered not in _TRUE and lowered not in _FALSE:
            raise ValueError(f"not a yes/no value: {value!r}")
        return lowered in _TRUE
    return bool(value)
