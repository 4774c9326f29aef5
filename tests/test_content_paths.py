"""One content reader for DATA and BDAT: the same message, sent either way and split at any byte, gives the handler
the same calls and the client the same final reply."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings, strategies as st
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core.content import ContentMode, dot_stuff
from esmtpkit.testing import Conversation, RecordingHandler

from .support import calls, policy, split

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)

ENVELOPE = b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"

#: Lines that exercise every rule of the content path: headers, folding, a non-header line, the empty line,
#: dot-led lines (stuffed for DATA), long lines, and bare CR or LF.
LINES = st.lists(st.sampled_from([b"Subject: hi", b"X-A:  spaced ", b" folded", b"\tmore", b"", b"not a header",
                                  b".", b"..two", b".dot", b"A: " + b"v" * 60, b"body " * 30, b"x\ry", b"x\ny",
                                  b"From: <a@example.org>"]),
                 max_size=14)
CUTS = st.lists(st.integers(0, 2000), max_size=8)
MODES = st.sampled_from([ContentMode.PARSED, ContentMode.LINES, ContentMode.RAW])
LIMITS = st.sampled_from([{}, {"max_line_length": 40}, {"max_header_size": 60}, {"max_message_size": 200},
                          {"max_line_length": 0, "max_header_size": 0}])


def run(mode: ContentMode, limits: dict[str, Any], pieces: list[bytes]) -> tuple[list[bytes], list[Any]]:
    """Feed ``pieces`` after the envelope; return the reply lines from the end of content on, and the calls.

    For a message refused for its content the data/header/eoh/body calls are left out: content already handed over
    when a limit is found broken depends on where the bytes were split (RAW content streams on before the end of
    the headers is known), BDAT refuses an announced size over the limit before asking data(), and abort() tells
    the handler to drop it all.
    """
    handler = RecordingHandler()
    handler.content_mode = mode
    handler.chunk_size = 16
    talk = Conversation(handler, policy(**limits))
    talk.write(ENVELOPE)
    before = len(talk.transport.value())
    for piece in pieces:
        talk.write(piece)
    wire = talk.transport.value()[before:]
    talk.protocol.connectionLost(Failure(ConnectionDone()))
    made = calls(handler)
    if any(call[0] == "abort" for call in made):
        made = [call for call in made if call[0] not in ("data", "header", "eoh", "body")]
    return wire.splitlines(), made


def bdat(content: bytes, sizes: list[int]) -> bytes:
    """``content`` sent as BDAT chunks of the given sizes (the rest in the LAST chunk)."""
    out, pos = [], 0
    for size in sizes:
        piece = content[pos:pos + size]
        if not piece:
            break
        out.append(b"BDAT %d\r\n%s" % (len(piece), piece))
        pos += len(piece)
    rest = content[pos:]
    out.append(b"BDAT %d LAST\r\n%s" % (len(rest), rest))
    return b"".join(out)


def final(lines: list[bytes]) -> list[bytes]:
    """The replies that answer the message itself: DATA's 354, BDAT's per-chunk 250s, and the 503s for chunks after
    a failed one (RFC 3030 §2), left out."""
    return [line for line in lines if not line.startswith((b"354 ", b"503 5.5.1 Transaction failed at an earlier"))
            and not re.match(rb"250 2\.0\.0 \d+ octets", line)]


class SameContentBothWaysTests(SynchronousTestCase):
    """DATA (dot-stuffed, ended by CRLF.CRLF) and BDAT (counted chunks) feed one reader."""

    @SETTINGS
    @given(lines=LINES, mode=MODES, limits=LIMITS, data_cuts=CUTS, chunk_sizes=st.lists(st.integers(1, 90), max_size=5),
           bdat_cuts=CUTS)
    def test_same_calls_and_reply(self, lines: list[bytes], mode: ContentMode, limits: dict[str, Any],
                                  data_cuts: list[int], chunk_sizes: list[int], bdat_cuts: list[int]) -> None:
        content = b"".join(line + b"\r\n" for line in lines)
        data_wire = b"DATA\r\n" + dot_stuff(content) + b"NOOP\r\n"
        bdat_wire = bdat(content, chunk_sizes) + b"NOOP\r\n"
        whole_data = run(mode, limits, [data_wire])
        whole_bdat = run(mode, limits, [bdat_wire])
        # Split anywhere, each path gives what it gives whole: replies byte for byte, calls call for call.
        self.assertEqual(run(mode, limits, split(data_wire, data_cuts)), whole_data)
        self.assertEqual(run(mode, limits, split(bdat_wire, bdat_cuts)), whole_bdat)
        # And the two paths agree: the same calls, the same answer to the message. (Past the size limit both
        # refuse, but BDAT may refuse by the announced size before another fault in the content is read.)
        if len(content) <= limits.get("max_message_size", len(content)):
            self.assertEqual(whole_data[1], whole_bdat[1])
            self.assertEqual(final(whole_data[0]), final(whole_bdat[0]))
        else:
            self.assertEqual(final(whole_data[0])[0][:1], b"5")
            self.assertEqual(final(whole_bdat[0])[0][:1], b"5")
        self.assertEqual(whole_data[0][-1], b"250 2.0.0 OK")  # the NOOP after the message is read as a command

    def test_limits_apply_the_same_way(self) -> None:
        """A header line over the limit is refused whichever way the message came, in every mode."""
        content = b"Subject: " + b"x" * 50 + b"\r\n\r\nbody\r\n"
        for mode in ContentMode:
            data = run(mode, {"max_line_length": 40}, [b"DATA\r\n" + dot_stuff(content)])
            chunks = run(mode, {"max_line_length": 40}, [bdat(content, [7, 20])])
            self.assertEqual(final(data[0]), [b"500 5.5.2 Line too long"])
            self.assertEqual(final(chunks[0]), [b"500 5.5.2 Line too long"])
            self.assertEqual(data[1], chunks[1])
            self.assertEqual(data[1][-1], ("abort", "Line too long"))
