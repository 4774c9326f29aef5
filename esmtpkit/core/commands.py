"""Split SMTP command lines into verbs, paths and ESMTP parameters (RFC 5321 §4.1, §4.1.2).

Pure core. `parse_command` never raises on client input except `CommandError`, whose reply the protocol sends.
"""

from __future__ import annotations

import enum
import re
from typing import Final, Mapping, NamedTuple

from esmtpkit.core.address import Address, AddressError, parse_path
from esmtpkit.core.reply import Reply

__all__ = ["Verb", "Command", "CommandError", "parse_command", "parse_mail_rcpt", "parse_params", "line_limit"]


class Verb(enum.Enum):
    """Every command esmtpkit knows; anything else is UNKNOWN and goes to the handler's ``unknown``."""

    __hash__ = object.__hash__  # members are singletons: identity hashing is exact and cheaper in table lookups

    HELO = "HELO"
    EHLO = "EHLO"
    LHLO = "LHLO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    BDAT = "BDAT"
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"
    VRFY = "VRFY"
    EXPN = "EXPN"
    HELP = "HELP"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    UNKNOWN = "UNKNOWN"


_VERBS: Final = {v.value: v for v in Verb if v is not Verb.UNKNOWN}
_KEYWORD: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_VALUE: Final = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")
_VALUE_UTF8: Final = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+\Z")

#: RFC 5321 §4.5.3.1.4: 512 octets per command line, CRLF included. Extensions add room (RFC 1870 §8 +26 for
#: SIZE, RFC 3461 §5 +100 on MAIL and +500 on RCPT, RFC 6531 +10 for SMTPUTF8, RFC 4954 §5 +500 on MAIL for AUTH=,
#: RFC 4954 §4 12288 for AUTH).
BASE_LINE_LIMIT: Final = 512
_EXTRA: Final[Mapping[Verb, int]] = {Verb.MAIL: 26 + 100 + 10 + 20 + 500, Verb.RCPT: 500, Verb.AUTH: 12288 - 512}


def line_limit(verb: Verb, base: int = BASE_LINE_LIMIT) -> int:
    """Largest command line for ``verb`` in octets without CRLF, given the policy's base limit."""
    return base + _EXTRA.get(verb, 0) - 2


class CommandError(Exception):
    """The command is malformed; ``reply`` is what the client gets (500/501/555)."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        super().__init__(str(reply))


class Command(NamedTuple):
    """One parsed command line: the verb, the raw argument text, and the line as received.

    An immutable named tuple rather than a frozen dataclass: one is made for every command line, in half the time.
    """

    verb: Verb
    argument: str
    line: str
    name: str = ""


def parse_command(raw: bytes) -> Command:
    """Decode a command line (without CRLF) and find its verb (case-insensitive, RFC 5321 §2.4)."""
    if 0 in raw:  # NUL; bytes answer an int test at once, a bytes one only after a failed int conversion
        raise CommandError(Reply(500, ("NUL character in command",), "5.5.2"))
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError(Reply(500, ("Invalid UTF-8 in command",), "5.5.2")) from None
    name, _, argument = line.partition(" ")
    verb = _VERBS.get(name.upper())  # no default: on Python 3.11 every Verb.X read goes through a slow hook
    return Command(verb if verb is not None else Verb.UNKNOWN, argument.strip(" "), line, name)


def parse_params(text: str, utf8: bool = False) -> dict[str, str | None]:
    """Parse ``KEY=value KEY2`` ESMTP parameters (RFC 5321 §4.1.2) into an upper-cased dict; 501 on bad syntax."""
    params: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not _KEYWORD.match(key):
            raise CommandError(Reply(501, (f"Bad parameter keyword {key!r}",), "5.5.4"))
        if eq and not (_VALUE_UTF8 if utf8 else _VALUE).match(value):
            raise CommandError(Reply(501, (f"Bad value for parameter {key.upper()}",), "5.5.4"))
        key = key.upper()
        if key in params:
            raise CommandError(Reply(501, (f"Duplicate parameter {key}",), "5.5.4"))
        params[key] = value if eq else None
    return params


def parse_mail_rcpt(argument: str, prefix: str, *, allow_null: bool, allow_postmaster: bool,
                    utf8_allowed: bool) -> tuple[Address, dict[str, str | None]]:
    """Parse ``FROM:<path> params`` or ``TO:<path> params``; whitespace after the colon is tolerated."""
    rest = argument[len(prefix):].lstrip(" ")
    if argument[: len(prefix)].upper() != prefix or not rest:  # an empty path is not <> (RFC 5321 §4.1.2)
        raise CommandError(Reply(501, (f"Syntax: {'MAIL FROM:<address>' if prefix == 'FROM:' else 'RCPT TO:<address>'}",), "5.5.4"))
    if rest.startswith("<"):
        end = _path_end(rest)
        if end < 0:
            raise CommandError(Reply(501, ("Bad address syntax: unbalanced <",), "5.1.7" if prefix == "FROM:" else "5.1.3"))
        path, params_text = rest[: end + 1], rest[end + 1:]
        if params_text and not params_text.startswith(" "):
            raise CommandError(Reply(501, ("Bad address syntax",), "5.5.4"))
    else:
        path, _, params_text = rest.partition(" ")
    params = parse_params(params_text, utf8_allowed)
    utf8 = utf8_allowed and "SMTPUTF8" in params if prefix == "FROM:" else utf8_allowed
    try:
        address = parse_path(path, allow_null=allow_null, allow_postmaster=allow_postmaster, utf8=utf8)
    except AddressError as e:
        enhanced = "5.6.7" if "SMTPUTF8" in str(e) else ("5.1.7" if prefix == "FROM:" else "5.1.3")
        code = 553 if enhanced == "5.6.7" else 501
        raise CommandError(Reply(code, (f"Bad address syntax: {e}",), enhanced)) from None
    return address, params


def _path_end(text: str) -> int:
    """Index of the ``>`` closing the path that opens ``text``, honouring quoted local parts; -1 if none."""
    if '"' not in text:
        return text.find(">")
    quoted = False
    i = 1
    while i < len(text):
        c = text[i]
        if quoted and c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
        i += 1
    return -1
