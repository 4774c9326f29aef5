"""Tests for `esmtpkit.core.escape`: client text made safe for one log line."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core.escape import UNSAFE, escape, escape_lines

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)

#: One of each kind of character that must never reach a log line raw.
HOSTILE = "\x00\x07\t\n\x0b\x0c\r\x1b\x1c\x1d\x1e\x1f\x7f\x80\x85\x9b\x9f\u061c\u200e\u200f\u2028\u2029" \
          "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


class EscapeTests(SynchronousTestCase):
    def test_printable_text_is_returned_as_it_is(self) -> None:
        """Ordinary text, UTF-8 letters, spaces, backslashes and joiners need no escaping."""
        for text in ("", "alice@example.org", "jörg@bücher.example", "a b\\c", "می\u200cخواهم", "\u00a0nbsp"):
            self.assertEqual(escape(text), text)

    def test_each_character_written_visibly(self) -> None:
        """TAB, LF and CR as ``\\t \\n \\r``; other characters below U+0100 as ``\\xNN``; the rest as ``\\uNNNN``."""
        self.assertEqual(escape("x\x1b[2J\x0c\x1c\x1d\x1ey"), "x\\x1b[2J\\x0c\\x1c\\x1d\\x1ey")
        self.assertEqual(escape("a\tb\nc\rd\x00e\x7f"), "a\\tb\\nc\\rd\\x00e\\x7f")
        self.assertEqual(escape("\x85\x9b\u2028\u2029"), "\\x85\\x9b\\u2028\\u2029")
        self.assertEqual(escape("\u202eevil\u2066\u200f\u061c"), "\\u202eevil\\u2066\\u200f\\u061c")

    def test_lone_surrogates(self) -> None:
        """Bytes decoded with ``surrogateescape`` cannot be encoded as UTF-8 by a log file: escaped too."""
        self.assertEqual(escape("a\udc80b"), "a\\udc80b")
        escape("a\udc80b").encode("utf-8")

    def test_every_unsafe_character(self) -> None:
        """Nothing `UNSAFE` finds survives, and every one of them is found."""
        for char in HOSTILE:
            self.assertIsNotNone(UNSAFE.search(char), repr(char))
            self.assertIsNone(UNSAFE.search(escape(char)), repr(char))
            self.assertTrue(escape(char).startswith("\\"), repr(char))

    def test_lines_kept(self) -> None:
        """`escape_lines` keeps LF and TAB (a whole message in the log) and escapes the rest."""
        self.assertEqual(escape_lines("Subject: x\n\tfolded\r\n\x1b[2J\u2028"),
                         "Subject: x\n\tfolded\\r\n\\x1b[2J\\u2028")

    @SETTINGS
    @given(st.text(alphabet=st.characters(codec=None), max_size=30) | st.text(alphabet=HOSTILE + "ab\\", max_size=30))
    def test_one_line_nothing_unsafe(self, text: str) -> None:
        """Any text escapes to one line of characters `UNSAFE` does not find, which UTF-8 can encode."""
        got = escape(text)
        self.assertIsNone(UNSAFE.search(got))
        self.assertEqual(len(got.splitlines()), 1 if got else 0)
        got.encode("utf-8")
