"""Abuse resistance: connection limits, early talkers, the tarpit, transaction caps, graceful shutdown, hostile input."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core.content import dot_stuff
from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.server.policy import Policy
from esmtpkit.testing import Conversation, RecordingHandler, parse_replies

START = b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"


class Connections:
    """Connections made through a factory, each over a StringTransport with a chosen client address."""

    def __init__(self, **policy: Any) -> None:
        self.clock = Clock()
        self.handlers: list[RecordingHandler] = []
        self.factory = ESMTPFactory(self._handler, Policy(hostname="mx.test", **policy), clock=self.clock)

    def _handler(self) -> RecordingHandler:
        handler = RecordingHandler()
        self.handlers.append(handler)
        return handler

    def open(self, ip: str = "192.0.2.1") -> tuple[Any, StringTransport]:
        peer = IPv4Address("TCP", ip, 40000)
        proto = self.factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
        proto.makeConnection(transport)
        return proto, transport


def lose(proto: Any, transport: StringTransport) -> None:
    transport.loseConnection()
    proto.connectionLost(None)


class ConnectionLimitTests(SynchronousTestCase):
    def test_total_limit(self) -> None:
        """Beyond max_connections a client gets 421 4.3.2 and is closed; a slot freed is usable again."""
        conns = Connections(max_connections=2)
        first, t1 = conns.open("192.0.2.1")
        conns.open("192.0.2.2")
        third, t3 = conns.open("192.0.2.3")
        self.assertEqual(t3.value(), b"421 Too many connections, try again later\r\n")
        self.assertTrue(t3.disconnecting)
        self.assertEqual(len(conns.handlers[2].calls), 0, "the refused client's handler is never asked")
        lose(third, t3)
        lose(first, t1)
        _, t4 = conns.open("192.0.2.4")
        self.assertTrue(t4.value().startswith(b"220 mx.test "))
        self.assertEqual(len(conns.factory.connections), 2)

    def test_per_client_limit(self) -> None:
        """Beyond max_connections_per_client one address gets 421 4.7.0; other addresses are not affected."""
        conns = Connections(max_connections_per_client=2)
        conns.open("192.0.2.1")
        conns.open("192.0.2.1")
        _, refused = conns.open("192.0.2.1")
        self.assertEqual(refused.value(), b"421 Too many connections from your address, try again later\r\n")
        _, other = conns.open("192.0.2.9")
        self.assertTrue(other.value().startswith(b"220 "))

    def test_counts_return_to_zero(self) -> None:
        conns = Connections()
        opened = [conns.open("192.0.2.1") for _ in range(5)]
        for proto, transport in opened:
            lose(proto, transport)
        self.assertEqual((conns.factory.connections, dict(conns.factory._per_client)), (set(), {}))


class EarlyTalkerTests(SynchronousTestCase):
    def test_polite_client_is_greeted_after_the_delay(self) -> None:
        clock = Clock()
        talk = Conversation(RecordingHandler(), Policy(hostname="mx.test", pregreet_delay=3), clock=clock)
        self.assertIsNone(talk.greeting)
        clock.advance(3)
        self.assertEqual([r.code for r in talk.replies()], [220])
        self.assertEqual(talk.send("EHLO c").code, 250)

    def test_early_talker_refused(self) -> None:
        """Sending before the greeting gets 554 5.5.1; then only QUIT works (RFC 5321 §3.1); input is discarded."""
        clock = Clock()
        handler = RecordingHandler()
        talk = Conversation(handler, Policy(hostname="mx.test", pregreet_delay=3), clock=clock)
        talk.write(b"EHLO spambot\r\nMAIL FROM:<x@y>\r\n")
        clock.advance(3)
        self.assertEqual(talk.transport.value(), b"554 Protocol error: data sent before the greeting\r\n")
        talk.replies()
        self.assertEqual(handler.verbs, [], "the handler never saw the early commands")
        self.assertEqual(talk.send("MAIL FROM:<x@y>").code, 503)
        self.assertEqual(talk.send("QUIT").code, 221)
        self.assertTrue(talk.closed)
        clock.advance(1000)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_hang_up_during_delay(self) -> None:
        clock = Clock()
        talk = Conversation(RecordingHandler(), Policy(hostname="mx.test", pregreet_delay=3), clock=clock)
        talk.protocol.connectionLost(None)
        self.assertEqual(clock.getDelayedCalls(), [])


class TarpitTests(SynchronousTestCase):
    def test_delay_after_soft_limit(self) -> None:
        """After soft_error_limit errors, nothing more is read for error_delay seconds after each error."""
        clock = Clock()
        talk = Conversation(RecordingHandler(), Policy(hostname="mx.test", soft_error_limit=2, error_delay=5),
                            clock=clock)
        talk.write(b"BOGUS1\r\nBOGUS2\r\nBOGUS3\r\nNOOP\r\n")
        self.assertEqual([r.code for r in talk.replies()], [500, 500, 500])
        clock.advance(4.9)
        self.assertEqual(talk.replies(), [])
        clock.advance(0.1)
        self.assertEqual([r.code for r in talk.replies()], [250])

    def test_off_by_default(self) -> None:
        talk = Conversation(RecordingHandler(), Policy(hostname="mx.test"))
        talk.write(b"".join(b"BOGUS\r\n" for _ in range(15)) + b"NOOP\r\n")
        self.assertEqual([r.code for r in talk.replies()][-1], 250)


class TransactionLimitTests(SynchronousTestCase):
    def test_max_transactions(self) -> None:
        talk = Conversation(RecordingHandler(), Policy(hostname="mx.test", max_transactions=2))
        for _ in range(2):
            self.assertEqual(talk.message("a@example.org", ["b@example.org"], b"x\r\n").code, 250)
        reply = talk.send("MAIL FROM:<a@example.org>")
        self.assertEqual((reply.code, reply.enhanced), (421, "4.7.0"))
        self.assertTrue(talk.closed)


class ShutdownTests(SynchronousTestCase):
    def test_idle_connections_closed_at_once(self) -> None:
        conns = Connections()
        proto, transport = conns.open()
        d = conns.factory.shutdown()
        self.assertTrue(transport.value().endswith(b"421 Service shutting down, try again later\r\n"))
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(d)
        lose(proto, transport)
        self.successResultOf(d)
        self.assertEqual(conns.clock.getDelayedCalls(), [])

    def test_transaction_in_flight_finishes(self) -> None:
        """A message being sent completes and gets its 250; then 421 4.3.2 and close. New clients are refused."""
        conns = Connections()
        proto, transport = conns.open()
        proto.dataReceived(START + b"Subject: x\r\n\r\npart one\r\n")
        d = conns.factory.shutdown()
        self.assertFalse(transport.disconnecting)
        _, late = conns.open("192.0.2.7")
        self.assertEqual(late.value(), b"421 Service shutting down, try again later\r\n")
        proto.dataReceived(b"part two\r\n.\r\nMAIL FROM:<again@example.org>\r\n")
        replies = parse_replies(transport.value())
        self.assertEqual([(r.code, r.enhanced) for r in replies[-2:]], [(250, "2.0.0"), (421, "4.3.2")])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(conns.handlers[0].messages[0]["body"], b"part one\r\npart two\r\n")
        lose(proto, transport)
        self.successResultOf(d)

    def test_deadline_forces_close_and_aborts(self) -> None:
        conns = Connections(shutdown_timeout=10)
        proto, transport = conns.open()
        proto.dataReceived(START + b"Subject: x\r\n\r\npart\r\n")
        d = conns.factory.shutdown()
        conns.clock.advance(10)
        self.assertTrue(transport.value().endswith(b"421 4.3.2 Service shutting down, try again later\r\n"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(conns.handlers[0].verbs[-1], "abort")
        lose(proto, transport)
        self.successResultOf(d)
        self.assertEqual(conns.clock.getDelayedCalls(), [])

    def test_nothing_open(self) -> None:
        self.successResultOf(Connections().factory.shutdown())


class SmugglingTableTests(SynchronousTestCase):
    """The six bare-newline 'ends' from the smuggling advisories, each followed by a smuggled transaction."""

    SEQUENCES = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\n.\r"]

    def attack(self, sneaky: bytes, policy: str) -> tuple[RecordingHandler, list[Any]]:
        handler = RecordingHandler()
        talk = Conversation(handler, Policy(hostname="mx.test", bare_newline=policy))
        talk.write(START + b"Subject: x\r\n\r\nhello" + sneaky + b"MAIL FROM:<evil@example.org>\r\n"
                   b"RCPT TO:<victim@example.org>\r\nDATA\r\nforged\r\n.\r\nQUIT\r\n")
        return handler, talk.replies()

    def test_at_most_one_message(self) -> None:
        for policy in ("reject", "allow"):
            for sneaky in self.SEQUENCES:
                handler, replies = self.attack(sneaky, policy)
                self.assertLessEqual(len(handler.messages), 1, (policy, sneaky))
                self.assertEqual(handler.verbs.count("mail"), 1, (policy, sneaky))
                self.assertEqual(replies[-1].code, 221)
                final = replies[-2]
                if policy == "reject":
                    self.assertEqual((final.code, final.enhanced), (550, "5.5.2"), sneaky)
                    self.assertEqual(handler.messages, [])
                else:
                    self.assertEqual(final.code, 250)
                    self.assertIn(b"forged", handler.messages[0]["body"])


class HostileInputTests(SynchronousTestCase):
    """Each kind of garbage gets a clear 5xx, never a traceback, and the session goes on."""

    CASES = [
        (b"NOOP\x00\r\n", 500, "5.5.2"),
        (b"MAIL FROM:<a\xff@example.org>\r\n", 500, "5.5.2"),
        (b"MAIL FROM:<a@example.org> SIZE=99999999999999999999999999\r\n", 501, "5.5.4"),
        (b"MAIL FROM:<a@example.org> SIZE=-1\r\n", 501, "5.5.4"),
        (b"MAIL FROM:<a@example.org> FROBNICATE=1\r\n", 555, "5.5.4"),
        (b"MAIL FROM:<a@example.org> BODY=9BIT\r\n", 555, "5.5.4"),
        (b"MAIL FROM:<" + b"a" * 300 + b"@example.org>\r\n", 501, "5.1.7"),
        (b"MAIL FROM:<a@example.org> " + b"X" * 1300 + b"\r\n", 500, "5.5.2"),
        (b"MAIL FROM:<a@b@c>\r\n", 501, "5.1.7"),
        (b"MAIL FROM:a@example.org>\r\n", 501, "5.1.7"),
    ]

    def test_cases(self) -> None:
        for line, code, enhanced in self.CASES:
            talk = Conversation(RecordingHandler(), Policy(hostname="mx.test"))
            talk.send("EHLO c")
            talk.write(line)
            (reply,) = talk.replies()
            self.assertEqual((reply.code, reply.enhanced), (code, enhanced), line)
            self.assertEqual(talk.send("NOOP").code, 250, line)

    def test_garbage_in_message_is_kept_intact(self) -> None:
        """NUL and invalid UTF-8 inside a message are content, passed on untouched."""
        handler = RecordingHandler()
        talk = Conversation(handler, Policy(hostname="mx.test"))
        content = b"Subject: bin\r\n\r\n\x00\xff\xfe text \x80\r\n"
        talk.write(START + dot_stuff(content))
        self.assertEqual(talk.replies()[-1].code, 250)
        self.assertEqual(handler.messages[0]["body"], b"\x00\xff\xfe text \x80\r\n")
