"""Message content byte paths: dot-unstuffing DATA, splitting headers, counting BDAT (RFC 5321 §4.5.2, RFC 3030).

Pure core. Every decoder is O(n) in its input, holds back at most a few bytes across chunk splits, and never
treats a bare CR or bare LF as a line end, so only ``CRLF.CRLF`` ends DATA (the SMTP smuggling rule).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final, Union

__all__ = ["ContentReader", "ContentMode", "ContentError", "ContentEvent", "EOH", "EndOfHeaders", "DotDecoder",
           "HeaderSplitter", "CountedReader", "dot_stuff", "has_bare_newline", "HeaderEvent", "NATIVE_SCAN"]

_MARK: Final = b"\r\n."
#: The dot as an int: bytes answer ``in`` for an int at once, for a bytes only after a failed int conversion.
_DOT: Final = ord(".")
#: A bare CR or LF, searched for only to know where the first one is (`has_bare_newline` says whether there is one).
_BARE: Final = re.compile(rb"\r(?!\n)|(?<!\r)\n")


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
        if _DOT not in buf:  # no dot, no marker and nothing to unstuff: one memchr instead of a search
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


class ContentMode(enum.Enum):
    """How message content reaches a handler (its ``content_mode``; the seed's ``chunk_mode`` maps onto it)."""

    #: Headers one by one to ``header()``, then ``eoh()``, then the rest in chunks of at most ``chunk_size`` octets
    #: (the seed's default, ``chunk_mode = None``).
    PARSED = "parsed"
    #: As PARSED, but the rest one line per ``body()`` call, CRLF included (``chunk_mode = False``).
    LINES = "lines"
    #: Everything, headers included, in raw chunks through ``body()`` (``chunk_mode = True``).
    RAW = "raw"


#: The modes as globals for the per-read paths: Python 3.11 reads enum members through a slow __getattr__ hook.
_RAW: Final = ContentMode.RAW
_LINES: Final = ContentMode.LINES


class ContentError(enum.Enum):
    """Why content was refused; the server turns each into its reply."""

    LINE_TOO_LONG = "line"  # a header line longer than the line limit
    HEADER_TOO_BIG = "header"  # the header section larger than its limit
    TOO_BIG = "size"  # the message larger than its limit
    BARE_NEWLINE = "bare"  # a CR or LF that is not part of a CRLF


class EndOfHeaders:
    """The header section ended (the event before the first body chunk)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "EOH"


#: The one end-of-headers event.
EOH: Final = EndOfHeaders()

#: What `ContentReader` returns: a complete header, the end of the headers, or body bytes.
ContentEvent = Union[HeaderEvent, EndOfHeaders, bytes]


def _slices(data: bytes, size: int) -> list[bytes]:
    """``data`` cut into pieces of at most ``size`` octets (none for empty data)."""
    if len(data) <= size:
        return [data] if data else []
    return [data[i:i + size] for i in range(0, len(data), size)]


class ContentReader:
    """The one content path: message content in, handler events out, for DATA and for BDAT alike.

    DATA content is fed as it arrives on the wire (``dotted``): a `DotDecoder` undoes the dot-stuffing and finds the
    end, after which ``done`` is set and ``rest`` holds the bytes that followed (pipelined commands). BDAT content is
    fed as the chunks' octets and ended by `end` after BDAT LAST. Either way the decoded content goes through the
    same header splitter, limits and end-of-headers logic, and comes out as events for ``mode``: `HeaderEvent`,
    `EOH`, then body ``bytes`` (for RAW, only body bytes; the header section is still read to apply its limits).

    The first limit broken sets ``error`` (a `ContentError`); from then on nothing more is returned, but DATA is
    still read to its end. Memory held is at most one header line (bounded by ``max_line``, or by ``max_header``)
    and, for LINES, one body line shorter than ``chunk_size``. A limit of 0 is no limit.
    """

    __slots__ = ("mode", "chunk_size", "max_size", "max_header", "_longest", "decoder", "error", "size", "done",
                 "_splitter", "_line", "_partial", "_check_bare", "_cr", "_discard", "_raw_first")

    def __init__(self, mode: ContentMode = ContentMode.PARSED, chunk_size: int = 65536, *, dotted: bool = True,
                 max_size: int = 0, max_line: int = 0, max_header: int = 0, check_bare: bool = True) -> None:
        self.mode = mode
        self.chunk_size = max(1, chunk_size)
        self.max_size = max_size
        self.max_header = max_header
        self._longest = max_line - 2 if max_line else 0  # the longest header line without its CRLF
        self.decoder = DotDecoder(at_line_start=True, check_bare=False) if dotted else None
        self.error: ContentError | None = None
        self.size = 0  # decoded content octets so far
        self.done = False
        # RAW content is passed on as it comes: its header section is read only to apply the limits, if any, and
        # then only if the first piece does not settle them at once (``_raw_first``).
        raw = mode is _RAW
        self._splitter: HeaderSplitter | None = None if raw else HeaderSplitter()
        self._raw_first = raw and bool(max_line or max_header)
        self._line = b""  # the header section's incomplete last line
        self._partial = b""  # LINES: the body's incomplete last line
        self._check_bare = check_bare  # the CR/LF scan runs on the content, DATA's decoded as BDAT's counted
        self._cr = False  # the content so far ends with a CR the next octet may pair with an LF
        self._discard = False

    @property
    def rest(self) -> bytes:
        """DATA: the bytes after the end-of-data marker, once ``done``."""
        return self.decoder.rest if self.decoder is not None else b""

    @property
    def in_headers(self) -> bool:
        """True while the header section is being read (for RAW without limits it is never read)."""
        return self._splitter is not None or self._raw_first

    def discard(self) -> None:
        """Return no more events (the transaction failed elsewhere); DATA is still read to its end."""
        self._discard = True

    def feed(self, data: bytes) -> list[ContentEvent]:
        """Consume wire bytes (DATA) or chunk octets (BDAT); return the events they complete."""
        decoder = self.decoder
        events = self._checked(data if decoder is None else decoder.feed(data))
        if decoder is not None and decoder.done:
            events += self._finish()
        return [] if self.error is not None or self._discard else events

    def _checked(self, data: bytes) -> list[ContentEvent]:
        """`_content` with the bare CR/LF rule. A bare line end fails the message once the content before it was
        read, so of two faults the one met first wins, however the content was split and whichever way it came."""
        if self._check_bare and self.error is None:
            carried = self._cr
            probe = b"\r" + data if carried else data
            self._cr = probe.endswith(b"\r")  # it may be the first half of a CRLF: the next octet tells
            end = len(probe) - self._cr
            if has_bare_newline(probe, end):
                found = _BARE.search(probe, 0, end)
                events = self._content(data[:max(found.start() - carried, 0)] if found is not None else data)
                self._fail(ContentError.BARE_NEWLINE)
                return events
        return self._content(data)

    def end(self) -> list[ContentEvent]:
        """BDAT LAST: the content is complete (it may end without CRLF); return the last events."""
        if self._cr:
            self._fail(ContentError.BARE_NEWLINE)  # a CR at the very end pairs with nothing
        events = self._finish()
        return [] if self.error is not None or self._discard else events

    def _fail(self, error: ContentError) -> None:
        if self.error is None:
            self.error = error

    def _content(self, data: bytes) -> list[ContentEvent]:
        if not data or self.error is not None:
            return []
        self.size += len(data)
        if self.max_size and self.size > self.max_size:
            self._fail(ContentError.TOO_BIG)
            return []
        if self._discard:
            return []
        if self._raw_first:
            self._raw_first = False
            if not self._section_fits(data):
                self._splitter = HeaderSplitter()  # read the section for its limits, piece by piece
        if self._splitter is None:
            return self._body(data)
        if self.mode is _RAW:
            self._headers(data)  # for the limits only: RAW content is passed on as it came
            return self._body(data)
        events, body = self._headers(data)
        if body:
            events += self._body(body)
        return events

    def _section_fits(self, data: bytes) -> bool:
        """RAW's usual case, in one search and one split: the first piece holds an empty line, and every line
        before it fits the limits (the section ends there or earlier, so no limit can be broken)."""
        end = data.find(b"\r\n\r\n")
        if end < 0 or (self.max_header and end + 4 > self.max_header):
            return False
        return not self._longest or max(map(len, data[:end].split(b"\r\n"))) <= self._longest

    def _headers(self, data: bytes) -> tuple[list[ContentEvent], bytes]:
        """Split header lines off ``data``; return the events and, if the section ended, the body bytes after it."""
        splitter = self._splitter
        assert splitter is not None
        buf = self._line + data if self._line else data
        longest, most = self._longest, self.max_header
        events: list[ContentEvent] = []
        pos = 0
        while True:
            cut = buf.find(b"\r\n", pos)
            if cut < 0:
                break
            line = buf[pos:cut]
            pos = cut + 2
            if longest and len(line) > longest:
                self._fail(ContentError.LINE_TOO_LONG)
                return [], b""
            headers, ended, first = splitter.line(line)
            if most and splitter.size > most:
                self._fail(ContentError.HEADER_TOO_BIG)
                return [], b""
            events += headers
            if ended:
                self._splitter = None
                self._line = b""
                events.append(EOH)
                return events, first + buf[pos:] if first else buf[pos:]
        self._line = line = buf[pos:]
        # The incomplete line will be at least this long (a CR at its end may be the first half of its CRLF).
        pending = len(line) - 1 if line.endswith(b"\r") else len(line)
        if line and longest and pending > longest:
            self._fail(ContentError.LINE_TOO_LONG)
        elif line and most and splitter.size + pending + 2 > most:
            self._fail(ContentError.HEADER_TOO_BIG)
        return events, b""

    def _body(self, data: bytes) -> list[ContentEvent]:
        size = self.chunk_size
        if self.mode is not _LINES:
            return _slices(data, size)  # type: ignore[return-value]
        # One call per line; a line longer than chunk_size still arrives in chunk_size pieces.
        data = self._partial + data
        cut = data.rfind(b"\r\n") + 2
        lines = [line + b"\r\n" for line in data[: cut - 2].split(b"\r\n")] if cut > 1 else []
        rest = data[cut:] if cut > 1 else data
        whole = len(rest) - len(rest) % size
        self._partial = rest[whole:]
        return [piece for line in lines + [rest[:whole]] for piece in _slices(line, size)]

    def _finish(self) -> list[ContentEvent]:
        """The content ended: the last header (and a last line without CRLF), the end of the headers, the rest."""
        self.done = True
        if self.error is not None:
            return []
        events: list[ContentEvent] = []
        splitter = self._splitter
        if splitter is not None:
            self._splitter = None
            body = b""
            if self._line:
                line, self._line = self._line, b""  # BDAT: a last line without CRLF
                headers, _, body = splitter.line(line)
                body = body[:-2]  # the splitter gave it the CRLF the message does not have
                if self.max_header and splitter.size > self.max_header:
                    self._fail(ContentError.HEADER_TOO_BIG)
                    return []
                events += headers
            events += splitter.finish()
            events.append(EOH)
            if self.mode is _RAW:
                events = []
            elif body:
                events += self._body(body)
        if self._partial:
            events.append(self._partial)
            self._partial = b""
        return events


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
