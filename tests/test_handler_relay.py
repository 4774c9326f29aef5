"""The Relay handler: who may relay, the upstream dialogue byte by byte, and the reply mapping.

Unit tests drive Twisted's SMTP client against a scripted upstream in memory (StringTransport + Clock); the
integration tests run an esmtpkit Relay in front of an esmtpkit Collecting server on loopback.
"""

from __future__ import annotations

import base64
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
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from esmtpkit.core.content import DotDecoder, dot_stuff, python_has_bare_newline
from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.handlers import Collecting, MessageStore, Relay
from esmtpkit.handlers.relay import DotStuffer, parse_networks
from esmtpkit.server.interfaces import IMessageHandler
from esmtpkit.server.policy import Policy
from esmtpkit.core.session import Session
from esmtpkit.testing import Conversation, serve

from .certs import serve_implicit_tls
from .support import HandlerTestCase

CONTENT = b"Subject: relayed\r\n\r\n.leading dot\r\n..two\r\n.\r\n8-bit \xe9\xff\r\n"
START = b"EHLO client.test\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"


@implementer(IStreamClientEndpoint)
class ScriptedUpstream:
    """An endpoint whose connection is a StringTransport: the test plays the upstream server by hand."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.connections = 0
        self.protocol: Any = None
        self.transport = StringTransport()

    def connect(self, factory: Any) -> "Deferred[Any]":
        self.connections += 1
        if self.refuse:
            return fail(ConnectionRefusedError("nobody listening"))
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 25))
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)

    def say(self, *lines: bytes) -> None:
        """Send reply lines to the client, then let it stream any file it is sending."""
        for line in lines:
            self.protocol.dataReceived(line + b"\r\n")
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()

    def sent(self) -> bytes:
        """Bytes the client wrote since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return data


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

    def greet(self) -> None:
        self.upstream.say(b"220 up.test ESMTP")
        assert self.upstream.sent() == b"EHLO mx.test\r\n"
        self.upstream.say(b"250-up.test", b"250 PIPELINING")

    def finish_upstream(self, rset_seen: bool = False) -> None:
        """RSET and QUIT after the transaction; the client closes."""
        if not rset_seen:
            self.assertEqual(self.upstream.sent(), b"RSET\r\n")
        self.upstream.say(b"250 2.0.0 Ok")
        self.assertEqual(self.upstream.sent(), b"QUIT\r\n")
        self.upstream.say(b"221 2.0.0 Bye")
        self.assertTrue(self.upstream.transport.disconnecting)
        self.upstream.protocol.connectionLost(Failure(ConnectionDone()))

    def final(self, talk: Conversation) -> bytes:
        return talk.transport.value().split(b"\r\n")[-2]


class UpstreamDialogueTests(Base):
    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IMessageHandler, Relay()))

    def test_byte_exact_and_250_only_after_upstream(self) -> None:
        """Envelope and content go upstream unchanged; the client's 250 waits for the upstream's 250."""
        talk = self.talk(self.relay())
        self.send_message(talk, CONTENT, ("bob@example.net", "postmaster"))
        self.assertEqual(talk.replies(), [])
        self.greet()
        self.assertEqual(self.upstream.sent(), b"MAIL FROM:<alice@example.com>\r\n")
        self.upstream.say(b"250 2.1.0 Ok")
        self.assertEqual(self.upstream.sent(), b"RCPT TO:<bob@example.net>\r\n")
        self.upstream.say(b"250 2.1.5 Ok")
        self.assertEqual(self.upstream.sent(), b"RCPT TO:<postmaster>\r\n")
        self.upstream.say(b"250 2.1.5 Ok")
        self.assertEqual(self.upstream.sent(), b"DATA\r\n")
        self.upstream.say(b"354 go ahead")
        self.assertEqual(self.upstream.sent(), dot_stuff(CONTENT))
        self.assertEqual(talk.replies(), [])
        self.upstream.say(b"250 2.0.0 Ok: queued as UP1")
        self.assertEqual(self.final(talk), b"250 2.0.0 Ok: relayed (Ok: queued as UP1)")
        self.finish_upstream()

    def test_dot_stuffing_across_file_chunks(self) -> None:
        """Dots at the very start and right after a chunk boundary of the spooled file are stuffed too.

        The long lines are body lines (after an empty header section), so header line limits do not apply.
        """
        chunk = 2 ** 14  # Twisted's FileSender reads this much at a time
        for content in (b".first line\r\n" + b"x" * (chunk - 15) + b"\r\n.after\r\n",
                        b"\r\n" + b"x" * (chunk - 4) + b"\r\n.on the boundary\r\n",
                        b"\r\n" + b"x" * (chunk - 3) + b"\r\n.split CRLF\r\n"):
            self.upstream = ScriptedUpstream()
            talk = self.talk(self.relay())
            self.send_message(talk, content)
            self.greet()
            self.upstream.say(b"250 ok", b"250 ok", b"354 go")
            wire = self.upstream.sent()
            self.assertEqual(wire, b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"
                             + dot_stuff(content))
            self.upstream.say(b"250 ok")
            self.assertEqual(self.final(talk), b"250 2.0.0 Ok: relayed (ok)")
            self.finish_upstream()

    def test_trace_header_added(self) -> None:
        """With ``trace`` (the default) a Received field, without the AUTH identity, comes first."""
        relay = self.relay(trace=True)
        talk = self.talk(relay)
        talk.protocol.session.authenticated = "alice"
        self.send_message(talk, b"hi\r\n")
        self.greet()
        self.upstream.say(b"250 ok", b"250 ok", b"354 go")
        wire = self.upstream.sent()
        body = wire[wire.index(b"DATA\r\n") + 6:]
        decoder = DotDecoder()
        content = decoder.feed(body)
        self.assertTrue(decoder.done)
        self.assertTrue(content.startswith(b"Received: from client.test (127.0.0.1 [127.0.0.1]) by mx.test with ESMTPA"))
        self.assertTrue(content.endswith(b"\r\nhi\r\n"))
        self.assertNotIn(b"alice", content)
        self.upstream.say(b"250 ok")
        self.finish_upstream()

    def test_logs_in_upstream(self) -> None:
        """With ``username``/``password`` the client authenticates before MAIL."""
        talk = self.talk(self.relay(username="relayuser", password="s3cret"))
        self.send_message(talk)
        self.upstream.say(b"220 up.test ESMTP")
        self.assertEqual(self.upstream.sent(), b"EHLO mx.test\r\n")
        self.upstream.say(b"250-up.test", b"250 AUTH PLAIN")
        self.assertEqual(self.upstream.sent(),
                         b"AUTH PLAIN " + base64.b64encode(b"relayuser\0relayuser\0s3cret") + b"\r\n")
        self.upstream.say(b"235 2.7.0 ok")
        self.assertEqual(self.upstream.sent(), b"MAIL FROM:<alice@example.com>\r\n")
        self.upstream.say(b"250 ok", b"250 ok", b"354 go")
        self.assertTrue(self.upstream.sent().endswith(dot_stuff(CONTENT)))
        self.upstream.say(b"250 ok")
        self.assertEqual(self.final(talk), b"250 2.0.0 Ok: relayed (ok)")
        self.finish_upstream()


class ReplyMappingTests(Base):
    def run_to_data(self, talk: Conversation, recipients: tuple[str, ...] = ("bob@example.net",)) -> None:
        """Up to the point where the upstream must answer MAIL FROM."""
        self.send_message(talk, CONTENT, recipients)
        self.greet()
        self.assertEqual(self.upstream.sent(), b"MAIL FROM:<alice@example.com>\r\n")

    def data_sent(self) -> None:
        self.assertTrue(self.upstream.sent().endswith(b"DATA\r\n" + dot_stuff(CONTENT)))

    def test_permanent_refusal_of_the_message(self) -> None:
        """5xx after the data: 554 5.0.0 with the upstream's text."""
        talk = self.talk(self.relay())
        self.run_to_data(talk)
        self.upstream.say(b"250 ok", b"250 ok", b"354 go")
        self.data_sent()
        self.upstream.say(b"550 5.7.1 Content rejected")
        self.assertEqual(self.final(talk), b"554 5.0.0 Upstream said: 550 Content rejected")
        self.finish_upstream()

    def test_temporary_refusal_of_the_message(self) -> None:
        """4xx after the data: 451 4.4.1, the client keeps the message and retries."""
        talk = self.talk(self.relay())
        self.run_to_data(talk)
        self.upstream.say(b"250 ok", b"250 ok", b"354 go")
        self.data_sent()
        self.upstream.say(b"452 4.3.1 Insufficient storage")
        self.assertEqual(self.final(talk), b"451 4.4.1 Upstream said: 452 Insufficient storage")
        self.finish_upstream()

    def test_sender_refused(self) -> None:
        talk = self.talk(self.relay())
        self.run_to_data(talk)
        self.upstream.say(b"553 5.1.8 Bad sender")
        self.assertEqual(self.final(talk), b"554 5.0.0 Upstream said: 553 Bad sender")
        self.finish_upstream()

    def test_all_recipients_refused(self) -> None:
        talk = self.talk(self.relay())
        self.run_to_data(talk)
        self.upstream.say(b"250 ok", b"550 5.1.1 No such user")
        self.assertEqual(self.upstream.sent(), b"RCPT TO:<bob@example.net>\r\nRSET\r\n")
        self.assertEqual(self.final(talk),
                         b"554 5.0.0 Upstream refused recipient(s): <bob@example.net>: 550 No such user")
        self.finish_upstream(rset_seen=True)

    def test_some_recipients_refused_sends_nothing(self) -> None:
        """All or nothing: one refused recipient means no DATA upstream, so nobody gets a copy we did not promise."""
        talk = self.talk(self.relay())
        self.run_to_data(talk, ("bob@example.net", "carol@example.net"))
        self.upstream.say(b"250 ok", b"250 ok", b"550 5.1.1 No such user")
        self.assertEqual(self.upstream.sent(),
                         b"RCPT TO:<bob@example.net>\r\nRCPT TO:<carol@example.net>\r\nRSET\r\n")
        self.assertEqual(self.final(talk),
                         b"554 5.0.0 Upstream refused recipient(s): <carol@example.net>: 550 No such user")
        self.finish_upstream(rset_seen=True)

    def test_some_recipients_deferred(self) -> None:
        """A 4xx for any recipient makes the whole message temporary."""
        talk = self.talk(self.relay())
        self.run_to_data(talk, ("bob@example.net", "carol@example.net"))
        self.upstream.say(b"250 ok", b"450 4.2.0 Mailbox busy", b"550 5.1.1 No such user")
        self.assertEqual(self.upstream.sent(),
                         b"RCPT TO:<bob@example.net>\r\nRCPT TO:<carol@example.net>\r\nRSET\r\n")
        self.assertEqual(self.final(talk), b"451 4.4.1 Upstream refused recipient(s): "
                                           b"<bob@example.net>: 450 Mailbox busy; <carol@example.net>: 550 No such user")
        self.finish_upstream(rset_seen=True)

    def test_connection_refused(self) -> None:
        """Nobody listening upstream: 451 4.4.1."""
        self.upstream = ScriptedUpstream(refuse=True)
        talk = self.talk(self.relay())
        self.send_message(talk)
        reply = talk.replies()[-1]
        self.assertEqual((reply.code, reply.enhanced), (451, "4.4.1"))
        self.assertTrue(reply.text.startswith("Upstream 127.0.0.1:25 unavailable, try again later"), reply.text)

    def test_upstream_closes_mid_dialogue(self) -> None:
        talk = self.talk(self.relay())
        self.run_to_data(talk)
        self.upstream.say(b"250 ok", b"250 ok", b"354 go")
        self.upstream.protocol.connectionLost(Failure(ConnectionLost("reset")))
        reply = talk.replies()[-1]
        self.assertEqual((reply.code, reply.enhanced), (451, "4.4.1"))

    def test_upstream_refuses_service(self) -> None:
        """A 554 greeting is the upstream's trouble, not the message's: 451 so the client retries."""
        talk = self.talk(self.relay())
        self.send_message(talk)
        self.upstream.say(b"554 5.3.2 Not now")
        self.assertEqual(talk.replies()[-1].code, 451)
        self.upstream.protocol.connectionLost(Failure(ConnectionDone()))

    def test_upstream_silent(self) -> None:
        """No answer within ``timeout``: the upstream connection is dropped and the client gets 451 4.4.1."""
        talk = self.talk(self.relay(timeout=30))
        self.send_message(talk)
        self.upstream.say(b"220 up.test ESMTP")
        self.clock.advance(31)
        reply = talk.replies()[-1]
        self.assertEqual((reply.code, reply.enhanced), (451, "4.4.1"))
        self.assertIn("Timeout", reply.text)
        self.upstream.protocol.connectionLost(Failure(ConnectionLost()))

    def test_auth_required_but_not_offered(self) -> None:
        talk = self.talk(self.relay(username="u", password="p"))
        self.send_message(talk)
        self.upstream.say(b"220 up.test ESMTP", b"250 up.test")
        self.assertEqual(talk.replies()[-1].code, 451)
        self.upstream.protocol.connectionLost(Failure(ConnectionDone()))

    def test_client_leaves_while_relaying(self) -> None:
        """The client drops while the upstream is busy: the send finishes; nothing crashes or leaks."""
        talk = self.talk(self.relay())
        self.run_to_data(talk)
        talk.protocol.connectionLost(Failure(ConnectionLost()))
        self.upstream.say(b"250 ok", b"250 ok", b"354 go")
        self.data_sent()
        self.upstream.say(b"250 ok")
        self.finish_upstream()


class LineEndTests(Base):
    """Nothing a lenient upstream could read as a line end, or as the end of the data, goes upstream but CRLF."""

    SMUGGLED = (b"Subject: hello\r\n\r\nhello\n.\nMAIL FROM:<ceo@bank.example>\nRCPT TO:<victim@example.net>\n"
                b"DATA\nSubject: forged\n\nsend money\r.\r\n")

    def relay_content(self, talk: Conversation, commands: bytes, content: bytes) -> bytes:
        """Send ``commands`` and ``content`` as given; play the upstream; the octets it got after DATA."""
        talk.write(commands + content)
        self.greet()
        self.upstream.say(b"250 ok", b"250 ok", b"354 go")
        wire = self.upstream.sent()
        self.upstream.say(b"250 ok")
        self.assertEqual(self.final(talk), b"250 2.0.0 Ok: relayed (ok)")
        self.finish_upstream()
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

    def test_binarymime_refused_at_mail(self) -> None:
        """Binary content cannot go over DATA (RFC 3030 §3): 555 5.6.3 before any content; nothing goes upstream."""
        talk = self.talk(self.relay())
        talk.write(b"EHLO client.test\r\n")
        self.assertIn("BINARYMIME", talk.replies()[0].lines)
        reply = talk.send("MAIL FROM:<alice@example.com> BODY=BINARYMIME")
        assert reply is not None
        self.assertEqual((reply.code, reply.enhanced), (555, "5.6.3"))
        self.assertIn("BINARYMIME", reply.text)
        talk.write(b"RCPT TO:<bob@example.net>\r\nBDAT 4 LAST\r\nx\n.\n")
        self.assertEqual([r.code for r in talk.replies()], [503, 503])
        reply = talk.send("MAIL FROM:<alice@example.com> BODY=8BITMIME")
        assert reply is not None
        self.assertEqual(reply.code, 250)
        self.assertEqual(self.upstream.connections, 0)


class DSNTests(Base):
    """RFC 3461 §5.2.1: DSN parameters go upstream with MAIL and RCPT only when the upstream offers DSN."""

    ENVELOPE = (b"EHLO client.test\r\nMAIL FROM:<alice@example.com> RET=hdrs ENVID=QQ+2B314\r\n"
                b"RCPT TO:<bob@example.net> NOTIFY=delay,failure ORCPT=rfc822;b+2Bx@example.org\r\n"
                b"RCPT TO:<carol@example.net> NOTIFY=NEVER\r\nRCPT TO:<postmaster>\r\nDATA\r\n")

    def start(self, *ehlo: bytes) -> Conversation:
        talk = self.talk(self.relay(), dsn=True)
        talk.write(self.ENVELOPE)
        self.assertEqual([r.code for r in talk.replies()], [250, 250, 250, 250, 250, 354])
        talk.write(dot_stuff(CONTENT))
        self.upstream.say(b"220 up.test ESMTP")
        self.assertEqual(self.upstream.sent(), b"EHLO mx.test\r\n")
        self.upstream.say(*ehlo)
        return talk

    def envelope_sent(self) -> bytes:
        self.upstream.say(b"250 ok", b"250 ok", b"250 ok", b"250 ok", b"354 go")
        wire = self.upstream.sent()
        self.assertTrue(wire.endswith(b"DATA\r\n" + dot_stuff(CONTENT)))
        return wire[:wire.index(b"DATA\r\n")]

    def finish(self, talk: Conversation) -> None:
        self.upstream.say(b"250 ok")
        self.assertEqual(self.final(talk), b"250 2.0.0 Ok: relayed (ok)")
        self.finish_upstream()

    def test_passed_on_when_offered(self) -> None:
        """RET, ENVID (re-encoded as xtext), NOTIFY and ORCPT go upstream in canonical form."""
        talk = self.start(b"250-up.test", b"250-PIPELINING", b"250 dsn")
        self.assertEqual(self.envelope_sent(),
                         b"MAIL FROM:<alice@example.com> RET=HDRS ENVID=QQ+2B314\r\n"
                         b"RCPT TO:<bob@example.net> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b+2Bx@example.org\r\n"
                         b"RCPT TO:<carol@example.net> NOTIFY=NEVER\r\nRCPT TO:<postmaster>\r\n")
        self.finish(talk)

    def test_left_out_when_not_offered(self) -> None:
        """An upstream without DSN gets the bare commands (a DSN parameter would be refused with 555)."""
        talk = self.start(b"250-DSNX.up.test", b"250-PIPELINING", b"250 8BITMIME")
        self.assertEqual(self.envelope_sent(),
                         b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\n"
                         b"RCPT TO:<carol@example.net>\r\nRCPT TO:<postmaster>\r\n")
        self.finish(talk)

    def test_left_out_after_helo_fallback(self) -> None:
        """An upstream that refuses EHLO offers no extensions: HELO, then the bare commands."""
        talk = self.start(b"502 5.5.1 EHLO not implemented")
        self.assertEqual(self.upstream.sent(), b"HELO mx.test\r\n")
        self.upstream.say(b"250 up.test")
        self.assertEqual(self.envelope_sent(),
                         b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\n"
                         b"RCPT TO:<carol@example.net>\r\nRCPT TO:<postmaster>\r\n")
        self.finish(talk)

    def test_only_mail_parameters(self) -> None:
        """ENVID alone on MAIL, nothing on RCPT: only what the client gave is passed on."""
        talk = self.talk(self.relay(), dsn=True)
        talk.write(b"EHLO client.test\r\nMAIL FROM:<> ENVID=a+3Db\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
        talk.replies()
        talk.write(dot_stuff(CONTENT))
        self.upstream.say(b"220 up.test ESMTP")
        self.upstream.sent()
        self.upstream.say(b"250-up.test", b"250 DSN", b"250 ok", b"250 ok", b"354 go")
        wire = self.upstream.sent()
        self.assertEqual(wire[:wire.index(b"DATA\r\n")], b"MAIL FROM:<> ENVID=a+3Db\r\nRCPT TO:<bob@example.net>\r\n")
        self.finish(talk)


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

    def test_smtputf8_refused(self) -> None:
        """Twisted's client cannot pass SMTPUTF8 on: refuse it up front rather than fail after the data."""
        talk = self.talk(self.relay())
        talk.write(b"EHLO c.test\r\n")
        talk.replies()
        reply = talk.send("MAIL FROM:<a@x.test> SMTPUTF8")
        assert reply is not None
        self.assertEqual((reply.code, reply.enhanced), (555, "5.5.4"))


class SettingsTests(SynchronousTestCase):
    def test_text_settings(self) -> None:
        """Settings arrive as text from ``--handler-option``: they are parsed."""
        relay = Relay(host="::1", port="2525", networks="10.0.0.0/8, 127.0.0.1 ::1", timeout="5", trace="no",
                      spool_max="100")
        self.assertEqual((relay.port, relay.timeout, relay.trace, relay.spool_max), (2525, 5.0, False, 100))
        self.assertEqual([str(n) for n in relay.networks], ["10.0.0.0/8", "127.0.0.1/32", "::1/128"])

    def test_defaults(self) -> None:
        relay = Relay()
        self.assertEqual((relay.host, relay.port, relay.tls, relay.trace), ("127.0.0.1", 25, "none", True))
        self.assertEqual([str(n) for n in relay.networks], ["127.0.0.0/8", "::1/128"])

    def test_bad_settings(self) -> None:
        self.assertRaises(ValueError, Relay, networks="not-a-network")
        self.assertRaises(ValueError, Relay, tls="maybe")
        self.assertRaises(ValueError, Relay, trace="perhaps")
        self.assertRaises(ValueError, Relay, port="smtp")

    def test_parse_networks(self) -> None:
        self.assertEqual(parse_networks(["192.0.2.1/24"]), (parse_networks("192.0.2.0/24")[0],))
        self.assertEqual(parse_networks(""), ())


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
