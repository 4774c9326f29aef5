"""Tests for `esmtpkit.core.content`: dot-unstuffing, end-of-data detection, header splitting (RFC 5321 §4.5.2)."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core import content as data_module
from esmtpkit.core.content import (ContentError, ContentMode, ContentReader, CountedReader, DotDecoder, HeaderEvent,
                                   HeaderSplitter, dot_stuff, has_bare_newline)

from .support import split

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)

#: Content made mostly of the bytes that matter to the decoder, so the interesting cases come up often.
CONTENT = st.one_of(
    st.binary(max_size=80),
    st.lists(st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"\r\n.", b"..", b"a", b"\r\n.\r\n"]),
             max_size=30).map(b"".join),
)


def decode(pieces: list[bytes]) -> tuple[bytes, DotDecoder]:
    decoder = DotDecoder()
    out = b"".join(decoder.feed(piece) for piece in pieces)
    return out, decoder


def terminated(content: bytes) -> bytes:
    """Content as the receiver sees it: CRLF-terminated unless empty (RFC 5321 §4.1.1.4)."""
    return content if not content or content.endswith(b"\r\n") else content + b"\r\n"


class DotStuffTests(SynchronousTestCase):
    def test_examples(self) -> None:
        self.assertEqual(dot_stuff(b""), b".\r\n")
        self.assertEqual(dot_stuff(b"a"), b"a\r\n.\r\n")
        self.assertEqual(dot_stuff(b"a\r\n"), b"a\r\n.\r\n")
        self.assertEqual(dot_stuff(b".a\r\n.\r\n..\r\n"), b"..a\r\n..\r\n...\r\n.\r\n")

    def test_bare_newlines_not_stuffed(self) -> None:
        """Only a dot at the start of a CRLF line is doubled; bare LF/CR do not start lines."""
        self.assertEqual(dot_stuff(b"a\n.\nb\r.\r"), b"a\n.\nb\r.\r\r\n.\r\n")


class DotDecoderTests(SynchronousTestCase):
    def test_simple(self) -> None:
        out, decoder = decode([b"Hello\r\n.\r\n"])
        self.assertEqual((out, decoder.done, decoder.rest, decoder.bare_newline), (b"Hello\r\n", True, b"", False))

    def test_empty_message(self) -> None:
        """A dot right after DATA: empty content."""
        out, decoder = decode([b".\r\nQUIT\r\n"])
        self.assertEqual((out, decoder.done, decoder.rest), (b"", True, b"QUIT\r\n"))

    def test_unstuffing(self) -> None:
        out, decoder = decode([b"..a\r\n...\r\nb.\r\n.b\r\n.\r\n"])
        self.assertEqual(out, b".a\r\n..\r\nb.\r\nb\r\n")

    def test_rest_kept(self) -> None:
        out, decoder = decode([b"a\r\n.\r\nMAIL FROM:<a@b>\r\n", b"RCPT", b".\r\n"])
        self.assertEqual((out, decoder.rest), (b"a\r\n", b"MAIL FROM:<a@b>\r\nRCPT.\r\n"))
        self.assertEqual(decoder.feed(b"more"), b"")
        self.assertEqual(decoder.rest, b"MAIL FROM:<a@b>\r\nRCPT.\r\nmore")

    def test_holds_back_little(self) -> None:
        """Only bytes that may begin the marker are held back, so content streams out as it comes."""
        decoder = DotDecoder()
        self.assertEqual(decoder.feed(b"abc"), b"abc")
        self.assertEqual(decoder.feed(b"def\r"), b"def")
        self.assertEqual(decoder.feed(b"\n"), b"")
        self.assertEqual(decoder.feed(b"."), b"")
        self.assertEqual(decoder.feed(b"\r"), b"")
        self.assertFalse(decoder.done)
        self.assertEqual(decoder.feed(b"\n"), b"\r\n")
        self.assertTrue(decoder.done)

    def test_dot_line_not_ending(self) -> None:
        """``.\\rX`` and ``.x`` are content lines whose dot is dropped, not the end."""
        out, decoder = decode([b"a\r\n.\rX\r\n.x\r\n.\r\n"])
        self.assertEqual((out, decoder.done), (b"a\r\n\rX\r\nx\r\n", True))
        self.assertTrue(decoder.bare_newline)

    def test_only_crlf_dot_crlf_ends(self) -> None:
        """SMTP smuggling: bare LF / bare CR around a dot never end DATA."""
        for sneaky in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\n.\r", b"x\r\r\n.\r\r\n"):
            for start in (b"", b"x", b"x\r\n"):
                data = start + sneaky + b"MAIL FROM:<evil@example>\r\n"
                out, decoder = decode([data])
                self.assertFalse(decoder.done, data)
                out_bytewise, bytewise = decode([bytes([b]) for b in data])
                self.assertFalse(bytewise.done, data)
                self.assertEqual(out + decoder.feed(b"\r\n.\r\n"), out_bytewise + bytewise.feed(b"\r\n.\r\n"))
                self.assertTrue(decoder.done)
                self.assertTrue(decoder.bare_newline, data)

    def test_bare_newline_flag(self) -> None:
        self.assertFalse(decode([b"a\r\nb\r\n.\r\n"])[1].bare_newline)
        self.assertTrue(decode([b"a\nb\r\n.\r\n"])[1].bare_newline)
        self.assertTrue(decode([b"a\r", b"b\r\n.\r\n"])[1].bare_newline)
        self.assertFalse(decode([b"a\r", b"\nb\r\n.\r\n"])[1].bare_newline)
        self.assertFalse(decode([b"a\r\n.\r\n\n\r"])[1].bare_newline)  # after the end: not content

    def test_linear(self) -> None:
        """Feeding many small pieces keeps the held-back tail tiny (O(n) total work)."""
        decoder = DotDecoder()
        for _ in range(10000):
            decoder.feed(b"\r\n..")
            self.assertLessEqual(len(decoder._tail), 4)
        self.assertFalse(decoder.done)

    @SETTINGS
    @given(content=CONTENT, tail=st.binary(max_size=30), cuts=st.lists(st.integers(0, 200), max_size=8))
    def test_round_trip(self, content: bytes, tail: bytes, cuts: list[int]) -> None:
        """For any content and any split: decode(dot_stuff(content) + tail) is the content; the tail comes back."""
        out, decoder = decode(split(dot_stuff(content) + tail, cuts))
        self.assertTrue(decoder.done)
        self.assertEqual(out, terminated(content))
        self.assertEqual(decoder.rest, tail)
        self.assertEqual(decoder.bare_newline, has_bare_newline(terminated(content)))

    @SETTINGS
    @given(content=CONTENT, tail=st.binary(max_size=30), cuts=st.lists(st.integers(0, 200), max_size=8))
    def test_pure_python_scans(self, content: bytes, tail: bytes, cuts: list[int]) -> None:
        """Built without the native scans, the decoder gives exactly the same results."""
        stuffed = split(dot_stuff(content) + tail, cuts)
        expected, native = decode(stuffed)
        saved = data_module.find_mark, data_module.has_bare_newline
        data_module.find_mark, data_module.has_bare_newline = (data_module.python_find_mark,
                                                               data_module.python_has_bare_newline)
        try:
            out, decoder = decode(stuffed)
        finally:
            data_module.find_mark, data_module.has_bare_newline = saved
        self.assertEqual((out, decoder.done, decoder.rest, decoder.bare_newline),
                         (expected, native.done, native.rest, native.bare_newline))

    @SETTINGS
    @given(data=CONTENT, cuts=st.lists(st.integers(0, 200), max_size=8))
    def test_split_invariant(self, data: bytes, cuts: list[int]) -> None:
        """Any bytes, stuffed or not: the outcome does not depend on how they were split."""
        whole, one = decode([data])
        pieces, other = decode(split(data, cuts))
        self.assertEqual((whole, one.done, one.rest, one.bare_newline),
                         (pieces, other.done, other.rest, other.bare_newline))
        if one.done:
            self.assertIn(b"\r\n.\r\n", b"\r\n" + data)


class HasBareNewlineTests(SynchronousTestCase):
    def test_examples(self) -> None:
        self.assertFalse(has_bare_newline(b""))
        self.assertFalse(has_bare_newline(b"a\r\nb\r\n"))
        for data in (b"\n", b"\r", b"a\nb", b"\r\r\n", b"\r\n\n", b"\n\r"):
            self.assertTrue(has_bare_newline(data), data)


class HeaderSplitterTests(SynchronousTestCase):
    def feed(self, lines: list[bytes]) -> tuple[list[HeaderEvent], bool, bytes]:
        splitter = HeaderSplitter()
        events: list[HeaderEvent] = []
        for line in lines:
            got, done, body = splitter.line(line)
            events.extend(got)
            if done:
                return events, True, body
        return events + splitter.finish(), False, b""

    def test_blank_line_ends(self) -> None:
        events, done, body = self.feed([b"Subject: Hello", b"From:  a@b  ", b"", b"body"])
        self.assertEqual(events, [HeaderEvent("Subject", "Hello"), HeaderEvent("From", "a@b")])
        self.assertEqual((done, body), (True, b""))

    def test_folded(self) -> None:
        """RFC 5322 §2.2.3: unfolding removes the CRLF before the continuation whitespace."""
        events, _, _ = self.feed([b"Subject: a", b"  b", b"\tc", b"X: y", b""])
        self.assertEqual(events, [HeaderEvent("Subject", "a  b\tc"), HeaderEvent("X", "y")])

    def test_non_header_ends(self) -> None:
        """The first line that is not a header ends the headers and is the first body line."""
        events, done, body = self.feed([b"A: 1", b"no colon here", b"B: 2"])
        self.assertEqual((events, done, body), ([HeaderEvent("A", "1")], True, b"no colon here\r\n"))

    def test_first_line_not_header(self) -> None:
        self.assertEqual(self.feed([b"Hello there"]), ([], True, b"Hello there\r\n"))
        self.assertEqual(self.feed([b" folded first"]), ([], True, b" folded first\r\n"))

    def test_name_rules(self) -> None:
        """RFC 5322 §3.6.8 field names: printable ASCII but colon; whitespace before the colon tolerated."""
        events, done, _ = self.feed([b"X-Odd_Name!: 1", b"Spaced : 2", b""])
        self.assertEqual(events, [HeaderEvent("X-Odd_Name!", "1"), HeaderEvent("Spaced", "2")])
        self.assertEqual(self.feed([b": no name"])[1:], (True, b": no name\r\n"))

    def test_finish(self) -> None:
        """End of data inside the headers: the last header is still delivered."""
        events, done, _ = self.feed([b"A: 1", b"B: 2"])
        self.assertEqual((events, done), ([HeaderEvent("A", "1"), HeaderEvent("B", "2")], False))

    def test_non_utf8_kept(self) -> None:
        events, _, _ = self.feed([b"Subject: \xff\xfe", b""])
        self.assertEqual(events[0].value.encode("utf-8", "surrogateescape"), b"\xff\xfe")

    def test_size(self) -> None:
        splitter = HeaderSplitter()
        splitter.line(b"A: 1")
        splitter.line(b"")
        self.assertEqual(splitter.size, 8)


class CountedReaderTests(SynchronousTestCase):
    def test_exact(self) -> None:
        reader = CountedReader(5)
        self.assertEqual(reader.feed(b"abc"), (b"abc", b""))
        self.assertFalse(reader.done)
        self.assertEqual(reader.feed(b"de\r\n.\r\nQUIT"), (b"de", b"\r\n.\r\nQUIT"))
        self.assertTrue(reader.done)
        self.assertEqual(reader.feed(b"x"), (b"", b"x"))

    def test_zero(self) -> None:
        reader = CountedReader(0)
        self.assertTrue(reader.done)
        self.assertEqual(reader.feed(b"NOOP\r\n"), (b"", b"NOOP\r\n"))


def definition(data: bytes) -> bool:
    """The plain meaning: some CR is not part of a CRLF pair, or some LF is not."""
    pairs = data.count(b"\r\n")
    return data.count(b"\n") != pairs or data.count(b"\r") != pairs


def implementations(name: str) -> list:
    """The pure-Python ``name`` from esmtpkit.core.content, then the native one when it was built."""
    pure = getattr(data_module, "python_" + name)
    try:
        from esmtpkit.core import _scan
    except ImportError:
        return [pure]
    return [pure, getattr(_scan, name)]


def scanners() -> list:
    return implementations("has_bare_newline")


def finders() -> list:
    return implementations("find_mark")




class FindMarkTests(SynchronousTestCase):
    @SETTINGS
    @given(data=st.binary(max_size=300) | st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b"x", b".", b"\r\n."]),
                                                    max_size=200).map(b"".join),
           start=st.integers(-400, 400))
    def test_same_as_find(self, data: bytes, start: int) -> None:
        """Any bytes, any start (negative and past the end too): the answer of ``bytes.find``."""
        for find in finders():
            self.assertEqual(find(data, start), data.find(b"\r\n.", start), find)

    def test_long_regions(self) -> None:
        """Every position in a body of several 4 KiB blocks, and every start, finds the first mark."""
        clean = b"0123456789abcdef0123456789abc\r\n" * 400
        for find in finders():
            self.assertEqual(find(clean), -1)
            for at in [0, 1, 4093, 4094, 4095, 4096, 8190, 8191, 8192, len(clean) - 3, len(clean) - 2]:
                data = clean[:at] + b"\r\n." + clean[at + 3:]
                self.assertEqual(find(data), data.find(b"\r\n."), (find, at))
                self.assertEqual(find(data, at + 1), data.find(b"\r\n.", at + 1), (find, at))
            marks = clean.replace(b"\r\n", b"\r\n.")
            for start in range(0, 9000, 97):
                self.assertEqual(find(marks, start), marks.find(b"\r\n.", start), (find, start))

    def test_native_in_use_when_built(self) -> None:
        self.assertIs(data_module.find_mark, finders()[-1])
        for find in finders()[1:]:
            for args in [(), ("text",), (b"a", "1"), (b"a", 1, 2), (None,)]:
                self.assertRaises(TypeError, find, *args)


class HasBareNewlineExhaustiveTests(SynchronousTestCase):
    def test_matches_definition(self) -> None:
        """Every string of CR, LF and 'a' up to six bytes, and every prefix end: same answer as the definition."""
        import itertools

        for scan in scanners():
            for n in range(7):
                for parts in itertools.product([b"\r", b"\n", b"a"], repeat=n):
                    data = b"".join(parts)
                    for end in range(len(data) + 1):
                        self.assertEqual(scan(data, end), definition(data[:end]), (scan, data, end))
                    self.assertEqual(scan(data), definition(data), (scan, data))

    @SETTINGS
    @given(data=st.binary(max_size=300) | st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b"x", b"."]),
                                                    max_size=200).map(b"".join),
           end=st.none() | st.integers(-400, 400))
    def test_scanners_agree(self, data: bytes, end: int | None) -> None:
        """Any bytes and any slice end (negative and past the end too): every scan gives the definition's answer."""
        expected = definition(data[:end])
        for scan in scanners():
            self.assertEqual(scan(data, end), expected, scan)

    def test_native_in_use_when_built(self) -> None:
        """The module picks the native scan whenever it was built."""
        chosen = scanners()[-1]
        self.assertIs(has_bare_newline, chosen)
        self.assertEqual(data_module.NATIVE_SCAN, len(scanners()) == 2)

    def test_long_regions(self) -> None:
        """Bodies of many kilobytes: one bad byte anywhere, including around the native scan's 4 KiB blocks."""
        clean = b"0123456789abcdef0123456789abc\r\n" * 400  # 12800 bytes, CRLF straddles block edges
        for scan in scanners():
            self.assertFalse(scan(clean))
            self.assertFalse(scan(bytearray(clean), len(clean)))
            for at in [0, 1, 4094, 4095, 4096, 4097, 8191, 8192, 8193, len(clean) - 3, len(clean) - 1]:
                for bad in (b"\r", b"\n", b"\x00"):
                    data = clean[:at] + bad + clean[at + 1:]
                    self.assertEqual(scan(data), definition(data), (scan, at, bad))
            self.assertTrue(scan(clean + b"\r"))
            self.assertFalse(scan(clean + b"\r", -1))
            self.assertTrue(scan(clean, len(clean) - 1))  # the region ends with a CR whose LF lies outside it

    def test_native_refuses_bad_arguments(self) -> None:
        """The native scan raises TypeError like a Python function would, never crashes."""
        for scan in scanners()[1:]:
            for args in [(), ("text",), (b"a", "1"), (b"a", 1, 2), (None,)]:
                self.assertRaises(TypeError, scan, *args)
            self.assertRaises(OverflowError, scan, b"a", 2 ** 70)
            self.assertFalse(scan(memoryview(b"a\r\nb")))
            self.assertTrue(scan(memoryview(b"a\nb")))


def splitter_verdict(content: bytes, max_line: int, max_size: int) -> str | None:
    """What reading ``content`` as lines through `HeaderSplitter` says of the limits (the definition)."""
    splitter = HeaderSplitter()
    lines = content.split(b"\r\n")
    last = lines.pop()  # after the final CRLF (empty), or a last line without one
    for line in lines + ([last] if last else []):
        if max_line and len(line) + 2 > max_line:
            return "line"
        _, done, _ = splitter.line(line)
        if max_size and splitter.size > max_size:
            return "size"
        if done:
            return None
    return None


#: Header-ish content: names, colons, folding, empty lines and long runs, so every rule comes up.
HEADERS = st.lists(st.sampled_from([b"Subject: hi", b"X:", b" folded", b"\tmore", b"", b"not a header",
                                    b"A: " + b"v" * 40, b"B" * 30 + b": x", b"\r", b"\n"]),
                   max_size=12).map(lambda lines: b"\r\n".join(lines) + b"\r\n")


#: The limit a `ContentReader` found broken, as `splitter_verdict` names it.
VERDICTS = {ContentError.LINE_TOO_LONG: "line", ContentError.HEADER_TOO_BIG: "size"}


class RawHeaderLimitsTests(SynchronousTestCase):
    """For RAW content (passed on, never split for the handler) the reader still applies the header limits, and
    agrees with reading the same content as lines, however it is split."""

    def reader(self, max_line: int, max_size: int) -> ContentReader:
        return ContentReader(ContentMode.RAW, dotted=False, max_line=max_line, max_header=max_size, check_bare=False)

    def verdict(self, reader: ContentReader, piece: bytes) -> str | None:
        """Feed one piece: the raw piece comes out as it went in; return the limit broken, if any."""
        events = reader.feed(piece)
        if reader.error is not None:
            self.assertEqual(events, [])
            return VERDICTS[reader.error]
        self.assertEqual(b"".join(events), piece)
        return None

    def feed(self, pieces: list[bytes], max_line: int, max_size: int) -> str | None:
        reader = self.reader(max_line, max_size)
        for piece in pieces:
            verdict = self.verdict(reader, piece)
            if verdict is not None or not reader.in_headers:
                return verdict
        return None

    @SETTINGS
    @given(HEADERS, st.lists(st.integers(0, 200), max_size=5), st.sampled_from([0, 20, 40, 1000]),
           st.sampled_from([0, 30, 60, 10000]))
    def test_agrees_with_the_splitter(self, content: bytes, cuts: list[int], max_line: int, max_size: int) -> None:
        expected = splitter_verdict(content, max_line, max_size)
        self.assertEqual(self.feed(split(content, cuts), max_line, max_size), expected)

    def test_usual_message_is_one_pass(self) -> None:
        reader = self.reader(1000, 102400)
        self.assertIsNone(self.verdict(reader, b"From: a@example.org\r\nSubject: hi\r\n\r\n" + b"x" * 5000 + b"\r\n"))
        self.assertFalse(reader.in_headers)

    def test_long_line_straddling_pieces(self) -> None:
        reader = self.reader(1000, 102400)
        self.assertIsNone(self.verdict(reader, b"X: " + b"v" * 500))
        self.assertIsNone(self.verdict(reader, b"v" * 495 + b"\r"))  # 998 octets and a CR that may begin the CRLF
        self.assertIsNone(self.verdict(reader, b"\n\r\n"))
        self.assertFalse(reader.in_headers)
        reader = self.reader(1000, 102400)
        self.assertIsNone(self.verdict(reader, b"X: " + b"v" * 995))
        self.assertEqual(self.verdict(reader, b"vv"), "line")

    def test_endless_line_is_caught_early(self) -> None:
        self.assertEqual(self.verdict(self.reader(1000, 102400), b"X: " + b"v" * 64 * 1024), "line")

    def test_section_size(self) -> None:
        reader = self.reader(1000, 100)
        self.assertIsNone(self.verdict(reader, b"X: 123456789\r\n" * 7))  # 98 octets
        self.assertEqual(self.verdict(reader, b"X"), "size")

    def test_a_body_line_ends_the_section(self) -> None:
        reader = self.reader(1000, 100)
        self.assertIsNone(self.verdict(reader, b"X: 1\r\nthis is the body\r\n" + b"y" * 5000))
        self.assertFalse(reader.in_headers)

    def test_no_limits(self) -> None:
        reader = self.reader(0, 0)
        self.assertIsNone(self.verdict(reader, b"X: " + b"v" * 100000 + b"\r\n" * 2))
        self.assertFalse(reader.in_headers)
