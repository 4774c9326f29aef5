"""PROXY protocol v1/v2 in front of ESMTPFactory: no banner and no handler before the header; the header's address
everywhere after it (session.peer, connect, trace headers, per-address limits); untrusted, late and malformed
senders closed. In memory (StringTransport and task.Clock), except one loopback test of STARTTLS through the wrapper.
"""

from __future__ import annotations

import re
import socket
import struct
from pathlib import Path
from typing import Any

import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import alsoProvides, implementer

from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.core.trace import received_header
from esmtpkit.server.policy import Policy
from esmtpkit.server.proxy import (
    MAX_V2_LENGTH,
    Endpoint,
    HeaderReader,
    MalformedHeader,
    ProxyHeader,
    ProxyProtocolFactory,
    ReceivedHeader,
    parse_v1,
    parse_v2,
    twisted_address,
)
from esmtpkit.testing import RecordingHandler
from esmtpkit.server.tls import tls_info

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
GREETING = b"220 mx.test ESMTP Mail Server\r\n"
EHLO_REPLY = (b"250-mx.test x, pleased to meet you\r\n250-HELP\r\n250-PIPELINING\r\n250-SIZE 33554432\r\n"
              b"250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250 BINARYMIME\r\n")
V1_TCP4 = b"PROXY TCP4 192.0.2.10 198.51.100.1 51000 25\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::10 2001:db8::1 51000 25\r\n"


def v2(command: int = 1, family: int = 0x11, source: str = "192.0.2.10", destination: str = "198.51.100.1",
       ports: tuple[int, int] = (51000, 25), tlvs: bytes = b"", length: int | None = None) -> bytes:
    """A v2 header built by hand from the spec (§2.2), independent of the code under test."""
    if family >> 4 == 1:
        block = socket.inet_pton(socket.AF_INET, source) + socket.inet_pton(socket.AF_INET, destination)
        block += struct.pack("!HH", *ports)
    elif family >> 4 == 2:
        block = socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(socket.AF_INET6, destination)
        block += struct.pack("!HH", *ports)
    elif family >> 4 == 3:
        block = source.encode().ljust(108, b"\0") + destination.encode().ljust(108, b"\0")
    else:
        block = b""
    block += tlvs
    size = len(block) if length is None else length
    return SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", size) + block


class Link:
    """One proxied connection: a ProxyProtocolFactory over an ESMTPFactory of RecordingHandlers."""

    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000), policy: Policy | None = None,
                 clock: Clock | None = None, factory: ProxyProtocolFactory | None = None,
                 **options: Any) -> None:
        self.clock = clock if clock is not None else Clock()
        if factory is None:
            esmtp = ESMTPFactory(self._make_handler, policy=policy or Policy(hostname="mx.test"), clock=self.clock)
            factory = ProxyProtocolFactory(esmtp, clock=self.clock, **options)
        self.factory = factory
        self.handlers: list[RecordingHandler] = getattr(factory, "handlers", [])
        factory.handlers = self.handlers  # type: ignore[attr-defined]
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", *peer),
                                         hostAddress=IPv4Address("TCP", "127.0.0.1", 2525))
        self.protocol = factory.buildProtocol(self.transport.getPeer())
        self.protocol.makeConnection(self.transport)

    def _make_handler(self) -> RecordingHandler:
        self.handlers.append(RecordingHandler())
        return self.handlers[-1]

    def write(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lose(self) -> None:
        if self.protocol.transport is not None and not getattr(self, "_lost", False):
            self._lost = True
            self.protocol.connectionLost(Failure(ConnectionDone()))

    @property
    def handler(self) -> RecordingHandler:
        [handler] = self.handlers
        return handler


class ProxyTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.links: list[Link] = []
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def link(self, **kwargs: Any) -> Link:
        link = Link(**kwargs)
        self.links.append(link)
        return link

    def tearDown(self) -> None:
        for link in self.links:
            link.lose()
        for link in self.links:
            self.assertEqual(link.clock.getDelayedCalls(), [])

    def logged(self, text: str) -> bool:
        from twisted.logger import formatEvent

        return any(text in formatEvent(e) for e in self.events)

    def assert_refused(self, link: Link, written: bytes = b"") -> None:
        """Closed, having written only ``written``, with no protocol or handler built and no timer left."""
        self.assertEqual(link.transport.value(), written)
        self.assertTrue(link.transport.disconnecting)
        self.assertEqual(link.handlers, [])
        self.assertIsNone(link.protocol.wrappedProtocol)
        self.assertEqual(link.clock.getDelayedCalls(), [])


class AddressesTests(ProxyTestCase):
    """After the header, the client's address from it is everything's peer."""

    def test_nothing_before_the_header(self) -> None:
        """No banner, no handler, one timer: the server waits for the proxy to speak first."""
        link = self.link()
        self.assertEqual(link.transport.value(), b"")
        self.assertEqual(link.handlers, [])
        self.assertEqual(len(link.clock.getDelayedCalls()), 1)

    def test_v1_tcp4(self) -> None:
        link = self.link()
        link.write(V1_TCP4)
        self.assertEqual(link.transport.value(), GREETING)
        self.assertEqual(link.handler.verbs, ["connect"])
        session = link.handler.calls[0].args[0]
        self.assertEqual(session.peer, IPv4Address("TCP", "192.0.2.10", 51000))
        self.assertEqual(session.host, IPv4Address("TCP", "198.51.100.1", 25))
        self.assertEqual(session.peer_ip, "192.0.2.10")
        parsed = ProxyHeader(1, "PROXY", "TCP4", Endpoint("TCP4", "192.0.2.10", 51000),
                             Endpoint("TCP4", "198.51.100.1", 25), V1_TCP4[:-2])
        self.assertEqual(link.protocol.header, ReceivedHeader(1, session.peer, session.host, parsed))

    def test_v1_tcp6(self) -> None:
        link = self.link()
        link.write(V1_TCP6)
        self.assertEqual(link.transport.value(), GREETING)
        self.assertEqual(link.handler.session.peer, IPv6Address("TCP", "2001:db8::10", 51000))
        self.assertEqual(link.handler.session.host, IPv6Address("TCP", "2001:db8::1", 25))

    def test_v1_tcp6_text_is_normalised(self) -> None:
        """Uncompressed or upper-case IPv6 text becomes the one compressed spelling."""
        link = self.link()
        link.write(b"PROXY TCP6 2001:DB8:0:0:0:0:0:10 2001:db8::1 51000 25\r\n")
        self.assertEqual(link.handler.session.peer, IPv6Address("TCP", "2001:db8::10", 51000))

    def test_v2_tcp4(self) -> None:
        link = self.link()
        link.write(v2())
        self.assertEqual(link.transport.value(), GREETING)
        self.assertEqual(link.handler.session.peer, IPv4Address("TCP", "192.0.2.10", 51000))
        self.assertEqual(link.handler.session.host, IPv4Address("TCP", "198.51.100.1", 25))

    def test_v2_tcp6(self) -> None:
        """The session gets IPv6 in the compressed form a socket would give."""
        link = self.link()
        link.write(v2(family=0x21, source="2001:db8::10", destination="2001:db8::1"))
        self.assertEqual(link.transport.value(), GREETING)
        self.assertEqual(link.handler.session.peer, IPv6Address("TCP", "2001:db8::10", 51000))
        self.assertEqual(link.handler.session.host, IPv6Address("TCP", "2001:db8::1", 25))

    def test_v2_ipv4_mapped_becomes_ipv4(self) -> None:
        """::ffff:a.b.c.d is the IPv4 client a.b.c.d (one spelling for per-address limits and trace headers)."""
        link = self.link()
        link.write(v2(family=0x21, source="::ffff:192.0.2.10", destination="::ffff:198.51.100.1"))
        self.assertEqual(link.handler.session.peer, IPv4Address("TCP", "192.0.2.10", 51000))

    def test_v2_tlvs_are_skipped(self) -> None:
        tlvs = b"\x04\x00\x03abc" + b"\x05\x00\x02id"  # NOOP and UNIQUE_ID TLVs
        link = self.link()
        link.write(v2(tlvs=tlvs) + b"EHLO x\r\n")
        self.assertEqual(link.transport.value(), GREETING + EHLO_REPLY)
        self.assertEqual(link.handler.session.peer, IPv4Address("TCP", "192.0.2.10", 51000))

    def test_v2_unix_addresses_are_kept(self) -> None:
        """A client the proxy took on a UNIX socket: the session shows that (no IP, so peer_ip is empty)."""
        link = self.link()
        link.write(v2(family=0x31, source="/run/client", destination="/run/haproxy"))
        self.assertEqual(link.transport.value(), GREETING)
        self.assertEqual(link.handler.session.peer, UNIXAddress(b"/run/client"))
        self.assertEqual(link.handler.session.peer_ip, "")

    def test_handler_connect_sees_the_client(self) -> None:
        """The handler's connect() is called once, with session.peer already the header's source."""
        seen: list[Any] = []
        link = self.link()
        link.write(V1_TCP4)
        link.handler.replies["noop"] = lambda: seen.append(link.handler.session.peer) or (250, "OK")
        connect_session = link.handler.calls[0].args[0]
        self.assertEqual(connect_session.peer.host, "192.0.2.10")
        link.write(b"NOOP\r\n")
        self.assertEqual(seen, [IPv4Address("TCP", "192.0.2.10", 51000)])

    def test_wrapped_factory_builds_with_the_client_address(self) -> None:
        """buildProtocol(addr) of the wrapped factory gets the header's source, as Twisted's contract says."""
        clock = Clock()
        addrs: list[Any] = []

        class Recording(ESMTPFactory):
            def buildProtocol(self, addr: Any) -> Any:
                addrs.append(addr)
                return super().buildProtocol(addr)

        factory = ProxyProtocolFactory(Recording(RecordingHandler, policy=Policy(hostname="mx.test"), clock=clock),
                                       clock=clock)
        link = self.link(factory=factory, clock=clock)
        self.assertEqual(addrs, [])
        link.write(V1_TCP4)
        self.assertEqual(addrs, [IPv4Address("TCP", "192.0.2.10", 51000)])

    def test_received_header_names_the_client(self) -> None:
        link = self.link()
        link.write(v2() + b"EHLO client.test\r\n")
        header = received_header(link.handler.session, id="1", timestamp=0)
        self.assertIn(b"[192.0.2.10]", header)
        self.assertNotIn(b"127.0.0.1", header)

    def test_transport_addresses(self) -> None:
        """getPeer/getHost of the wrapper: the socket's before the header, the header's after."""
        link = self.link()
        self.assertEqual(link.protocol.getPeer(), IPv4Address("TCP", "127.0.0.1", 40000))
        link.write(V1_TCP4)
        self.assertEqual(link.protocol.getPeer(), IPv4Address("TCP", "192.0.2.10", 51000))
        self.assertEqual(link.protocol.getHost(), IPv4Address("TCP", "198.51.100.1", 25))


class LocalTests(ProxyTestCase):
    """Health checks (v2 LOCAL) and unknown families keep the socket's addresses and get a normal session."""

    def test_v2_local_health_check(self) -> None:
        link = self.link()
        link.write(v2(command=0, family=0x00))
        self.assertEqual(link.transport.value(), GREETING)
        self.assertEqual(link.handler.session.peer, IPv4Address("TCP", "127.0.0.1", 40000))
        self.assertEqual(link.handler.session.host, IPv4Address("TCP", "127.0.0.1", 2525))
        link.write(b"QUIT\r\n")
        self.assertEqual(link.transport.value(), GREETING + b"221 Closing connection\r\n")
        self.assertTrue(link.transport.disconnecting)

    def test_v2_local_ignores_an_address_block(self) -> None:
        """LOCAL with addresses (HAProxy checks may carry some): they are ignored (spec §2.2)."""
        link = self.link()
        link.write(v2(command=0, family=0x11))
        self.assertEqual(link.handler.session.peer, IPv4Address("TCP", "127.0.0.1", 40000))

    def test_v2_proxy_unspec(self) -> None:
        link = self.link()
        link.write(v2(command=1, family=0x00))
        self.assertEqual(link.transport.value(), GREETING)
        self.assertEqual(link.handler.session.peer, IPv4Address("TCP", "127.0.0.1", 40000))

    def test_v1_unknown(self) -> None:
        """Both spellings: bare, and followed by addresses the receiver must ignore (spec §2.1)."""
        for header in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\n"):
            link = self.link()
            link.write(header)
            self.assertEqual(link.transport.value(), GREETING, header)
            self.assertEqual(link.handler.session.peer, IPv4Address("TCP", "127.0.0.1", 40000))


class FramingTests(ProxyTestCase):
    """The header may arrive in any pieces; the bytes after it belong to SMTP."""

    def test_byte_by_byte(self) -> None:
        for header in (V1_TCP4, V1_TCP6, v2(), v2(family=0x21, source="2001:db8::10", destination="::1"),
                       v2(command=0, family=0x00)):
            link = self.link()
            data = header + b"EHLO x\r\n"
            for i in range(len(header) - 1):
                link.write(data[i:i + 1])
                self.assertEqual(link.transport.value(), b"", (header, i))
                self.assertEqual(link.handlers, [])
            link.write(data[len(header) - 1:len(header)])
            self.assertEqual(link.transport.value(), GREETING)
            for i in range(len(header), len(data)):
                link.write(data[i:i + 1])
            self.assertEqual(link.transport.value(), GREETING + EHLO_REPLY)

    def test_header_and_pipelined_commands_in_one_write(self) -> None:
        for header in (V1_TCP4, v2()):
            link = self.link()
            link.write(header + b"EHLO x\r\nNOOP\r\n")
            self.assertEqual(link.transport.value(), GREETING + EHLO_REPLY + b"250 2.0.0 OK\r\n")
            self.assertEqual(link.handler.verbs, ["connect", "ehlo", "noop"])

    def test_longest_v1_header(self) -> None:
        """107 bytes is the v1 limit (spec §2.1) and is accepted."""
        header = b"PROXY UNKNOWN " + b"f" * 91 + b"\r\n"
        self.assertEqual(len(header), 107)
        link = self.link()
        link.write(header)
        self.assertEqual(link.transport.value(), GREETING)

    def test_largest_v2_header(self) -> None:
        tlvs = b"\x04" + struct.pack("!H", MAX_V2_LENGTH - 12 - 3) + b"\0" * (MAX_V2_LENGTH - 12 - 3)
        link = self.link()
        link.write(v2(tlvs=tlvs))
        self.assertEqual(link.transport.value(), GREETING)

    def test_data_after_close_is_ignored(self) -> None:
        """Bytes that arrive after the wrapped protocol closed are not passed on (QUIT then more commands)."""
        link = self.link()
        link.write(V1_TCP4 + b"QUIT\r\nNOOP\r\n")
        self.assertEqual(link.transport.value(), GREETING + b"221 Closing connection\r\n")
        self.assertEqual(link.handler.verbs, ["connect", "quit"])


class RefusalTests(ProxyTestCase):
    """Untrusted, silent or malformed senders are closed before any protocol or handler exists."""

    def test_untrusted_source(self) -> None:
        """A header from anyone but a trusted proxy could claim any address: close at once, say nothing."""
        link = self.link(peer=("192.0.2.99", 40000))
        self.assert_refused(link)
        link.write(V1_TCP4 + b"EHLO x\r\n")
        self.assert_refused(link)
        self.assertTrue(self.logged("192.0.2.99:40000: not a trusted PROXY sender"))

    def test_trusted_networks(self) -> None:
        link = self.link(peer=("10.1.2.3", 40000), trusted=("10.0.0.0/8", "2001:db8::/32"))
        link.write(V1_TCP4)
        self.assertEqual(link.transport.value(), GREETING)
        self.assert_refused(self.link(peer=("127.0.0.1", 40000), trusted=("10.0.0.0/8",)))

    def test_timeout(self) -> None:
        link = self.link()
        link.write(V1_TCP4[:10])
        link.clock.advance(4.999)
        self.assertEqual(link.transport.value(), b"")
        link.clock.advance(0.001)
        self.assert_refused(link, b"421 4.4.2 PROXY header timeout\r\n")
        link.write(V1_TCP4[10:] + b"EHLO x\r\n")
        self.assert_refused(link, b"421 4.4.2 PROXY header timeout\r\n")
        self.assertTrue(self.logged("127.0.0.1:40000: no PROXY header within 5.0 s"))

    def test_timeout_setting(self) -> None:
        link = self.link(timeout=30)
        link.clock.advance(29.9)
        self.assertEqual(link.transport.value(), b"")
        link.clock.advance(0.1)
        self.assert_refused(link, b"421 4.4.2 PROXY header timeout\r\n")

    def test_no_timeout_once_the_header_is_in(self) -> None:
        """The header's timer stops; only the SMTP command timer (Policy.command_timeout) remains."""
        link = self.link()
        link.write(V1_TCP4)
        [timer] = link.clock.getDelayedCalls()
        self.assertEqual(timer.getTime(), 300.0)

    MALFORMED = {
        "SMTP instead of a header": b"EHLO x\r\n",
        "lower-case": b"proxy TCP4 192.0.2.10 198.51.100.1 51000 25\r\n",
        "unknown protocol": b"PROXY TCP5 192.0.2.10 198.51.100.1 51000 25\r\n",
        "missing port": b"PROXY TCP4 192.0.2.10 198.51.100.1 51000\r\n",
        "port not a number": b"PROXY TCP4 192.0.2.10 198.51.100.1 x 25\r\n",
        "port out of range": b"PROXY TCP4 192.0.2.10 198.51.100.1 65536 25\r\n",
        "negative port": b"PROXY TCP4 192.0.2.10 198.51.100.1 -1 25\r\n",
        "not an address": b"PROXY TCP4 mail.example 198.51.100.1 51000 25\r\n",
        "octet out of range": b"PROXY TCP4 192.0.2.256 198.51.100.1 51000 25\r\n",
        "IPv6 in TCP4": b"PROXY TCP4 2001:db8::10 2001:db8::1 51000 25\r\n",
        "IPv4 in TCP6": b"PROXY TCP6 192.0.2.10 198.51.100.1 51000 25\r\n",
        "not UTF-8": b"PROXY TCP4 192.0.2.\xff 198.51.100.1 51000 25\r\n",
        "no CRLF in 107 bytes": b"PROXY UNKNOWN " + b"f" * 93,
        "v1 with bare LF": b"PROXY TCP4 192.0.2.10 198.51.100.1 51000 25\n" + b"x" * 70,
        "v2 signature wrong": SIGNATURE[:11] + b"X" + b"\x21\x11\x00\x0c",
        "v2 version 1": SIGNATURE + b"\x11\x11\x00\x0c" + b"\0" * 12,
        "v2 command 2": SIGNATURE + b"\x22\x11\x00\x0c" + b"\0" * 12,
        "v2 datagram": v2(family=0x12),
        "v2 unknown family": v2(family=0x41, length=12) + b"\0" * 12,
        "v2 unknown transport": v2(family=0x13, length=12) + b"\0" * 12,
        "v2 address block short": v2(length=11)[:16] + b"\0" * 11,
        "v2 length over the limit": v2(length=MAX_V2_LENGTH + 1)[:16],
    }

    def test_malformed_headers(self) -> None:
        for name, data in self.MALFORMED.items():
            del self.events[:]
            link = self.link()
            link.write(data)
            self.assert_refused(link)
            self.assertTrue(self.logged("closed connection from 127.0.0.1:40000: "), name)

    def test_malformed_headers_byte_by_byte(self) -> None:
        """The same refusals when the bytes come one at a time."""
        for name, data in self.MALFORMED.items():
            link = self.link()
            for i in range(len(data)):
                link.write(data[i:i + 1])
            self.assert_refused(link)

    def test_not_a_header_is_refused_at_the_first_byte(self) -> None:
        """A client that speaks SMTP first is not kept waiting for the timeout."""
        for first in (b"E", b"\r\n\r\n\x01", b"PROXX"):
            link = self.link()
            link.write(first)
            self.assert_refused(link)

    def test_oversize_v2_is_refused_before_its_body(self) -> None:
        """The declared length is checked on the 16th byte: nothing more is buffered."""
        link = self.link()
        link.write(v2(length=0xFFFF)[:16])
        self.assert_refused(link)
        self.assertTrue(self.logged(f"v2 header declares 65535 bytes, more than {MAX_V2_LENGTH}"))

    def test_max_v2_length_setting(self) -> None:
        link = self.link(max_v2_length=12)
        link.write(v2(tlvs=b"\x04\x00\x00"))
        self.assert_refused(link)
        link = self.link(max_v2_length=12)
        link.write(v2())
        self.assertEqual(link.transport.value(), GREETING)

    def test_lost_before_the_header(self) -> None:
        link = self.link()
        link.write(V1_TCP4[:20])
        link.lose()
        self.assertEqual(link.clock.getDelayedCalls(), [])
        self.assertEqual(link.handlers, [])
        self.assertEqual(link.factory.protocols, {})

    def test_wrapped_factory_declines(self) -> None:
        """A wrapped factory whose buildProtocol returns None: the connection is closed."""
        clock = Clock()

        class Declining(ESMTPFactory):
            def buildProtocol(self, addr: Any) -> Any:
                return None

        factory = ProxyProtocolFactory(Declining(RecordingHandler, clock=clock), clock=clock)
        link = self.link(factory=factory, clock=clock)
        link.write(V1_TCP4)
        self.assert_refused(link)


class ConnectionLifeTests(ProxyTestCase):
    """The wrapper is a faithful transport once the wrapped protocol runs."""

    def test_per_client_limit_counts_the_real_client(self) -> None:
        """All sockets come from the proxy (127.0.0.1); the limit still tells clients apart."""
        clock = Clock()
        handlers: list[RecordingHandler] = []

        def make() -> RecordingHandler:
            handlers.append(RecordingHandler())
            return handlers[-1]

        esmtp = ESMTPFactory(make, policy=Policy(hostname="mx.test", max_connections_per_client=1), clock=clock)
        factory = ProxyProtocolFactory(esmtp, clock=clock)
        first = self.link(factory=factory, clock=clock)
        second = self.link(factory=factory, clock=clock, peer=("127.0.0.1", 40001))
        other = self.link(factory=factory, clock=clock, peer=("127.0.0.1", 40002))
        first.write(V1_TCP4)
        second.write(b"PROXY TCP4 192.0.2.10 198.51.100.1 51001 25\r\n")
        other.write(b"PROXY TCP4 192.0.2.11 198.51.100.1 51002 25\r\n")
        self.assertEqual(first.transport.value(), GREETING)
        self.assertEqual(second.transport.value(),
                         b"421 Too many connections from your address, try again later\r\n")
        self.assertTrue(second.transport.disconnecting)
        self.assertEqual(other.transport.value(), GREETING)
        self.assertEqual(sorted(esmtp._per_client), ["192.0.2.10", "192.0.2.11"])
        first.lose()
        self.assertEqual(sorted(esmtp._per_client), ["192.0.2.11"])

    def test_connection_lost_reaches_the_handler(self) -> None:
        """A transaction cut by the network: the handler gets abort(), the factory forgets the connection."""
        link = self.link()
        link.write(V1_TCP4 + b"EHLO x\r\nMAIL FROM:<a@example.org>\r\n")
        esmtp = link.factory.wrappedFactory
        self.assertEqual(len(esmtp.connections), 1)
        link.lose()
        self.assertEqual(link.handler.verbs[-1], "abort")
        self.assertEqual(esmtp.connections, set())
        self.assertEqual(link.factory.protocols, {})
        self.assertIsNone(link.protocol.wrappedProtocol)

    def test_backpressure_reaches_the_socket(self) -> None:
        """A pending handler result pauses the real transport (the wrapper relays pauseProducing)."""
        from twisted.internet.defer import Deferred

        link = self.link()
        pending: Deferred[Any] = Deferred()
        link.write(V1_TCP4)
        link.handler.replies["noop"] = lambda: pending
        link.write(b"NOOP\r\n")
        self.assertEqual(link.transport.producerState, "paused")
        pending.callback((250, "OK"))
        self.assertEqual(link.transport.producerState, "producing")
        self.assertEqual(link.transport.value(), GREETING + b"250 OK\r\n")

    def test_start_tls_shows_tls_on_the_wrapper(self) -> None:
        """After startTLS the wrapper provides ISSLTransport like the socket it wraps."""

        @implementer(ITLSTransport)
        class TLSCapable(StringTransport):
            def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
                self.tls_context = contextFactory
                alsoProvides(self, ISSLTransport)

        link = self.link()
        transport = TLSCapable(peerAddress=IPv4Address("TCP", "127.0.0.1", 40001))
        protocol = link.factory.buildProtocol(transport.getPeer())
        protocol.makeConnection(transport)
        protocol.dataReceived(V1_TCP4)
        self.assertTrue(ITLSTransport.providedBy(protocol))
        self.assertFalse(ISSLTransport.providedBy(protocol))
        protocol.startTLS("context")
        self.assertEqual(transport.tls_context, "context")
        self.assertTrue(ISSLTransport.providedBy(protocol))
        protocol.connectionLost(Failure(ConnectionDone()))


class FactoryTests(SynchronousTestCase):
    def esmtp(self, clock: Clock | None = None) -> ESMTPFactory:
        return ESMTPFactory(RecordingHandler, clock=clock)

    def test_is_trusted(self) -> None:
        factory = ProxyProtocolFactory(self.esmtp())
        trusted = [IPv4Address("TCP", "127.0.0.1", 1), IPv4Address("TCP", "127.9.8.7", 1),
                   IPv6Address("TCP", "::1", 1), IPv6Address("TCP", "::ffff:127.0.0.1", 1), UNIXAddress(b"/run/s")]
        untrusted = [IPv4Address("TCP", "192.0.2.1", 1), IPv6Address("TCP", "::2", 1),
                     IPv6Address("TCP", "::ffff:192.0.2.1", 1), IPv4Address("TCP", "not-an-ip", 1), None]
        for address in trusted:
            self.assertTrue(factory.is_trusted(address), address)
        for address in untrusted:
            self.assertFalse(factory.is_trusted(address), address)

    def test_trusted_accepts_one_string_and_network_objects(self) -> None:
        import ipaddress

        factory = ProxyProtocolFactory(self.esmtp(), trusted="10.0.0.0/8")
        self.assertEqual(factory.trusted, (ipaddress.ip_network("10.0.0.0/8"),))
        factory = ProxyProtocolFactory(self.esmtp(), trusted=[ipaddress.ip_network("::/0"), "192.0.2.7"])
        self.assertTrue(factory.is_trusted(IPv6Address("TCP", "2001:db8::1", 1)))
        self.assertTrue(factory.is_trusted(IPv4Address("TCP", "192.0.2.7", 1)))
        self.assertFalse(factory.is_trusted(IPv4Address("TCP", "192.0.2.8", 1)))

    def test_bad_settings(self) -> None:
        for kwargs in ({"trusted": ["10.0.0.5/8"]}, {"trusted": ["ten"]}, {"timeout": 0}, {"timeout": -1},
                       {"max_v2_length": 65536}):
            self.assertRaises(ValueError, ProxyProtocolFactory, self.esmtp(), **kwargs)

    def test_clock_comes_from_the_wrapped_factory(self) -> None:
        clock = Clock()
        self.assertIs(ProxyProtocolFactory(self.esmtp(clock)).clock, clock)
        other = Clock()
        self.assertIs(ProxyProtocolFactory(self.esmtp(clock), clock=other).clock, other)

    def test_start_and_stop_reach_the_wrapped_factory(self) -> None:
        calls: list[str] = []

        class Watched(ESMTPFactory):
            def startFactory(self) -> None:
                calls.append("start")

            def stopFactory(self) -> None:
                calls.append("stop")

        factory = ProxyProtocolFactory(Watched(RecordingHandler, clock=Clock()))
        factory.doStart()
        factory.doStop()
        self.assertEqual(calls, ["start", "stop"])
        self.assertEqual(factory.logPrefix(), "Watched (PROXY)")
        self.assertEqual(factory.buildProtocol(None).logPrefix(), "Watched (PROXY)")


class ReaderTests(SynchronousTestCase):
    """HeaderReader alone: I/O free, any split gives the same result."""

    CASES = [V1_TCP4, V1_TCP6, b"PROXY UNKNOWN\r\n", v2(), v2(family=0x21, source="2001:db8::10",
             destination="2001:db8::1"), v2(command=0, family=0x00), v2(tlvs=b"\x04\x00\x01x")]

    def test_whole(self) -> None:
        for header in self.CASES:
            found = HeaderReader().feed(header + b"rest")
            assert found is not None
            self.assertEqual(found[1], b"rest")

    def test_starts_afresh_after_a_header(self) -> None:
        reader = HeaderReader()
        first = reader.feed(V1_TCP4 + b"EHLO")
        self.assertEqual(first, (parse_v1(V1_TCP4[:-2]), b"EHLO"))
        self.assertEqual(reader.feed(v2()), (parse_v2(v2()), b""))

    def test_incomplete(self) -> None:
        for header in self.CASES:
            reader = HeaderReader()
            self.assertIsNone(reader.feed(b""))
            self.assertIsNone(reader.feed(header[:-1]))

    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from(CASES), st.binary(max_size=20), st.lists(st.integers(0, 200), max_size=8))
    def test_any_split(self, header: bytes, rest: bytes, cuts: list[int]) -> None:
        data = header + rest
        expected = HeaderReader().feed(data)
        reader = HeaderReader()
        points = sorted({min(c, len(data)) for c in cuts} | {len(data)})
        found = None
        start = 0
        for point in points:
            assert found is None
            found = reader.feed(data[start:point])
            if found is not None:
                found = (found[0], found[1] + data[point:])
                break
            start = point
        self.assertEqual(found, expected)

    def test_parsers(self) -> None:
        self.assertEqual(parse_v1(V1_TCP4[:-2]).source, Endpoint("TCP4", "192.0.2.10", 51000))
        self.assertEqual(parse_v2(v2()).destination, Endpoint("TCP4", "198.51.100.1", 25))
        self.assertRaises(MalformedHeader, parse_v1, b"PROXY")
        self.assertRaises(MalformedHeader, parse_v2, SIGNATURE)

    def test_twisted_addresses(self) -> None:
        """Each endpoint family becomes the Twisted address a socket of that kind would report."""
        self.assertEqual(twisted_address(Endpoint("TCP4", "192.0.2.10", 51000)),
                         IPv4Address("TCP", "192.0.2.10", 51000))
        self.assertEqual(twisted_address(Endpoint("TCP6", "2001:db8::10", 25)), IPv6Address("TCP", "2001:db8::10", 25))
        self.assertEqual(twisted_address(Endpoint("UNIX", "/run/client", 0)), UNIXAddress(b"/run/client"))
        self.assertEqual(twisted_address(Endpoint("UNIX", "/run/\udcff", 0)), UNIXAddress(b"/run/\xff"))
        received = ReceivedHeader.of(parse_v2(v2(command=0, family=0x11)))
        self.assertEqual((received.version, received.source, received.destination), (2, None, None))


class _StartTLSLine(LineReceiver):
    """A minimal server: greets, answers STARTTLS by starting TLS, answers PEER with what its transport shows."""

    delimiter = b"\r\n"

    def __init__(self, creator: Any) -> None:
        self.creator = creator

    def connectionMade(self) -> None:
        self.sendLine(b"220 ready")

    def lineReceived(self, line: bytes) -> None:
        if line == b"STARTTLS":
            self.sendLine(b"220 go ahead")
            self.transport.startTLS(self.creator)
        elif line == b"PEER":
            peer = self.transport.getPeer()
            cipher = tls_info(self.transport).get("cipher", "")
            ssl = ISSLTransport.providedBy(self.transport)
            self.sendLine(f"250 {peer.host} {peer.port} {ssl} {cipher}".encode())


@pytest_twisted.ensureDeferred
async def test_starttls_through_the_wrapper(tmp_path: Any) -> None:
    """On a real socket: header, then STARTTLS; the wrapper relays startTLS and shows TLS like the socket does."""
    import ssl

    from twisted.internet import reactor, threads
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory

    from esmtpkit.server.tls import ServerTLS
    from tests.certs import make_tls_files

    files = make_tls_files(tmp_path)
    creator = ServerTLS(files.cert, files.key)
    factory = ProxyProtocolFactory(Factory.forProtocol(lambda: _StartTLSLine(creator)), clock=reactor)
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)

    def client() -> list[bytes]:
        context = ssl.create_default_context(cafile=str(files.ca))
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as raw:
            reader = raw.makefile("rb")
            raw.sendall(V1_TCP4)
            seen = [reader.readline()]
            raw.sendall(b"PEER\r\nSTARTTLS\r\n")
            seen += [reader.readline(), reader.readline()]
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"PEER\r\n")
                seen.append(tls.makefile("rb").readline())
        return seen

    try:
        seen = await threads.deferToThread(client)
    finally:
        await port.stopListening()
    assert seen[:3] == [b"220 ready\r\n", b"250 192.0.2.10 51000 False \r\n", b"220 go ahead\r\n"]
    assert seen[3].startswith(b"250 192.0.2.10 51000 True TLS_")


class DocsTests(SynchronousTestCase):
    """The Python examples of docs/proxy.md run."""

    DOC = Path(__file__).resolve().parent.parent / "docs" / "proxy.md"

    def blocks(self) -> list[str]:
        return re.findall(r"```python\n(.*?)```", self.DOC.read_text(), re.S)

    def test_embedding_example(self) -> None:
        import ipaddress

        from twisted.internet.testing import MemoryReactor

        namespace: dict[str, Any] = {}
        exec(compile(self.blocks()[0], str(self.DOC), "exec"), namespace)
        reactor = MemoryReactor()
        namespace["listen"](reactor)
        [(port, factory, _, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (2525, ""))
        self.assertIsInstance(factory, ProxyProtocolFactory)
        self.assertEqual(factory.trusted, (ipaddress.ip_network("10.0.0.5/32"), ipaddress.ip_network("fd00::5/128")))
        self.assertIs(factory.clock, reactor)

    def test_testing_example(self) -> None:
        exec(compile(self.blocks()[1], str(self.DOC), "exec"), {})

    def test_options_documented(self) -> None:
        text = self.DOC.read_text()
        for option in ("--proxy-protocol", "--proxy-trusted NETWORK", "--proxy-timeout SECONDS"):
            self.assertIn(f"| `{option}` |", text)
        self.assertIn("at most 4096", text)
        self.assertEqual(MAX_V2_LENGTH, 4096)
