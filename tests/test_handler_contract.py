"""Tests for the handler contract: `IMessageHandler`, the seed defaults, what a handler may return, abort()."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from esmtpkit.core.address import Address
from esmtpkit.handlers.base import MessageHandler
from esmtpkit.server.interfaces import ContentMode, IMessageHandler, content_mode_of
from esmtpkit.server.policy import Policy
from esmtpkit.core.reply import Reply, SMTPReply
from esmtpkit.core.session import Session
from esmtpkit.core.rules import Phase
from esmtpkit.testing import RecordingHandler

from .support import ACCEPTED, EHLO_REPLY, GO_AHEAD, GREETING, ServerMixin

LOCAL_ERROR = b"451 4.3.0 Requested action aborted: local error in processing\r\n"
START = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"

#: The seed's default replies (Apache2::Protocol::ESMTP), verb by verb, with the arguments used to ask.
SEED_DEFAULTS: list[tuple[str, tuple[Any, ...], Reply]] = [
    ("connect", (Session(hostname="mx.test"),), Reply.of(220, "ESMTP Mail Server")),
    ("helo", ("client.test",), Reply.of(250, "OK")),
    ("ehlo", ("client.test",), Reply.of(250, "client.test, pleased to meet you", "HELP")),
    ("mail", (Address("a@example.org"), {}), Reply.of(250, "<a@example.org>, sender ok", enhanced="2.1.0")),
    ("rcpt", (Address("b@example.org"), {}), Reply.of(250, "<b@example.org>, recipient ok", enhanced="2.1.5")),
    ("data", (), Reply.of(354, 'Enter mail, end with "." on a line by itself')),
    ("eom", (), Reply.of(250, "Message accepted for delivery", enhanced="2.0.0")),
    ("expn", ("staff",), Reply.of(502, "Sorry we don't allow this operation", enhanced="5.5.1")),
    ("vrfy", ("bob",), Reply.of(252, "Cannot VRFY user; try RCPT to attempt delivery", enhanced="2.5.2")),
    ("noop", (), Reply.of(250, "OK")),
    ("rset", (), Reply.of(250, "OK")),
    ("help", (None,), Reply.of(214, "This is SMTP::Proxy 1.0")),
    ("quit", (), Reply.of(221, "Closing connection", enhanced="2.0.0")),
    ("unknown", ("FROB x",), Reply.of(500, "Command unrecognized: FROB x", enhanced="5.5.2")),
]


class InterfaceTests(SynchronousTestCase):
    def test_verify(self) -> None:
        verifyClass(IMessageHandler, MessageHandler)
        self.assertTrue(verifyObject(IMessageHandler, MessageHandler()))
        self.assertTrue(verifyObject(IMessageHandler, RecordingHandler()))

    def test_every_seed_verb(self) -> None:
        """Every seed method, Pythonic, plus abort(), the seed properties, the content mode and the session."""
        names = set(IMessageHandler.names())
        self.assertEqual(names, {"connect", "helo", "ehlo", "mail", "rcpt", "data", "header", "eoh", "body", "eom",
                                 "expn", "vrfy", "noop", "rset", "help", "quit", "unknown", "abort",
                                 "chunk_mode", "chunk_size", "disconnect", "content_mode", "session"})

    def test_seed_defaults(self) -> None:
        """The seed's default replies, word for word (angle brackets around paths, as the design asks)."""
        handler = MessageHandler()
        for verb, args, reply in SEED_DEFAULTS:
            self.assertEqual(getattr(handler, verb)(*args), reply, verb)

    def test_defaults_documented(self) -> None:
        """The interface docstrings state the same defaults the base class gives."""
        documented = {"ehlo": "250 <domain>, pleased to meet you", "mail": "250 <sender>, sender ok",
                      "rcpt": "250 <recipient>, recipient ok", "unknown": "500 Command unrecognized: <line>"}
        for verb, _, reply in SEED_DEFAULTS:
            text = documented.get(verb, f"{reply.code} {reply.lines[0]}")
            self.assertIn(f"``{text}``", IMessageHandler[verb].__doc__, verb)

    def test_silent_verbs(self) -> None:
        handler = MessageHandler()
        self.assertIsNone(handler.header("Subject", "x"))
        self.assertIsNone(handler.eoh())
        self.assertIsNone(handler.body(b"x\r\n"))
        self.assertIsNone(handler.abort("reset"))

    def test_properties(self) -> None:
        """The seed's properties: line mode for headers then chunks (PARSED), 64 KiB chunks (stated once, by the
        policy: the handler's None defers to it), no disconnect."""
        handler = MessageHandler()
        self.assertEqual((handler.chunk_mode, handler.content_mode, handler.chunk_size, handler.disconnect),
                         (None, None, None, False))
        self.assertIs(content_mode_of(handler), ContentMode.PARSED)
        self.assertEqual(Policy().chunk_size, 65536)
        for chunk_mode, mode in ((True, ContentMode.RAW), (False, ContentMode.LINES), (None, ContentMode.PARSED)):
            handler.chunk_mode = chunk_mode
            self.assertIs(content_mode_of(handler), mode)
        handler.content_mode = ContentMode.LINES  # the explicit mode wins over the seed's flag
        self.assertIs(content_mode_of(handler), ContentMode.LINES)

    def test_connect_keeps_session(self) -> None:
        handler = MessageHandler()
        session = Session(hostname="mx.test")
        handler.connect(session)
        self.assertIs(handler.session, session)


class ResultTests(ServerMixin, SynchronousTestCase):
    """A handler may return a Reply, a tuple, a Deferred or a coroutine of either, or raise."""

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def noop_answers(self, result: Any) -> bytes:
        talk = self.ehlo(RecordingHandler({"noop": result}))
        return self.exchange(talk, b"NOOP\r\n")

    def test_tuple(self) -> None:
        self.assertEqual(self.noop_answers(lambda: (250, "first", "second")), b"250-2.0.0 first\r\n250 2.0.0 second\r\n")
        self.assertEqual(self.noop_answers(lambda: (250,)), b"250 2.0.0\r\n")

    def test_reply(self) -> None:
        self.assertEqual(self.noop_answers(lambda: Reply.of(250, "fine", enhanced="2.1.0")), b"250 2.1.0 fine\r\n")

    def test_multi_line(self) -> None:
        """RFC 5321 §4.2.1 multi-line replies, with the enhanced code on every line."""
        self.assertEqual(self.noop_answers(lambda: Reply.of(250, "a", "b", "c")),
                         b"250-2.0.0 a\r\n250-2.0.0 b\r\n250 2.0.0 c\r\n")

    def test_deferred(self) -> None:
        self.assertEqual(self.noop_answers(lambda: succeed((250, "soon"))), b"250 2.0.0 soon\r\n")

    def test_deferred_fired_later(self) -> None:
        pending: Deferred[Any] = Deferred()
        talk = self.ehlo(RecordingHandler({"noop": lambda: pending}))
        self.assertEqual(self.exchange(talk, b"NOOP\r\n"), b"")
        before = len(talk.transport.value())
        pending.callback(Reply.of(250, "later"))
        self.assertEqual(talk.transport.value()[before:], b"250 2.0.0 later\r\n")

    def test_coroutine(self) -> None:
        pending: Deferred[Any] = Deferred()

        async def noop() -> Any:
            first = await pending
            return (250, first)

        talk = self.ehlo(RecordingHandler({"noop": noop}))
        self.assertEqual(self.exchange(talk, b"NOOP\r\nRSET\r\n"), b"")
        before = len(talk.transport.value())
        pending.callback("from a coroutine")
        self.assertEqual(talk.transport.value()[before:], b"250 2.0.0 from a coroutine\r\n250 2.0.0 OK\r\n")

    def test_coroutine_immediate(self) -> None:
        async def noop() -> Any:
            return Reply.of(250, "at once")

        self.assertEqual(self.noop_answers(noop), b"250 2.0.0 at once\r\n")

    def test_raise_smtp_reply(self) -> None:
        def noop() -> Any:
            raise SMTPReply(550, "not today", enhanced="5.7.1")

        self.assertEqual(self.noop_answers(noop), b"550 5.7.1 not today\r\n")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_smtp_reply_from_deferred_and_coroutine(self) -> None:
        async def noop() -> Any:
            raise SMTPReply(421, "bye")

        self.assertEqual(self.noop_answers(lambda: fail(SMTPReply(550, "nope"))), b"550 5.0.0 nope\r\n")
        self.assertEqual(self.noop_answers(noop), b"421 4.3.0 bye\r\n")

    def test_unexpected_exception(self) -> None:
        """451 4.3.0, logged with twisted.logger, and the session goes on."""
        def noop() -> Any:
            raise RuntimeError("disk on fire")

        talk = self.ehlo(RecordingHandler({"noop": noop}))
        self.assertEqual(self.exchange(talk, b"NOOP\r\n"), LOCAL_ERROR)
        errors = self.flushLoggedErrors(RuntimeError)
        self.assertEqual([str(e.value) for e in errors], ["disk on fire"])
        self.assertEqual([e["log_format"] for e in self.events if "log_failure" in e], ["handler {what} failed"])
        self.assertFalse(talk.closed)
        self.assertEqual(talk.message("a@example.org", ["b@example.org"], b"still fine\r\n", ehlo=None).code, 250)

    def test_unexpected_exception_everywhere(self) -> None:
        """Any verb that raises gives 451 (plain before EHLO); from a Deferred or coroutine as well."""
        async def broken(*args: Any) -> Any:
            raise ValueError("broken")

        for verb, line in [("helo", b"HELO x"), ("ehlo", b"EHLO x"), ("vrfy", b"VRFY x"), ("help", b"HELP")]:
            talk = self.connect(RecordingHandler({verb: broken}))
            self.assertEqual(self.exchange(talk, line + b"\r\n"),
                             b"451 Requested action aborted: local error in processing\r\n", verb)
        talk = self.ehlo(RecordingHandler({"mail": lambda s, p: fail(KeyError("x")), "rset": broken}))
        self.assertEqual(self.exchange(talk, b"MAIL FROM:<a@example.org>\r\nRSET\r\nNOOP\r\n"),
                         LOCAL_ERROR + LOCAL_ERROR + b"250 2.0.0 OK\r\n")
        self.assertEqual(len(self.flushLoggedErrors(ValueError, KeyError)), 6)

    def test_garbage(self) -> None:
        """A result that is not a reply: 451 4.3.0, logged."""
        for garbage in (None, "250 OK", [250, "OK"], (999, "no such code"), object()):
            self.assertEqual(self.noop_answers(lambda: garbage), LOCAL_ERROR, garbage)
        logged = [e for e in self.events if e.get("log_format") == "handler {what} returned {value!r}, not a reply"]
        self.assertEqual(len(logged), 5)

    def test_garbage_from_deferred(self) -> None:
        self.assertEqual(self.noop_answers(lambda: succeed("nonsense")), LOCAL_ERROR)

    def test_failing_greeting(self) -> None:
        talk = self.connect(RecordingHandler({"connect": lambda s: fail(RuntimeError("no"))}))
        self.assertEqual(talk.transport.value(), b"451 Requested action aborted: local error in processing\r\n")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failing_eom(self) -> None:
        """eom() raising: 451 after the final dot, the transaction is over (no abort, eom was asked)."""
        def eom() -> Any:
            raise RuntimeError("store failed")

        talk = self.ehlo(RecordingHandler({"eom": eom}))
        self.assertEqual(self.exchange(talk, START + b"x\r\n.\r\nNOOP\r\n"),
                         b"250 2.1.0 <a@example.org>, sender ok\r\n250 2.1.5 <b@example.org>, recipient ok\r\n"
                         + GO_AHEAD + LOCAL_ERROR + b"250 2.0.0 OK\r\n")
        self.assertNotIn("abort", talk.handler.verbs)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failing_body(self) -> None:
        """header()/eoh()/body() raising: the message is refused after the final dot and abort() called."""
        def boom(*args: Any) -> Any:
            raise RuntimeError("no space")

        for verb in ("header", "eoh", "body"):
            talk = self.ehlo(RecordingHandler({verb: boom}))
            wire = self.exchange(talk, START + b"Subject: x\r\n\r\nbody\r\nmore\r\n.\r\nNOOP\r\n")
            self.assertTrue(wire.endswith(GO_AHEAD + LOCAL_ERROR + b"250 2.0.0 OK\r\n"), verb)
            self.assertEqual(talk.handler.verbs[-2:], ["abort", "noop"], verb)
            self.assertEqual(talk.handler.verbs.count(verb), 1, verb)
            self.assertNotIn("eom", talk.handler.verbs)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)

    def test_body_raising_smtp_reply(self) -> None:
        def body(chunk: bytes) -> Any:
            raise SMTPReply(554, "5.6.0 bad content")

        talk = self.ehlo(RecordingHandler({"body": body}))
        wire = self.exchange(talk, START + b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.assertTrue(wire.endswith(GO_AHEAD + b"554 5.6.0 bad content\r\n"))
        self.assertEqual(talk.handler.verbs[-1], "abort")

    def test_failing_abort_is_logged(self) -> None:
        def abort(reason: str) -> Any:
            raise RuntimeError("cannot clean up")

        talk = self.ehlo(RecordingHandler({"abort": abort}))
        self.assertEqual(self.exchange(talk, b"MAIL FROM:<a@example.org>\r\nRSET\r\n"),
                         b"250 2.1.0 <a@example.org>, sender ok\r\n250 2.0.0 OK\r\n")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_error_reply_from_handler_not_logged_as_failure(self) -> None:
        self.assertEqual(self.noop_answers(lambda: (550, "no")), b"550 5.0.0 no\r\n")
        self.assertEqual([e for e in self.events if e.get("log_level") is not None
                          and e["log_level"].name in ("error", "critical")], [])


class DisconnectTests(ServerMixin, SynchronousTestCase):
    """The seed's ``disconnect`` property: close once the current reply is written."""

    def test_disconnect_after_reply(self) -> None:
        class Handler(RecordingHandler):
            def noop(self) -> Any:
                self.disconnect = True
                return super().noop()

        talk = self.ehlo(Handler())
        self.assertEqual(self.exchange(talk, b"NOOP\r\nNOOP\r\n"), b"250 2.0.0 OK\r\n")
        self.assertTrue(talk.closed)
        self.assertEqual(talk.handler.verbs.count("noop"), 1)

    def test_disconnect_mid_transaction_aborts(self) -> None:
        class Handler(RecordingHandler):
            def rcpt(self, recipient: Address, params: Any) -> Any:
                self.disconnect = True
                self._record("rcpt", recipient, params)
                return (550, "go away")

        talk = self.ehlo(Handler())
        self.assertEqual(self.exchange(talk, START), b"250 2.1.0 <a@example.org>, sender ok\r\n550 5.1.1 go away\r\n")
        self.assertTrue(talk.closed)
        self.assertEqual(talk.handler.verbs[-2:], ["rcpt", "abort"])

    def test_disconnect_at_greeting(self) -> None:
        class Handler(RecordingHandler):
            disconnect = True

        talk = self.connect(Handler())
        self.assertEqual(talk.transport.value(), GREETING)
        self.assertTrue(talk.closed)


class RefusedServiceTests(ServerMixin, SynchronousTestCase):
    """RFC 5321 §3.1: a 554 greeting; only QUIT is served afterwards. A 421 greeting closes at once."""

    def test_554(self) -> None:
        talk = self.connect(RecordingHandler({"connect": (554, "no service for you")}))
        self.assertEqual(talk.transport.value(), b"554 no service for you\r\n")
        self.assertEqual(self.exchange(talk, b"EHLO client.test\r\nHELO x\r\nMAIL FROM:<a@example.org>\r\nNOOP\r\n"),
                         b"503 No service: send QUIT\r\n" * 4)
        self.assertEqual(talk.handler.verbs, ["connect"])
        self.assertFalse(talk.closed)
        self.assertEqual(self.exchange(talk, b"QUIT\r\n"), b"221 Closing connection\r\n")
        self.assertTrue(talk.closed)

    def test_421(self) -> None:
        talk = self.connect(RecordingHandler({"connect": (421, "busy")}))
        self.assertEqual(talk.transport.value(), b"421 busy\r\n")
        self.assertTrue(talk.closed)
        self.assertEqual(talk.clock.getDelayedCalls(), [])

    def test_late_greeting(self) -> None:
        """A Deferred greeting: nothing is answered before it, even to a client that talks first."""
        pending: Deferred[Any] = Deferred()
        talk = self.connect(RecordingHandler({"connect": lambda s: pending}))
        self.assertEqual(self.exchange(talk, b"EHLO client.test\r\n"), b"")
        self.assertEqual(talk.handler.verbs, ["connect"])
        pending.callback(Reply.of(220, "late"))
        self.assertEqual(talk.transport.value(), b"220 mx.test late\r\n" + EHLO_REPLY)


class AbortTests(ServerMixin, SynchronousTestCase):
    """abort(): the transaction was dropped before eom(); never after eom()."""

    SETUPS = {
        Phase.SENDER: b"MAIL FROM:<a@example.org>\r\n",
        Phase.RECIPIENTS: b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n",
        Phase.DATA: START + b"Subject: x\r\n\r\npartial",
    }

    def started(self, phase: Phase) -> Any:
        talk = self.ehlo()
        self.exchange(talk, self.SETUPS[phase])
        self.assertEqual(talk.protocol.phase, phase)
        return talk

    def aborts(self, talk: Any) -> list[str]:
        return [c.args[0] for c in talk.handler.calls if c.verb == "abort"]

    def test_rset(self) -> None:
        for phase in self.SETUPS:
            talk = self.started(phase)
            if phase is Phase.DATA:
                continue  # commands are not read while content arrives
            self.assertEqual(self.exchange(talk, b"RSET\r\n"), b"250 2.0.0 OK\r\n")
            self.assertEqual(self.aborts(talk), ["reset by RSET"])
            self.assertEqual(talk.handler.verbs[-2:], ["abort", "rset"])

    def test_helo_ehlo(self) -> None:
        for line, reason in ((b"EHLO again.test\r\n", "reset by EHLO"), (b"HELO again.test\r\n", "reset by HELO")):
            talk = self.started(Phase.RECIPIENTS)
            self.exchange(talk, line)
            self.assertEqual(self.aborts(talk), [reason])
            self.assertEqual(talk.protocol.session.envelope.recipients, [])
            self.assertEqual(self.exchange(talk, b"RCPT TO:<b@example.org>\r\n"), b"503 5.5.1 Need MAIL command\r\n"
                             if line.startswith(b"EHLO") else b"503 Need MAIL command\r\n")

    def test_quit(self) -> None:
        talk = self.started(Phase.RECIPIENTS)
        self.assertEqual(self.exchange(talk, b"QUIT\r\n"), b"221 2.0.0 Closing connection\r\n")
        self.assertEqual(self.aborts(talk), ["QUIT"])
        self.assertEqual(talk.handler.verbs[-2:], ["abort", "quit"])

    def test_connection_lost(self) -> None:
        for phase in self.SETUPS:
            talk = self.started(phase)
            talk.protocol.connectionLost(Failure(ConnectionLost()))
            self.assertEqual(self.aborts(talk), ["connection lost"], phase)
            self.assertEqual(talk.protocol.phase, Phase.CLOSED)

    def test_no_abort_outside_transaction(self) -> None:
        talk = self.ehlo()
        self.exchange(talk, b"RSET\r\nEHLO again.test\r\nHELO again.test\r\nQUIT\r\n")
        talk.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.aborts(talk), [])

    def test_never_after_eom(self) -> None:
        for after in (b"RSET\r\n", b"EHLO again.test\r\n", b"QUIT\r\n", b""):
            talk = self.ehlo()
            self.assertIn(GO_AHEAD + ACCEPTED, self.exchange(talk, START + b"x\r\n.\r\n" + after))
            talk.protocol.connectionLost(Failure(ConnectionLost()))
            self.assertEqual(self.aborts(talk), [], after)

    def test_not_after_pending_eom(self) -> None:
        """The connection drops while eom() is pending: the handler decides, abort() is not called."""
        pending: Deferred[Any] = Deferred()
        talk = self.ehlo(RecordingHandler({"eom": lambda: pending}))
        self.exchange(talk, START + b"x\r\n.\r\n")
        talk.protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.aborts(talk), [])
        pending.callback((250, "kept"))
        self.assertFalse(talk.transport.value().endswith(b"kept\r\n"))

    def test_abort_between_transactions(self) -> None:
        """A second transaction after a delivered one is aborted on its own."""
        talk = self.ehlo()
        self.exchange(talk, START + b"x\r\n.\r\nMAIL FROM:<c@example.org>\r\nRSET\r\n")
        self.assertEqual(self.aborts(talk), ["reset by RSET"])
        self.assertEqual(len(talk.handler.messages), 1)
