"""STARTTLS (RFC 3207) and implicit TLS (RFC 8314) in the protocol, over a StringTransport that can start TLS.

The handshake itself is not run here (see test_ext_tls_loopback.py); `handshakeCompleted` is called by the test,
as Twisted calls it, with an OpenSSL connection that did a real handshake in memory behind the transport.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core.reply import Reply
from esmtpkit.server.sasl import portal_from_strings
from esmtpkit.core.rules import Phase
from esmtpkit.testing import RecordingHandler
from esmtpkit.server.tls import ServerTLS

from .certs import make_tls_files
from .support import CONTEXT, GREETING, ScratchPaths, TLSMixin, TLSStringTransport

TLS_EHLO = (b"250-mx.test client.test, pleased to meet you\r\n250-HELP\r\n250-PIPELINING\r\n250-SIZE 33554432\r\n"
            b"250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250-BINARYMIME\r\n")
READY = b"220 2.0.0 Ready to start TLS\r\n"


def handshaken(directory: Path) -> SSL.Connection:
    """The server side of a TLS connection whose handshake was completed in memory with a client."""
    files = make_tls_files(directory)
    server = SSL.Connection(ServerTLS(files.cert, files.key).options.getContext(), None)
    server.set_accept_state()
    client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    for _ in range(10):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
    assert server.get_cipher_name() is not None
    return server


class StartTLSTests(TLSMixin, ScratchPaths, SynchronousTestCase):
    def test_advertised(self) -> None:
        protocol, _ = self.connect()
        self.assertEqual(self.exchange(protocol, b"EHLO client.test\r\n"), TLS_EHLO + b"250 STARTTLS\r\n")

    def test_starttls(self) -> None:
        """220 2.0.0 first, then startTLS with the policy's context; HELO/EHLO is forgotten (RFC 3207 §4.2)."""
        protocol, transport = self.connect()
        self.exchange(protocol, b"EHLO client.test\r\n")
        self.assertEqual(self.exchange(protocol, b"STARTTLS\r\n"), READY)
        self.assertIs(transport.tls_context, CONTEXT)
        self.assertEqual(transport.tls_started_at, len(transport.value()))  # the 220 went out before TLS
        session = protocol.session
        self.assertEqual((session.tls, session.helo, session.esmtp, protocol.phase),
                         (True, None, False, Phase.CONNECTED))
        self.assertEqual(self.exchange(protocol, b"MAIL FROM:<a@example.org>\r\n"),
                         b"503 Send HELO/EHLO first\r\n")
        self.assertEqual(self.exchange(protocol, b"EHLO client.test\r\n"), TLS_EHLO.replace(b"250-BINARYMIME",
                                                                                           b"250 BINARYMIME"))
        self.assertEqual(self.exchange(protocol, b"STARTTLS\r\n"), b"503 5.5.1 TLS already active\r\n")
        self.assertEqual(session.with_protocol, "ESMTPS")
        self.assertEqual(protocol.handler.verbs, ["connect", "ehlo", "ehlo"])

    def test_before_ehlo(self) -> None:
        protocol, transport = self.connect()
        self.assertEqual(self.exchange(protocol, b"STARTTLS\r\n"), b"220 Ready to start TLS\r\n")
        self.assertIs(transport.tls_context, CONTEXT)

    def test_injection_defence(self) -> None:
        """STARTTLS and NOOP in one write: the NOOP was sent in plaintext and is never run, even after the
        handshake (RFC 3207 §4.2; CVE-2011-0411).
        """
        protocol, transport = self.connect()
        self.exchange(protocol, b"EHLO client.test\r\n")
        self.assertEqual(self.exchange(protocol, b"STARTTLS\r\nNOOP\r\n"), READY)
        transport.connection = handshaken(Path(self.mktemp()))
        protocol.handshakeCompleted()
        self.assertEqual(self.exchange(protocol, b"NOOP\r\n"), b"250 OK\r\n")
        self.assertEqual(transport.value(), GREETING + TLS_EHLO + b"250 STARTTLS\r\n" + READY + b"250 OK\r\n")
        self.assertEqual(protocol.handler.verbs, ["connect", "ehlo", "noop"])

    def test_injected_transaction_never_runs(self) -> None:
        protocol, transport = self.connect()
        self.exchange(protocol, b"EHLO client.test\r\n")
        wire = self.exchange(protocol, b"STARTTLS\r\nEHLO evil\r\nMAIL FROM:<evil@example.org>\r\n"
                                       b"RCPT TO:<victim@example.org>\r\nDATA\r\nSubject: forged\r\n\r\n.\r\n")
        self.assertEqual(wire, READY)
        self.assertEqual(protocol.handler.verbs, ["connect", "ehlo"])

    def test_injection_behind_a_pending_reply(self) -> None:
        """STARTTLS read only after an earlier NOOP's Deferred fires: what followed it is still dropped."""
        pending: Deferred[Any] = Deferred()
        protocol, transport = self.connect(RecordingHandler({"noop": lambda: pending}))
        self.exchange(protocol, b"EHLO client.test\r\n")
        self.assertEqual(self.exchange(protocol, b"NOOP\r\nSTARTTLS\r\nNOOP\r\n"), b"")
        self.assertIsNone(transport.tls_context)
        pending.callback(Reply.of(250, "OK"))
        self.assertTrue(transport.value().endswith(b"250 STARTTLS\r\n250 2.0.0 OK\r\n" + READY))
        self.assertIs(transport.tls_context, CONTEXT)
        self.assertEqual(protocol.handler.verbs, ["connect", "ehlo", "noop"])

    def test_handshake_fills_tls_info(self) -> None:
        protocol, transport = self.connect()
        self.exchange(protocol, b"STARTTLS\r\n")
        transport.connection = handshaken(Path(self.mktemp()))
        protocol.handshakeCompleted()
        info = protocol.session.tls_info
        self.assertEqual(set(info), {"version", "cipher", "bits"})
        self.assertEqual(info["version"], "TLSv1.3")

    def test_tls_info_without_the_handshake_event(self) -> None:
        """A wrapper that swallows handshakeCompleted: the EHLO after TLS fills tls_info all the same."""
        protocol, transport = self.connect()
        self.exchange(protocol, b"STARTTLS\r\n")
        transport.connection = handshaken(Path(self.mktemp()))
        self.exchange(protocol, b"EHLO client.test\r\n")
        self.assertEqual(protocol.session.tls_info["version"], "TLSv1.3")

    def test_syntax_and_order(self) -> None:
        protocol, transport = self.connect()
        self.exchange(protocol, b"EHLO client.test\r\n")
        self.assertEqual(self.exchange(protocol, b"STARTTLS now\r\n"), b"501 5.5.4 Syntax: STARTTLS\r\n")
        self.exchange(protocol, b"MAIL FROM:<a@example.org>\r\n")
        self.assertEqual(self.exchange(protocol, b"STARTTLS\r\n"),
                         b"503 5.5.1 STARTTLS not allowed during a mail transaction\r\n")
        self.assertIsNone(transport.tls_context)

    def test_transport_without_tls(self) -> None:
        protocol, _ = self.connect(transport=StringTransport())
        self.exchange(protocol, b"EHLO client.test\r\n")
        self.assertEqual(self.exchange(protocol, b"STARTTLS\r\n"),
                         b"454 4.7.0 TLS not available due to temporary reason\r\n")

    def test_require_tls(self) -> None:
        """RFC 3207 §4: with TLS required, MAIL before STARTTLS gets 530 5.7.0."""
        protocol, _ = self.connect(require_tls=True)
        self.exchange(protocol, b"EHLO client.test\r\n")
        self.assertEqual(self.exchange(protocol, b"MAIL FROM:<a@example.org>\r\n"),
                         b"530 5.7.0 Must issue a STARTTLS command first\r\n")
        self.exchange(protocol, b"STARTTLS\r\n")
        self.exchange(protocol, b"EHLO client.test\r\n")
        self.assertEqual(self.exchange(protocol, b"MAIL FROM:<a@example.org>\r\n"),
                         b"250 2.1.0 <a@example.org>, sender ok\r\n")

    def test_forgets_authentication(self) -> None:
        """AUTH over plaintext (allowed here), then STARTTLS: the identity is released and forgotten."""
        protocol, _ = self.connect(portal=portal_from_strings(["memory:alice:secret"]), auth_require_tls=False)
        self.exchange(protocol, b"EHLO client.test\r\n")
        self.assertEqual(self.exchange(protocol, b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"),
                         b"235 2.7.0 Authentication successful\r\n")
        self.exchange(protocol, b"STARTTLS\r\n")
        self.assertEqual((protocol.session.authenticated, protocol.session.auth_mechanism), (None, None))
        self.assertIsNone(protocol._identity)

    def test_not_configured(self) -> None:
        protocol, transport = self.connect(tls_context=None)
        wire = self.exchange(protocol, b"EHLO client.test\r\nSTARTTLS\r\n")
        self.assertTrue(wire.endswith(b"250 BINARYMIME\r\n500 5.5.2 Command unrecognized: STARTTLS\r\n"))
        self.assertIsNone(transport.tls_context)


class ImplicitTLSTests(TLSMixin, ScratchPaths, SynchronousTestCase):
    """An ``ssl:`` listener: TLS from the first byte (RFC 8314)."""

    def transport(self) -> TLSStringTransport:
        transport = TLSStringTransport()
        transport.connection = handshaken(Path(self.mktemp()))
        return transport

    def test_tls_from_the_start(self) -> None:
        protocol, transport = self.connect(transport=self.transport(), require_tls=True)
        self.assertTrue(protocol.session.tls)
        wire = self.exchange(protocol, b"EHLO client.test\r\nSTARTTLS\r\nMAIL FROM:<a@example.org>\r\n")
        self.assertEqual(wire, TLS_EHLO.replace(b"250-BINARYMIME", b"250 BINARYMIME")
                         + b"503 5.5.1 TLS already active\r\n250 2.1.0 <a@example.org>, sender ok\r\n")
        self.assertIsNone(transport.tls_context)
        self.assertEqual(protocol.session.tls_info["version"], "TLSv1.3")

    def test_without_a_starttls_context(self) -> None:
        """A listener with its own certificate and no --tls-cert: TLS all the same, STARTTLS unknown."""
        protocol, _ = self.connect(transport=self.transport(), tls_context=None)
        protocol.handshakeCompleted()
        self.assertEqual(protocol.session.tls_info["version"], "TLSv1.3")
        self.assertEqual(self.exchange(protocol, b"STARTTLS\r\n"), b"500 Command unrecognized: STARTTLS\r\n")
