"""Client text made safe to show: characters that act on a reader written as visible escapes (pure core).

A client chooses much of what a log line says: addresses, names, the text a handler's reply echoes. Written raw,
ESC starts a terminal escape sequence; CR, VT, FF, FS, GS, RS, NEL and U+2028/U+2029 end a line for many readers
(``str.splitlines``, editors, log viewers); the Unicode bidirectional formatting characters make text display in
another order than it is stored (CVE-2021-42574). `escape` writes each of them as ``\\x1b``, ``\\u202e``, ...
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["UNSAFE", "escape", "escape_lines"]

# C0 controls, DEL and C1 controls (RFC 5321 §4.1.2 and RFC 5198 §2 keep them out of text), the line and paragraph
# separators, and the bidirectional formatting characters (Unicode UAX #9: ALM, LRM, RLM, LRE..RLO, LRI..PDI).
_OTHERS: Final = r"\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
_CLASS: Final = r"\x00-\x1f" + _OTHERS

#: Finds the first such character: ``address`` refuses a path that has one.
UNSAFE: Final = re.compile(f"[{_CLASS}]")

# Lone surrogates (text decoded with ``surrogateescape``) cannot be written as UTF-8: escaped too.
_ESCAPED: Final = re.compile(f"[{_CLASS}\\ud800-\\udfff]")
_ESCAPED_KEEPING_LINES: Final = re.compile(f"[\\x00-\\x08\\x0b-\\x1f{_OTHERS}\\ud800-\\udfff]")
_SHORT: Final = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _visible(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT.get(char)
    if short is not None:
        return short
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with each character `UNSAFE` finds (TAB and LF too) and each lone surrogate written as its Python
    escape (``\\x1b``, ``\\u2028``): one line, shown as sent.

    A backslash the client sent stays as it is, so the result is for reading, not for decoding back.
    """
    if text.isprintable():  # none of them is printable: the common case costs one scan in C
        return text
    return _ESCAPED.sub(_visible, text)


def escape_lines(text: str) -> str:
    """Like `escape`, but LF and TAB stay: for a log message that is meant to span lines (a whole message)."""
    return _ESCAPED_KEEPING_LINES.sub(_visible, text)
