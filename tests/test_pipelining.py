"""Pipelining (RFC 2920) and backpressure: replies stay in order while handler results are pending."""

from __future__ import annotations

from typing import Any

from hypothesis import given, strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core.reply import Reply
from esmtpkit.core.rules import Phase
from esmtpkit.testing import Conversation, RecordingHandler

from .support import (
    ACCEPTED, GO_AHEAD, SCENARIO, SCENARIO_CALLS, SCENARIO_WIRE, SETTINGS, TOKENS, ServerMixin, calls, policy, replay,
    split,
)

ENVELOPE = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n"
ENVELOPE_REPLIES = (b"250 2.1.0 <a@example.org>, sender ok\r\n250 2.1.5 <b@example.org>, recipient ok\r\n"
                    b"250 2.1.5 <c@example.org>, recipient ok\r\n" + GO_AHEAD)


class LateHandler(RecordingHandler):
    """Answers the chosen verbs with Deferreds that the test fires (``fire_all``) when it likes."""

    def __init__(self, late: set[str]) -> None:
        super().__init__()
        self.late = late
        self.pending: list[tuple[Deferred[Any], Any]] = []

    def _record(self, verb: str, *args: Any) -> Any:
        result = super()._record(verb, *args)
        if verb not in self.late:
            return result
        d: Deferred[Any] = Deferred()
        self.pending.append((d, result))
        return d

    def fire_all(self) -> None:
        while self.pending:
            d, result = self.pending.pop(0)
            d.callback(result)


class OrderTests(ServerMixin, SynchronousTestCase):
    def test_mail_fired_late(self) -> None:
        """No RCPT or DATA reply is written, and RCPT is not even asked, before MAIL's Deferred fires."""
        pending: Deferred[Any] = Deferred()
        talk = self.ehlo(RecordingHandler({"mail": lambda sender, params: pending}))
        self.assertEqual(self.exchange(talk, ENVELOPE), b"")
        self.assertNoResult(pending)
        self.assertEqual(talk.handler.verbs[-1], "mail")
        self.assertEqual(talk.transport.producerState, "paused")
        before = len(talk.transport.value())
        pending.callback(Reply.of(250, "<a@example.org>, sender ok", enhanced="2.1.0"))
        self.assertEqual(talk.transport.value()[before:], ENVELOPE_REPLIES)
        self.assertEqual(talk.handler.verbs[-4:], ["mail", "rcpt", "rcpt", "data"])
        self.assertEqual(talk.transport.producerState, "producing")

    def test_one_at_a_time(self) -> None:
        """Each RCPT is asked only when the previous reply is known; replies come in command order."""
        talk = self.ehlo(LateHandler({"rcpt"}))
        self.assertEqual(self.exchange(talk, ENVELOPE), b"250 2.1.0 <a@example.org>, sender ok\r\n")
        handler = talk.handler
        self.assertEqual(len(handler.pending), 1)
        first, result = handler.pending.pop()
        self.assertNoResult(first)
        before = len(talk.transport.value())
        first.callback(result)
        self.assertEqual(talk.transport.value()[before:], b"250 2.1.5 <b@example.org>, recipient ok\r\n")
        self.assertEqual(len(handler.pending), 1)
        handler.fire_all()
        self.assertEqual(talk.transport.value()[before:], ENVELOPE_REPLIES.split(b"\r\n", 1)[1])

    def test_failure_keeps_order(self) -> None:
        pending: Deferred[Any] = Deferred()
        talk = self.ehlo(RecordingHandler({"noop": lambda: pending}))
        self.assertEqual(self.exchange(talk, b"NOOP\r\nRSET\r\nHELP\r\n"), b"")
        before = len(talk.transport.value())
        pending.errback(RuntimeError("lost the database"))
        self.assertEqual(talk.transport.value()[before:],
                         b"451 4.3.0 Requested action aborted: local error in processing\r\n250 2.0.0 OK\r\n"
                         b"214 2.0.0 This is SMTP::Proxy 1.0\r\n")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_eom_late(self) -> None:
        """Commands pipelined after the final dot wait for eom()'s reply."""
        pending: Deferred[Any] = Deferred()
        talk = self.ehlo(RecordingHandler({"eom": lambda: pending}))
        self.assertEqual(self.exchange(talk, ENVELOPE), ENVELOPE_REPLIES)
        self.assertEqual(self.exchange(talk, b"Hi\r\n.\r\nNOOP\r\nQUIT\r\n"), b"")
        self.assertNoResult(pending)
        self.assertNotIn("noop", talk.handler.verbs)
        before = len(talk.transport.value())
        pending.callback((250, "queued as 42"))
        self.assertEqual(talk.transport.value()[before:],
                         b"250 2.0.0 queued as 42\r\n250 2.0.0 OK\r\n221 2.0.0 Closing connection\r\n")
        self.assertTrue(talk.closed)

    def test_no_timeout_while_handler_works(self) -> None:
        """The command timer does not run while the handler holds the reply; it restarts after."""
        pending: Deferred[Any] = Deferred()
        talk = self.ehlo(RecordingHandler({"noop": lambda: pending}))
        self.exchange(talk, b"NOOP\r\n")
        self.assertEqual(talk.clock.getDelayedCalls(), [])
        talk.clock.advance(talk.policy.command_timeout * 10)
        self.assertFalse(talk.closed)
        pending.callback((250, "done"))
        self.assertEqual([call.getTime() for call in talk.clock.getDelayedCalls()],
                         [talk.clock.seconds() + talk.policy.command_timeout])

    @SETTINGS
    @given(late=st.sets(st.sampled_from(["connect", "ehlo", "mail", "rcpt", "data", "header", "eoh", "body", "eom",
                                         "quit"])),
           cuts=st.lists(st.integers(0, len(SCENARIO)), max_size=12))
    def test_scenario_with_late_results(self, late: set[str], cuts: list[int]) -> None:
        """Whatever verbs answer late and however the bytes are split: the same replies, in the same order."""
        handler = LateHandler(late)
        talk = Conversation(handler, policy())
        handler.fire_all()
        for piece in split(SCENARIO, cuts):
            talk.write(piece)
            handler.fire_all()
        self.assertEqual(talk.transport.value(), SCENARIO_WIRE)
        self.assertEqual(calls(handler), SCENARIO_CALLS)
        talk.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(talk.clock.getDelayedCalls(), [])


class BackpressureTests(ServerMixin, SynchronousTestCase):
    """A pending header()/eoh()/body() pauses the transport: nothing more is read until it fires."""

    def late_once(self, verb: str) -> tuple[Conversation, Deferred[Any]]:
        pending: Deferred[Any] = Deferred()
        state = {"first": True}

        def late(*args: Any) -> Any:
            if state["first"]:
                state["first"] = False
                return pending
            return None

        handler = RecordingHandler({verb: late})
        handler.chunk_size = 4
        talk = self.ehlo(handler)
        self.assertEqual(self.exchange(talk, ENVELOPE), ENVELOPE_REPLIES)
        return talk, pending

    def test_body(self) -> None:
        talk, pending = self.late_once("body")
        self.assertEqual(self.exchange(talk, b"A: 1\r\n\r\n0123456789\r\n.\r\nNOOP\r\n"), b"")
        self.assertEqual([c.args for c in talk.handler.calls if c.verb == "body"], [(b"0123",)])
        self.assertEqual(talk.transport.producerState, "paused")
        self.assertNoResult(pending)
        self.assertEqual(self.exchange(talk, b"NOOP\r\n"), b"")  # arrives while paused: kept for later
        self.assertEqual(talk.clock.getDelayedCalls(), [])
        before = len(talk.transport.value())
        pending.callback(None)
        self.assertEqual(talk.transport.producerState, "producing")
        self.assertEqual(talk.transport.value()[before:], ACCEPTED + b"250 2.0.0 OK\r\n" * 2)
        self.assertEqual([c.args[0] for c in talk.handler.calls if c.verb == "body"],
                         [b"0123", b"4567", b"89\r\n"])
        self.assertEqual(talk.handler.messages[0]["body"], b"0123456789\r\n")

    def test_header(self) -> None:
        talk, pending = self.late_once("header")
        self.assertEqual(self.exchange(talk, b"A: 1\r\nB: 2\r\nC: 3\r\n\r\nbody\r\n.\r\n"), b"")
        self.assertEqual(talk.handler.verbs[-1], "header")
        self.assertEqual(talk.transport.producerState, "paused")
        pending.callback(None)
        self.assertEqual(talk.handler.messages[0]["headers"], [("A", "1"), ("B", "2"), ("C", "3")])
        self.assertTrue(talk.transport.value().endswith(ACCEPTED))
        self.assertEqual(talk.transport.producerState, "producing")

    def test_eoh(self) -> None:
        talk, pending = self.late_once("eoh")
        self.assertEqual(self.exchange(talk, b"A: 1\r\n\r\nbody\r\n.\r\n"), b"")
        self.assertEqual(talk.handler.verbs[-1], "eoh")
        pending.callback(None)
        self.assertEqual(talk.handler.verbs[-2:], ["body", "eom"])
        self.assertTrue(talk.transport.value().endswith(ACCEPTED))

    def test_body_failure(self) -> None:
        """A body() Deferred that fails: the message is refused after the final dot, abort() is called."""
        talk, pending = self.late_once("body")
        self.exchange(talk, b"A: 1\r\n\r\n0123456789\r\n.\r\nNOOP\r\n")
        before = len(talk.transport.value())
        pending.errback(OSError("disk full"))
        self.assertEqual(talk.transport.value()[before:],
                         b"451 4.3.0 Requested action aborted: local error in processing\r\n250 2.0.0 OK\r\n")
        self.assertEqual(talk.handler.verbs.count("body"), 1)
        self.assertEqual(talk.handler.verbs[-2:], ["abort", "noop"])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_connection_lost_while_paused(self) -> None:
        talk, pending = self.late_once("body")
        self.exchange(talk, b"A: 1\r\n\r\n0123456789\r\n.\r\n")
        talk.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(talk.handler.verbs[-1], "abort")
        pending.callback(None)
        self.assertEqual(talk.handler.verbs[-1], "abort")
        self.assertNotIn("eom", talk.handler.verbs)


class GoneWhilePendingTests(ServerMixin, SynchronousTestCase):
    """The client leaves while a handler result is pending: no error is logged, the transaction is dropped."""

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def gone(self, verb: str, setup: bytes, result: Any) -> Conversation:
        pending: Deferred[Any] = Deferred()
        talk = self.ehlo(RecordingHandler({verb: lambda *args: pending}))
        self.exchange(talk, setup)
        self.assertEqual(talk.handler.verbs[-1], verb)
        written = talk.transport.value()
        talk.protocol.connectionLost(Failure(ConnectionDone()))
        pending.callback(result)
        self.assertEqual(talk.transport.value(), written)
        self.assertEqual([e for e in self.events if e.get("log_level") in (LogLevel.error, LogLevel.critical)], [])
        return talk

    def test_mail_accepted_after_loss(self) -> None:
        """MAIL accepted by the handler after the client left: abort() tells it the transaction is gone."""
        talk = self.gone("mail", b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n", (250, "ok"))
        self.assertEqual(talk.handler.verbs[-2:], ["mail", "abort"])
        self.assertEqual(talk.protocol.phase, Phase.CLOSED)

    def test_mail_refused_after_loss(self) -> None:
        talk = self.gone("mail", b"MAIL FROM:<a@example.org>\r\n", (550, "no"))
        self.assertNotIn("abort", talk.handler.verbs)

    def test_rcpt_and_data_after_loss(self) -> None:
        for verb, setup in (("rcpt", b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"),
                            ("data", ENVELOPE)):
            for result in ((250, "ok"), (354, "go"), (550, "no")):
                talk = self.gone(verb, setup, result)
                self.assertEqual(talk.handler.verbs.count("abort"), 1, (verb, result))
                self.assertEqual(talk.protocol.phase, Phase.CLOSED)

    def test_other_verbs_after_loss(self) -> None:
        for verb, line in (("noop", b"NOOP\r\n"), ("rset", b"RSET\r\n"), ("quit", b"QUIT\r\n"),
                           ("help", b"HELP\r\n")):
            talk = self.gone(verb, line, (250, "ok"))
            self.assertNotIn("abort", talk.handler.verbs)


class LateFuzzTests(SynchronousTestCase):
    """Any client input with any verbs answering late gives what the synchronous handler gives."""

    @SETTINGS
    @given(tokens=st.lists(TOKENS, max_size=30), cuts=st.lists(st.integers(0, 20000), max_size=10),
           late=st.sets(st.sampled_from(["connect", "ehlo", "helo", "mail", "rcpt", "data", "header", "eoh", "body",
                                         "eom", "quit", "rset", "noop", "unknown", "abort"])),
           mode=st.sampled_from([None, True, False]))
    def test_any_input_late(self, tokens: list[bytes], cuts: list[int], late: set[str], mode: bool | None) -> None:
        data = b"".join(tokens)
        wire, expected = replay([data], chunk_mode=mode, chunk_size=5, max_message_size=2000)
        handler = LateHandler(late)
        handler.chunk_mode, handler.chunk_size = mode, 5
        talk = Conversation(handler, policy(max_message_size=2000))
        handler.fire_all()
        for piece in split(data, cuts):
            talk.write(piece)
            handler.fire_all()
        self.assertEqual(talk.transport.value(), wire)
        talk.protocol.connectionLost(Failure(ConnectionDone()))
        handler.fire_all()
        self.assertEqual(calls(handler), calls(expected))
        self.assertEqual(talk.clock.getDelayedCalls(), [])
