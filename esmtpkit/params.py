"""Check and convert MAIL/RCPT ESMTP parameters against the extensions a server offers (RFC 1870, 6152, 6531).

Pure core. Unknown or unoffered parameters get 555 5.5.4 (RFC 5321 §4.1.1.11); bad values 501 5.5.4.
"""

from __future__ import annotations

from typing import Any, Collection

from .commands import CommandError
from .reply import Reply

__all__ = ["check_mail_params", "check_rcpt_params"]

_BODY_TYPES = {"7BIT", "8BITMIME", "BINARYMIME"}
MAX_SIZE_DIGITS = 20


def _bad(text: str, code: int = 501) -> CommandError:
    return CommandError(Reply(code, (text,), "5.5.4"))


def check_mail_params(params: dict[str, str | None], offered: Collection[str]) -> dict[str, Any]:
    """Validate MAIL parameters; return them with parsed values (SIZE int, BODY upper-case str, SMTPUTF8 True)."""
    parsed: dict[str, Any] = {}
    for key, value in params.items():
        if key == "SIZE" and "SIZE" in offered:
            if value is None or not value.isdigit() or len(value) > MAX_SIZE_DIGITS:
                raise _bad("Bad SIZE value")
            parsed[key] = int(value)
        elif key == "BODY" and "8BITMIME" in offered:
            body = (value or "").upper()
            if body not in _BODY_TYPES or (body == "BINARYMIME" and "BINARYMIME" not in offered):
                raise _bad(f"Unsupported BODY type {value}", 555)
            parsed[key] = body
        elif key == "SMTPUTF8" and "SMTPUTF8" in offered:
            if value is not None:
                raise _bad("SMTPUTF8 takes no value")
            parsed[key] = True
        else:
            raise _bad(f"Unsupported MAIL parameter {key}", 555)
    return parsed


def check_rcpt_params(params: dict[str, str | None], offered: Collection[str]) -> dict[str, Any]:
    """Validate RCPT parameters (none are offered by the base protocol: any parameter gets 555)."""
    for key in params:
        raise _bad(f"Unsupported RCPT parameter {key}", 555)
    return {}
