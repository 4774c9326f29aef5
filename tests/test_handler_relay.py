"""The Relay handler: who may relay, the upstream dialogue byte by byte, all or nothing, and the reply mapping.

Unit tests run the Relay's client (esmtpkit's own, `esmtpkit.client`) against a scripted upstream in memory
(StringTransport + Clock); the integration tests run an esmtpkit Relay in front of an esmtpkit Collecting server on
loopback.
"""

from __future__ import annotations

import base64
import io
import re
import smtplib
import socket
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings, strategies as st
from twisted.internet import threads
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint, ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from esmtpkit.client.options import ClientOptions
from esmtpkit.client.protocol import CHUNK_SIZE
from esmtpkit.client.session import Attempt, send
from esmtpkit.core.content import DotDecoder, dot_stuff, python_has_bare_newline
from esmtpkit.core.outbound import Message, Outcome, Recipient
from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.handlers import Collecting, MessageStore, Relay
from esmtpkit.handlers.relay import DEFAULT_NETWORKS, DotStuffer, parse_networks, relay_reply
from esmtpkit.server.interfaces import IMessageHandler
from esmtpkit.server.policy import Policy
from esmtpkit.core.session import Session
from esmtpkit.testing import Conversation, serve

from .certs import serve_implicit_tls
from .support import HandlerTestCase, RawClient

CONTENT = b"Subject: relayed\r\n\r\n.leading dot\r\n..two\r\n.\r\n8-bit \xe9\xff\r\n"
START = b"EHLO client.test\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"
#: The upstream's EHLO reply unless a test gives another: PIPELINING only.
PIPELINING = (b"250-up.test", b"250 PIPELINING")
#: An upstream offering every extension the client uses but STARTTLS and AUTH.
EVERYTHING = (b"250-up.test", b"250-PIPELINING", b"250-SIZE 10000000", b"250-8BITMIME", b"250-SMTPUTF8",
              b"250-CHUNKING", b"250-BINARYMIME", b"250 DSN")
#: Binary content: any octet, bare LFs and a dot line included, as BODY=BINARYMIME allows.
BINARY = b"Subject: binary\r\n\r\n\x00\x01\xff\n.\nMAIL FROM:<ceo@bank.example>\n\r\r.\r\n"


@implementer(ITLSTransport)
class UpstreamWire(StringTransport):
    """The relay's connection to the upstream: STARTTLS recorded (no handshake), the connection ending as soon as
    the relay closes it."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol: Any = None
        self.tls: Any = None
        self.aborted = False

    def startTLS(self, contextFactory: Any) -> None:
        self.tls = contextFactory

    def loseConnection(self) -> None:
        if not self.disconnecting:
            super().loseConnection()
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()

    def drop(self) -> None:
        """The upstream goes away."""
        self.disconnecting = True
        self.protocol.connectionLost(Failure(ConnectionLost("reset")))


@implementer(IStreamClientEndpoint)
class ScriptedUpstream:
    """An endpoint whose connection is an `UpstreamWire`: the test plays the upstream server by hand."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.connections = 0
        self.protocol: Any = None
        self.transport = UpstreamWire()

    def connect(self, factory: Any) -> "Deferred[Any]":
        self.connections += 1
        if self.refuse:
            return fail(ConnectionRefusedError("nobody listening"))
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 25))
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)

    def say(self, *lines: bytes) -> None:
        """Send reply lines to the client."""
        for line in lines:
            self.protocol.dataReceived(line + b"\r\n")

    def sent(self) -> bytes:
        """Bytes the client wrote since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return data


def filler(size: int) -> bytes:
    """``size`` octets of short ``x`` lines, each ending CRLF (``size`` is 0 or at least 2)."""
    lines, rest = divmod(size, 100)
    if rest == 1:
        lines, rest = lines - 1, 101
    return (b"x" * 98 + b"\r\n") * lines + (b"x" * (rest - 2) + b"\r\n" if rest else b"")


class Base(HandlerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.upstream = ScriptedUpstream()

    def relay(self, **settings: Any) -> Relay:
        settings.setdefault("reactor", self.clock)
        settings.setdefault("endpoint", self.upstream)
        settings.setdefault("trace", False)
        return Relay(**settings)

    def talk(self, handler: Relay, peer: tuple[str, int] = ("127.0.0.1", 40000), **policy: Any) -> Conversation:
        return self.conversation(handler, Policy(hostname="mx.test", **policy), clock=self.clock, peer=peer)

    def tearDown(self) -> None:
        super().tearDown()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def send_message(self, talk: Conversation, content: bytes = CONTENT,
                     recipients: tuple[str, ...] = ("bob@example.net",)) -> None:
        talk.write(b"EHLO client.test\r\nMAIL FROM:<alice@example.com>\r\n"
                   + b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in recipients) + b"DATA\r\n")
        talk.replies()
        talk.write(dot_stuff(content))

    def greet(self, *ehlo: bytes) -> bytes:
        """The upstream greets and answers EHLO (default: `PIPELINING`); what the relay sent next."""
        self.upstream.say(b"220 up.test ESMTP")
        self.assertEqual(self.upstream.sent(), b"EHLO mx.test\r\n")
        self.upstream.say(*(ehlo or PIPELINING))
        return self.upstream.sent()

    def answer_commands(self, sent: bytes = b"") -> bytes:
        """Play a willing upstream: 250 to each command, 354 to DATA; all the relay wrote up to its content's end.

        ``sent`` is what the relay wrote already (e.g. as `greet` returned it)."""
        wire = b""
        while b"\r\nDATA\r\n" not in b"\r\n" + wire:
            sent = sent or self.upstream.sent()
            self.assertTrue(sent, f"the relay is waiting: {wire!r}")
            wire += sent
            lines, sent = sent.split(b"\r\n")[:-1], b""
            for line in lines:
                self.upstream.say(b"354 go ahead" if line == b"DATA" else b"250 ok")
        return wire + self.upstream.sent()

    def finish_upstream(self) -> None:
        """QUIT once the outcome is known; the relay closes the connection after the upstream's 221."""
        self.assertEqual(self.upstream.sent(), b"QUIT\r\n")
        self.assertFalse(self.upstream.transport.disconnecting)
        self.upstream.say(b"221 2.0.0 Bye")
        self.assertTrue(self.upstream.transport.disconnecting)
        self.assertFalse(self.upstream.transport.aborted)

    def final(self, talk: Conversation) -> bytes:
        return talk.transport.value().split(b"\r\n")[-2]


class UpstreamDialogueTests(Base):
    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IMessageHandler, Relay()))

    def test_byte_exact_and_250_only_after_upstream(self) -> None:
        """Envelope and content go upstream unchanged, pipelined; the client's 250 waits for the upstream's."""
        talk = self.talk(self.relay())
        self.send_message(talk, CONTENT, ("bob@example.net", "postmaster"))
        self.assertEqual(talk.replies(), [])
        self.assertEqual(self.greet(), b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\n"
                                       b"RCPT TO:<postmaster>\r\nDATA\r\n")
        self.upstream.say(b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"250 2.1.5 Ok")
        self.assertEqual(self.upstream.sent(), b"")
        self.upstream.say(b"354 go ahead")
        self.assertEqual(self.upstream.sent(), dot_stuff(CONTENT))
        self.assertEqual(talk.replies(), [])
        self.upstream.say(b"250 2.0.0 Ok: queued as UP1")
        self.assertEqual(talk.replies(), [])
        self.finish_upstream()
        self.assertEqual(self.final(talk), b"250 2.0.0 Ok: relayed (Ok: queued as UP1)")

    def test_one_command_at_a_time_without_pipelining(self) -> None:
        talk = self.talk(self.relay())
        self.send_message(talk, CONTENT, ("bob@example.net", "postmaster"))
        self.assertEqual(self.greet(b"250 up.test"), b"MAIL FROM:<alice@example.com>\r\n")
        self.upstream.say(b"250 ok")
        self.assertEqual(self.upstream.sent(), b"RCPT TO:<bob@example.net>\r\n")
        self.upstream.say(b"250 ok")
        self.assertEqual(self.upstream.sent(), b"RCPT TO:<postmaster>\r\n")
        self.upstream.say(b"250 ok")
        self.assertEqual(self.upstream.sent(), b"DATA\r\n")
        self.upstream.say(b"354 go ahead")
        self.assertEqual(self.upstream.sent(), dot_stuff(CONTENT))
        self.upstream.say(b"250 ok")
        self.finish_upstream()
        self.assertEqual(self.final(talk), b"250 2.0.0 Ok: relayed (ok)")

    def test_parameters_passed_on(self) -> None:
        """SIZE (the spooled size, trace included) and BODY=8BITMIME go to an upstream offering them."""
        talk = self.talk(self.relay(trace=True))
        talk.write(b"EHLO client.test\r\nMAIL FROM:<alice@example.com> BODY=8BITMIME SIZE=50\r\n"
                   b"RCPT TO:<bob@example.net>\r\nDATA\r\n")
        talk.replies()
        talk.write(dot_stuff(CONTENT))
        wire = self.answer_commands(self.greet(*EVERYTHING))
        content = DotDecoder().feed(wire[wire.index(b"DATA\r\n") + 6:])
        self.assertTrue(wire.startswith(b"MAIL FROM:<alice@example.com> SIZE=%d BODY=8BITMIME\r\n" % len(content)),
                        wire)
        self.assertTrue(content.startswith(b"Received: ") and content.endswith(CONTENT))
        self.upstream.say(b"250 ok")
        self.finish_upstream()
        self.assertEqual(self.final(talk), b"250 2.0.0 Ok: relayed (ok)")

    def test_dot_stuffing_across_file_chunks(self) -> None:
        """Dots at the very start and right after a chunk boundary of the spooled file are stuffed too."""
        for content in (b".first line\r\n" + filler(CHUNK_SIZE - 13) + b".after\r\n",
                        b"\r\n" + filler(CHUNK_SIZE - 2) + b".on the boundary\r\n",
                        b"\r\n" + filler(CHUNK_SIZE - 3) + b"\r\n.split CRLF\r\n"):
            self.upstream = ScriptedUpstream()
            talk = self.talk(self.relay())
            self.send_message(talk, content)
            wire = self.answer_commands(self.greet())
            self.assertEqual(wire, b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"
                             + dot_stuff(content))
            self.upstream.say(b"250 ok")
            self.finish_upstream()
            self.assertEqual(self.final(talk), b"250 2.0.0 Ok: relayed (ok)")

    def test_trace_header_added(self) -> None:
        """With ``trace`` (the default) a Received field, without the AUTH identity, comes first."""
        relay = self.relay(trace=True)
        talk = self.talk(relay)
        talk.protocol.session.authenticated = "alice"
        self.send_message(talk, b"hi\r\n")
        wire = self.answer_commands(self.greet())
        body = wire[wire.index(b"DATA\r\n") + 6:]
        decoder = DotDecoder()
        content = decoder.feed(body)
        self.assertTrue(decoder.done)
        self.assertTrue(content.startswith(b"Received: from client.test (127.0.0.1 [127.0.0.1]) by mx.test with ESMTPA"))
        self.assertTrue(content.endswith(b"\r\nhi\r\n"))
        self.assertNotIn(b"alice", content)
        self.upstream.say(b"250 ok")
        self.finish_upstream()

    def test_logs_in_upstream_over_starttls(self) -> None:
        """``tls="starttls"`` with ``username``/``password``: STARTTLS (certificate checked), EHLO again, AUTH PLAIN."""
        talk = self.talk(self.relay(tls="starttls", username="relayuser", password="s3cret"))
        self.send_message(talk)
        self.assertEqual(self.greet(b"250-up.test", b"250 STARTTLS"), b"STARTTLS\r\n")
        self.upstream.say(b"220 2.0.0 go ahead")
        self.assertIsNotNone(self.upstream.transport.tls)
        self.assertEqual(self.upstream.sent(), b"EHLO mx.test\r\n")
        self.upstream.say(b"250-up.test", b"250 AUTH PLAIN LOGIN")
        self.assertEqual(self.upstream.sent(), b"AUTH PLAIN " + base64.b64encode(b"\0relayuser\0s3cret") + b"\r\n")
        self.upstream.say(b"235 2.7.0 ok")
        self.assertTrue(self.answer_commands().endswith(dot_stuff(CONTENT)))
        self.upstream.say(b"250 ok")
        self.finish_upstream()
        self.assertEqual(self.final(talk), b"250 2.0.0 Ok: relayed (ok)")

    def test_starttls_required(self) -> None:
        """``tls="starttls"`` and an upstream offering no STARTTLS: nothing is sent, 451 4.4.1."""
        talk = self.talk(self.relay(tls="starttls"))
        self.send_message(talk)
        self.assertEqual(self.greet(), b"QUIT\r\n")
        self.upstream.say(b"221 bye")
        reply = talk.replies()[-1]
        self.assertEqual((reply.code, reply.enhanced), (451, "4.4.1"))
        self.assertIn("TLS is required", reply.text)

    def test_opportunistic_tls(self) -> None:
        """``tls="opportunistic"``: STARTTLS when offered, in clear when not."""
        talk = self.talk(self.relay(tls="opportunistic"))
        self.send_message(talk)
        self.assertEqual(self.greet(b"250-up.test", b"250 STARTTLS"), b"STARTTLS\r\n")
        self.upstream.say(b"220 2.0.0 go ahead")
        self.assertIsNotNone(self.upstream.transport.tls)
        self.assertEqual(self.upstream.sent(), b"EHLO mx.test\r\n")
        self.upstream.say(*PIPELINING)
        self.assertTrue(self.answer_commands().endswith(dot_stuff(CONTENT)))
        self.upstream.say(b"250 ok")
        self.finish_upstream()
        self.assertEqual(self.final(talk), b"250 2.0.0 Ok: relayed (ok)")

        self.upstream = ScriptedUpstream()
        talk = self.talk(self.relay(tls="opportunistic"))
        self.send_message(talk)
        self.assertTrue(self.answer_commands(self.greet()).endswith(dot_stuff(CONTENT)))
        self.assertIsNone(self.upstream.transport.tls)
        self.upstream.say(b"250 ok")
        self.finish_upstream()
        self.assertEqual(self.final(talk), b"250 2.0.0 Ok: relayed (ok)")


class ReplyMappingTests(Base):
    def run_to_mail(self, talk: Conversation, recipients: tuple[str, ...] = ("bob@example.net",),
                    *ehlo: bytes) -> bytes:
        """Up to the point where the upstream must answer MAIL FROM; what the relay sent."""
        self.send_message(talk, CONTENT, recipients)
        sent = self.greet(*ehlo)
        self.assertTrue(sent.startswith(b"MAIL FROM:<alice@example.com>\r\n"), sent)
        return sent

    def to_data_end(self, talk: Conversation) -> None:
        self.assertTrue(self.answer_commands(self.run_to_mail(talk)).endswith(b"DATA\r\n" + dot_stuff(CONTENT)))

    def test_permanent_refusal_of_the_message(self) -> None:
        """5xx after the data: 554 with the upstream's enhanced code and text."""
        talk = self.talk(self.relay())
        self.to_data_end(talk)
        self.upstream.say(b"550 5.7.1 Content rejected")
        self.finish_upstream()
        self.assertEqual(self.final(talk), b"554 5.7.1 Upstream said: 550 Content rejected")

    def test_permanent_refusal_without_enhanced_code(self) -> None:
        talk = self.talk(self.relay())
        self.to_data_end(talk)
        self.upstream.say(b"554 Go away")
        self.finish_upstream()
        self.assertEqual(self.final(talk), b"554 5.0.0 Upstream said: 554 Go away")

    def test_temporary_refusal_of_the_message(self) -> None:
        """4xx after the data: 451 4.4.1, the client keeps the message and retries."""
        talk = self.talk(self.relay())
        self.to_data_end(talk)
        self.upstream.say(b"452 4.3.1 Insufficient storage")
        self.finish_upstream()
        self.assertEqual(self.final(talk), b"451 4.4.1 Upstream said: 452 Insufficient storage")

    def test_sender_refused(self) -> None:
        talk = self.talk(self.relay())
        self.run_to_mail(talk)
        self.upstream.say(b"553 5.1.8 Bad sender", b"503 5.5.1 Need MAIL", b"503 5.5.1 Need RCPT")
        self.finish_upstream()
        self.assertEqual(self.final(talk), b"554 5.1.8 Upstream said: 553 Bad sender")

    def test_all_recipients_refused(self) -> None:
        talk = self.talk(self.relay())
        self.run_to_mail(talk, ("bob@example.net", "carol@example.net"))
        self.upstream.say(b"250 ok", b"550 5.1.1 No such user", b"550 5.1.1 No such user",
                          b"554 5.5.1 No valid recipients")
        self.finish_upstream()
        self.assertEqual(self.final(talk), b"554 5.1.1 Upstream said: 550 No such user")

    def test_some_recipients_refused_pipelined(self) -> None:
        """All or nothing, pipelined: DATA got 354, so the relay closes the connection without the final dot and
        the upstream discards the transaction; nobody gets a copy the client was not told about."""
        talk = self.talk(self.relay())
        self.assertEqual(self.run_to_mail(talk, ("bob@example.net", "carol@example.net")),
                         b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\n"
                         b"RCPT TO:<carol@example.net>\r\nDATA\r\n")
        self.upstream.say(b"250 ok", b"250 ok", b"550 5.1.1 No such user")
        self.assertEqual(talk.replies(), [])
        self.upstream.say(b"354 go ahead")
        self.assertEqual(self.upstream.sent(), b"")
        self.assertTrue(self.upstream.transport.disconnecting)
        self.assertEqual(self.final(talk),
                         b"554 5.1.1 Upstream refused recipient(s): <carol@example.net>: 550 No such user")

    def test_some_recipients_refused_one_at_a_time(self) -> None:
        """All or nothing, without pipelining: no DATA at all, QUIT."""
        talk = self.talk(self.relay())
        self.run_to_mail(talk, ("bob@example.net", "carol@example.net"), b"250 up.test")
        self.upstream.say(b"250 ok")
        self.assertEqual(self.upstream.sent(), b"RCPT TO:<bob@example.net>\r\n")
        self.upstream.say(b"550 5.1.1 No such user")
        self.assertEqual(self.upstream.sent(), b"RCPT TO:<carol@example.net>\r\n")
        self.upstream.say(b"250 ok")
        self.finish_upstream()
        self.assertEqual(self.final(talk),
                         b"554 5.1.1 Upstream refused recipient(s): <bob@example.net>: 550 No such user")

    def test_some_recipients_deferred(self) -> None:
        """A 4xx for any recipient makes the whole message temporary; the pipelined DATA's 354 is not answered."""
        talk = self.talk(self.relay())
        self.run_to_mail(talk, ("bob@example.net", "carol@example.net", "dave@example.net"))
        self.upstream.say(b"250 ok", b"450 4.2.0 Mailbox busy", b"550 5.1.1 No such user", b"250 ok",
                          b"354 go ahead")
        self.assertEqual(self.upstream.sent(), b"")
        self.assertTrue(self.upstream.transport.disconnecting)
        self.assertEqual(self.final(talk), b"451 4.4.1 Upstream refused recipient(s): "
                                           b"<bob@example.net>: 450 Mailbox busy; <carol@example.net>: 550 No such user")

    def test_some_recipients_refused_before_bdat(self) -> None:
        """All or nothing with BDAT (binary content): no chunk is sent once a recipient was refused."""
        talk = self.talk(self.relay())
        talk.write(b"EHLO client.test\r\nMAIL FROM:<alice@example.com> BODY=BINARYMIME\r\n"
                   b"RCPT TO:<bob@example.net>\r\nRCPT TO:<carol@example.net>\r\nBDAT %d LAST\r\n" % len(BINARY)
                   + BINARY)
        self.assertEqual(self.greet(*EVERYTHING),
                         b"MAIL FROM:<alice@example.com> SIZE=%d BODY=BINARYMIME\r\nRCPT TO:<bob@example.net>\r\n"
                         b"RCPT TO:<carol@example.net>\r\n" % len(BINARY))
        self.upstream.say(b"250 ok", b"250 ok", b"450 4.2.1 Try later")
        self.finish_upstream()
        self.assertEqual(self.final(talk),
                         b"451 4.4.1 Upstream refused recipient(s): <carol@example.net>: 450 Try later")

    def test_connection_refused(self) -> None:
        """Nobody listening upstream: 451 4.4.1."""
        self.upstream = ScriptedUpstream(refuse=True)
        talk = self.talk(self.relay())
        self.send_message(talk)
        self.assertEqual(self.final(talk), b"451 4.4.1 Upstream 127.0.0.1:25 unavailable, try again later "
                                           b"(connection refused by 127.0.0.1)")

    def test_upstream_closes_mid_dialogue(self) -> None:
        talk = self.talk(self.relay())
        self.to_data_end(talk)
        self.upstream.transport.drop()
        reply = talk.replies()[-1]
        self.assertEqual((reply.code, reply.enhanced), (451, "4.4.1"))
        self.assertIn("lost connection", reply.text)

    def test_upstream_refuses_service(self) -> None:
        """A 554 greeting is the upstream's trouble, not the message's: 451 so the client retries."""
        talk = self.talk(self.relay())
        self.send_message(talk)
        self.upstream.say(b"554 5.3.2 Not now")
        self.finish_upstream()
        reply = talk.replies()[-1]
        self.assertEqual((reply.code, reply.enhanced), (451, "4.4.1"))
        self.assertIn("Not now", reply.text)

    def test_upstream_silent(self) -> None:
        """No answer within ``timeout``: the upstream connection is dropped and the client gets 451 4.4.1."""
        talk = self.talk(self.relay(timeout=30))
        self.send_message(talk)
        self.upstream.say(b"220 up.test ESMTP")
        self.clock.advance(29)
        self.assertEqual(talk.replies(), [])
        self.clock.advance(2)
        self.assertTrue(self.upstream.transport.aborted)
        reply = talk.replies()[-1]
        self.assertEqual((reply.code, reply.enhanced), (451, "4.4.1"))
        self.assertIn("timed out", reply.text)

    def test_auth_required_but_not_offered(self) -> None:
        talk = self.talk(self.relay(tls="starttls", username="u", password="p"))
        self.send_message(talk)
        self.assertEqual(self.greet(b"250-up.test", b"250 STARTTLS"), b"STARTTLS\r\n")
        self.upstream.say(b"220 go ahead")
        self.assertEqual(self.upstream.sent(), b"EHLO mx.test\r\n")
        self.upstream.say(b"250 up.test")
        self.finish_upstream()
        reply = talk.replies()[-1]
        self.assertEqual((reply.code, reply.enhanced), (451, "4.4.1"))
        self.assertIn("authentication", reply.text)

    def test_client_leaves_while_relaying(self) -> None:
        """The client drops while the upstream is busy: the send finishes; nothing crashes or leaks."""
        talk = self.talk(self.relay())
        sent = self.run_to_mail(talk)
        talk.protocol.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(self.answer_commands(sent).endswith(dot_stuff(CONTENT)))
        self.upstream.say(b"250 ok")
        self.finish_upstream()

    def test_long_upstream_text_is_clipped(self) -> None:
        """However long the upstream's reply, the client's reply line stays short (RFC 5321 §4.5.3.1.5)."""
        talk = self.talk(self.relay())
        self.to_data_end(talk)
        self.upstream.say(*[b"550-5.7.1 " + b"y" * 1000] * 5, b"550 5.7.1 end")
        self.finish_upstream()
        final = self.final(talk)
        self.assertTrue(final.startswith(b"554 5.7.1 Upstream said: 550 yyy") and final.endswith(b"..."), final)
        self.assertLess(len(final), 512)


class InternationalAndBinaryTests(Base):
    """SMTPUTF8 and BODY=BINARYMIME are accepted and passed on to an upstream offering them."""

    def test_smtputf8_passed_on(self) -> None:
        talk = self.talk(self.relay())
        talk.write("EHLO client.test\r\nMAIL FROM:<jörg@example.org> SMTPUTF8\r\nRCPT TO:<ü@example.net>\r\n"
                   "DATA\r\n")
        self.assertEqual([r.code for r in talk.replies()], [250, 250, 250, 354])
        talk.write(dot_stuff(CONTENT))
        wire = self.answer_commands(self.greet(b"250-up.test", b"250-PIPELINING", b"250 SMTPUTF8"))
        self.assertEqual(wire, "MAIL FROM:<jörg@example.org> SMTPUTF8\r\nRCPT TO:<ü@example.net>\r\nDATA\r\n"
                         .encode() + dot_stuff(CONTENT))
        self.upstream.say(b"250 ok")
        self.finish_upstream()
        self.assertEqual(self.final(talk), b"250 2.0.0 Ok: relayed (ok)")

    def test_smtputf8_upstream_without_it(self) -> None:
        """An upstream not offering SMTPUTF8 is sent nothing; the client gets the permanent 5.6.7 (RFC 6531 §3.2)."""
        talk = self.talk(self.relay())
        talk.write("EHLO client.test\r\nMAIL FROM:<alice@example.com> SMTPUTF8\r\nRCPT TO:<ü@example.net>\r\n"
                   "DATA\r\n")
        talk.replies()
        talk.write(dot_stuff(CONTENT))
        self.assertEqual(self.greet(), b"QUIT\r\n")
        self.upstream.say(b"221 bye")
        reply = talk.replies()[-1]
        self.assertEqual((reply.code, reply.enhanced), (554, "5.6.7"))
        self.assertTrue(reply.text.startswith("Upstream 127.0.0.1:25 cannot take this message: SMTPUTF8 is "
                                              "required"), reply.text)

    def test_binarymime_goes_in_bdat(self) -> None:
        """Binary content goes as it came, in BDAT (RFC 3030 §3), to an upstream offering CHUNKING and BINARYMIME."""
        talk = self.talk(self.relay())
        talk.write(b"EHLO client.test\r\nMAIL FROM:<alice@example.com> BODY=BINARYMIME\r\n"
                   b"RCPT TO:<bob@example.net>\r\nBDAT %d LAST\r\n" % len(BINARY) + BINARY)
        self.assertEqual([r.code for r in talk.replies()], [250, 250, 250])  # EHLO, MAIL, RCPT: BDAT LAST waits
        self.assertEqual(self.greet(*EVERYTHING),
                         b"MAIL FROM:<alice@example.com> SIZE=%d BODY=BINARYMIME\r\nRCPT TO:<bob@example.net>\r\n"
                         % len(BINARY))
        self.upstream.say(b"250 ok", b"250 ok")
        self.assertEqual(self.upstream.sent(), b"BDAT %d LAST\r\n" % len(BINARY) + BINARY)
        self.upstream.say(b"250 2.0.0 Ok: queued")
        self.finish_upstream()
        self.assertEqual(self.final(talk), b"250 2.0.0 Ok: relayed (Ok: queued)")

    def test_binarymime_upstream_without_it(self) -> None:
        """An upstream without BINARYMIME: nothing sent (no MIME conversion here), permanent 5.6.3."""
        talk = self.talk(self.relay())
        talk.write(b"EHLO client.test\r\nMAIL FROM:<alice@example.com> BODY=BINARYMIME\r\n"
                   b"RCPT TO:<bob@example.net>\r\nBDAT %d LAST\r\n" % len(BINARY) + BINARY)
        self.assertEqual(self.greet(b"250-up.test", b"250-PIPELINING", b"250-8BITMIME", b"250 CHUNKING"),
                         b"QUIT\r\n")
        self.upstream.say(b"221 bye")
        reply = talk.replies()[-1]
        self.assertEqual((reply.code, reply.enhanced), (554, "5.6.3"))
        self.assertIn("BINARYMIME", reply.text)

    def test_size_over_the_upstream_limit(self) -> None:
        talk = self.talk(self.relay())
        self.send_message(talk)
        self.assertEqual(self.greet(b"250-up.test", b"250 SIZE 10"), b"QUIT\r\n")
        self.upstream.say(b"221 bye")
        reply = talk.replies()[-1]
        self.assertEqual((reply.code, reply.enhanced), (554, "5.3.4"))


class LineEndTests(Base):
    """Nothing a lenient upstream could read as a line end, or as the end of the data, goes upstream but CRLF."""

    SMUGGLED = (b"Subject: hello\r\n\r\nhello\n.\nMAIL FROM:<ceo@bank.example>\nRCPT TO:<victim@example.net>\n"
                b"DATA\nSubject: forged\n\nsend money\r.\r\n")

    def relay_content(self, talk: Conversation, commands: bytes, content: bytes) -> bytes:
        """Send ``commands`` and ``content`` as given; play the upstream; the octets it got after DATA."""
        talk.write(commands + content)
        wire = self.answer_commands(self.greet())
        self.upstream.say(b"250 ok")
        self.finish_upstream()
        self.assertEqual(self.final(talk), b"250 2.0.0 Ok: relayed (ok)")
        head = b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"
        self.assertTrue(wire.startswith(head), wire)
        return wire[len(head):]

    def test_bare_line_ends_in_data(self) -> None:
        """Allowed in by ``bare_newline="allow"``, bare LF and CR go upstream as CRLF, stuffed where dot-led."""
        talk = self.talk(self.relay(), bare_newline="allow")
        sent = self.relay_content(talk, START, self.SMUGGLED + b".\r\n")
        self.assertEqual(sent, b"Subject: hello\r\n\r\nhello\r\n..\r\nMAIL FROM:<ceo@bank.example>\r\n"
                               b"RCPT TO:<victim@example.net>\r\nDATA\r\nSubject: forged\r\n\r\nsend money\r\n"
                               b"..\r\n.\r\n")

    def test_bdat_without_final_line_end(self) -> None:
        """BDAT content may end anywhere (RFC 3030 §2): the data still ends CRLF before the dot."""
        for last, ending in ((b"no line end", b"no line end\r\n"), (b"bare LF\n", b"bare LF\r\n"),
                             (b"bare CR\r", b"bare CR\r\n"), (b"CRLF\r\n", b"CRLF\r\n")):
            self.upstream = ScriptedUpstream()
            content = b"Subject: bdat\r\n\r\n" + last
            talk = self.talk(self.relay(), bare_newline="allow")
            sent = self.relay_content(talk, b"EHLO client.test\r\nMAIL FROM:<alice@example.com> BODY=8BITMIME\r\n"
                                      b"RCPT TO:<bob@example.net>\r\nBDAT %d LAST\r\n" % len(content), content)
            self.assertEqual(sent, b"Subject: bdat\r\n\r\n" + ending + b".\r\n")


class DSNTests(Base):
    """RFC 3461 §5.2.1: DSN parameters go upstream with MAIL and RCPT only when the upstream offers DSN."""

    ENVELOPE = (b"EHLO client.test\r\nMAIL FROM:<alice@example.com> RET=hdrs ENVID=QQ+2B314\r\n"
                b"RCPT TO:<bob@example.net> NOTIFY=delay,failure ORCPT=rfc822;b+2Bx@example.org\r\n"
                b"RCPT TO:<carol@example.net> NOTIFY=NEVER\r\nRCPT TO:<postmaster>\r\nDATA\r\n")

    def start(self, *ehlo: bytes) -> tuple[Conversation, bytes]:
        talk = self.talk(self.relay(), dsn=True)
        talk.write(self.ENVELOPE)
        self.assertEqual([r.code for r in talk.replies()], [250, 250, 250, 250, 250, 354])
        talk.write(dot_stuff(CONTENT))
        self.upstream.say(b"220 up.test ESMTP")
        self.assertEqual(self.upstream.sent(), b"EHLO mx.test\r\n")
        self.upstream.say(*ehlo)
        return talk, self.upstream.sent()

    def envelope_sent(self, sent: bytes) -> bytes:
        wire = self.answer_commands(sent)
        self.assertTrue(wire.endswith(b"DATA\r\n" + dot_stuff(CONTENT)))
        return wire[:wire.index(b"DATA\r\n")]

    def finish(self, talk: Conversation) -> None:
        self.upstream.say(b"250 ok")
        self.finish_upstream()
        self.assertEqual(self.final(talk), b"250 2.0.0 Ok: relayed (ok)")

    def test_passed_on_when_offered(self) -> None:
        """RET, ENVID (re-encoded as xtext), NOTIFY and ORCPT go upstream in canonical form."""
        talk, sent = self.start(b"250-up.test", b"250-PIPELINING", b"250 dsn")
        self.assertEqual(self.envelope_sent(sent),
                         b"MAIL FROM:<alice@example.com> RET=HDRS ENVID=QQ+2B314\r\n"
                         b"RCPT TO:<bob@example.net> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b+2Bx@example.org\r\n"
                         b"RCPT TO:<carol@example.net> NOTIFY=NEVER\r\nRCPT TO:<postmaster>\r\n")
        self.finish(talk)

    def test_left_out_when_not_offered(self) -> None:
        """An upstream without DSN gets the bare commands (a DSN parameter would be refused with 555)."""
        talk, sent = self.start(b"250-DSNX.up.test", b"250-PIPELINING", b"250 8BITMIME")
        self.assertEqual(self.envelope_sent(sent),
                         b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\n"
                         b"RCPT TO:<carol@example.net>\r\nRCPT TO:<postmaster>\r\n")
        self.finish(talk)

    def test_left_out_after_helo_fallback(self) -> None:
        """An upstream that refuses EHLO offers no extensions: HELO, then the bare commands."""
        talk, sent = self.start(b"502 5.5.1 EHLO not implemented")
        self.assertEqual(sent, b"HELO mx.test\r\n")
        self.upstream.say(b"250 up.test")
        self.assertEqual(self.envelope_sent(b""),
                         b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\n"
                         b"RCPT TO:<carol@example.net>\r\nRCPT TO:<postmaster>\r\n")
        self.finish(talk)

    def test_only_mail_parameters(self) -> None:
        """ENVID alone on MAIL, nothing on RCPT: only what the client gave is passed on."""
        talk = self.talk(self.relay(), dsn=True)
        talk.write(b"EHLO client.test\r\nMAIL FROM:<> ENVID=a+3Db\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
        talk.replies()
        talk.write(dot_stuff(CONTENT))
        wire = self.answer_commands(self.greet(b"250-up.test", b"250-PIPELINING", b"250 DSN"))
        self.assertEqual(wire[:wire.index(b"DATA\r\n")], b"MAIL FROM:<> ENVID=a+3Db\r\nRCPT TO:<bob@example.net>\r\n")
        self.finish(talk)


class AllOrNothingClientTests(SynchronousTestCase):
    """``ClientOptions(all_or_nothing=True)`` on the wire, through `send`: the refused recipients' outcomes are
    the upstream's; the accepted ones are held back (temporary, not a session failure)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.upstream = ScriptedUpstream()
        self.message = Message("Q1", "a@example.org", [Recipient("b@example.net"), Recipient("c@example.net")],
                               size=len(CONTENT))
        self.attempts: list[Attempt] = []

    def start(self, all_or_nothing: bool, ehlo: bytes) -> bytes:
        options = ClientOptions(helo="client.test", tls="none", all_or_nothing=all_or_nothing)
        send(self.clock, self.upstream, self.message, lambda: io.BytesIO(CONTENT), options,
             host="up.test[127.0.0.1]").addCallback(self.attempts.append)
        self.upstream.say(b"220 up.test ESMTP")
        self.assertEqual(self.upstream.sent(), b"EHLO client.test\r\n")
        self.upstream.say(b"250-up.test", ehlo)
        return self.upstream.sent()

    def attempt(self) -> Attempt:
        self.assertEqual(self.clock.getDelayedCalls(), [])
        [attempt] = self.attempts
        return attempt

    def test_pipelined_data_left_unfinished(self) -> None:
        self.assertEqual(self.start(True, b"250 PIPELINING"),
                         b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n")
        self.upstream.say(b"250 ok", b"550 5.1.1 no such user", b"250 ok", b"354 go ahead")
        self.assertEqual(self.upstream.sent(), b"")
        self.assertTrue(self.upstream.transport.disconnecting)
        attempt = self.attempt()
        self.assertEqual(attempt.outcomes[0], Outcome(550, "5.1.1", "no such user", "up.test[127.0.0.1]"))
        held = attempt.outcomes[1]
        self.assertEqual((held.code, held.enhanced, held.remote), (451, "4.0.0", ""))
        self.assertIn("<b@example.net>", held.text)
        self.assertFalse(attempt.session_failed)

    def test_pipelined_data_refused_anyway(self) -> None:
        """A server that refuses the pipelined DATA itself: QUIT, as usual."""
        self.start(True, b"250 PIPELINING")
        self.upstream.say(b"250 ok", b"250 ok", b"550 5.1.1 no such user", b"554 5.5.1 no valid recipients")
        self.assertEqual(self.upstream.sent(), b"QUIT\r\n")
        self.upstream.say(b"221 bye")
        outcomes = self.attempt().outcomes
        self.assertEqual((outcomes[0].code, outcomes[1].code), (451, 550))

    def test_no_data_without_pipelining(self) -> None:
        self.assertEqual(self.start(True, b"250 8BITMIME"), b"MAIL FROM:<a@example.org>\r\n")
        self.upstream.say(b"250 ok")
        self.assertEqual(self.upstream.sent(), b"RCPT TO:<b@example.net>\r\n")
        self.upstream.say(b"250 ok")
        self.assertEqual(self.upstream.sent(), b"RCPT TO:<c@example.net>\r\n")
        self.upstream.say(b"450 4.2.0 busy")
        self.assertEqual(self.upstream.sent(), b"QUIT\r\n")
        self.upstream.say(b"221 bye")
        attempt = self.attempt()
        self.assertEqual([(attempt.outcomes[i].code, attempt.outcomes[i].enhanced) for i in (0, 1)],
                         [(451, "4.0.0"), (450, "4.2.0")])
        self.assertFalse(attempt.session_failed)

    def test_without_the_option_the_accepted_get_the_message(self) -> None:
        """The default: the message goes to the recipients the server accepted."""
        self.start(False, b"250 PIPELINING")
        self.upstream.say(b"250 ok", b"550 5.1.1 no such user", b"250 ok", b"354 go ahead")
        self.assertEqual(self.upstream.sent(), dot_stuff(CONTENT))
        self.upstream.say(b"250 2.0.0 queued")
        self.assertEqual(self.upstream.sent(), b"QUIT\r\n")
        self.upstream.say(b"221 bye")
        outcomes = self.attempt().outcomes
        self.assertEqual((outcomes[0].code, outcomes[1].code), (550, 250))


class OpenRelayTests(Base):
    def test_refused_from_outside(self) -> None:
        """A client outside ``networks`` that did not authenticate cannot relay: 554 5.7.1, nothing sent."""
        talk = self.talk(self.relay(), peer=("192.0.2.1", 1234))
        talk.write(b"EHLO client.test\r\nMAIL FROM:<alice@example.com>\r\n")
        talk.replies()
        talk.write(b"RCPT TO:<bob@example.net>\r\nDATA\r\n")
        self.assertEqual(talk.transport.value().split(b"\r\n")[-3:],
                         [b"554 5.7.1 <bob@example.net>: Relay access denied", b"503 5.5.1 Need RCPT command", b""])
        self.assertEqual(self.upstream.connections, 0)

    def test_authenticated_may_relay(self) -> None:
        talk = self.talk(self.relay(), peer=("192.0.2.1", 1234))
        talk.protocol.session.authenticated = "alice"
        talk.write(b"EHLO client.test\r\nMAIL FROM:<alice@example.com>\r\n")
        talk.replies()
        self.assertEqual(talk.send("RCPT TO:<bob@example.net>").code, 250)

    def test_configured_networks(self) -> None:
        """``networks`` replaces the default: only the listed networks may relay."""
        outside = self.talk(self.relay(networks="192.0.2.0/24"), peer=("192.0.2.1", 1234))
        outside.write(b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\n")
        outside.replies()
        self.assertEqual(outside.send("RCPT TO:<b@y.test>").code, 250)
        local = self.talk(self.relay(networks="192.0.2.0/24"))
        local.write(b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\n")
        local.replies()
        self.assertEqual(local.send("RCPT TO:<b@y.test>").code, 554)

    def test_may_relay_by_address(self) -> None:
        relay = self.relay()
        cases = [(IPv4Address("TCP", "127.0.0.1", 1), True), (IPv4Address("TCP", "127.9.9.9", 1), True),
                 (IPv4Address("TCP", "10.0.0.1", 1), False), (IPv6Address("TCP", "::1", 1), True),
                 (IPv6Address("TCP", "::ffff:127.0.0.1", 1), True), (IPv6Address("TCP", "2001:db8::1", 1), False),
                 (UNIXAddress(b"/run/smtp.sock"), False), (None, False)]
        for peer, expected in cases:
            relay.session = Session(hostname="mx.test", peer=peer)
            self.assertEqual(relay.may_relay(), expected, peer)
        relay.session = None
        self.assertFalse(relay.may_relay())

    def test_smtputf8_accepted(self) -> None:
        """SMTPUTF8 and non-ASCII paths are accepted (the upstream decides at the end of the data)."""
        talk = self.talk(self.relay())
        talk.write(b"EHLO c.test\r\n")
        talk.replies()
        self.assertEqual(talk.send("MAIL FROM:<jörg@x.test> SMTPUTF8").code, 250)
        self.assertEqual(talk.send("RCPT TO:<ü@y.test>").code, 250)
        self.assertEqual(self.upstream.connections, 0)


class SettingsTests(SynchronousTestCase):
    def test_text_settings(self) -> None:
        """Settings arrive as text from ``--handler-option``: they are parsed."""
        relay = Relay(host="::1", port="2525", networks="10.0.0.0/8, 127.0.0.1 ::1", timeout="5", trace="no",
                      spool_max="100")
        self.assertEqual((relay.port, relay.timeout, relay.trace, relay.spool_max), (2525, 5.0, False, 100))
        self.assertEqual([str(n) for n in relay.networks], ["10.0.0.0/8", "127.0.0.1/32", "::1/128"])
        self.assertEqual(relay.where, "[::1]:2525")

    def test_defaults(self) -> None:
        relay = Relay()
        self.assertEqual((relay.host, relay.port, relay.tls, relay.trace), ("127.0.0.1", 25, "none", True))
        self.assertEqual([str(n) for n in relay.networks], ["127.0.0.0/8", "::1/128"])
        self.assertEqual(DEFAULT_NETWORKS, ("127.0.0.0/8", "::1/128"))

    def test_client_options(self) -> None:
        """Each ``tls`` setting as the client takes it; all or nothing; one ``timeout`` for every wait."""
        expected = {"none": ("none", False), "opportunistic": ("opportunistic", False),
                    "starttls": ("required", True), "implicit": ("implicit", True)}
        for tls, (mode, verify) in expected.items():
            options = Relay(host="smtp.example.net", tls=tls, timeout=7).options
            self.assertEqual((options.tls, options.verify, options.tls_hostname), (mode, verify, "smtp.example.net"))
            self.assertTrue(options.all_or_nothing)
            self.assertEqual(set(vars(options.timeouts).values()), {7.0})
        options = Relay(tls="starttls", tls_hostname="cert.example.net", ca_file="/ca.pem", username="u",
                        password="p").options
        self.assertEqual((options.tls_hostname, options.ca_file, options.username, options.password),
                         ("cert.example.net", "/ca.pem", "u", "p"))

    def test_bad_settings(self) -> None:
        self.assertRaises(ValueError, Relay, networks="not-a-network")
        self.assertRaises(ValueError, Relay, tls="maybe")
        self.assertRaises(ValueError, Relay, trace="perhaps")
        self.assertRaises(ValueError, Relay, port="smtp")
        self.assertRaises(ValueError, Relay, timeout="0")

    def test_no_password_in_clear(self) -> None:
        """A login needs TLS: the client never sends credentials in clear."""
        with self.assertRaises(ValueError) as caught:
            Relay(username="u", password="p")
        self.assertIn("tls", str(caught.exception))

    def test_parse_networks(self) -> None:
        self.assertEqual(parse_networks(["192.0.2.1/24"]), (parse_networks("192.0.2.0/24")[0],))
        self.assertEqual(parse_networks(""), ())


class ReplyTests(SynchronousTestCase):
    """`relay_reply`: one reply for a message from every recipient's outcome."""

    MESSAGE = Message("Q1", "a@example.org", [Recipient("b@example.net"), Recipient("c@example.net")])

    def reply(self, *outcomes: Outcome) -> str:
        return str(relay_reply(self.MESSAGE, dict(enumerate(outcomes)), "up.test:25"))

    def test_delivered(self) -> None:
        ok = Outcome(250, "2.0.0", "queued as X", "up")
        self.assertEqual(self.reply(ok, ok), "250 2.0.0 Ok: relayed (queued as X)")
        self.assertEqual(self.reply(Outcome(250, "2.0.0", "", "up")), "250 2.0.0 Ok: relayed")

    def test_held_back_recipients_do_not_decide(self) -> None:
        """A permanent refusal of one recipient, the other held back by all or nothing: permanent."""
        held = Outcome.local(451, "4.0.0", "not sent")
        self.assertEqual(self.reply(held, Outcome(550, "5.1.1", "no such user", "up")),
                         "554 5.1.1 Upstream refused recipient(s): <c@example.net>: 550 no such user")

    def test_local_outcomes(self) -> None:
        lost = Outcome.local(451, "4.4.2", "lost connection")
        self.assertEqual(self.reply(lost, lost), "451 4.4.1 Upstream up.test:25 unavailable, try again later "
                                                 "(lost connection)")
        big = Outcome.local(552, "5.3.4", "too big")
        self.assertEqual(self.reply(big, big), "554 5.3.4 Upstream up.test:25 cannot take this message: too big")


#: Content octets that matter to line ends and dot-stuffing, and ends of data as lenient next hops read them.
PIECES = [b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"a", b"..", b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n"]
SMUGGLING = [b"hi\n.\nMAIL FROM:<ceo@bank.example>\n", b"hi\r\n.\nX\r", b"\r.\r\n.\n\r", b".\n..\r\r\n.",
             b"Subject: s\r\n\r\nhi\n.\r\nRSET\n"]
LENIENT_END = re.compile(rb"(?:\r\n|\r|\n)\.(?:\r\n|\r|\n)")


def encode_whole(content: bytes) -> bytes:
    """The reference: every bare CR and LF made CRLF, then stuffed and terminated in one piece (RFC 5321 §4.5.2)."""
    return dot_stuff(re.sub(rb"\r\n|\r|\n", b"\r\n", content))


def encode_pieces(content: bytes, points: list[int]) -> bytes:
    """``content`` cut at ``points`` (sorted offsets) and fed to one DotStuffer, then finished."""
    stuffer = DotStuffer()
    bounds = [0] + points + [len(content)]
    return b"".join(stuffer(content[a:b]) for a, b in zip(bounds, bounds[1:])) + stuffer.finish()


class DotStufferTests(SynchronousTestCase):
    """What the relay sends after DATA has CRLF line ends only and ends with CRLF, a dot line, CRLF."""

    def assert_clean(self, content: bytes, wire: bytes) -> None:
        self.assertFalse(python_has_bare_newline(wire), wire)
        self.assertTrue(wire == b".\r\n" or wire.endswith(b"\r\n.\r\n"), wire)
        ends = [m.start() for m in LENIENT_END.finditer(b"\r\n" + wire)]
        self.assertEqual(ends, [len(wire) - 3], "only the last line may be a lone dot, however line ends are read")
        decoder = DotDecoder()
        decoded = decoder.feed(wire)
        self.assertTrue(decoder.done)
        self.assertEqual(decoder.rest, b"")
        lines = re.sub(rb"\r\n|\r|\n", b"\r\n", content)
        self.assertEqual(decoded, lines if lines.endswith(b"\r\n") or not lines else lines + b"\r\n")

    @settings(deadline=None, derandomize=True, database=None)
    @given(st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join),
           st.lists(st.integers(min_value=0, max_value=200), max_size=8))
    def test_any_split(self, content: bytes, cuts: list[int]) -> None:
        """Chunk by chunk equals all at once wherever the chunks are cut (empty chunks included)."""
        wire = encode_pieces(content, sorted(min(c, len(content)) for c in cuts))
        self.assertEqual(wire, encode_whole(content))
        self.assert_clean(content, wire)

    def test_every_split_point(self) -> None:
        """Smuggling sequences cut at every one and every two points give the same clean bytes."""
        for content in SMUGGLING:
            whole = encode_whole(content)
            self.assert_clean(content, whole)
            for i in range(len(content) + 1):
                for j in range(i, len(content) + 1):
                    self.assertEqual(encode_pieces(content, [i, j]), whole, (content, i, j))

    def test_line_ends(self) -> None:
        """Bare CR and bare LF become CRLF; the data always ends CRLF before the dot."""
        cases = {b"": b".\r\n", b"a": b"a\r\n.\r\n", b"a\r\n": b"a\r\n.\r\n", b"a\n": b"a\r\n.\r\n",
                 b"a\r": b"a\r\n.\r\n", b"\r\r\n\n": b"\r\n\r\n\r\n.\r\n", b"a\n.\nb": b"a\r\n..\r\nb\r\n.\r\n",
                 b".a\r.b": b"..a\r\n..b\r\n.\r\n"}
        for content, wire in cases.items():
            self.assertEqual(encode_pieces(content, []), wire, content)

    def test_unchanged_when_clean(self) -> None:
        """CRLF content goes as it came, only dot-stuffed; a CR ending a chunk is sent at once, not held back."""
        stuffer = DotStuffer()
        self.assertEqual(stuffer(b".a\r\nb\r"), b"..a\r\nb\r")
        self.assertEqual(stuffer(b"\n.c\r\n"), b"\n..c\r\n")
        self.assertEqual(stuffer.finish(), b".\r\n")


# ---- integration: two real servers on loopback -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _smtplib_send(port: int, sender: str, recipients: list[str], content: bytes) -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
        return client.sendmail(sender, recipients, content)


@pytest_twisted.inlineCallbacks
def test_relay_in_front_of_collecting() -> Any:
    """A message sent to the relay arrives upstream byte-exact (after the relay's Received field), unchanged envelope."""
    from twisted.internet import reactor

    store = MessageStore()
    upstream = yield serve(Collecting.factory(store), reactor=reactor, policy=Policy(hostname="up.test"))
    relay = yield serve(lambda: Relay(port=upstream.port, timeout=10), reactor=reactor,
                        policy=Policy(hostname="relay.test"))
    try:
        refused = yield threads.deferToThread(_smtplib_send, relay.port, "alice@example.com",
                                              ["bob@example.net", "postmaster"], CONTENT)
        assert refused == {}
        message = yield store.next_message()
    finally:
        yield relay.stop()
        yield upstream.stop()
    assert message.sender == "alice@example.com"
    assert message.recipients == ("bob@example.net", "postmaster")
    assert message.helo == "relay.test"
    assert message.data.startswith(b"Received: from client.test (127.0.0.1 [127.0.0.1])")
    trace_end = message.data.index(b"Subject: relayed")
    assert message.data[trace_end:] == CONTENT
    assert b"by relay.test with ESMTP" in message.data[:trace_end]


@pytest_twisted.inlineCallbacks
def test_upstream_down_answers_4xx() -> Any:
    """Relay pointed at a closed port: the client gets 451 4.4.1 after the data, so it keeps the message."""
    from twisted.internet import reactor

    relay = yield serve(lambda: Relay(port=_free_port(), timeout=10), reactor=reactor,
                        policy=Policy(hostname="relay.test"))
    try:
        with pytest.raises(smtplib.SMTPDataError) as caught:
            yield threads.deferToThread(_smtplib_send, relay.port, "alice@example.com", ["bob@example.net"], CONTENT)
    finally:
        yield relay.stop()
    assert caught.value.smtp_code == 451
    assert caught.value.smtp_error.startswith(b"4.4.1 Upstream 127.0.0.1:")


def _self_signed(directory: str) -> tuple[str, str]:
    """A throw-away self-signed certificate for "localhost" (key and certificate PEM paths)."""
    import datetime
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = os.path.join(directory, "key.pem"), os.path.join(directory, "cert.pem")
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest_twisted.inlineCallbacks
def test_relay_over_implicit_tls(tmp_path: Any) -> Any:
    """``tls="implicit"``: the upstream connection is TLS from the first byte and its certificate is checked."""
    from twisted.internet import reactor

    key, cert = _self_signed(str(tmp_path))
    store = MessageStore()
    upstream = yield serve_implicit_tls(ESMTPFactory(Collecting.factory(store), policy=Policy(hostname="up.test"),
                                                     clock=reactor), cert, key, reactor)
    relay = yield serve(lambda: Relay(port=upstream.port, tls="implicit", tls_hostname="localhost", ca_file=cert,
                                      timeout=10), reactor=reactor, policy=Policy(hostname="relay.test"))
    try:
        yield threads.deferToThread(_smtplib_send, relay.port, "alice@example.com", ["bob@example.net"], CONTENT)
        message = yield store.next_message()
    finally:
        yield relay.stop()
        yield upstream.stop()
    assert message.data.endswith(b"\r\n" + CONTENT)


@pytest_twisted.inlineCallbacks
def test_relay_refuses_untrusted_upstream(tmp_path: Any) -> Any:
    """An upstream certificate that is not trusted: the message is not sent, the client gets 451 4.4.1."""
    from twisted.internet import reactor

    key, cert = _self_signed(str(tmp_path))
    store = MessageStore()
    upstream = yield serve_implicit_tls(ESMTPFactory(Collecting.factory(store), policy=Policy(hostname="up.test"),
                                                     clock=reactor), cert, key, reactor)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    _, other_cert = _self_signed(str(other_dir))
    relay = yield serve(lambda: Relay(port=upstream.port, tls="implicit", tls_hostname="localhost",
                                      ca_file=other_cert, timeout=10),
                        reactor=reactor, policy=Policy(hostname="relay.test"))
    try:
        with pytest.raises(smtplib.SMTPDataError) as caught:
            yield threads.deferToThread(_smtplib_send, relay.port, "alice@example.com", ["bob@example.net"], CONTENT)
    finally:
        yield relay.stop()
        yield upstream.stop()
    assert caught.value.smtp_code == 451
    assert store.messages == []


def _raw_bdat(address: tuple[str, int], commands: bytes, content: bytes) -> list[bytes]:
    """EHLO, then ``commands`` and ``content`` exactly as given (a blocking client, run in a thread); the replies
    to MAIL, RCPT and BDAT LAST."""
    client = RawClient(address)
    try:
        client.send(b"EHLO client.test\r\n")
        return client.send(commands + content, 3)
    finally:
        client.close()


@pytest_twisted.inlineCallbacks
def test_relay_passes_binarymime_over_bdat() -> Any:
    """``BODY=BINARYMIME`` content (bare LFs, NULs, a dot line) reaches esmtpkit's own server octet for octet,
    in BDAT: no dot-stuffing, no line-end changes."""
    from twisted.internet import reactor

    store = MessageStore()
    upstream = yield serve(Collecting.factory(store), reactor=reactor, policy=Policy(hostname="up.test"))
    relay = yield serve(lambda: Relay(port=upstream.port, timeout=10, trace=False), reactor=reactor,
                        policy=Policy(hostname="relay.test"))
    try:
        replies = yield threads.deferToThread(
            _raw_bdat, relay.address, b"MAIL FROM:<alice@example.com> BODY=BINARYMIME\r\nRCPT TO:<bob@example.net>\r\n"
            b"BDAT %d LAST\r\n" % len(BINARY), BINARY)
        message = yield store.next_message()
    finally:
        yield relay.stop()
        yield upstream.stop()
    assert [reply[:3] for reply in replies] == [b"250", b"250", b"250"], replies
    assert replies[-1].startswith(b"250 2.0.0 Ok: relayed (")
    assert message.data == BINARY
    assert message.mail_params.get("BODY") == "BINARYMIME"
    assert message.sender == "alice@example.com" and message.recipients == ("bob@example.net",)


def _smtputf8_send(port: int, sender: str, recipients: list[str], content: bytes) -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
        return client.sendmail(sender, recipients, content, mail_options=["SMTPUTF8"])


@pytest_twisted.inlineCallbacks
def test_relay_passes_smtputf8() -> Any:
    """A message with SMTPUTF8 and non-ASCII paths goes to esmtpkit's own server with SMTPUTF8."""
    from twisted.internet import reactor

    store = MessageStore()
    upstream = yield serve(Collecting.factory(store), reactor=reactor, policy=Policy(hostname="up.test"))
    relay = yield serve(lambda: Relay(port=upstream.port, timeout=10), reactor=reactor,
                        policy=Policy(hostname="relay.test"))
    try:
        refused = yield threads.deferToThread(_smtputf8_send, relay.port, "jörg@example.org", ["ü@example.net"],
                                              CONTENT)
        message = yield store.next_message()
    finally:
        yield relay.stop()
        yield upstream.stop()
    assert refused == {}
    assert (str(message.sender), [str(r) for r in message.recipients]) == ("jörg@example.org", ["ü@example.net"])
    assert message.mail_params.get("SMTPUTF8") is True
    assert message.data.endswith(b"\r\n" + CONTENT)
