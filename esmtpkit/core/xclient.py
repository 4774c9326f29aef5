"""XCLIENT and XFORWARD (Postfix's XCLIENT_README and XFORWARD_README): a trusted proxy or content filter tells
the server who the real client is.

Pure core. Both are offered only to clients on the policy's ``trusted_networks`` (`Offer.TRUSTED`), and both
verbs are known to every client so that anyone else gets ``550 5.7.0 Insufficient authorization``. Each takes
``ATTRIBUTE=value`` pairs, values in xtext (RFC 3461 §4), ``[UNAVAILABLE]`` for a value the sender does not know
(and ``[TEMPUNAVAIL]`` for a NAME whose lookup failed for now); a whole command is checked before any of it is
used, and anything malformed is ``501 5.5.4``.

XCLIENT (for a proxy such as nginx's mail proxy) replaces the client's identity for the rest of the connection:
``session.peer`` (ADDR, PORT), ``session.client_name`` (NAME), ``session.authenticated`` (LOGIN) and
``session.host`` (DESTADDR, DESTPORT); relay rules, trace headers and logs then see the real client. The server
answers with a new 220 greeting and the dialogue starts over, so the client must greet again: HELO and PROTO are
checked, and the greeting that follows (which carries the real client's HELO name) is what counts. Trust is then
judged again, from the new address: Postfix keeps the proxy's authorization for the whole connection, but a proxy
such as nginx turns transparent once it has replayed its client's first commands, and the client behind it could
then send an XCLIENT of its own. One command carries every attribute (its line may be 1024 octets longer than
RFC 5321's 512), so a proxy never needs a second one; ``XClient(keep_trust=True)`` keeps the proxy's trust for the
connection, as Postfix does, for proxies that split their attributes over several commands. A new ADDR also
forgets an AUTH identity the proxy had (unless LOGIN gives one): it was the proxy's, not the client's.

XFORWARD (for a content filter between two MTAs) names the client the upstream MTA received the message from,
for the next message only; `forwarded_client` gives it while that message's transaction is open. It is trace
and log information (as in Postfix): the ``Received:`` field shows it, relay decisions do not use it (the
upstream MTA took those, and may have accepted the message from an authenticated client anywhere).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Final, Iterable, Mapping

from esmtpkit.core.commands import CommandError
from esmtpkit.core.dsn import XtextError, xtext_decode
from esmtpkit.core.extension import Extension, Offer, VerbCall, VerbSpec
from esmtpkit.core.reply import Reply
from esmtpkit.core.session import Session

__all__ = ["on_networks", "XClient", "XForward", "ClientAddress", "Forwarded", "forwarded_client", "UNAVAILABLE",
           "TEMPUNAVAIL", "LINE_ALLOWANCE", "NOT_AUTHORIZED"]

#: The value for information the sender does not have.
UNAVAILABLE: Final = "[UNAVAILABLE]"
#: The NAME value when the sender's hostname lookup failed for now.
TEMPUNAVAIL: Final = "[TEMPUNAVAIL]"
#: Octets an XCLIENT or XFORWARD line may have beyond 512: every attribute in one command (NAME and HELO up to
#: 255 characters each, a login name, two IPv6 addresses, ports and the attribute names come to about 1000).
LINE_ALLOWANCE: Final = 1024
#: The reply to a client that is not on the trusted networks (as Postfix words it).
NOT_AUTHORIZED: Final = Reply(550, ("Insufficient authorization",), "5.7.0")

#: The longest host name, HELO name or login name taken (RFC 1035 §2.3.4 for names).
_MAX_NAME: Final = 255
_HOSTNAME: Final = re.compile(r"(?=.{1,255}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                              r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?\Z")
#: Printable ASCII without space: what a HELO name, protocol name or queue id may hold.
_TOKEN: Final = re.compile(r"[\x21-\x7e]+\Z")
_ATTRIBUTE_NAME: Final = re.compile(r"[A-Za-z]{1,16}\Z")


@dataclass(frozen=True)
class ClientAddress:
    """A client or server address given by XCLIENT, shaped like Twisted's ``IPv4Address``/``IPv6Address`` (what
    ``session.peer`` and ``session.host`` usually hold): ``host`` is the IP as text (``""`` when unavailable),
    ``port`` the TCP port (None when unavailable)."""

    type: str = "TCP"
    host: str = ""
    port: int | None = None


@dataclass(frozen=True)
class Forwarded:
    """What XFORWARD said about the client the upstream MTA received the next message from. Each attribute is
    None when not given or ``[UNAVAILABLE]``; ``addr`` is an IP address as text (IPv6 without its ``IPV6:``
    prefix) or, as XFORWARD allows, some other address. ``transaction`` is the number the message's transaction
    gets (`Session.transactions` once its MAIL is accepted)."""

    name: str | None = None
    addr: str | None = None
    port: int | None = None
    proto: str | None = None
    helo: str | None = None
    ident: str | None = None
    source: str | None = None  # "LOCAL" or "REMOTE"
    transaction: int = 0


def forwarded_client(session: Session) -> Forwarded | None:
    """The client XFORWARD named for the current message (None when there is none, or it was for another)."""
    forwarded = session.forwarded
    if forwarded is None or forwarded.transaction != session.transactions:
        return None
    return forwarded


# ---- parsing -------------------------------------------------------------------------------------------------------

def _syntax(text: str) -> CommandError:
    return CommandError(Reply(501, (text,), "5.5.4"))


def _attributes(verb: str, argument: str, known: Iterable[str]) -> list[tuple[str, str]]:
    """The ``NAME=value`` pairs of ``argument``, names upper-cased and values xtext-decoded (printable, no
    control characters); 501 5.5.4 for an unknown name, a missing ``=`` or a bad value."""
    if not argument:
        raise _syntax(f"Syntax: {verb} attribute=value...")
    pairs = []
    for item in argument.split():
        name, equals, raw = item.partition("=")
        name = name.upper()
        if not equals or name not in known:
            shown = f": {name}" if _ATTRIBUTE_NAME.match(name) else ""
            raise _syntax(f"Bad {verb} attribute name{shown}")
        try:
            value = xtext_decode(raw).decode("utf-8")
        except (XtextError, UnicodeDecodeError):
            raise _syntax(f"Bad {verb} {name} syntax") from None
        if not value or any(ord(c) < 0x20 or ord(c) == 0x7f for c in value):
            raise _syntax(f"Bad {verb} {name} syntax")
        pairs.append((name, value))
    return pairs


def _unavailable(value: str, temporary: bool = False) -> bool:
    upper = value.upper()
    return upper == UNAVAILABLE or (temporary and upper == TEMPUNAVAIL)


def _ip(value: str) -> str | None:
    """An IPv4 address, or an IPv6 one after ``IPV6:`` (XCLIENT_README), as canonical text; None if neither."""
    if value[:5].upper() == "IPV6:":
        try:
            return ipaddress.IPv6Address(value[5:]).compressed
        except ValueError:
            return None
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        return None


def _port(value: str) -> int:
    if not value.isdigit() or not value.isascii() or int(value) > 65535:
        raise ValueError(value)
    return int(value)


@lru_cache(maxsize=32)
def _networks(cidrs: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def on_networks(ip: str, cidrs: Iterable[str]) -> bool:
    """Whether ``ip`` is inside one of ``cidrs`` (an IPv4-mapped IPv6 address counts as its IPv4 address)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in _networks(tuple(cidrs)))


def _moved(address: Any, host: str | None, port: int | None, port_given: bool) -> ClientAddress:
    """``address`` (a Twisted address or a ClientAddress) with the ``host`` and ``port`` XCLIENT gave: a new host
    without a port has an unknown one (the old port belonged to the old host)."""
    if host is None:
        host = str(getattr(address, "host", "") or "")
        if not port_given:
            port = getattr(address, "port", None)
    return ClientAddress("TCP", host, port)


# ---- XCLIENT -------------------------------------------------------------------------------------------------------

def _xclient_values(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Check and convert XCLIENT's attributes (the last of a repeated one wins); ValueError names a bad one."""
    values: dict[str, Any] = {}
    for name, value in pairs:
        if name == "NAME":
            if _unavailable(value, temporary=True):
                values[name] = None
            elif _HOSTNAME.match(value):
                values[name] = value
            else:
                raise ValueError(name)
        elif name in ("ADDR", "DESTADDR"):
            ip = "" if _unavailable(value) else _ip(value)
            if ip is None:
                raise ValueError(name)
            values[name] = ip
        elif name in ("PORT", "DESTPORT"):
            try:
                values[name] = None if _unavailable(value) else _port(value)
            except ValueError:
                raise ValueError(name) from None
        elif name == "PROTO":
            if not _unavailable(value) and value.upper() not in ("SMTP", "ESMTP"):
                raise ValueError(name)
            values[name] = value.upper()
        elif name == "HELO":
            if _unavailable(value):
                values[name] = None
            elif len(value) <= _MAX_NAME and _TOKEN.match(value):
                values[name] = value
            else:
                raise ValueError(name)
        elif name == "LOGIN":
            if _unavailable(value):
                values[name] = None
            elif len(value) <= _MAX_NAME and value.isprintable():
                values[name] = value
            else:
                raise ValueError(name)
    return values


def _xclient(call: VerbCall, keep_trust: bool = False) -> Reply:
    if not call.trusted:
        raise CommandError(NOT_AUTHORIZED)
    pairs = _attributes("XCLIENT", call.argument, XClient.ATTRIBUTES)
    try:
        values = _xclient_values(pairs)
    except ValueError as e:
        raise _syntax(f"Bad XCLIENT {e.args[0]} syntax") from None
    session, settings = call.session, call.settings
    if "ADDR" in values or "PORT" in values:
        session.peer = _moved(session.peer, values.get("ADDR"), values.get("PORT"), "PORT" in values)
        if "ADDR" in values:  # a new client: its name and login are unknown unless given; trust is judged again
            session.client_name = None
            session.authenticated, session.auth_mechanism = None, None
            if not keep_trust:
                session.trusted = on_networks(values["ADDR"], getattr(settings, "trusted_networks", ()))
    if "NAME" in values:
        session.client_name = values["NAME"]
    if "DESTADDR" in values or "DESTPORT" in values:
        session.host = _moved(session.host, values.get("DESTADDR"), values.get("DESTPORT"), "DESTPORT" in values)
    if "LOGIN" in values:
        session.authenticated, session.auth_mechanism = values["LOGIN"], None
    session.forwarded = None  # what XFORWARD said was about the client before
    call.restart()
    hostname = getattr(settings, "hostname", None) or "localhost"
    return Reply(220, (f"{hostname} ESMTP Mail Server",))


class XClient(Extension):
    """XCLIENT: a trusted proxy gives the real client's address, port, name, login, HELO name and protocol, and
    the address it connected to; the server greets again (220) and the client greets again."""

    name = keyword = "XCLIENT"
    rfc = "Postfix XCLIENT_README"
    offer = Offer.TRUSTED
    ATTRIBUTES: Final = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT")
    verbs = (VerbSpec("XCLIENT", _xclient, line_allowance=LINE_ALLOWANCE, gated=False),)

    def __init__(self, keep_trust: bool = False) -> None:
        self.keep_trust = keep_trust
        if keep_trust:
            self.verbs = (VerbSpec("XCLIENT", lambda call: _xclient(call, keep_trust=True),
                                   line_allowance=LINE_ALLOWANCE, gated=False),)

    def ehlo_params(self, session: Session, settings: Any) -> str:
        return " ".join(self.ATTRIBUTES)


# ---- XFORWARD ------------------------------------------------------------------------------------------------------

def _forward_addr(value: str) -> str:
    ip = _ip(value)
    if ip is not None:
        return ip
    if value[:5].upper() == "IPV6:" or len(value) > _MAX_NAME or not _TOKEN.match(value):
        raise ValueError("ADDR")
    return value  # XFORWARD_README: the address may be a non-IP address


def _token(limit: int) -> Callable[[str], str]:
    def check(value: str) -> str:
        if len(value) > limit or not _TOKEN.match(value):
            raise ValueError
        return value
    return check


def _source(value: str) -> str:
    if value.upper() not in ("LOCAL", "REMOTE"):
        raise ValueError
    return value.upper()


#: How each XFORWARD attribute's value is checked and converted (ValueError when bad), and the Forwarded field it
#: fills. Names, HELO names and addresses need not be DNS names there (XFORWARD_README); a protocol name is at
#: most 64 characters.
_FORWARD: Final[Mapping[str, tuple[str, Callable[[str], Any]]]] = {
    "NAME": ("name", _token(_MAX_NAME)), "ADDR": ("addr", _forward_addr), "PORT": ("port", _port),
    "PROTO": ("proto", _token(64)), "HELO": ("helo", _token(_MAX_NAME)), "IDENT": ("ident", _token(_MAX_NAME)),
    "SOURCE": ("source", _source),
}


def _xforward(call: VerbCall) -> Reply:
    if not call.trusted:
        raise CommandError(NOT_AUTHORIZED)
    pairs = _attributes("XFORWARD", call.argument, XForward.ATTRIBUTES)
    changes: dict[str, Any] = {}
    for name, value in pairs:
        field, parse = _FORWARD[name]
        if _unavailable(value, temporary=name == "NAME"):
            changes[field] = None
            continue
        try:
            changes[field] = parse(value)
        except ValueError:
            raise _syntax(f"Bad XFORWARD {name} syntax") from None
    session = call.session
    upcoming = session.transactions + 1  # XFORWARD is taken only outside a transaction: it is for the next one
    current = session.forwarded
    if current is None or current.transaction != upcoming:
        current = Forwarded(transaction=upcoming)  # attributes sent for an earlier message are forgotten
    session.forwarded = dataclasses.replace(current, **changes)
    return Reply(250, ("Ok",), "2.0.0")


class XForward(Extension):
    """XFORWARD: a trusted content filter names the client, HELO name, protocol, queue id and source of the
    next message as the upstream MTA saw them; the ``Received:`` field shows that client."""

    name = keyword = "XFORWARD"
    rfc = "Postfix XFORWARD_README"
    offer = Offer.TRUSTED
    ATTRIBUTES: Final = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
    verbs = (VerbSpec("XFORWARD", _xforward, line_allowance=LINE_ALLOWANCE, gated=False),)

    def ehlo_params(self, session: Session, settings: Any) -> str:
        return " ".join(self.ATTRIBUTES)
