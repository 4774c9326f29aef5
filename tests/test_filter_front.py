"""`FilterFront`: what the client hears and what the handler behind gets for each filter verdict, at each stage
(in memory, with `esmtpkit.testing.Conversation` and a scripted filter)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from esmtpkit.core.reply import Reply
from esmtpkit.filters import CONTINUE, Action, FilterChain, FilterSession, HeaderEdit, IFilter, Verdict
from esmtpkit.handlers.collecting import Collecting, MessageStore
from esmtpkit.handlers.filtering import FilterFront
from esmtpkit.server.policy import Policy
from esmtpkit.testing import Conversation
from tests.support import ScratchPaths

CONTENT = (b"From: a@example.org\r\n"
           b"To: b@example.net\r\n"
           b"Subject: hello\r\n"
           b"Received: one\r\n"
           b"Received: two\r\n"
           b"\r\n"
           b"Hi.\r\n")


@implementer(IFilter)
class Scripted:
    """A filter answering each stage from ``answers`` (a Verdict, or a Deferred of one); it records what it saw."""

    timeout = None
    on_failure = None

    def __init__(self, **answers: Any) -> None:
        self.name = "scripted"
        self.answers = answers
        self.seen: list[Any] = []

    def start(self, session: Any) -> Any:
        owner = self

        class One(FilterSession):
            def _answer(self, stage: str, *args: Any) -> Any:
                owner.seen.append((stage, *args))
                return owner.answers.get(stage, CONTINUE)

            def connect(self) -> Any:
                return self._answer("connect")

            def helo(self, name: str) -> Any:
                return self._answer("helo", name)

            def mail(self, sender: str, params: Any) -> Any:
                return self._answer("mail", sender)

            def rcpt(self, recipient: str, params: Any) -> Any:
                return self._answer("rcpt", recipient)

            def message(self, message: Any) -> Any:
                with message.open() as stream:
                    owner.seen.append(("message", stream.read(), message.size, message.sender,
                                       message.recipients))
                return owner.answers.get("message", CONTINUE)

            def reset(self) -> None:
                owner.seen.append(("reset",))

            def close(self) -> None:
                owner.seen.append(("close",))

        return One(session)


class FilterFrontTests(ScratchPaths, SynchronousTestCase):
    def talk(self, **answers: Any) -> tuple[Conversation, MessageStore, Scripted]:
        store = MessageStore()
        scripted = Scripted(**answers)
        chain = FilterChain([scripted], reactor=Clock())
        talk = Conversation(FilterFront(Collecting(store), chain), Policy(hostname="mx.test"))
        self.addCleanup(talk.protocol.transport.loseConnection)
        return talk, store, scripted

    def test_every_stage_reaches_the_filter_and_the_message_the_handler(self) -> None:
        talk, store, scripted = self.talk()
        reply = talk.message("a@example.org", ["b@example.net"], CONTENT)
        self.assertEqual(reply.code, 250)
        self.assertEqual([m.data for m in store.messages], [CONTENT])
        stages = [s[0] for s in scripted.seen]
        self.assertEqual(stages, ["connect", "helo", "mail", "rcpt", "message", "reset"])
        self.assertEqual(scripted.seen[4][1:], (CONTENT, len(CONTENT), "a@example.org", ["b@example.net"]))

    def test_header_edits_are_made(self) -> None:
        edits = (HeaderEdit("add", "X-Spam", "Yes"), HeaderEdit("insert", "X-Top", "1", 0),
                 HeaderEdit("change", "Received", "changed", 2), HeaderEdit("delete", "Subject"),
                 HeaderEdit("change", "X-Missing", "added"), HeaderEdit("insert", "X-Before-To", "b", 1))
        talk, store, _ = self.talk(message=Verdict(edits=edits))
        self.assertEqual(talk.message("a@example.org", ["b@example.net"], CONTENT).code, 250)
        [message] = store.messages
        self.assertEqual(message.data, b"X-Top: 1\r\n"
                                       b"From: a@example.org\r\n"
                                       b"X-Before-To: b\r\n"
                                       b"To: b@example.net\r\n"
                                       b"Received: one\r\n"
                                       b"Received: changed\r\n"
                                       b"X-Spam: Yes\r\n"
                                       b"X-Missing: added\r\n"
                                       b"\r\n"
                                       b"Hi.\r\n")

    def test_a_folded_value_goes_in_with_crlf(self) -> None:
        talk, store, _ = self.talk(message=Verdict(edits=(HeaderEdit("add", "DKIM-Signature", "v=1;\n\tb=abc"),)))
        talk.message("a@example.org", ["b@example.net"], CONTENT)
        self.assertIn(b"DKIM-Signature: v=1;\r\n\tb=abc\r\n\r\nHi.", store.messages[0].data)

    def test_reject_at_end_of_data(self) -> None:
        refused = Reply.of(550, "Spam", enhanced="5.7.1")
        talk, store, scripted = self.talk(message=Verdict(Action.REJECT, refused))
        reply = talk.message("a@example.org", ["b@example.net"], CONTENT)
        self.assertEqual((reply.code, reply.enhanced, reply.lines), (550, "5.7.1", ("Spam",)))
        self.assertEqual(store.messages, [])

    def test_a_reply_of_the_wrong_class_gets_the_default(self) -> None:
        talk, _, _ = self.talk(message=Verdict(Action.TEMPFAIL, Reply.of(250, "fine")))
        self.assertEqual(talk.message("a@example.org", ["b@example.net"], CONTENT).code, 451)

    def test_discard_answers_250_and_delivers_nothing(self) -> None:
        talk, store, _ = self.talk(message=Verdict(Action.DISCARD))
        self.assertEqual(talk.message("a@example.org", ["b@example.net"], CONTENT).code, 250)
        self.assertEqual(store.messages, [])

    def test_discard_at_rcpt_discards_the_message(self) -> None:
        talk, store, _ = self.talk(rcpt=Verdict(Action.DISCARD))
        self.assertEqual(talk.message("a@example.org", ["b@example.net"], CONTENT).code, 250)
        self.assertEqual(store.messages, [])

    def test_quarantine_marks_the_envelope(self) -> None:
        marks: list[Any] = []

        class Marking(Collecting):
            quarantines = True

            def eom(self) -> Any:
                marks.append(self.session.envelope.quarantine)
                return super().eom()

        scripted = Scripted(message=Verdict(Action.QUARANTINE, reason="odd attachment"))
        talk = Conversation(FilterFront(Marking(MessageStore()), FilterChain([scripted], reactor=Clock())))
        self.addCleanup(talk.protocol.transport.loseConnection)
        self.assertEqual(talk.message("a@example.org", ["b@example.net"], CONTENT).code, 250)
        self.assertEqual(marks, ["odd attachment"])

    def test_reject_at_mail_and_rcpt(self) -> None:
        talk, _, scripted = self.talk(mail=Verdict(Action.REJECT, Reply.of(553, "no such sender")))
        talk.send("EHLO client.test")
        self.assertEqual(talk.send("MAIL FROM:<a@example.org>").code, 553)
        talk, _, _ = self.talk(rcpt=Verdict(Action.TEMPFAIL))
        talk.send("EHLO client.test")
        talk.send("MAIL FROM:<a@example.org>")
        reply = talk.send("RCPT TO:<b@example.net>")
        self.assertEqual((reply.code, reply.enhanced), (451, "4.7.1"))

    def test_reject_at_connect_refuses_service(self) -> None:
        talk, _, _ = self.talk(connect=Verdict(Action.REJECT))
        self.assertEqual(talk.greeting.code, 554)
        self.assertEqual(talk.send("EHLO client.test").code, 503)

    def test_tempfail_at_connect_closes(self) -> None:
        talk, _, _ = self.talk(connect=Verdict(Action.TEMPFAIL))
        self.assertEqual(talk.greeting.code, 421)
        self.assertTrue(talk.closed)

    def test_a_pending_verdict_holds_the_reply(self) -> None:
        pending: Deferred[Verdict] = Deferred()
        talk, store, _ = self.talk(rcpt=pending)
        talk.send("EHLO client.test")
        talk.send("MAIL FROM:<a@example.org>")
        self.assertIsNone(talk.send("RCPT TO:<b@example.net>"))
        pending.callback(CONTINUE)
        self.assertEqual([r.code for r in talk.replies()], [250])

    def test_rset_resets_the_filter_and_the_connection_end_closes_it(self) -> None:
        talk, _, scripted = self.talk()
        talk.send("EHLO client.test")
        talk.send("MAIL FROM:<a@example.org>")
        talk.send("RSET")
        talk.send("QUIT")
        self.assertEqual([s[0] for s in scripted.seen], ["connect", "helo", "mail", "reset", "close"])

    def test_maildir_delivers_a_quarantined_message_apart(self) -> None:
        import os

        from esmtpkit.handlers.maildir import QUARANTINE_FOLDER, Maildir

        path = self.mktemp()
        scripted = Scripted(message=Verdict(Action.QUARANTINE, reason="suspicious"))
        chain = FilterChain([scripted], reactor=Clock())
        talk = Conversation(FilterFront(Maildir(path), chain))
        self.addCleanup(talk.protocol.transport.loseConnection)
        self.assertEqual(talk.message("a@example.org", ["b@example.net"], CONTENT).code, 250)
        self.assertEqual(os.listdir(os.path.join(path, "new")), [])
        [name] = os.listdir(os.path.join(path, QUARANTINE_FOLDER, "new"))
        with open(os.path.join(path, QUARANTINE_FOLDER, "new", name), "rb") as f:
            self.assertTrue(f.read().endswith(CONTENT))
        self.assertTrue(os.path.exists(os.path.join(path, QUARANTINE_FOLDER, "maildirfolder")))
        scripted.answers = {}
        self.assertEqual(talk.message("a@example.org", ["b@example.net"], CONTENT, ehlo=None).code, 250)
        self.assertEqual(len(os.listdir(os.path.join(path, "new"))), 1)

    def test_the_queue_holds_a_quarantined_message(self) -> None:
        from esmtpkit.handlers import Queue
        from esmtpkit.queue.memory import MemoryStore

        clock = Clock()
        store = MemoryStore(reactor=clock)
        scripted = Scripted(message=Verdict(Action.QUARANTINE, reason="suspicious"))
        front = FilterFront(Queue(store=store, reactor=clock, hostname="mx.test"),
                            FilterChain([scripted], reactor=clock))
        talk = Conversation(front, Policy(hostname="mx.test"), clock=clock)
        self.addCleanup(talk.protocol.transport.loseConnection)
        self.assertEqual(talk.message("a@example.org", ["b@example.net"], CONTENT).code, 250)
        scripted.answers = {}
        self.assertEqual(talk.message("a@example.org", ["b@example.net"], CONTENT, ehlo=None).code, 250)
        self.assertEqual(sorted(m.held for m in store.messages.values()), [False, True])

    def test_a_handler_that_cannot_quarantine_refuses_the_message(self) -> None:
        talk, store, _ = self.talk(message=Verdict(Action.QUARANTINE, reason="odd"))
        reply = talk.message("a@example.org", ["b@example.net"], CONTENT)
        self.assertEqual((reply.code, reply.enhanced), (550, "5.7.1"))
        self.assertEqual(store.messages, [])

    def test_a_refused_helo_refuses_the_client_from_then_on(self) -> None:
        talk, _, scripted = self.talk(helo=Verdict(Action.REJECT, Reply.of(550, "Bad name")))
        self.assertEqual(talk.send("EHLO client.test").code, 550)
        for command in ("EHLO other.test", "HELO other.test", "MAIL FROM:<a@example.org>"):
            self.assertEqual(talk.send(command).code, 554 if "MAIL" not in command else 503)
        self.assertEqual([s[0] for s in scripted.seen], ["connect", "helo"])

    def test_a_deferred_helo_closes_the_connection(self) -> None:
        talk, _, _ = self.talk(helo=Verdict(Action.TEMPFAIL))
        self.assertEqual(talk.send("EHLO client.test").code, 421)
        self.assertTrue(talk.closed)

    def test_a_client_gone_while_the_filters_decide_gets_nothing_delivered(self) -> None:
        pending: Deferred[Verdict] = Deferred()
        talk, store, scripted = self.talk(message=pending)
        talk.write(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n" + CONTENT
                   + b".\r\n")
        self.assertEqual([s[0] for s in scripted.seen][-1], "message")
        talk.protocol.transport.loseConnection()
        self.assertTrue(pending.called)  # cancelled: the filter need not go on
        self.assertEqual(store.messages, [])
        self.assertEqual([s[0] for s in scripted.seen][-2:], ["message", "close"])

    def test_edits_to_the_same_field_the_last_one_wins(self) -> None:
        cases = [
            ((HeaderEdit("change", "Subject", "A", 1), HeaderEdit("change", "Subject", "B", 1)),
             b"Subject: B\r\n", 1),
            ((HeaderEdit("change", "Subject", "A", 1), HeaderEdit("delete", "Subject", index=1)), b"", 0),
            ((HeaderEdit("delete", "Subject", index=1), HeaderEdit("change", "Subject", "C", 1)),
             b"Subject: C\r\n", 1),
            ((HeaderEdit("change", "Subject", "Z"),), b"Subject: Z\r\n", 1),
            ((HeaderEdit("delete", "Received"), HeaderEdit("change", "Received", "kept", 2)),
             b"Received: kept\r\n", 1),
        ]
        for edits, expected, subjects in cases:
            talk, store, _ = self.talk(message=Verdict(edits=edits))
            self.assertEqual(talk.message("a@example.org", ["b@example.net"], CONTENT).code, 250)
            data = store.messages[0].data
            name = edits[0].name.encode()
            self.assertEqual(data.count(name + b":"), subjects, (edits, data))
            if expected:
                self.assertIn(expected, data)

    def test_a_field_longer_than_998_octets_is_folded(self) -> None:
        value = " ".join(f"SYMBOL_{n}(0.5)" for n in range(300))
        talk, store, _ = self.talk(message=Verdict(edits=(HeaderEdit("add", "X-Spamd-Result", value),)))
        talk.message("a@example.org", ["b@example.net"], CONTENT)
        data = store.messages[0].data
        self.assertTrue(all(len(line) <= 998 for line in data.split(b"\r\n")))
        head = data.split(b"\r\n\r\n")[0]
        unfolded = head.replace(b"\r\n ", b" ")
        self.assertIn(b"X-Spamd-Result: " + value.encode() + b"\r\n", unfolded + b"\r\n")

    def test_a_fold_of_blanks_only_is_dropped(self) -> None:
        self.assertEqual(HeaderEdit("add", "X", "a\n \n\t\n b").line, b"X: a\r\n b\r\n")

    def test_a_client_gone_gets_nothing_delivered_even_when_failures_are_accepted(self) -> None:
        pending: Deferred[Verdict] = Deferred()
        store = MessageStore()
        scripted = Scripted(message=pending)
        chain = FilterChain([scripted], reactor=Clock(), on_failure="accept")
        talk = Conversation(FilterFront(Collecting(store), chain), Policy(hostname="mx.test"))
        talk.write(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n" + CONTENT
                   + b".\r\n")
        talk.protocol.transport.loseConnection()
        self.assertEqual(store.messages, [])

    def test_a_client_gone_calls_off_a_filter_front_behind_another_front(self) -> None:
        from esmtpkit.handlers.front import Front

        pending: Deferred[Verdict] = Deferred()
        store = MessageStore()
        scripted = Scripted(message=pending)
        inner = FilterFront(Collecting(store), FilterChain([scripted], reactor=Clock(), on_failure="accept"))
        talk = Conversation(Front(inner, Clock()), Policy(hostname="mx.test"))
        talk.write(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n" + CONTENT
                   + b".\r\n")
        talk.protocol.transport.loseConnection()
        self.assertTrue(pending.called)  # called off at once, not after its verdict
        self.assertEqual(store.messages, [])
        self.assertEqual([s[0] for s in scripted.seen][-1], "close")

    def test_an_edit_after_a_bdat_message_that_ends_inside_a_field(self) -> None:
        talk, store, _ = self.talk(message=Verdict(edits=(HeaderEdit("add", "X-Spam", "yes"),)))
        content = b"Subject: hi\r\nFrom: a@x.org"
        talk.send("EHLO client.test")
        talk.send("MAIL FROM:<a@example.org>")
        talk.send("RCPT TO:<b@example.net>")
        talk.write(b"BDAT %d LAST\r\n" % len(content) + content)
        self.assertEqual([r.code for r in talk.replies()], [250])
        self.assertEqual(store.messages[0].data, b"Subject: hi\r\nFrom: a@x.org\r\nX-Spam: yes\r\n\r\n")

    def test_xclient_starts_the_filters_over_for_the_client_it_names(self) -> None:
        from esmtpkit.core.xclient import XClient

        seen: list[Any] = []

        @implementer(IFilter)
        class ByAddress:
            name, timeout, on_failure = "by-address", None, None

            def start(self, session: Any) -> Any:
                class One(FilterSession):
                    def connect(self) -> Any:
                        seen.append(("connect", session.peer_ip))
                        return Verdict(Action.ACCEPT) if session.peer_ip == "127.0.0.1" else CONTINUE

                    def message(self, message: Any) -> Any:
                        seen.append(("message", session.peer_ip))
                        return Verdict(Action.REJECT)

                    def close(self) -> None:
                        seen.append(("close", session.peer_ip))

                return One(session)

        store = MessageStore()
        front = FilterFront(Collecting(store), FilterChain([ByAddress()], reactor=Clock()))
        talk = Conversation(front, Policy(hostname="mx.test", extensions=(XClient(),),
                                          trusted_networks=("127.0.0.0/8",)))
        self.addCleanup(talk.protocol.transport.loseConnection)
        talk.send("EHLO proxy.test")
        self.assertEqual(talk.send("XCLIENT ADDR=203.0.113.9").code, 220)
        reply = talk.message("a@example.org", ["b@example.net"], CONTENT, ehlo="client.example")
        self.assertEqual(reply.code, 550)
        self.assertEqual(store.messages, [])
        self.assertEqual(seen, [("connect", "127.0.0.1"), ("close", "203.0.113.9"), ("connect", "203.0.113.9"),
                                ("message", "203.0.113.9")])
