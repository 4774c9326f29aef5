"""PROXY protocol v1/v2 in front of an SMTP factory: the real client's address is known before the banner.

A load balancer such as HAProxy sends one PROXY header (https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt)
before the client's bytes. `ProxyProtocolFactory` reads that header first and only then builds and connects the
wrapped protocol, so the greeting, the handler's ``connect``, trace headers and per-address limits all see the
client, not the proxy. Twisted's ``haproxy:`` endpoint connects the wrapped protocol at once: an SMTP server
would send its 220 before the header arrived and see the proxy's address in ``connectionMade``.

Framing and parsing are the pure `esmtpkit.core.proxy_header` (strict, bounded, any split); this module checks who
may send a header, times out, and turns the header's endpoints into Twisted addresses. Its names `ProxyHeader`,
`Endpoint`, `HeaderReader`, `MalformedHeader`, `parse_v1`, `parse_v2` and the size limits are importable from here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Final, Iterable, Union

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from esmtpkit.core.proxy_header import (
    MAX_V1_LENGTH,
    MAX_V2_LENGTH,
    Endpoint,
    HeaderReader,
    MalformedHeader,
    ProxyHeader,
    parse_v1,
    parse_v2,
)
from esmtpkit.core.reply import Reply

__all__ = ["ProxyProtocolFactory", "ProxyProtocolWrapper", "ReceivedHeader", "twisted_address", "ProxyHeader",
           "Endpoint", "HeaderReader", "MalformedHeader", "parse_v1", "parse_v2", "DEFAULT_TRUSTED",
           "DEFAULT_TIMEOUT", "MAX_V1_LENGTH", "MAX_V2_LENGTH", "HEADER_TIMEOUT"]

#: Proxies trusted when none are named: this host only.
DEFAULT_TRUSTED: Final = ("127.0.0.0/8", "::1/128")
#: Seconds a connection may take to send its header (the spec asks receivers to wait at least 3).
DEFAULT_TIMEOUT: Final = 5.0
#: Written when no complete header came in time (RFC 3463 §3.5: 4.4.2 bad connection).
HEADER_TIMEOUT: Final = Reply(421, ("PROXY header timeout",), "4.4.2")

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True)
class ReceivedHeader:
    """The PROXY header a connection began with, its endpoints as the Twisted addresses the connection reports.

    ``source``/``destination`` are what ``getPeer``/``getHost`` return, or None when the header carries none (v2
    LOCAL for health checks, v2 UNSPEC, v1 UNKNOWN): the socket's own addresses then apply. ``parsed`` is the
    header as `esmtpkit.core.proxy_header` read it.
    """

    version: int
    source: IAddress | None
    destination: IAddress | None
    parsed: ProxyHeader

    @classmethod
    def of(cls, header: ProxyHeader) -> ReceivedHeader:
        """The Twisted view of a parsed header."""
        source = None if header.source is None else twisted_address(header.source)
        destination = None if header.destination is None else twisted_address(header.destination)
        return cls(header.version, source, destination, header)


def twisted_address(endpoint: Endpoint) -> IPv4Address | IPv6Address | UNIXAddress:
    """A header's endpoint as a Twisted address: a TCP `IPv4Address`/`IPv6Address`, or a `UNIXAddress`."""
    if endpoint.family == "TCP4":
        return IPv4Address("TCP", endpoint.host, endpoint.port)
    if endpoint.family == "TCP6":
        return IPv6Address("TCP", endpoint.host, endpoint.port)
    return UNIXAddress(endpoint.host.encode("utf-8", "surrogateescape"))


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
    it, ``header`` is the `ReceivedHeader` and ``getPeer``/``getHost`` return the addresses from it (the socket's
    own for LOCAL/UNKNOWN).
    """

    log = Logger()

    def __init__(self, factory: "ProxyProtocolFactory") -> None:
        self.factory = factory
        self.wrappedProtocol: IProtocol | None = None  # type: ignore[assignment]
        self.header: ReceivedHeader | None = None
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
        parsed, rest = found
        self.header = ReceivedHeader.of(parsed)
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
