"""PROXY protocol v1/v2 in front of an SMTP factory: the real client's address is known before the banner.

A load balancer such as HAProxy sends one PROXY header (https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt)
before the client's bytes. `ProxyProtocolFactory` reads that header first and only then builds and connects the
wrapped protocol, so the greeting, the handler's ``connect``, trace headers and per-address limits all see the
client, not the proxy. Twisted's ``haproxy:`` endpoint connects the wrapped protocol at once: an SMTP server
would send its 220 before the header arrived and see the proxy's address in ``connectionMade``.

Field parsing is delegated to Twisted's parsers (``twisted.protocols.haproxy``); this module frames the header
(any split, bounded size), checks who may send one, times out, and validates and normalises the addresses.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any, Final, Iterable, Union

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from esmtpkit.core.reply import Reply

__all__ = ["ProxyProtocolFactory", "ProxyProtocolWrapper", "ProxyHeader", "HeaderReader", "MalformedHeader",
           "DEFAULT_TRUSTED", "DEFAULT_TIMEOUT", "MAX_V1_LENGTH", "MAX_V2_LENGTH", "HEADER_TIMEOUT"]

#: Proxies trusted when none are named: this host only.
DEFAULT_TRUSTED: Final = ("127.0.0.0/8", "::1/128")
#: Seconds a connection may take to send its header (the spec asks receivers to wait at least 3).
DEFAULT_TIMEOUT: Final = 5.0
#: Longest v1 header, CRLF included (spec §2.1: "PROXY UNKNOWN" with two IPv6 addresses and ports).
MAX_V1_LENGTH: Final = 107
#: Largest v2 address block plus TLVs we accept (the 16-byte fixed part not counted; the spec allows 65535).
MAX_V2_LENGTH: Final = 4096
#: Written when no complete header came in time (RFC 3463 §3.5: 4.4.2 bad connection).
HEADER_TIMEOUT: Final = Reply(421, ("PROXY header timeout",), "4.4.2")

_V1_PREFIX: Final = b"PROXY "
_V2_SIGNATURE: Final = V2Parser.PREFIX  # spec §2.2: \r\n\r\n\0\r\nQUIT\n
_V2_FIXED: Final = 16

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class MalformedHeader(ValueError):
    """The bytes are not a PROXY header we accept; the message says why (for the log)."""


@dataclass(frozen=True)
class ProxyHeader:
    """One parsed PROXY header.

    ``source``/``destination`` are the client's and the proxy's listening address, or None when the header
    carries none (v2 LOCAL for health checks, v2 UNSPEC, v1 UNKNOWN): the socket's own addresses then apply.
    ``raw`` is the header as received (a v1 line without its CRLF).
    """

    version: int
    source: IAddress | None
    destination: IAddress | None
    raw: bytes


class HeaderReader:
    """Collects one PROXY header from bytes arriving in any pieces (I/O free, so it can be fed byte by byte).

    ``feed`` returns None until the header is complete, then ``(header, bytes_after_it)`` and starts afresh; it
    raises `MalformedHeader` as soon as the bytes cannot start a header, or a header would pass the size limits.
    """

    def __init__(self, max_v2_length: int = MAX_V2_LENGTH) -> None:
        self.max_v2_length = max_v2_length
        self._buffer = b""

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        """Add ``data``; return the header and the bytes after it once the header is complete."""
        buffer = self._buffer = self._buffer + data
        if not buffer:
            return None
        found = self._v2(buffer) if buffer[:1] == _V2_SIGNATURE[:1] else self._v1(buffer)
        if found is not None:
            self._buffer = b""
        return found

    def _v1(self, buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
        if not buffer.startswith(_V1_PREFIX[:len(buffer)]):
            raise MalformedHeader("not a PROXY header")
        end = buffer.find(b"\r\n", 0, MAX_V1_LENGTH)
        if end < 0:
            if len(buffer) >= MAX_V1_LENGTH:
                raise MalformedHeader(f"v1 header longer than {MAX_V1_LENGTH} bytes")
            return None
        return parse_v1(buffer[:end]), buffer[end + 2:]

    def _v2(self, buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
        signature = buffer[:len(_V2_SIGNATURE)]
        if not _V2_SIGNATURE.startswith(signature):
            raise MalformedHeader("not a PROXY header")
        if len(buffer) < _V2_FIXED:
            return None
        version, command = buffer[12] >> 4, buffer[12] & 0x0F
        if version != 2 or command not in (0, 1):
            raise MalformedHeader(f"v2 header with version {version}, command {command}")
        length = struct.unpack("!H", buffer[14:16])[0]
        if length > self.max_v2_length:
            raise MalformedHeader(f"v2 header declares {length} bytes, more than {self.max_v2_length}")
        end = _V2_FIXED + length
        if len(buffer) < end:
            return None
        return parse_v2(buffer[:end]), buffer[end:]


def parse_v1(line: bytes) -> ProxyHeader:
    """A v1 header line (CRLF removed) as a `ProxyHeader`; `MalformedHeader` if invalid (spec §2.1)."""
    if line == b"PROXY UNKNOWN":  # the shortest valid v1 header; Twisted's parser wants more fields
        return ProxyHeader(1, None, None, line)
    try:
        info = V1Parser.parse(line)
    except (InvalidProxyHeader, ValueError) as e:  # int() of a bad port and bad UTF-8 are not converted
        raise MalformedHeader(f"invalid v1 header {line!r}") from e
    if info.source is None or info.destination is None:
        return ProxyHeader(1, None, None, line)
    family = 4 if line.startswith(b"PROXY TCP4 ") else 6
    return ProxyHeader(1, _tcp_address(info.source, family), _tcp_address(info.destination, family), line)


def parse_v2(header: bytes) -> ProxyHeader:
    """A complete v2 header (fixed part, addresses, TLVs) as a `ProxyHeader`; TLVs are skipped (spec §2.2)."""
    if len(header) < _V2_FIXED:
        raise MalformedHeader("v2 header shorter than 16 bytes")
    try:
        info = V2Parser.parse(header)
    except (InvalidProxyHeader, ValueError, LookupError, struct.error) as e:
        raise MalformedHeader(f"invalid v2 header {header[12:16].hex()}") from e
    source, destination = info.source, info.destination
    if source is None or destination is None:
        return ProxyHeader(2, None, None, header)
    if isinstance(source, UNIXAddress):
        return ProxyHeader(2, source, destination, header)
    if getattr(source, "type", None) != "TCP":
        raise MalformedHeader("v2 header for a datagram connection")
    family = 4 if isinstance(source, IPv4Address) else 6
    return ProxyHeader(2, _tcp_address(source, family), _tcp_address(destination, family), header)


def _tcp_address(address: Any, family: int) -> IPv4Address | IPv6Address:
    """A checked TCP address: a real IP of the announced family, a port in range; IPv6 text compressed,
    IPv4-mapped IPv6 turned into IPv4 (so one client has one spelling for per-address limits)."""
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError as e:
        raise MalformedHeader(f"not an IP address: {address.host!r}") from e
    port = address.port
    if ip.version != family or not 0 <= port <= 65535:
        raise MalformedHeader(f"bad TCP{family} address {address.host}:{port}")
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return IPv4Address("TCP", str(ip.ipv4_mapped), port)
        return IPv6Address("TCP", ip.compressed, port)
    return IPv4Address("TCP", str(ip), port)


def _ip_of(address: IAddress) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ProxyProtocolWrapper(ProtocolWrapper):
    """One connection: reads the PROXY header, then builds the wrapped protocol and becomes its transport.

    Until the header is complete nothing is written (no banner) and the wrapped protocol does not exist; after
    it, ``getPeer``/``getHost`` return the addresses from the header (the socket's own for LOCAL/UNKNOWN).
    """

    log = Logger()

    def __init__(self, factory: "ProxyProtocolFactory") -> None:
        self.factory = factory
        self.wrappedProtocol: IProtocol | None = None  # type: ignore[assignment]
        self.header: ProxyHeader | None = None
        self._reader: HeaderReader | None = HeaderReader(factory.max_v2_length)
        self._timer: IDelayedCall | None = None

    def logPrefix(self) -> str:
        return self.factory.logPrefix()

    def makeConnection(self, transport: Any) -> None:
        """Take the socket; unlike ProtocolWrapper, do not connect a wrapped protocol yet."""
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        self.factory.registerProtocol(self)
        peer = self.transport.getPeer()
        if not self.factory.is_trusted(peer):
            self.log.warn("closed connection from {peer}: not a trusted PROXY sender", peer=_show(peer))
            self.loseConnection()
            return
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._reader is None or self.disconnecting:
            return
        try:
            found = self._reader.feed(data)
        except MalformedHeader as e:
            self.log.warn("closed connection from {peer}: {why}", peer=_show(self.transport.getPeer()), why=e)
            self._give_up()
            return
        if found is None:
            return
        self.header, rest = found
        self._reader = None
        self._stop_timer()
        self._connect_wrapped(rest)

    def _connect_wrapped(self, rest: bytes) -> None:
        protocol = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if protocol is None:
            self.loseConnection()
            return
        self.wrappedProtocol = protocol
        protocol.makeConnection(self)
        if rest and not self.disconnecting:
            protocol.dataReceived(rest)

    def _timed_out(self) -> None:
        self._timer = None
        self.log.info("closed connection from {peer}: no PROXY header within {seconds} s",
                      peer=_show(self.transport.getPeer()), seconds=self.factory.timeout)
        self.transport.write(HEADER_TIMEOUT.render(enhanced=True))
        self._give_up()

    def _give_up(self) -> None:
        self._reader = None
        self._stop_timer()
        self.loseConnection()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        self._reader = None
        if self in self.factory.protocols:
            self.factory.unregisterProtocol(self)
        wrapped, self.wrappedProtocol = self.wrappedProtocol, None
        if wrapped is not None:
            wrapped.connectionLost(reason)

    def getPeer(self) -> IAddress:
        """The client's address from the header, else the socket's peer."""
        if self.header is not None and self.header.source is not None:
            return self.header.source
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        """The address the client connected to (the proxy's) from the header, else the socket's own."""
        if self.header is not None and self.header.destination is not None:
            return self.header.destination
        return self.transport.getHost()

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        """Start TLS on the socket and show the TLS interfaces it gains (ISSLTransport) on this transport too."""
        self.transport.startTLS(contextFactory, normal)
        directlyProvides(self, providedBy(self.transport))


class ProxyProtocolFactory(WrappingFactory):
    """Wrap a server factory so each connection must begin with a PROXY header (v1 or v2) from a trusted proxy.

    ``trusted``: networks (text like ``"10.0.0.0/8"`` or ``ipaddress`` networks) allowed to send headers; other
    sources are closed at once, silently, since their header could claim any address. UNIX-socket peers are
    trusted (file permissions decide who connects). ``timeout``: seconds to wait for a complete header before
    ``421 4.4.2``. ``clock`` defaults to the wrapped factory's ``clock`` attribute, else the global reactor.
    The wrapped factory's ``buildProtocol`` gets the client's address from the header.
    """

    protocol = ProxyProtocolWrapper  # type: ignore[assignment]
    noisy = False

    def __init__(self, wrapped_factory: Any, trusted: Iterable[str | Network] = DEFAULT_TRUSTED,
                 timeout: float = DEFAULT_TIMEOUT, clock: IReactorTime | None = None,
                 max_v2_length: int = MAX_V2_LENGTH) -> None:
        super().__init__(wrapped_factory)
        if isinstance(trusted, str):
            trusted = (trusted,)
        self.trusted: tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in trusted)
        if not timeout > 0:
            raise ValueError("the PROXY header timeout must be positive")
        if not 0 <= max_v2_length <= 65535:
            raise ValueError("max_v2_length must be 0-65535")
        self.timeout = float(timeout)
        self.max_v2_length = max_v2_length
        self._clock = clock

    @property
    def clock(self) -> IReactorTime:
        """The clock for header timeouts."""
        if self._clock is None:
            clock = getattr(self.wrappedFactory, "clock", None)
            if clock is None:
                from twisted.internet import reactor

                clock = reactor
            self._clock = clock
        return self._clock  # type: ignore[return-value]

    def is_trusted(self, address: IAddress) -> bool:
        """True if a connection from ``address`` may send a PROXY header."""
        if isinstance(address, UNIXAddress):
            return True
        ip = _ip_of(address)
        return ip is not None and any(ip.version == net.version and ip in net for net in self.trusted)

    def buildProtocol(self, addr: IAddress | None) -> ProxyProtocolWrapper:  # type: ignore[override]
        return self.protocol(self)

    def logPrefix(self) -> str:
        wrapped = self.wrappedFactory
        prefix = wrapped.logPrefix() if hasattr(wrapped, "logPrefix") else type(wrapped).__name__
        return f"{prefix} (PROXY)"


def _show(address: IAddress) -> str:
    host = getattr(address, "host", None)
    return f"{host}:{getattr(address, 'port', '')}" if host is not None else repr(address)
