"""Delivery Status Notification parameters (RFC 3461): RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT.

Pure core: no Twisted, no I/O. Each ``parse_*`` function takes a parameter's value as the client sent it and
returns a typed value, or raises `CommandError` with a ``501 5.5.4`` reply naming the parameter. The encodings
the values use are here too: xtext (RFC 3461 §4) and the ``utf-8`` address type's escapes (RFC 6533 §3).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final

from esmtpkit.core.commands import CommandError
from esmtpkit.core.reply import Reply

__all__ = [
    "Ret", "Notify", "OriginalRecipient", "XtextError",
    "xtext_decode", "xtext_encode", "utf8_addr_decode", "utf8_addr_encode",
    "parse_ret", "parse_envid", "parse_notify", "parse_orcpt",
    "MAX_ENVID_LENGTH", "MAX_ORCPT_LENGTH",
]

#: RFC 3461 §4.4: an ENVID is at most 100 characters (counted here as sent, in xtext form).
MAX_ENVID_LENGTH: Final = 100
#: RFC 3461 §4.2 and §5 give ORCPT up to 500 characters (the whole ``type;address`` value as sent).
MAX_ORCPT_LENGTH: Final = 500

_HEX: Final = "0123456789ABCDEF"
_XCHAR: Final = frozenset(range(0x21, 0x7F)) - {ord("+"), ord("=")}
_PRINTABLE: Final = re.compile(r"[\t\x20-\x7e]+\Z")
#: RFC 822 atom: printable ASCII except specials ()<>@,;:\".[] (RFC 3461 §4.2 addr-type).
_ATOM: Final = re.compile(r"[!#-'*+\-/-9=?A-Z^-~]+\Z")
_ESCAPE: Final = re.compile(r"\\x\{([0-9A-Fa-f]{2,6})\}")


class XtextError(ValueError):
    """A value is not valid xtext (or not a valid RFC 6533 utf-8 address encoding)."""


def _bad(parameter: str, why: str) -> CommandError:
    return CommandError(Reply(501, (f"Bad {parameter} parameter: {why}",), "5.5.4"))


# ---- encodings ------------------------------------------------------------------------------------------------

def xtext_decode(text: str) -> bytes:
    """Undo xtext (RFC 3461 §4): ``+XX`` with two upper-case hex digits is octet XX; every other character must
    be printable ASCII other than ``+`` and ``=``.
    """
    out = bytearray()
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "+":
            pair = text[i + 1:i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise XtextError(f"'+' must be followed by two upper-case hex digits at offset {i}")
            out.append(int(pair, 16))
            i += 3
            continue
        if ord(c) not in _XCHAR:
            raise XtextError(f"character {c!r} not allowed in xtext at offset {i}")
        out.append(ord(c))
        i += 1
    return bytes(out)


def xtext_encode(value: bytes | str) -> str:
    """Encode as xtext (RFC 3461 §4): ``+``, ``=``, and octets outside ``!``..``~`` become ``+XX``.

    Text is encoded as UTF-8 first.
    """
    data = value.encode("utf-8") if isinstance(value, str) else value
    return "".join(chr(b) if b in _XCHAR else f"+{b:02X}" for b in data)


def _qchar(c: str) -> bool:
    """RFC 6533 QCHAR: printable ASCII except space, backslash, ``+`` and ``=``."""
    return "\x21" <= c <= "\x7e" and c not in "\\+="


def utf8_addr_decode(text: str, *, unitext: bool = False) -> str:
    """Decode an RFC 6533 §3 ``utf-8-addr-xtext`` (ASCII, ``\\x{HEX}`` escapes) or, with ``unitext``, a
    ``utf-8-addr-unitext`` (UTF-8 characters allowed as they are).

    Escapes may stand for ``\\``, space, ``+``, ``=`` or a character beyond ASCII, written with 2 to 6 digits and
    no leading zero. Escapes of control characters are refused, though RFC 6533's grammar lets some through:
    decoded, they could end a command line when the address is relayed.
    """
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            match = _ESCAPE.match(text, i)
            if match is None:
                raise XtextError(f"bad escape at offset {i} (expected \\x{{HEX}})")
            digits = match.group(1)
            point = int(digits, 16)
            if (digits[0] == "0" or point > 0x10FFFF or 0xD800 <= point <= 0xDFFF
                    or (point < 0x80 and chr(point) not in "\\ +=")):
                raise XtextError(f"escape {match.group(0)} does not stand for an allowed character")
            out.append(chr(point))
            i = match.end()
            continue
        if _qchar(c) or (unitext and ord(c) > 0x7F):
            out.append(c)
            i += 1
            continue
        raise XtextError(f"character {c!r} not allowed at offset {i}")
    if not out:
        raise XtextError("empty address")
    return "".join(out)


def utf8_addr_encode(address: str, *, unitext: bool = False) -> str:
    """Encode an address as RFC 6533 ``utf-8-addr-xtext`` (or ``utf-8-addr-unitext``, keeping non-ASCII text)."""
    out = []
    for c in address:
        if _qchar(c) or (unitext and ord(c) > 0x7F):
            out.append(c)
        elif c in "\\ +=" or ord(c) > 0x7F:
            out.append(f"\\x{{{ord(c):02X}}}")
        else:
            raise XtextError(f"character {c!r} cannot be encoded")
    return "".join(out)


# ---- MAIL parameters ------------------------------------------------------------------------------------------

class Ret(enum.StrEnum):
    """RET (RFC 3461 §4.3): return the full message, or only its headers, in a failure DSN."""

    FULL = "FULL"
    HDRS = "HDRS"


def parse_ret(value: str | None) -> Ret:
    """``RET=FULL`` or ``RET=HDRS`` (any case)."""
    try:
        return Ret((value or "").upper())
    except ValueError:
        raise _bad("RET", "expected FULL or HDRS") from None


def parse_envid(value: str | None) -> str:
    """``ENVID=xtext`` (RFC 3461 §4.4): at most 100 characters, decoding to printable ASCII. Returns it decoded
    (`xtext_encode` gives it back for relaying).
    """
    if not value:
        raise _bad("ENVID", "a value is required")
    if len(value) > MAX_ENVID_LENGTH:
        raise _bad("ENVID", f"longer than {MAX_ENVID_LENGTH} characters")
    try:
        decoded = xtext_decode(value)
    except XtextError as e:
        raise _bad("ENVID", str(e)) from None
    text = decoded.decode("latin-1")
    if not _PRINTABLE.match(text):
        raise _bad("ENVID", "must decode to printable ASCII")
    return text


# ---- RCPT parameters ------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Notify:
    """NOTIFY (RFC 3461 §4.1): when to send a DSN for this recipient; all False means NEVER."""

    success: bool = False
    failure: bool = False
    delay: bool = False

    @property
    def never(self) -> bool:
        """True for ``NOTIFY=NEVER``."""
        return not (self.success or self.failure or self.delay)

    def __str__(self) -> str:
        """The parameter value, in canonical order: ``NEVER`` or e.g. ``SUCCESS,FAILURE``."""
        names = [n for n, on in (("SUCCESS", self.success), ("FAILURE", self.failure), ("DELAY", self.delay)) if on]
        return ",".join(names) or "NEVER"


_NOTIFY_WORDS: Final = ("SUCCESS", "FAILURE", "DELAY")


def parse_notify(value: str | None) -> Notify:
    """``NOTIFY=NEVER`` or a comma list of SUCCESS, FAILURE, DELAY (any case; NEVER only alone; repeats are
    harmless).
    """
    words = (value or "").upper().split(",")
    if words == ["NEVER"]:
        return Notify()
    if any(w not in _NOTIFY_WORDS for w in words):
        if "NEVER" in words:
            raise _bad("NOTIFY", "NEVER cannot be combined with other values")
        raise _bad("NOTIFY", "expected NEVER or a list of SUCCESS, FAILURE, DELAY")
    return Notify("SUCCESS" in words, "FAILURE" in words, "DELAY" in words)


@dataclass(frozen=True, slots=True)
class OriginalRecipient:
    """ORCPT (RFC 3461 §4.2): the recipient address as the original sender gave it, and its type.

    ``addr_type`` is lower-cased (``rfc822``, ``utf-8``, or another type passed along as is); ``address`` is
    decoded. ``str()`` gives the parameter value again, for relaying.
    """

    addr_type: str
    address: str

    def __str__(self) -> str:
        if self.addr_type == "utf-8":
            return f"utf-8;{utf8_addr_encode(self.address)}"
        return f"{self.addr_type};{xtext_encode(self.address)}"


def parse_orcpt(value: str | None, *, utf8: bool = False) -> OriginalRecipient:
    """``ORCPT=addr-type;xtext``. The ``utf-8`` type (RFC 6533) takes RFC 6533's encoding instead of xtext,
    with raw UTF-8 only when ``utf8`` (the transaction uses SMTPUTF8); other types decode to printable ASCII.
    """
    if not value:
        raise _bad("ORCPT", "a value is required")
    if len(value) > MAX_ORCPT_LENGTH:
        raise _bad("ORCPT", f"longer than {MAX_ORCPT_LENGTH} characters")
    addr_type, semicolon, encoded = value.partition(";")
    if not semicolon or not _ATOM.match(addr_type):
        raise _bad("ORCPT", "expected addr-type;address")
    addr_type = addr_type.lower()
    if not utf8 and not encoded.isascii():
        raise _bad("ORCPT", "non-ASCII address without SMTPUTF8")
    try:
        if addr_type == "utf-8":
            address = utf8_addr_decode(encoded, unitext=utf8)
        else:
            address = xtext_decode(encoded).decode("latin-1")
            if not _PRINTABLE.match(address):
                raise XtextError("the address must decode to printable ASCII")
    except XtextError as e:
        raise _bad("ORCPT", str(e)) from None
    return OriginalRecipient(addr_type, address)
