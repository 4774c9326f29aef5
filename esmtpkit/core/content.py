"""Message content byte paths: dot-unstuffing DATA, splitting headers, counting BDAT (RFC 5321 §4.5.2, RFC 3030).

Pure core. Every decoder is O(n) in its input, holds back at most a few bytes across chunk splits, and never
treats a bare CR or bare LF as a line end, so only ``CRLF.CRLF`` ends DATA (the SMTP smuggling rule).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = ["DotDecoder", "HeaderSplitter", "HeaderLimits", "CountedReader", "dot_stuff", "has_bare_newline",
           "HeaderEvent", "NATIVE_SCAN"]

_MARK: Final = b"\r\n."


def python_has_bare_newline(data: bytes, end: int | None = None) -> bool:
    """True if ``data[:end]`` holds a CR not followed by LF or an LF not preceded by CR (the pure-Python scan).

    Exact, in three C-speed passes: with no bare CR or LF, the number of line breaks ``splitlines`` finds equals
    both the number of CRs and the number of LFs (each CRLF is one break); a bare CR or LF breaks that equality.
    """
    end = len(data) if end is None else end
    crs = data.count(b"\r", 0, end)
    if crs != data.count(b"\n", 0, end):
        return True
    if not crs:
        return False
    region = data[:end] if end != len(data) else data
    breaks = len(region.splitlines())
    if not region.endswith((b"\n", b"\r")):
        breaks -= 1  # the last, unterminated piece is not a break
    return breaks != crs


def python_find_mark(data: bytes, start: int = 0) -> int:
    """Where the next ``CRLF .`` (a dot-led line) begins at or after ``start``, or -1 (the pure-Python search)."""
    return data.find(_MARK, start)


try:
    from esmtpkit.core._scan import find_mark as _native_find_mark
    from esmtpkit.core._scan import has_bare_newline as _native_has_bare_newline
except ImportError:  # built without a C compiler: same answers, the body path about 10 times dearer
    _native_find_mark = _native_has_bare_newline = None

#: True when the native scans (``esmtpkit.core._scan``, an optional C extension) were built and are in use.
NATIVE_SCAN: Final = _native_has_bare_newline is not None
#: ``has_bare_newline(data, end=None)``: the native scan when built, else :func:`python_has_bare_newline`.
has_bare_newline: Final = _native_has_bare_newline or python_has_bare_newline
#: ``find_mark(data, start=0)``: the native search when built, else :func:`python_find_mark`.
find_mark: Final = _native_find_mark or python_find_mark


class DotDecoder:
    """Undo dot-stuffing and find the end-of-data marker of a DATA stream.

    ``feed(data)`` returns the decoded content bytes that are certain, holding back up to four bytes that might
    begin the marker. Once the marker is seen, ``done`` is True, ``rest`` holds the bytes that followed it
    (pipelined commands), and ``bare_newline`` tells whether a bare CR or LF was present anywhere. The content
    returned ends with the CRLF that precedes the terminating dot, as RFC 5321 §4.1.1.4 defines it.
    """

    __slots__ = ("_tail", "_skip", "done", "rest", "bare_newline", "_check_bare")

    def __init__(self, at_line_start: bool = True, check_bare: bool = True) -> None:
        # The tail always starts at a line boundary when ``_skip`` is 2: a virtual CRLF that is never emitted.
        self._tail = b"\r\n" if at_line_start else b""
        self._skip = 2 if at_line_start else 0
        self.done = False
        self.rest = b""
        self.bare_newline = False
        self._check_bare = check_bare  # False: skip the bare CR/LF scan (bare_newline stays False)

    def feed(self, data: bytes) -> bytes:
        """Consume ``data``; return decoded content (possibly empty)."""
        if self.done:
            self.rest += data
            return b""
        buf = self._tail + data if self._tail else data
        start = self._skip
        size = len(buf)
        if b"." not in buf:  # no dot, no marker and nothing to unstuff: one memchr instead of a search
            hold = size - 2 if buf.endswith(b"\r\n") else size - 1 if buf.endswith(b"\r") else size
            if self._check_bare and not self.bare_newline and has_bare_newline(buf, hold):
                self.bare_newline = True
            self._tail = buf[hold:]
            if hold > start:
                self._skip = 0
                return buf[start:hold] if start or hold != size else buf
            self._skip = start - hold
            return b""
        pos = 0
        hold = size
        out: list[bytes] = []
        while True:
            i = find_mark(buf, pos)
            if i < 0:
                break
            j = i + 3
            if j >= len(buf) or (buf[j] == 13 and j + 1 >= len(buf)):
                hold = i  # "\r\n." or "\r\n.\r" at the very end: wait for more
                break
            if buf[j] == 13 and buf[j + 1] == 10:
                out.append(buf[start: i + 2])
                self._finish(buf[: j + 2], buf[j + 2:])
                return b"".join(out)
            out.append(buf[start: i + 2])  # RFC 5321 §4.5.2: drop the leading dot
            start = pos = j
        if hold == len(buf):
            if buf.endswith(b"\r\n"):
                hold -= 2
            elif buf.endswith(b"\r"):
                hold -= 1
        if hold > start:
            out.append(buf[start:hold])
            self._skip = 0
        else:
            self._skip = start - hold
        self._check(buf[:hold])
        self._tail = buf[hold:]
        return b"".join(out) if len(out) != 1 else out[0]

    def _check(self, consumed: bytes) -> None:
        if self._check_bare and not self.bare_newline and has_bare_newline(consumed):
            self.bare_newline = True

    def _finish(self, consumed: bytes, rest: bytes) -> None:
        self._check(consumed)
        self.done = True
        self.rest = rest
        self._tail = b""


def dot_stuff(content: bytes) -> bytes:
    """Encode content for DATA: double leading dots and append the terminator (the client side of §4.5.2)."""
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


_HEADER: Final = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


@dataclass(frozen=True, slots=True)
class HeaderEvent:
    """One complete header: ``name`` as sent, ``value`` unfolded (CRLF before continuation whitespace removed)."""

    name: str
    value: str


class HeaderSplitter:
    """Turn header lines (CRLF removed, dots already unstuffed) into complete, unfolded headers.

    ``line(raw)`` returns ``(headers, done, body)``: headers completed by this line, whether the header section
    ended, and, when a line that is not a header ended it, that line (with CRLF) as the first body bytes.
    """

    __slots__ = ("_name", "_parts", "size")

    def __init__(self) -> None:
        self._name: bytes | None = None
        self._parts: list[bytes] = []
        self.size = 0

    def _flush(self) -> list[HeaderEvent]:
        if self._name is None:
            return []
        value = b"".join(self._parts).strip(b" \t")
        event = HeaderEvent(self._name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        self._name, self._parts = None, []
        return [event]

    def line(self, raw: bytes) -> tuple[list[HeaderEvent], bool, bytes]:
        """Feed one line; see the class docstring."""
        self.size += len(raw) + 2
        if not raw:
            return self._flush(), True, b""
        if raw[0] in (32, 9) and self._name is not None:
            self._parts.append(raw)
            return [], False, b""
        match = _HEADER.match(raw)
        if match is None:
            return self._flush(), True, raw + b"\r\n"
        done = self._flush()
        self._name = match.group(1)
        self._parts = [raw[match.end():]]
        return done, False, b""

    def finish(self) -> list[HeaderEvent]:
        """End of data reached inside the headers: return the last pending header."""
        return self._flush()


class HeaderLimits:
    """The header limits for content passed on raw (a handler with ``chunk_mode = True``), which no splitter sees.

    ``feed(content)`` looks at decoded content until the header section ends where `HeaderSplitter` would end it
    (an empty line, or a line that is not a header field) and returns ``"line"`` once a line is longer than
    ``max_line`` octets with its CRLF, ``"size"`` once the section is larger than ``max_size`` octets, else None;
    ``done`` tells that the section ended and nothing more needs feeding. 0 turns a limit off. The usual case, a
    section that ends in the first piece within both limits, costs one search and one split.
    """

    __slots__ = ("_max_line", "_max_size", "size", "_line", "_seen_header", "done")

    def __init__(self, max_line: int, max_size: int) -> None:
        self._max_line = max_line
        self._max_size = max_size
        self.size = 0  # octets of complete lines of the section so far, CRLF included (as HeaderSplitter counts)
        self._line = b""  # the section's last, incomplete line
        self._seen_header = False  # a continuation line needs a header before it
        self.done = False

    def _fits(self, longest: int, size: int) -> bool:
        return (not self._max_line or longest <= self._max_line) and (not self._max_size or size <= self._max_size)

    def feed(self, data: bytes) -> str | None:
        """Look at the next content octets; see the class docstring."""
        if self.done or not data:
            return None
        buf = self._line + data if self._line else data
        if not self.size and not self._line:
            end = buf.find(b"\r\n\r\n")
            if end >= 0 and self._fits(max(map(len, buf[:end].split(b"\r\n"))) + 2, end + 4):
                # Every line up to the first empty one fits; the section ends there or earlier.
                self.done = True
                return None
        pos = 0
        while True:
            cut = buf.find(b"\r\n", pos)
            if cut < 0:
                break
            line = buf[pos:cut]
            pos = cut + 2
            self.size += len(line) + 2
            if not self._fits(len(line) + 2, self.size):
                self.done = True
                return "line" if self._max_line and len(line) + 2 > self._max_line else "size"
            if not line or not (line[0] in (32, 9) and self._seen_header or _HEADER.match(line)):
                self.done = True
                return None
            self._seen_header = True
        self._line = line = buf[pos:]
        # The incomplete line will be at least this long (a CR at its end may be the first half of its CRLF).
        pending = len(line) - 1 if line.endswith(b"\r") else len(line)
        if line and not self._fits(pending + 2, self.size + pending + 2):
            self.done = True
            return "line" if self._max_line and pending + 2 > self._max_line else "size"
        return None


class CountedReader:
    """Read exactly ``count`` raw bytes (a BDAT chunk, RFC 3030 §2): no unstuffing, no line semantics."""

    __slots__ = ("remaining",)

    def __init__(self, count: int) -> None:
        self.remaining = count

    @property
    def done(self) -> bool:
        """True once all ``count`` bytes were read."""
        return self.remaining == 0

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """Return ``(chunk_bytes, rest)``: the part of ``data`` that belongs to the chunk, and what follows it."""
        take = min(self.remaining, len(data))
        self.remaining -= take
        if take == len(data):
            return data, b""
        return data[:take], data[take:]
