"""The monitor calls the protocol makes, the events EventLog emits from them, and the message/connection ids."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.handlers.base import MessageHandler
from esmtpkit.core.ids import ID_LENGTH, id_time, new_id
from esmtpkit.server.monitor import EVENTS, EventLog, Monitor, Monitors, guarded
from esmtpkit.server.policy import Policy
from esmtpkit.core.reply import Reply, SMTPReply
from esmtpkit.server.sasl import portal_from_strings
from esmtpkit.testing import Conversation

from .support import Recorder, every_event

CONTENT = b"Subject: hi\r\n\r\nbody text that must never be logged\r\n"


class RejectingHandler(MessageHandler):
    def eom(self) -> Any:
        raise SMTPReply(554, "5.7.1 Message refused by policy")


def talk(handler: Any = None, monitor: Monitor | None = None, ehlo: bool = False, **policy: Any) -> Conversation:
    policy.setdefault("hostname", "mx.test")
    conversation = Conversation(handler or MessageHandler(), Policy(**policy), monitor=monitor)
    if ehlo:
        conversation.send("EHLO client.test")
    return conversation


class ProtocolCallsTests(SynchronousTestCase):
    def test_accepted_message(self) -> None:
        """One transaction: opened, a reply per command (by verb), accepted with id, size and elapsed time."""
        rec = Recorder()
        t = talk(monitor=rec)
        t.send("EHLO client.test")
        t.send("MAIL FROM:<alice@example.com>")
        envelope = t.protocol.session.envelope
        t.clock.advance(2.5)
        t.send("RCPT TO:<bob@example.net>")
        t.send("DATA")
        t.write(CONTENT + b".\r\n")
        self.assertEqual(t.replies()[-1].code, 250)
        t.send("QUIT")
        t.protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(rec.names()[0], "connection_opened")
        replies = [(verb, reply.code) for _, verb, reply in rec.called("replied")]
        self.assertEqual(replies, [("CONNECT", 220), ("EHLO", 250), ("MAIL", 250), ("RCPT", 250), ("DATA", 354),
                                   ("DATA", 250), ("QUIT", 221)])
        [(session, accepted, size, seconds, reply)] = rec.called("message_accepted")
        self.assertIs(accepted, envelope)
        self.assertEqual(len(accepted.id), ID_LENGTH)
        self.assertEqual(str(accepted.sender), "alice@example.com")
        self.assertEqual(size, len(CONTENT))
        self.assertEqual(seconds, 2.5)
        self.assertEqual(reply.code, 250)
        [(session, duration, reason)] = rec.called("connection_closed")
        self.assertEqual((duration, reason), (2.5, "QUIT"))
        self.assertEqual(len(session.id), ID_LENGTH)
        self.assertEqual(rec.called("message_aborted"), [])

    def test_ids_differ(self) -> None:
        """Each transaction and each connection has its own id."""
        t = talk(ehlo=True)
        seen = set()
        for _ in range(3):
            t.send("MAIL FROM:<a@example.com>")
            seen.add(t.protocol.session.envelope.id)
            t.send("RSET")
        seen.add(t.protocol.session.id)
        seen.add(talk().protocol.session.id)
        self.assertEqual(len(seen), 5)

    def test_rejected_by_handler(self) -> None:
        rec = Recorder()
        t = talk(RejectingHandler(), monitor=rec)
        reply = t.message("alice@example.com", ["bob@example.net"], CONTENT)
        self.assertEqual(reply.code, 554)
        [(_, envelope, size, refusal)] = rec.called("message_rejected")
        self.assertEqual((envelope.recipients, size, refusal.code), (["bob@example.net"], len(CONTENT), 554))
        self.assertEqual(rec.called("message_accepted"), [])

    def test_rejected_by_size_limit(self) -> None:
        rec = Recorder()
        t = talk(monitor=rec, max_message_size=10)
        reply = t.message("alice@example.com", ["bob@example.net"], CONTENT)
        self.assertEqual((reply.code, reply.enhanced), (552, "5.3.4"))
        [(_, _, _, refusal)] = rec.called("message_rejected")
        self.assertEqual(refusal.code, 552)

    def test_aborted_by_rset_and_by_lost_connection(self) -> None:
        rec = Recorder()
        t = talk(monitor=rec, ehlo=True)
        t.send("MAIL FROM:<a@example.com>")
        t.send("RSET")
        t.send("MAIL FROM:<b@example.com>")
        t.send("RCPT TO:<c@example.com>")
        t.send("DATA")
        t.write(b"Subject: x\r\n\r\npartial")
        t.protocol.connectionLost(Failure(ConnectionLost("gone")))
        aborted = rec.called("message_aborted")
        self.assertEqual([(str(e.sender), reason) for _, e, _, reason in aborted],
                         [("a@example.com", "reset by RSET"), ("b@example.com", "connection lost")])
        self.assertEqual(aborted[1][2], len(b"Subject: x\r\n\r\npartial"))  # what had arrived
        [(_, _, reason)] = rec.called("connection_closed")
        self.assertTrue(reason.startswith("connection lost:"), reason)

    def test_bdat_message(self) -> None:
        rec = Recorder()
        t = talk(monitor=rec)
        t.send("EHLO c")
        t.send("MAIL FROM:<a@example.com>")
        t.send("RCPT TO:<b@example.com>")
        t.write(b"BDAT %d LAST\r\n" % len(CONTENT) + CONTENT)
        self.assertEqual(t.replies()[-1].code, 250)
        [(_, _, size, _, _)] = rec.called("message_accepted")
        self.assertEqual(size, len(CONTENT))
        self.assertEqual([v for _, v, _ in rec.called("replied")][-1], "BDAT")

    def test_timeout(self) -> None:
        rec = Recorder()
        t = talk(monitor=rec, command_timeout=30, ehlo=True)
        t.send("MAIL FROM:<a@example.com>")
        t.clock.advance(30)
        self.assertEqual(t.replies()[-1].code, 421)
        self.assertEqual(rec.called("timed_out")[0][1], "sender")
        self.assertEqual(rec.called("replied")[-1][1], "TIMEOUT")
        t.protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(rec.called("connection_closed")[0][2], "timeout")
        self.assertEqual(rec.called("message_aborted")[0][3], "timeout")

    def test_auth(self) -> None:
        rec = Recorder()
        t = talk(monitor=rec, portal=portal_from_strings(["memory:alice:secret"]), auth_require_tls=False)
        t.send("EHLO c")
        bad = base64.b64encode(b"\0alice\0wrong").decode()
        good = base64.b64encode(b"\0alice\0secret").decode()
        self.assertEqual(t.send(f"AUTH PLAIN {bad}").code, 535)
        self.assertEqual(t.send("AUTH PLAIN " + base64.b64encode(b"no separators").decode()).code, 501)
        self.assertEqual(t.send(f"AUTH PLAIN {good}").code, 235)
        failed = rec.called("auth_failed")
        self.assertEqual([(m, u, r.code) for _, m, u, r in failed], [("PLAIN", "alice", 535), ("PLAIN", None, 501)])
        self.assertEqual([(m, u) for _, m, u in rec.called("auth_succeeded")], [("PLAIN", "alice")])

    def test_refused_connection(self) -> None:
        """A connection the factory refuses is reported refused, never opened or closed."""
        from esmtpkit.server.factory import ESMTPFactory
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        rec = Recorder()
        factory = ESMTPFactory(MessageHandler, Policy(hostname="mx.test", max_connections=1), Clock(), monitor=rec)
        protos = []
        for port in (1000, 1001):
            proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
            proto.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port)))
            protos.append(proto)
        self.assertEqual(rec.names()[:3], ["connection_opened", "replied", "connection_refused"])
        self.assertEqual(rec.called("connection_refused")[0][1].code, 421)
        for proto in protos:
            proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(len(rec.called("connection_closed")), 1)

    def test_handler_timing(self) -> None:
        """With ``timing``, handler latency is measured until a Deferred result fires."""
        pending: Deferred[Any] = Deferred()

        class Slow(MessageHandler):
            def rcpt(self, recipient: Any, params: Any) -> Any:
                return pending

        rec = Recorder(timing=True)
        t = talk(Slow(), monitor=rec, ehlo=True)
        t.send("MAIL FROM:<a@example.com>")
        t.write(b"RCPT TO:<b@example.com>\r\n")
        t.clock.advance(0.75)
        pending.callback(Reply.of(250, "ok"))
        handled = dict((verb, seconds) for verb, seconds in rec.called("handled"))
        self.assertEqual(handled["rcpt"], 0.75)
        self.assertEqual(handled["mail"], 0.0)

    def test_no_timing_by_default(self) -> None:
        rec = Recorder()
        talk(monitor=rec).send("NOOP")
        self.assertEqual(rec.called("handled"), [])


    def test_unsolicited_replies_and_reasons(self) -> None:
        """An over-long line counts as UNKNOWN; the error limit's 421 and a shutdown's are heard, with reasons."""
        rec = Recorder()
        t = talk(monitor=rec, ehlo=True, error_limit=2)
        t.send("MAIL FROM:<a@example.com>")
        t.write(b"X" * 2000 + b"\r\nBOGUS\r\n")
        self.assertEqual([(v, r.code) for _, v, r in rec.called("replied")][-3:],
                         [("UNKNOWN", 500), ("UNKNOWN", 500), ("ERRORS", 421)])
        t.protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(rec.called("connection_closed")[0][2], "too many errors")
        idle_rec = Recorder()
        idle = talk(monitor=idle_rec, ehlo=True)
        idle.protocol.shutdown()
        idle.protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(idle_rec.called("replied")[-1][1:], ("SHUTDOWN", idle_rec.called("replied")[-1][2]))
        self.assertEqual(idle_rec.called("connection_closed")[0][2], "shutdown")

    def test_auth_line_too_long_is_a_failure(self) -> None:
        rec = Recorder()
        t = talk(monitor=rec, portal=portal_from_strings(["memory:alice:secret"]), auth_require_tls=False)
        t.send("EHLO c")
        self.assertEqual(t.send("AUTH LOGIN").code, 334)
        t.write(b"A" * 20000 + b"\r\n")
        self.assertEqual(t.replies()[-1].code, 500)
        self.assertEqual([(m, r.code) for _, m, _, r in rec.called("auth_failed")], [("LOGIN", 500)])


class GuardTests(SynchronousTestCase):
    def test_failing_monitor_never_breaks_the_session(self) -> None:
        class Broken(Monitor):
            def replied(self, session: Any, verb: str, reply: Reply) -> None:
                raise RuntimeError("boom")

        rec = Recorder()
        t = talk(monitor=Monitors([Broken(), rec]))
        self.assertEqual(t.send("NOOP").code, 250)
        self.assertEqual([v for _, v, _ in rec.called("replied")], ["CONNECT", "NOOP"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_guarded_wraps_once(self) -> None:
        both = Monitors([Monitor()])
        self.assertIs(guarded(both), both)
        self.assertIsInstance(guarded(Monitor()), Monitors)
        self.assertTrue(Monitors([Monitor(), Recorder(timing=True)]).timing)


class EventLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        log = Logger(namespace="esmtpkit.events", observer=self.events.append)
        self.monitor = EventLog(log)

    def by_name(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]

    def test_vocabulary(self) -> None:
        """A session's events: names, levels, ids linking them, and formatted text."""
        t = talk(monitor=self.monitor, portal=portal_from_strings(["memory:alice:secret"]), auth_require_tls=False)
        t.send("EHLO c")
        t.send("AUTH PLAIN " + base64.b64encode(b"\0alice\0hunter2-wrong").decode())
        t.send("AUTH PLAIN " + base64.b64encode(b"\0alice\0secret").decode())
        t.message("alice@example.com", ["bob@example.net", "carol@example.net"], CONTENT, ehlo=None)
        t.send("QUIT")
        t.protocol.connectionLost(Failure(ConnectionLost()))
        names = [e["event"] for e in self.events]
        self.assertEqual(names, ["connection.opened", "auth.failed", "reply.error", "auth.succeeded",
                                 "message.accepted", "connection.closed"])
        for event in self.events:
            self.assertEqual(event["log_level"], EVENTS[event["event"]])
            self.assertEqual(event["conn"], t.protocol.session.id)
            self.assertEqual(event["peer"], "127.0.0.1")
            self.assertNotIn("hunter2", formatEvent(event))
            self.assertNotIn("never be logged", repr(event))
        [accepted] = self.by_name("message.accepted")
        self.assertEqual({k: accepted[k] for k in ("sender", "recipients", "size", "code", "enhanced")},
                         {"sender": "alice@example.com", "recipients": 2, "size": len(CONTENT), "code": 250,
                          "enhanced": "2.0.0"})
        self.assertIn(f"message {accepted['id']} accepted: from=<alice@example.com> recipients=2",
                      formatEvent(accepted))
        [error] = self.by_name("reply.error")
        self.assertEqual((error["verb"], error["code"], error["enhanced"], error["reply_text"]), ("AUTH", 535, "5.7.8", ""))
        [closed] = self.by_name("connection.closed")
        self.assertEqual((closed["reason"], closed["messages"], closed["user"]), ("QUIT", 1, "alice"))
        self.assertEqual(self.by_name("auth.failed")[0]["log_level"], LogLevel.warn)

    def test_minimum_level(self) -> None:
        """Below ``minimum`` nothing is emitted (nor computed); refused AUTH still is at warn."""
        quiet = EventLog(Logger(namespace="esmtpkit.events", observer=self.events.append), minimum=LogLevel.warn)
        t = talk(monitor=guarded(quiet), portal=portal_from_strings(["memory:alice:secret"]),
                 auth_require_tls=False)
        t.send("EHLO c")
        t.send("AUTH PLAIN " + base64.b64encode(b"\0alice\0nope").decode())
        t.message("alice@example.com", ["bob@example.net"], CONTENT, ehlo=None)
        self.assertEqual([e["event"] for e in self.events], ["auth.failed"])

    def test_user_names_cannot_forge_log_lines(self) -> None:
        t = talk(monitor=self.monitor, portal=portal_from_strings(["memory:alice:secret"]), auth_require_tls=False)
        t.send("EHLO c")
        t.send("AUTH PLAIN " + base64.b64encode(b"\0alice\nforged: line\0x").decode())
        [failed] = self.by_name("auth.failed")
        self.assertEqual(failed["user"], "alice\\nforged: line")
        self.assertNotIn("\n", formatEvent(failed))

    def test_every_event_escapes_client_text(self) -> None:
        """Each method, given control characters wherever text may come from a client, emits none raw."""
        from twisted.internet.address import IPv4Address

        from esmtpkit.core.address import Address
        from esmtpkit.core.escape import UNSAFE
        from esmtpkit.core.session import Envelope, Session

        bad = "\x1b[2J\r\n\x0c\x85\u2028\u202e"
        session = Session(hostname="mx.test", peer=IPv4Address("TCP", "192.0.2.1" + bad, 1),
                          host=IPv4Address("TCP", "192.0.2.2" + bad, 25), helo="c" + bad,
                          authenticated="u" + bad,
                          envelope=Envelope(id="M1", sender=Address("s" + bad + "@example.org"),
                                            recipients=[Address("r" + bad + "@example.org")]))
        reply = Reply.of(550, "5.1.1 <r" + bad + "@example.org> unknown")
        monitor = self.monitor
        monitor.connection_opened(session)
        monitor.connection_refused(session, Reply.of(421, "4.3.2 busy " + bad))
        monitor.tls_established(session)
        monitor.tls_failed(session, "alert " + bad)
        monitor.auth_succeeded(session, "PLAIN", "u" + bad)
        monitor.auth_failed(session, "PLAIN", "u" + bad, Reply.of(535))
        monitor.replied(session, "RCPT", reply)
        monitor.timed_out(session, "greeted")
        monitor.message_accepted(session, session.envelope, 1, 0.5, Reply.of(250, "ok " + bad))
        monitor.message_rejected(session, session.envelope, 1, reply)
        monitor.message_aborted(session, session.envelope, 1, "reset by RSET")
        monitor.connection_closed(session, 1.0, "connection lost: " + bad)
        self.assertEqual(len(self.events), 12)
        for event in self.events:
            fields = [v for k, v in event.items() if isinstance(v, str)] + [formatEvent(event)]
            for text in fields:
                self.assertIsNone(UNSAFE.search(text), f"{event['event']}: {text!r}")
        self.assertEqual(self.by_name("reply.error")[0]["reply_text"],
                         "<r\\x1b[2J  \\x0c\\x85\\u2028\\u202e@example.org> unknown")  # Reply made CR LF spaces

    def test_unknown_command_text_is_not_logged(self) -> None:
        """An unknown command's reply may echo the line (here, credentials for an AUTH that is not offered)."""
        t = talk(monitor=self.monitor)
        secret = base64.b64encode(b"\0alice\0hunter2").decode()
        reply = t.send(f"AUTH PLAIN {secret}")
        self.assertEqual(reply.code, 500)
        self.assertIn(secret, reply.text)
        [error] = self.by_name("reply.error")
        self.assertEqual((error["verb"], error["code"], error["reply_text"]), ("UNKNOWN", 500, ""))
        self.assertNotIn(secret, repr(self.events))

    def test_rejected_and_aborted(self) -> None:
        t = talk(RejectingHandler(), monitor=self.monitor)
        t.message("alice@example.com", ["bob@example.net"], CONTENT)
        t.send("MAIL FROM:<x@example.com>")
        t.send("RSET")
        [rejected] = self.by_name("message.rejected")
        self.assertEqual((rejected["code"], rejected["enhanced"], rejected["reply_text"]),
                         (554, "5.7.1", "Message refused by policy"))
        [aborted] = self.by_name("message.aborted")
        self.assertEqual((aborted["sender"], aborted["reason"], aborted["size"]), ("x@example.com", "reset by RSET", 0))
        self.assertNotEqual(aborted["id"], rejected["id"])


class IdTests(SynchronousTestCase):
    def test_shape_order_and_time(self) -> None:
        first, second = new_id(1_700_000_000.001), new_id(1_700_000_000.002)
        self.assertEqual(len(first), ID_LENGTH)
        self.assertRegex(first, r"^[0-9A-HJKMNP-TV-Z]{20}$")
        self.assertLess(first, second)
        self.assertEqual(id_time(first), 1_700_000_000.001)

    def test_unique(self) -> None:
        self.assertEqual(len({new_id(1.0) for _ in range(10000)}), 10000)

    def test_not_an_id(self) -> None:
        for value in ("", "short", "I" * ID_LENGTH):
            self.assertRaises(ValueError, id_time, value)


class FlattenedEventTests(SynchronousTestCase):
    """EventLog hands observers events that are already flattened, exactly as Twisted would flatten them."""

    def test_as_logger_emit_makes_them(self) -> None:
        """The same keys and values as `Logger.emit` gives, plus ``log_flattened``; the same text without it."""
        from twisted.logger import eventAsJSON

        for text in ("", "\x1b é\u2028"):
            events = every_event(text)
            self.assertEqual(len(events), 17)
            for event in events:
                made: list[dict[str, Any]] = []
                plain = {k: v for k, v in event.items() if not k.startswith("log_")}
                Logger(namespace="esmtpkit.events", observer=made.append).emit(
                    event["log_level"], event["log_format"], **plain)
                [emitted] = made
                self.assertEqual(set(event) - {"log_flattened"}, set(emitted))
                for key in emitted:
                    if key not in ("log_time", "log_logger"):
                        self.assertEqual(event[key], emitted[key], key)
                unflattened = {k: v for k, v in event.items() if k != "log_flattened"}
                self.assertEqual(formatEvent(event), formatEvent(unflattened))
                self.assertEqual(json.loads(eventAsJSON(dict(event))), json.loads(eventAsJSON(unflattened)))

    def test_logger_subclass_emit_still_called(self) -> None:
        """A logger whose class overrides ``emit`` sees every event, flattened the same way."""
        emitted: list[str] = []
        events: list[dict[str, Any]] = []

        class Counting(Logger):
            def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
                emitted.append(str(kwargs["event"]))
                super().emit(level, format, **kwargs)

        monitor = EventLog(Counting(namespace="esmtpkit.events", observer=events.append))
        talk(monitor=monitor).send("QUIT")
        self.assertEqual(emitted, ["connection.opened", "connection.closed"])
        self.assertEqual(formatEvent(events[0]), formatEvent({k: v for k, v in events[0].items()
                                                              if k != "log_flattened"}))
        self.assertIn("peer!s:", events[0]["log_flattened"])

    def test_text_lines_as_twistd_writes_them(self) -> None:
        """`text_lines_observer` writes what twistd's `textFileLogObserver` writes, for our events and others."""
        from twisted.logger import textFileLogObserver

        from esmtpkit.ops.logformat import text_lines_observer

        events = every_event() + every_event("\x1b é")
        for when, event in zip([1_700_000_000.0, 1_700_000_000.5, 1_700_000_001.0, 1_700_000_001.999], events):
            event["log_time"] = when
        other = Logger(namespace="elsewhere", observer=events.append)
        other.info("plain {x} and {y!r} and {z:>4}", x="a", y="b", z=7)
        other.warn("two\nlines {n}", n=2)
        other.info("system {s}", s=1, log_system="custom")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            other.failure("it failed")
        events.append({"log_time": 1.0})
        events.append({"log_format": "{a.b}", "a": 1})
        ours, theirs = io.StringIO(), io.StringIO()
        fast, slow = text_lines_observer(ours), textFileLogObserver(theirs)
        for event in events:
            fast(event)
            slow(event)
        self.assertEqual(ours.getvalue(), theirs.getvalue())
        self.assertIn("2023-11-14T22:13:21", ours.getvalue())

    def test_json_lines_as_before(self) -> None:
        """`json_lines_observer` writes the JSON objects `jsonFileLogObserver` writes for the events with their
        ``text`` (its keys may come in another order)."""
        from twisted.logger import jsonFileLogObserver

        from esmtpkit.ops.logformat import json_lines_observer

        events = every_event() + every_event("\x1b é\u2028")
        other = Logger(namespace="elsewhere", observer=events.append)
        other.info("plain {x} and {y!r}", x=b"bytes", y=object())
        ours, theirs = io.StringIO(), io.StringIO()
        fast, slow = json_lines_observer(ours), jsonFileLogObserver(theirs, recordSeparator="")
        for event in events:
            fast(event)
            slow({**event, "text": formatEvent(event)})
        self.assertEqual([json.loads(line) for line in ours.getvalue().splitlines()],
                         [json.loads(line) for line in theirs.getvalue().splitlines()])
        accepted = [json.loads(line) for line in ours.getvalue().splitlines()][10]
        self.assertEqual((accepted["event"], accepted["text"]),
                         ("message.accepted", "message M1 accepted: from=<s@example.org> recipients=1 size=1 "
                                              "elapsed=0.5s conn= peer=192.0.2.1"))

    def test_text_observer_writes_where_twistd_would(self) -> None:
        """`use_text` names `text_observer` for twistd's ``--logger``; with ``-n`` and no ``--logfile`` it writes
        to stdout, as twistd does."""
        import sys

        from esmtpkit.ops import logformat

        self.addCleanup(logformat._destination.update, dict(logformat._destination))
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(logformat.use_text(None, True), "esmtpkit.ops.logformat.text_observer")
        logformat.text_observer()(every_event()[0])
        self.assertEqual(out.getvalue().split(" ", 1)[1], "[esmtpkit.events#info] connection  from 192.0.2.1 port 1\n")
