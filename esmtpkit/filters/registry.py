"""The filters by kind, as ``twistd esmtpkit --filter KIND:TARGET[,KEY=VALUE...]`` names them: `parse_spec` reads
one such entry and `build` makes the filter, importing its module (``esmtpkit.filters.<kind>``) only when used."""

from __future__ import annotations

import importlib
from typing import Any, Mapping

__all__ = ["KINDS", "parse_spec", "build"]

#: The kinds, and the module whose ``from_spec(target, options, reactor=)`` makes each.
KINDS: Mapping[str, str] = {
    "rspamd": "esmtpkit.filters.rspamd",
    "clamd": "esmtpkit.filters.clamd",
    "spamd": "esmtpkit.filters.spamd",
    "milter": "esmtpkit.filters.milter",
}


def parse_spec(entry: str) -> tuple[str, str, dict[str, str]]:
    """``KIND:TARGET[,KEY=VALUE...]`` as ``(kind, target, options)``; ValueError naming what is wrong."""
    kind, colon, rest = entry.strip().partition(":")
    kind = kind.strip().lower()
    if not colon or kind not in KINDS:
        raise ValueError(f"{entry!r} is not KIND:TARGET with KIND one of {', '.join(KINDS)}")
    target, *pairs = rest.split(",")
    if not target.strip():
        raise ValueError(f"{entry!r} names no {kind} to ask (KIND:TARGET)")
    options: dict[str, str] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        key = key.strip().lower()
        if not equals or not key:
            raise ValueError(f"{entry!r}: {pair!r} is not KEY=VALUE")
        if key in options:
            raise ValueError(f"{entry!r}: {key} is given twice")
        options[key] = value.strip()
    return kind, target.strip(), options


def build(entry: str, reactor: Any = None) -> Any:
    """The filter ``entry`` (``KIND:TARGET[,KEY=VALUE...]``) asks for; ValueError naming what is wrong."""
    kind, target, options = parse_spec(entry)
    module = importlib.import_module(KINDS[kind])
    try:
        return module.from_spec(target, options, reactor=reactor)
    except ValueError as e:
        raise ValueError(f"{kind}: {e}") from None
