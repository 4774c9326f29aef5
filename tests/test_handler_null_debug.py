"""The Null (accept and discard) and Debug (log each message) handlers."""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.logger import LogLevel, Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from esmtpkit.handlers import Debug, Null
from esmtpkit.server.interfaces import ContentMode, IMessageHandler, content_mode_of
from esmtpkit.testing import Conversation

from .support import HandlerTestCase


class Base(HandlerTestCase):
    def talk(self, handler: Any) -> Conversation:
        return self.conversation(handler)


class NullTests(Base):
    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IMessageHandler, Null()))

    def test_accepts_and_discards(self) -> None:
        """Every message gets ``250 2.0.0 Ok: discarded``; the content reaches body() raw and is dropped."""
        talk = self.talk(Null())
        talk.write(b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        talk.replies()
        talk.write(b"Subject: x\r\n\r\n" + b"0123456789" * 10000 + b"\r\n.\r\n")
        self.assertEqual(talk.transport.value().split(b"\r\n")[-2], b"250 2.0.0 Ok: discarded")
        self.assertEqual(talk.message("", ["b@y.test"], b"again\r\n").code, 250)

    def test_keeps_no_state(self) -> None:
        """Nothing is kept on the handler between messages."""
        handler = Null()
        before = dict(vars(handler))
        talk = self.talk(handler)
        talk.message("a@x.test", ["b@y.test"], b"x" * 5000 + b"\r\n")
        self.assertEqual(set(vars(handler)) - set(before), {"session"})
        self.assertIs(content_mode_of(Null()), ContentMode.RAW)


class DebugTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict[str, Any]] = []
        self.handler = Debug()
        self.handler.log = Logger(namespace="esmtpkit.debug", observer=self.events.append)

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IMessageHandler, Debug()))

    def test_logs_envelope_and_content(self) -> None:
        """One info event per message: envelope and content, undecodable bytes replaced, braces kept as text."""
        talk = self.talk(self.handler)
        reply = talk.message("alice@example.com", ["bob@example.net", "carol@example.net"],
                             b"Subject: {not a field}\r\n\r\ncaf\xc3\xa9 \xff\r\n")
        self.assertEqual((reply.code, reply.text), (250, "Message accepted for delivery"))
        [event] = self.events
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(len(event["id"]), 20)
        self.assertEqual(formatEvent(event), (
            "---------- MESSAGE FOLLOWS ----------\n"
            f"X-Queue-Id: {event['id']}\n"
            "X-Peer: 127.0.0.1\n"
            "X-Mail-From: <alice@example.com>\n"
            "X-Rcpt-To: <bob@example.net>, <carol@example.net>\n"
            "\n"
            "Subject: {not a field}\n"
            "\n"
            "caf\u00e9 \ufffd\n"
            "------------ END MESSAGE ------------"))
        self.assertEqual(event["recipients"], ["bob@example.net", "carol@example.net"])

    def test_controls_in_the_content_are_escaped(self) -> None:
        """Lines stay lines; an escape sequence, a form feed or U+2028 in the message cannot act on a terminal."""
        talk = self.talk(self.handler)
        reply = talk.message("alice@example.com", ["bob@example.net"],
                             b"Subject: \x1b[2J\x0c\r\n\r\none\xe2\x80\xa8two\x1b]0;title\x07\r\n")
        self.assertEqual(reply.code, 250)
        [event] = self.events
        self.assertEqual(event["content"], "Subject: \\x1b[2J\\x0c\n\none\\u2028two\\x1b]0;title\\x07\n")
        self.assertNotIn("\x1b", formatEvent(event))

    def test_each_message_separately(self) -> None:
        talk = self.talk(self.handler)
        talk.message("a@x.test", ["b@y.test"], b"one\r\n")
        talk.message("a@x.test", ["b@y.test"], b"two\r\n")
        self.assertEqual([e["content"] for e in self.events], ["one\n", "two\n"])

    def test_aborted_message_not_logged(self) -> None:
        """A message cut mid-DATA is not logged, and does not leak into the next one."""
        talk = self.talk(self.handler)
        talk.write(b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nhalf")
        talk.protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.events, [])
        self.talk(self.handler).message("a@x.test", ["b@y.test"], b"whole\r\n")
        self.assertEqual([e["content"] for e in self.events], ["whole\n"])


class HandlersPageTests(SynchronousTestCase):
    """The Python examples of docs/handlers.md run and build what they say."""

    def test_examples_build_factories(self) -> None:
        import re
        from pathlib import Path

        from esmtpkit.server.factory import ESMTPFactory

        page = (Path(__file__).resolve().parent.parent / "docs" / "handlers.md").read_text()
        blocks = re.findall(r"```python\n(.*?)```", page, re.S)
        self.assertEqual(len(blocks), 5)
        for block in blocks:
            namespace: dict[str, Any] = {}
            exec(compile(block, "docs/handlers.md", "exec"), namespace)
            factory = namespace["factory"]
            self.assertIsInstance(factory, ESMTPFactory)
            if "Maildir(" not in block:  # that one would create /var/mail/incoming
                self.assertTrue(IMessageHandler.providedBy(factory.make_handler()))
