"""Check and convert MAIL/RCPT ESMTP parameters against the extensions a server offers (RFC 1870, 6152, 6531,
3030, 3461, 4954).

Pure core. Unknown or unoffered parameters get 555 5.5.4 (RFC 5321 §4.1.1.11); bad values 501 5.5.4.
"""

from __future__ import annotations

from typing import Any, Collection

from esmtpkit.core.commands import CommandError
from esmtpkit.core.dsn import XtextError, parse_envid, parse_notify, parse_orcpt, parse_ret, xtext_decode
from esmtpkit.core.reply import Reply

__all__ = ["check_mail_params", "check_rcpt_params", "parse_size", "parse_body", "parse_smtputf8", "auth_mailbox"]

#: BODY values (RFC 6152 §2, RFC 3030 §3) and the extension each needs offered; 7BIT needs only BODY itself.
_BODY_TYPES = {"7BIT": None, "8BITMIME": "8BITMIME", "BINARYMIME": "BINARYMIME"}
MAX_SIZE_DIGITS = 20
#: RFC 4954 §5: the AUTH parameter's mailbox, as sent (xtext), is bounded like ORCPT's value.
MAX_AUTH_LENGTH = 500


def _bad(text: str, code: int = 501) -> CommandError:
    return CommandError(Reply(code, (text,), "5.5.4"))


def parse_size(value: str | None) -> int:
    """``SIZE=n`` (RFC 1870 §6): the declared size in octets."""
    if value is None or not value.isdigit() or len(value) > MAX_SIZE_DIGITS:
        raise _bad("Bad SIZE value")
    return int(value)


def parse_body(value: str | None, offered: Collection[str]) -> str:
    """``BODY=7BIT|8BITMIME|BINARYMIME`` (RFC 6152 §2, RFC 3030 §3), upper-cased; each type needs its extension."""
    body = (value or "").upper()
    if body not in _BODY_TYPES or _BODY_TYPES[body] not in (None, *offered):
        raise _bad(f"Unsupported BODY type {value}", 555)
    return body


def parse_smtputf8(value: str | None) -> bool:
    """``SMTPUTF8`` (RFC 6531 §3.4): no value."""
    if value is not None:
        raise _bad("SMTPUTF8 takes no value")
    return True


def check_mail_params(params: dict[str, str | None], offered: Collection[str]) -> dict[str, Any]:
    """Validate MAIL parameters; return them with parsed values (SIZE int, BODY upper-case str, SMTPUTF8 True,
    with DSN offered: RET a `dsn.Ret`, ENVID the decoded str; with AUTH offered: AUTH the decoded mailbox or
    ``<>``, RFC 4954 §5).

    BODY is known when 8BITMIME or BINARYMIME is offered; BODY=BINARYMIME only with BINARYMIME (which a server
    offers only together with CHUNKING, RFC 3030 §3). A server's own extensions are parsed by its
    `esmtpkit.core.extension.Extensions`, with these same functions for the standard ones.
    """
    parsed: dict[str, Any] = {}
    for key, value in params.items():
        if key == "SIZE" and "SIZE" in offered:
            parsed[key] = parse_size(value)
        elif key == "BODY" and ("8BITMIME" in offered or "BINARYMIME" in offered):
            parsed[key] = parse_body(value, offered)
        elif key == "SMTPUTF8" and "SMTPUTF8" in offered:
            parsed[key] = parse_smtputf8(value)
        elif key == "RET" and "DSN" in offered:
            parsed[key] = parse_ret(value)
        elif key == "ENVID" and "DSN" in offered:
            parsed[key] = parse_envid(value)
        elif key == "AUTH" and "AUTH" in offered:
            parsed[key] = auth_mailbox(value)
        else:
            raise _bad(f"Unsupported MAIL parameter {key}", 555)
    return parsed


def auth_mailbox(value: str | None) -> str:
    """``AUTH=xtext`` on MAIL (RFC 4954 §5): the submitter's mailbox, or ``<>``, decoded to printable ASCII."""
    if not value or len(value) > MAX_AUTH_LENGTH:
        raise _bad("Bad AUTH parameter: a mailbox or <> of at most 500 characters is required")
    try:
        text = xtext_decode(value).decode("latin-1")
    except XtextError as e:
        raise _bad(f"Bad AUTH parameter: {e}") from None
    if not text.isprintable() or not text.isascii() or " " in text:
        raise _bad("Bad AUTH parameter: must decode to a mailbox in printable ASCII")
    return text


def check_rcpt_params(params: dict[str, str | None], offered: Collection[str], *,
                      utf8: bool = False) -> dict[str, Any]:
    """Validate RCPT parameters: with DSN offered, NOTIFY (a `dsn.Notify`) and ORCPT (a `dsn.OriginalRecipient`;
    ``utf8`` when the transaction uses SMTPUTF8). Anything else gets 555.
    """
    parsed: dict[str, Any] = {}
    for key, value in params.items():
        if key == "NOTIFY" and "DSN" in offered:
            parsed[key] = parse_notify(value)
        elif key == "ORCPT" and "DSN" in offered:
            parsed[key] = parse_orcpt(value, utf8=utf8)
        else:
            raise _bad(f"Unsupported RCPT parameter {key}", 555)
    return parsed
