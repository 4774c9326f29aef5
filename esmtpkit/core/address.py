"""RFC 5321 §4.1.2 paths: parse ``<local@domain>``, ``<>`` and source routes into `Address` values.

Pure core. `Address` is a `str` (the mailbox, ``""`` for the null sender) carrying its parts, so handlers can
compare and log it like text. UTF-8 mailboxes (RFC 6531) are accepted only when the caller allows them. No path
holds a control character (C0, DEL, C1), U+2028/U+2029 or a bidirectional formatting character (`escape.UNSAFE`),
quoted or not: such an address could not be written into a trace field or a log line as it is.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

from esmtpkit.core.escape import UNSAFE

__all__ = ["Address", "AddressError", "parse_path", "quote_local_part"]

_ATEXT: Final = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_DOT_STRING: Final = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
_DOT_STRING_UTF8: Final = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*\Z")
_QUOTED: Final = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_QUOTED_UTF8: Final = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"\Z')
_QUOTED_PAIR: Final = re.compile(r"\\(.)", re.DOTALL)
_NEEDS_BACKSLASH: Final = re.compile(r'(["\\])')
_SUBDOMAIN: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")
_SUBDOMAIN_UTF8: Final = re.compile(r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\u0080-\U0010ffff-]*[A-Za-z0-9\u0080-\U0010ffff])?\Z")
_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
#: The everyday path, ``<dot.atom@host.name>`` in ASCII, matched in one step; anything else takes the full road.
_SIMPLE_PATH: Final = re.compile(rf"<([{_ATEXT}]+(?:\.[{_ATEXT}]+)*)@((?:{_LABEL}\.)*{_LABEL})>\Z")
_GENERAL_LITERAL: Final = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+\Z")

MAX_LOCAL_PART: Final = 64
MAX_DOMAIN: Final = 255
MAX_PATH: Final = 256


class AddressError(ValueError):
    """The path is not valid RFC 5321 syntax; the message says why (it becomes the 501 reply text)."""


class Address(str):
    """A mailbox from a MAIL or RCPT path: ``str(address)`` is ``local@domain`` (``""`` for ``<>``)."""

    local_part: str
    domain: str
    source_route: tuple[str, ...]
    utf8: bool

    def __new__(cls, mailbox: str, local_part: str = "", domain: str = "",
                source_route: tuple[str, ...] = (), utf8: bool = False) -> "Address":
        self = super().__new__(cls, mailbox)
        if mailbox and not local_part:
            local_part, _, domain = mailbox.rpartition("@") if "@" in mailbox else (mailbox, "", "")
        self.local_part = local_part
        self.domain = domain
        self.source_route = source_route
        self.utf8 = utf8
        return self

    @property
    def is_null(self) -> bool:
        """True for the null reverse-path ``<>`` (bounces, RFC 5321 §4.5.5)."""
        return self == ""

    def bracketed(self) -> str:
        """The path as it appears on the wire: ``<local@domain>``."""
        return f"<{self}>"

    def canonical(self) -> str:
        """The mailbox with its local part quoted as little as possible (`quote_local_part`): ``"bob"@x`` is
        ``bob@x``, ``"a\\ b"@x`` is ``"a b"@x`` (RFC 5321 §4.1.2: all quoted forms of a local part are the same)."""
        local = self.local_part
        if not local:
            return str(self)
        if len(local) >= 2 and local[0] == local[-1] == '"':
            local = _QUOTED_PAIR.sub(r"\1", local[1:-1])
        local = quote_local_part(local)
        return f"{local}@{self.domain}" if self.domain else local

    def __repr__(self) -> str:
        return f"Address({str(self)!r})"


def quote_local_part(text: str) -> str:
    """``text`` as a local part: a dot-string when it is one, else a quoted string that escapes only ``"`` and
    ``\\`` (RFC 5321 §4.1.2: "the form that uses the minimum quoting possible"; UTF-8 as in RFC 6531 §3.3)."""
    if (_DOT_STRING if text.isascii() else _DOT_STRING_UTF8).match(text):
        return text
    return '"' + _NEEDS_BACKSLASH.sub(r"\\\1", text) + '"'


def _check_domain(domain: str, utf8: bool) -> None:
    if not domain:
        raise AddressError("empty domain")
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError("domain too long")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise AddressError(f"bad address literal {domain}")
        inner = domain[1:-1]
        try:
            if inner[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(inner[5:])
            elif _GENERAL_LITERAL.match(inner):
                pass
            else:
                ipaddress.IPv4Address(inner)
        except ValueError:
            raise AddressError(f"bad address literal {domain}") from None
        return
    pattern = _SUBDOMAIN_UTF8 if utf8 else _SUBDOMAIN
    for label in domain.split("."):
        if not pattern.match(label) or len(label) > 63:
            raise AddressError(f"bad domain {domain}")


def _check_local(local: str, utf8: bool) -> None:
    if not local:
        raise AddressError("empty local part")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part too long")
    if local.startswith('"'):
        if not (_QUOTED_UTF8 if utf8 else _QUOTED).match(local):
            raise AddressError(f"bad quoted local part {local}")
    elif not (_DOT_STRING_UTF8 if utf8 else _DOT_STRING).match(local):
        raise AddressError(f"bad local part {local}")


def _split_mailbox(mailbox: str) -> tuple[str, str]:
    """Split at the last ``@`` that is outside a quoted local part."""
    if mailbox.startswith('"'):
        end = 1
        while end < len(mailbox):
            if mailbox[end] == "\\":
                end += 2
                continue
            if mailbox[end] == '"':
                break
            end += 1
        local, rest = mailbox[: end + 1], mailbox[end + 1:]
        if not rest.startswith("@"):
            raise AddressError(f"bad mailbox {mailbox}")
        return local, rest[1:]
    local, at, domain = mailbox.rpartition("@")
    if not at:
        raise AddressError(f"no domain in {mailbox}")
    return local, domain


def parse_path(path: str, *, allow_null: bool = False, allow_postmaster: bool = False,
               utf8: bool = False) -> Address:
    """Parse a bracketed path (``<a@b>``, ``<@relay:a@b>``, ``<>``) into an Address.

    ``allow_null`` admits ``<>`` (reverse-path), ``allow_postmaster`` admits ``<Postmaster>`` without a domain
    (RFC 5321 §4.1.1.3), ``utf8`` admits RFC 6531 UTF-8 mailboxes. A path without brackets is tolerated,
    as Postfix does by default. Source routes are kept in ``source_route`` and otherwise ignored (§C).
    """
    simple = _SIMPLE_PATH.match(path)
    if simple is not None:
        local, domain = simple.group(1), simple.group(2)
        if len(local) <= MAX_LOCAL_PART and len(path) <= MAX_PATH + 2 and (
                len(domain) <= 63 or max(map(len, domain.split("."))) <= 63):
            return Address(f"{local}@{domain}", local, domain, (), False)
    if path.startswith("<"):
        if not path.endswith(">"):
            raise AddressError("unbalanced <")
        inner = path[1:-1]
    else:
        inner = path
    if len(inner.encode("utf-8")) > MAX_PATH:
        raise AddressError("path too long")
    unsafe = UNSAFE.search(inner)
    if unsafe is not None:  # RFC 5321 §4.1.2: no control characters in MAIL or RCPT; named, never echoed
        raise AddressError(f"character U+{ord(unsafe.group()):04X} not allowed in an address")
    if not inner:
        if allow_null:
            return Address("")
        raise AddressError("null path not allowed here")
    if not utf8 and not inner.isascii():
        raise AddressError("non-ASCII address needs SMTPUTF8")
    route: tuple[str, ...] = ()
    if inner.startswith("@"):
        adl, colon, inner = inner.partition(":")
        if not colon:
            raise AddressError("bad source route")
        hops = adl.split(",")
        for hop in hops:
            if not hop.startswith("@"):
                raise AddressError("bad source route")
            _check_domain(hop[1:], utf8)
        route = tuple(hop[1:] for hop in hops)
    if allow_postmaster and inner.lower() == "postmaster":
        return Address(inner, inner, "", route, False)
    local, domain = _split_mailbox(inner)
    _check_local(local, utf8)
    _check_domain(domain, utf8)
    return Address(f"{local}@{domain}", local, domain, route, not inner.isascii())
