"""LMTP (RFC 2033): LHLO, and one reply per accepted recipient after the content; in memory and over ``unix:``."""

from __future__ import annotations

import re
import smtplib
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from esmtpkit.core.address import Address
from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.server.interfaces import ILMTPHandler
from esmtpkit.server.policy import Policy
from esmtpkit.core.reply import Reply
from esmtpkit.testing import RecordingHandler

from .support import ServerMixin

LHLO_REPLY = (b"250-mx.test client.test, pleased to meet you\r\n250-HELP\r\n250-PIPELINING\r\n250-SIZE 33554432\r\n"
              b"250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250 BINARYMIME\r\n")
THREE = (b"MAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<nobody@example.org>\r\n"
         b"RCPT TO:<bob@example.org>\r\n")
THREE_REPLIES = (b"250 2.1.0 <a@example.org>, sender ok\r\n250 2.1.5 <alice@example.org>, recipient ok\r\n"
                 b"550 5.1.1 No such user\r\n250 2.1.5 <bob@example.org>, recipient ok\r\n")
GO_AHEAD = b"354 Enter mail, end with \".\" on a line by itself\r\n"
ACCEPTED = b"250 2.0.0 Message accepted for delivery\r\n"


@implementer(ILMTPHandler)
class Mailboxes(RecordingHandler):
    """Knows alice and bob; bob's mailbox is full, so it answers per recipient."""

    def rcpt(self, recipient: Address, params: Any) -> Any:
        if recipient.local_part not in ("alice", "bob"):
            self._record("rcpt", recipient, dict(params))
            return Reply.of(550, "No such user", enhanced="5.1.1")
        return super().rcpt(recipient, params)

    def eom_per_recipient(self) -> Any:
        self.eom()  # records the message, as eom() did before it answered per recipient
        assert self.session is not None
        return [Reply.of(250, f"<{r}> delivered", enhanced="2.0.0") if r.local_part == "alice"
                else Reply.of(452, f"<{r}> mailbox full", enhanced="4.2.2")
                for r in self.session.envelope.recipients]


@implementer(ILMTPHandler)
class PerRecipient(RecordingHandler):
    """Answers the end of an LMTP message with ``answer`` (or what calling it gives), one reply per recipient."""

    def __init__(self, answer: Any) -> None:
        super().__init__()
        self.answer = answer

    def eom_per_recipient(self) -> Any:
        self.eom()  # records the message, as eom() did before it answered per recipient
        return self.answer() if callable(self.answer) else self.answer


class LMTPTests(ServerMixin, SynchronousTestCase):
    def lhlo(self, handler: Any = None, **changes: Any) -> Any:
        talk = self.connect(handler, lmtp=True, **changes)
        expected = LHLO_REPLY.replace(b"SIZE 33554432", b"SIZE %d" % talk.policy.max_message_size)
        self.assertEqual(self.exchange(talk, b"LHLO client.test\r\n"), expected)
        return talk

    def test_lhlo(self) -> None:
        talk = self.lhlo()
        self.assertEqual(talk.handler.verbs, ["connect", "ehlo"])
        session = talk.protocol.session
        self.assertEqual((session.helo, session.esmtp, session.lmtp, session.with_protocol),
                         ("client.test", True, True, "LMTP"))
        self.assertEqual(self.exchange(talk, b"NOOP\r\n"), b"250 2.0.0 OK\r\n")

    def test_helo_and_ehlo_refused(self) -> None:
        """RFC 2033 §4.1: an LMTP server knows LHLO only."""
        talk = self.connect(lmtp=True)
        self.assertEqual(self.exchange(talk, b"HELO client.test\r\nEHLO client.test\r\n"),
                         b"500 This is an LMTP server: use LHLO\r\n" * 2)
        self.assertEqual(self.exchange(talk, b"MAIL FROM:<a@example.org>\r\n"), b"503 Send HELO/EHLO first\r\n")
        self.assertEqual(talk.handler.verbs, ["connect"])

    def test_one_reply_per_recipient(self) -> None:
        """Replies for accepted recipients only, in RCPT order (RFC 2033 §4.2)."""
        talk = self.lhlo(Mailboxes())
        wire = self.exchange(talk, THREE + b"DATA\r\nSubject: hi\r\n\r\nhello\r\n.\r\nNOOP\r\n")
        self.assertEqual(wire, THREE_REPLIES + GO_AHEAD + b"250 2.0.0 <alice@example.org> delivered\r\n"
                         b"452 4.2.2 <bob@example.org> mailbox full\r\n250 2.0.0 OK\r\n")
        self.assertEqual(talk.protocol.errors, 1)  # the 550 to RCPT; a partly refused message is no client error

    def test_one_reply_for_all(self) -> None:
        """Without ILMTPHandler, eom()'s reply answers for every recipient."""
        talk = self.lhlo(RecordingHandler({"eom": Reply.of(250, "Stored")}))
        talk.handler.rcpt = Mailboxes().rcpt  # type: ignore[method-assign]
        wire = self.exchange(talk, THREE + b"DATA\r\n.\r\n")
        self.assertEqual(wire, THREE_REPLIES + GO_AHEAD + b"250 2.0.0 Stored\r\n" * 2)

    def test_tuple_reply_is_one_reply(self) -> None:
        talk = self.lhlo(RecordingHandler({"eom": (250, "Stored")}))
        wire = self.exchange(talk, b"MAIL FROM:<>\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n.\r\n")
        self.assertTrue(wire.endswith(GO_AHEAD + b"250 2.0.0 Stored\r\n250 2.0.0 Stored\r\n"))

    def test_wrong_number_of_replies(self) -> None:
        """A handler that miscounts gets 451 for every recipient (the client retries; nothing is lost)."""
        talk = self.lhlo(PerRecipient([Reply.of(250, "one")]))
        wire = self.exchange(talk, b"MAIL FROM:<>\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n.\r\n")
        self.assertTrue(wire.endswith(GO_AHEAD + b"451 4.3.0 Requested action aborted: local error in processing"
                                                 b"\r\n" * 1 + b"451 4.3.0 Requested action aborted: local error in "
                                                 b"processing\r\n"))

    def test_failed_content_answered_for_each(self) -> None:
        """A message refused as a whole (here, too big) gets the same reply for each recipient."""
        talk = self.lhlo(max_message_size=10)
        wire = self.exchange(talk, b"MAIL FROM:<>\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n"
                                   b"Subject: far too long\r\n.\r\n")
        self.assertTrue(wire.endswith(GO_AHEAD + b"552 5.3.4 Message size exceeds fixed maximum message size\r\n" * 2))
        self.assertEqual(talk.protocol.errors, 1)

    def test_pending_eom(self) -> None:
        pending: Deferred[Any] = Deferred()
        talk = self.lhlo(PerRecipient(lambda: pending))
        self.exchange(talk, b"MAIL FROM:<>\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n")
        self.assertEqual(self.exchange(talk, b".\r\nQUIT\r\n"), b"")
        self.assertNoResult(pending)
        before = len(talk.transport.value())
        pending.callback([Reply.of(250, "a"), Reply.of(550, "b", enhanced="5.2.1")])
        self.assertEqual(talk.transport.value()[before:],
                         b"250 2.0.0 a\r\n550 5.2.1 b\r\n221 2.0.0 Closing connection\r\n")

    def test_eom_list_still_answers_per_recipient(self) -> None:
        """A handler written before ILMTPHandler returned the list from eom(): it works, with a warning."""
        talk = self.lhlo(RecordingHandler({"eom": [Reply.of(250, "a"), Reply.of(452, "b", enhanced="4.2.2")]}))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            wire = self.exchange(talk, b"MAIL FROM:<>\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n.\r\n")
        self.assertTrue(wire.endswith(GO_AHEAD + b"250 2.0.0 a\r\n452 4.2.2 b\r\n"))
        self.assertEqual([w.category for w in caught], [DeprecationWarning])
        self.assertIn("ILMTPHandler", str(caught[0].message))

    def test_bdat_last(self) -> None:
        """CHUNKING in LMTP: one reply per chunk, and per recipient after BDAT LAST (RFC 3030 §4)."""
        talk = self.lhlo(Mailboxes())
        wire = self.exchange(talk, THREE + b"BDAT 4\r\nX: 1BDAT 2 LAST\r\n\r\n")
        self.assertEqual(wire, THREE_REPLIES + b"250 2.0.0 4 octets received\r\n"
                         b"250 2.0.0 <alice@example.org> delivered\r\n452 4.2.2 <bob@example.org> mailbox full\r\n")

    def test_disconnect_after_the_replies(self) -> None:
        """A handler asking to disconnect gets every recipient's reply written first."""
        handler = RecordingHandler()
        talk = self.lhlo(handler)
        self.exchange(talk, b"MAIL FROM:<>\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n")
        handler.disconnect = True
        self.assertEqual(self.exchange(talk, b".\r\n"), ACCEPTED * 2)
        self.assertTrue(talk.closed)

    def test_documented_handler(self) -> None:
        """The LMTP example of docs/handler-contract.md answers per recipient as the page says."""
        page = (Path(__file__).resolve().parent.parent / "docs" / "handler-contract.md").read_text()
        [example] = [b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "class Mailboxes" in b]
        namespace: dict[str, Any] = {}
        exec(compile(example, "handler-contract.md", "exec"), namespace)
        talk = self.lhlo(namespace["Mailboxes"]())
        wire = self.exchange(talk, b"MAIL FROM:<>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
                                   b"DATA\r\n.\r\n")
        self.assertTrue(wire.endswith(GO_AHEAD + b"250 2.0.0 <alice@example.org> delivered\r\n"
                                                 b"452 4.2.2 <bob@example.org> mailbox full\r\n"))

    def test_lhlo_unknown_outside_lmtp(self) -> None:
        talk = self.connect()
        self.assertEqual(self.exchange(talk, b"LHLO client.test\r\n"),
                         b"500 Command unrecognized: LHLO client.test\r\n")


@pytest_twisted.inlineCallbacks
def test_smtplib_lmtp_over_a_unix_socket() -> Any:
    """Python's smtplib.LMTP on a ``unix:`` endpoint: one recipient refused at RCPT, one accepted and one refused
    after the content; the two replies after DATA come in RCPT order.
    """
    handlers: list[Mailboxes] = []

    def make() -> Mailboxes:
        handlers.append(Mailboxes())
        return handlers[-1]

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "lmtp.sock")
        factory = ESMTPFactory(make, policy=Policy(hostname="mx.test", lmtp=True), clock=reactor)
        port = yield serverFromString(reactor, f"unix:{path}").listen(factory)

        def client() -> dict[str, Any]:
            seen: dict[str, Any] = {}
            with smtplib.LMTP(path) as lmtp:
                seen["lhlo"] = lmtp.ehlo("client.test")  # smtplib.LMTP sends LHLO for ehlo()
                seen["mail"] = lmtp.mail("a@example.org")
                seen["rcpt"] = [lmtp.rcpt(r) for r in ("alice@example.org", "nobody@example.org", "bob@example.org")]
                seen["data"] = [lmtp.data(b"Subject: hi\r\n\r\nHello\r\n"), lmtp.getreply()]
                seen["quit"] = lmtp.docmd("QUIT")
            return seen

        try:
            seen = yield threads.deferToThread(client)
        finally:
            yield port.stopListening()
    assert seen["lhlo"][0] == 250
    assert seen["rcpt"] == [(250, b"2.1.5 <alice@example.org>, recipient ok"), (550, b"5.1.1 No such user"),
                            (250, b"2.1.5 <bob@example.org>, recipient ok")]
    assert seen["data"] == [(250, b"2.0.0 <alice@example.org> delivered"), (452, b"4.2.2 <bob@example.org> mailbox full")]
    assert seen["quit"] == (221, b"2.0.0 Closing connection")
    [handler] = handlers
    assert handler.messages[0]["recipients"] == ["alice@example.org", "bob@example.org"]
    assert handler.messages[0]["body"] == b"Hello\r\n"
    assert handler.session is not None and handler.session.peer_ip == ""
