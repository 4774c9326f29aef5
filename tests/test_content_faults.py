"""Two faults in one message (a limit broken and a bare CR or LF): the one met first in the content is the answer,
by DATA or by BDAT, in one write or byte by byte."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core.content import ContentError, ContentReader, ContentMode, dot_stuff
from esmtpkit.testing import Conversation, RecordingHandler

from .support import policy

ENVELOPE = b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"
LONG = b"A: " + b"v" * 60 + b"\r\n"  # a header line over a 40-octet limit
BARE = b"X: x\ry\r\n"  # a header line with a bare CR
TOO_LONG = b"500 5.5.2 Line too long"
BARE_REPLY = b"550 5.5.2 Message contains a bare CR or LF (only CRLF ends a line)"


def answer(content: bytes, bdat: bool, bytewise: bool) -> bytes:
    """The reply to the message ``content``, sent by DATA or as one BDAT LAST chunk, in one write or byte by byte."""
    talk = Conversation(RecordingHandler(), policy(max_line_length=40))
    talk.write(ENVELOPE)
    wire = (b"BDAT %d LAST\r\n" % len(content) + content) if bdat else b"DATA\r\n" + dot_stuff(content)
    before = len(talk.transport.value())
    for piece in ([wire[i:i + 1] for i in range(len(wire))] if bytewise else [wire]):
        talk.write(piece)
    replies = talk.transport.value()[before:].splitlines()
    talk.protocol.connectionLost(Failure(ConnectionDone()))
    return [r for r in replies if not r.startswith(b"354 ")][-1]


class FirstFaultTests(SynchronousTestCase):
    def test_long_line_first(self) -> None:
        for bdat in (False, True):
            for bytewise in (False, True):
                self.assertEqual(answer(LONG + BARE + b"\r\nbody\r\n", bdat, bytewise), TOO_LONG, (bdat, bytewise))

    def test_bare_newline_first(self) -> None:
        for bdat in (False, True):
            for bytewise in (False, True):
                self.assertEqual(answer(BARE + LONG + b"\r\nbody\r\n", bdat, bytewise), BARE_REPLY, (bdat, bytewise))

    def test_reader_reads_up_to_the_bare_newline(self) -> None:
        """The content before a bare line end is read (and counted) first; nothing after it."""
        reader = ContentReader(ContentMode.PARSED, dotted=False, max_line=42)
        self.assertEqual(reader.feed(b"Subject: hi\r\nX: x\ny\r\n" + LONG), [])
        self.assertIs(reader.error, ContentError.BARE_NEWLINE)
        self.assertEqual(reader.size, len(b"Subject: hi\r\nX: x"))
