"""`DotStuffer` and `LineEnds`: content as it goes after DATA or in BDAT chunks, encoded chunk by chunk.

Pure core. Shared by every sender of content (the client session, the Relay handler): CRLF line ends only,
dot-stuffing and the end-of-data line for DATA, the line ends alone for text in BDAT chunks, whatever the chunk
boundaries.
"""

from __future__ import annotations

import re
from typing import Final

from esmtpkit.core.content import has_bare_newline

__all__ = ["DotStuffer", "LineEnds"]

#: A line end as a lenient reader might see one: CRLF, or a bare CR, or a bare LF.
_LINE_END: Final = re.compile(rb"\r\n?|\n")


class DotStuffer:
    """Encode content for DATA chunk by chunk: CRLF line ends, dot-stuffing (RFC 5321 §2.3.8, §4.5.2).

    Every bare CR and bare LF becomes CRLF, so no octet sequence a lenient next hop could read as a line end is
    left to end the data early (SMTP smuggling), and `finish` closes the data with CRLF before the dot so a strict
    one never waits. Any chunk split gives the same bytes; nothing is held back (a CR ending a chunk is sent at
    once and completed by the next chunk or by `finish`).
    """

    def __init__(self) -> None:
        self._line_start = True
        self._after_cr = False

    def __call__(self, chunk: bytes) -> bytes:
        """The encoded form of the next ``chunk`` of content."""
        head = b""
        if self._after_cr and chunk:
            head = b"\n"  # completes the CR sent last time, as CRLF or as a bare CR made CRLF
            self._after_cr = False
            self._line_start = True
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        tail = b""
        if chunk.endswith(b"\r"):
            tail = b"\r"  # an LF may follow in the next chunk: its CRLF is completed then, or by finish()
            self._after_cr = True
            chunk = chunk[:-1]
        if chunk:
            if has_bare_newline(chunk):
                chunk = _LINE_END.sub(b"\r\n", chunk)
            chunk = chunk.replace(b"\r\n.", b"\r\n..")
            if self._line_start and chunk[:1] == b".":
                chunk = b"." + chunk
            self._line_start = chunk.endswith(b"\r\n")
        return head + chunk + tail if head or tail else chunk

    def finish(self) -> bytes:
        """The bytes that end the data: what completes the last line, then the ``.`` line (RFC 5321 §4.1.1.4)."""
        if self._after_cr:
            tail = b"\n"
        elif self._line_start:
            tail = b""
        else:
            tail = b"\r\n"
        self._line_start, self._after_cr = True, False
        return tail + b".\r\n"


class LineEnds:
    """Make every line end CRLF, chunk by chunk, for text content sent with BDAT (RFC 3030 §3: only BINARYMIME
    content may hold a bare CR or LF). Like `DotStuffer`, any chunk split gives the same bytes and a CR ending a
    chunk is sent at once; `finish` completes it."""

    def __init__(self) -> None:
        self._after_cr = False

    def __call__(self, chunk: bytes) -> bytes:
        """The next ``chunk`` with its line ends made CRLF."""
        head = b""
        if self._after_cr and chunk:
            head = b"\n"
            self._after_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        tail = b""
        if chunk.endswith(b"\r"):
            tail = b"\r"
            self._after_cr = True
            chunk = chunk[:-1]
        if chunk and has_bare_newline(chunk):
            chunk = _LINE_END.sub(b"\r\n", chunk)
        return head + chunk + tail if head or tail else chunk

    def finish(self) -> bytes:
        """What completes the last line end (b"" unless the content ended with a CR)."""
        tail = b"\n" if self._after_cr else b""
        self._after_cr = False
        return tail
