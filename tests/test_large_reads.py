"""Reads far larger than a command: many pipelined transactions, long lines and content arriving in one write.

The protocol hands such reads to LineReceiver in pieces; whatever the pieces, the server must answer and call the
handler exactly as it does when the same bytes arrive a little at a time.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.testing import Conversation, RecordingHandler

from .support import CONTEXT, ServerMixin, TLSMixin, calls, policy, replay, split

TRANSACTION = (b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
               b"Subject: one of many\r\n\r\n" + b"a line of the body, long enough to matter\r\n" * 20
               + b"..dotted\r\n.\r\n")
#: About 50 KiB of pipelined transactions, then QUIT: many times the size of one piece.
BATCH = b"EHLO client.test\r\n" + TRANSACTION * 50 + b"QUIT\r\n"


def small_writes(data: bytes, size: int = 97) -> list[bytes]:
    """``data`` in writes of ``size`` bytes: every command and every message crosses a write boundary."""
    return split(data, list(range(size, len(data), size)))


class Late(RecordingHandler):
    """Answers the ``late`` verbs with Deferreds that the test fires (`fire_all`) when it likes."""

    def __init__(self, *late: str) -> None:
        super().__init__()
        self.late = late
        self.pending: list[tuple[Deferred[Any], Any]] = []

    def fire_all(self) -> int:
        """Fire the pending results one by one, each as soon as it is asked for; return how many there were."""
        fired = 0
        while self.pending:
            d, result = self.pending.pop(0)
            d.callback(result)
            fired += 1
        return fired

    def _record(self, verb: str, *args: Any) -> Any:
        result = super()._record(verb, *args)
        if verb not in self.late:
            return result
        d: Deferred[Any] = Deferred()
        self.pending.append((d, result))
        return d


class LargeReadTests(ServerMixin, SynchronousTestCase):
    def test_batch_in_one_write(self) -> None:
        """Fifty transactions in one write: the same replies and handler calls as in small writes."""
        whole, whole_handler = replay([BATCH])
        pieces, pieces_handler = replay(small_writes(BATCH))
        self.assertEqual(whole, pieces)
        self.assertEqual(whole.count(b"250 2.0.0 Message accepted for delivery\r\n"), 50)
        self.assertTrue(whole.endswith(b"221 2.0.0 Closing connection\r\n"))
        self.assertEqual(calls(whole_handler), calls(pieces_handler))

    def test_batch_in_one_write_raw_and_lines(self) -> None:
        """The same in the other content modes: RAW and one call per line."""
        for chunk_mode in (True, False):
            whole, whole_handler = replay([BATCH], chunk_mode=chunk_mode)
            pieces, pieces_handler = replay(small_writes(BATCH), chunk_mode=chunk_mode)
            self.assertEqual(whole, pieces)
            self.assertEqual(calls(whole_handler), calls(pieces_handler))

    def test_batch_with_every_reply_late(self) -> None:
        """Every handler result pending: reading pauses in the middle of the write and goes on from there."""
        handler = Late("ehlo", "mail", "rcpt", "data", "eom", "quit")
        talk = self.connect(handler)
        talk.write(BATCH)
        self.assertEqual(handler.fire_all(), 1 + 50 * 4 + 1)  # EHLO; MAIL, RCPT, DATA, end of data; QUIT
        expected, expected_handler = replay(small_writes(BATCH))
        self.assertEqual(talk.transport.value(), expected)
        self.assertEqual(calls(handler), calls(expected_handler))
        self.assertTrue(talk.closed)

    def test_batch_with_some_replies_late(self) -> None:
        """Pauses at a command, in the content or at the end of data, with the rest of the write still unread."""
        expected, expected_handler = replay(small_writes(BATCH))
        for late in ("eom", "rcpt", "body", "header"):
            handler = Late(late)
            talk = self.connect(handler)
            talk.write(BATCH)
            handler.fire_all()
            self.assertEqual(talk.transport.value(), expected, late)
            self.assertEqual(calls(handler), calls(expected_handler), late)

    def test_more_arrives_while_paused(self) -> None:
        """Writes that arrive while a result is pending queue behind what the pause left unread."""
        expected, _ = replay(small_writes(BATCH))
        for late in ("eom", "data"):
            handler = Late(late)
            talk = self.connect(handler)
            talk.write(BATCH[:30000])
            talk.write(BATCH[30000:])
            handler.fire_all()
            self.assertEqual(talk.transport.value(), expected, late)

    def test_long_line_in_a_large_write(self) -> None:
        """A 40 KB command line and the commands after it in one write: 500 5.5.2, then the rest run."""
        data = b"EHLO client.test\r\nNOOP " + b"x" * 40000 + b"\r\nNOOP\r\n" + TRANSACTION + b"QUIT\r\n"
        whole, _ = replay([data])
        pieces, _ = replay(small_writes(data))
        self.assertEqual(whole, pieces)
        self.assertIn(b"500 5.5.2 Line too long\r\n250 2.0.0 OK\r\n", whole)
        self.assertTrue(whole.endswith(b"250 2.0.0 Message accepted for delivery\r\n"
                                       b"221 2.0.0 Closing connection\r\n"))

    def test_large_message_then_commands(self) -> None:
        """A 100 KB message and the next transaction in one write: the content whole, the commands after it."""
        content = b"Subject: big\r\n\r\n" + b"0123456789" * 10000 + b"\r\n"
        data = (b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" + content
                + b".\r\n" + TRANSACTION * 20 + b"QUIT\r\n")
        whole, whole_handler = replay([data])
        pieces, pieces_handler = replay(small_writes(data, 4093))
        self.assertEqual(whole, pieces)
        self.assertEqual(whole.count(b"250 2.0.0 Message accepted for delivery\r\n"), 21)
        self.assertEqual(calls(whole_handler), calls(pieces_handler))

    def test_nothing_after_the_handler_hangs_up(self) -> None:
        """A handler that closes the transport itself: as LineReceiver does, nothing more of the write is run."""
        def noop() -> tuple[int, str]:
            talk.transport.loseConnection()
            return (250, "OK")

        talk = self.connect(RecordingHandler({"noop": noop}))
        talk.transport.reading = False  # the connection stays, closing, as the rest of the write is read
        talk.write(b"EHLO client.test\r\nNOOP\r\n" + b"RSET\r\n" * 5000)
        self.assertEqual(talk.handler.verbs, ["connect", "ehlo", "noop"])

    def test_nothing_after_quit_runs(self) -> None:
        """Commands after QUIT in the same large write are never run."""
        talk = Conversation(RecordingHandler(), policy())
        talk.write(b"EHLO client.test\r\nQUIT\r\n" + b"NOOP\r\n" * 5000)
        self.assertEqual(talk.handler.verbs, ["connect", "ehlo", "quit"])
        talk.protocol.connectionLost(Failure(ConnectionDone()))


class LargeReadTLSTests(TLSMixin, SynchronousTestCase):
    def test_plaintext_after_starttls_in_a_large_write(self) -> None:
        """STARTTLS followed by 50 KB of plaintext commands in one write: none of them ever runs (RFC 3207 §4.2)."""
        protocol, transport = self.connect()
        self.exchange(protocol, b"EHLO client.test\r\n")
        wire = self.exchange(protocol, b"STARTTLS\r\n" + TRANSACTION * 40 + b"QUIT\r\n")
        self.assertEqual(wire, b"220 2.0.0 Ready to start TLS\r\n")
        self.assertIs(transport.tls_context, CONTEXT)
        self.assertEqual(protocol.handler.verbs, ["connect", "ehlo"])
        self.assertEqual(self.exchange(protocol, b"EHLO client.test\r\n")[:4], b"250-")
        self.assertEqual(protocol.handler.verbs, ["connect", "ehlo", "ehlo"])
