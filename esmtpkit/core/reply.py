"""SMTP replies as values: what a handler returns and what the protocol writes (RFC 5321 §4.2, RFC 3463).

Pure core: no Twisted, no I/O. A `Reply` knows its code, its text lines and, optionally, its enhanced status
code; `render` turns it into wire bytes, adding the enhanced code only when the session negotiated it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Union

__all__ = ["Reply", "SMTPReply", "ReplyLike", "coerce", "default_enhanced", "strip_enhanced"]

_ENHANCED: Final = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
_UNSAFE: Final = re.compile(r"[\r\n\x00]")

#: Enhanced codes (RFC 3463) for basic codes that have a clear meaning on their own.
_BY_CODE: Final[dict[int, str]] = {
    221: "2.0.0",
    250: "2.0.0",
    251: "2.1.5",
    252: "2.0.0",
    421: "4.3.0",
    450: "4.2.0",
    451: "4.3.0",
    452: "4.3.1",
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    535: "5.7.8",
    550: "5.0.0",
    551: "5.1.6",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.0.0",
    555: "5.5.4",
}


#: Enhanced codes already known to be well-formed (so replies built from constants skip the regex).
_VALID: Final = frozenset(_BY_CODE.values()) | {"2.1.0", "2.1.5", "2.0.0", "2.5.2", "2.7.0", "4.4.2", "4.3.2",
                                                  "4.7.0", "5.5.1", "5.5.2", "5.5.4", "5.3.4", "5.7.1"}


def default_enhanced(code: int) -> str | None:
    """A sensible RFC 3463 enhanced code for a basic reply code (None for 1xx/3xx, which carry none)."""
    if code in _BY_CODE:
        return _BY_CODE[code]
    klass = code // 100
    if klass in (2, 4, 5):
        return f"{klass}.0.0"
    return None


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: a three-digit code, one or more text lines, and an optional enhanced status code.

    Text lines never contain CR, LF or NUL: they are replaced by spaces so a handler cannot inject replies.
    """

    code: int
    lines: tuple[str, ...] = ("",)
    enhanced: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.code, int) or not 200 <= self.code <= 599:
            raise ValueError(f"SMTP reply code must be 200-599, not {self.code!r}")
        given = (self.lines,) if isinstance(self.lines, str) else (self.lines or ("",))  # Reply(250, "OK") too
        if type(given) is tuple and len(given) == 1 and type(given[0]) is str and given[0].isprintable():
            lines = given  # one clean line, the usual reply: no generator to run
        else:
            lines = tuple(line if type(line) is str and line.isprintable() else _UNSAFE.sub(" ", str(line))
                          for line in given)
        enhanced = self.enhanced
        if enhanced is None:
            first = lines[0]
            match = _ENHANCED.match(first) if first[1:2] == "." else None
            if match is not None and match.group(1) == str(self.code)[0]:
                enhanced = f"{match.group(1)}.{match.group(2)}.{match.group(3)}"
                lines = (lines[0][match.end():],) + lines[1:]
        elif str(enhanced)[:1] != str(self.code)[0] or (enhanced not in _VALID and not _ENHANCED.match(enhanced)):
            raise ValueError(f"enhanced code {enhanced!r} does not fit reply code {self.code}")
        if lines is not self.lines:  # a frozen field costs a call to set: only when normalising changed it
            object.__setattr__(self, "lines", lines)
        if enhanced is not self.enhanced:
            object.__setattr__(self, "enhanced", enhanced)

    @classmethod
    def of(cls, code: int, *lines: str, enhanced: str | None = None) -> "Reply":
        """Build a reply from a code and text lines: ``Reply.of(250, "OK")``."""
        return cls(code, tuple(lines) or ("",), enhanced)

    @property
    def is_positive(self) -> bool:
        """True for 2xx and 3xx replies (the command was accepted)."""
        return self.code < 400

    @property
    def text(self) -> str:
        """The text lines joined with newlines (handy in tests and logs)."""
        return "\n".join(self.lines)

    def render(self, enhanced: bool = False) -> bytes:
        """Wire bytes, CRLF-terminated; with ``enhanced`` each line is prefixed by the enhanced status code."""
        lines = self.lines
        if len(lines) == 1 and lines[0] and lines[0][-1] != " ":  # the common case, in one format
            code = (self.enhanced or default_enhanced(self.code)) if enhanced else None
            text = f"{code} {lines[0]}" if code else lines[0]
            return f"{self.code} {text}\r\n".encode("utf-8", "surrogateescape")
        prefix = ""
        if enhanced:
            code = self.enhanced or default_enhanced(self.code)
            if code is not None:
                prefix = code + " "
        last = len(self.lines) - 1
        out = []
        for i, line in enumerate(self.lines):
            body = (prefix + line).rstrip(" ") if line or prefix else ""
            sep = "-" if i != last else (" " if body else "")  # RFC 5321 §4.2: SP only before a textstring
            out.append(f"{self.code}{sep}{body}\r\n")
        return "".join(out).encode("utf-8", "surrogateescape")

    def __str__(self) -> str:
        return self.render(self.enhanced is not None).decode("utf-8", "replace").rstrip("\r\n")


class SMTPReply(Exception):
    """Raise from a handler method to answer with this reply: ``raise SMTPReply(550, "No such user")``."""

    def __init__(self, code: int | Reply, *lines: str, enhanced: str | None = None) -> None:
        self.reply = code if isinstance(code, Reply) else Reply.of(code, *lines, enhanced=enhanced)
        super().__init__(str(self.reply))


#: What a handler verb may return (before Deferreds and coroutines are resolved).
ReplyLike = Union[Reply, tuple]


def coerce(value: Any) -> Reply:
    """Turn a handler's result into a Reply: a Reply, a ``(code, *lines)`` tuple or an int code.

    Anything else raises TypeError, which the protocol answers with 451 4.3.0.
    """
    if isinstance(value, Reply):
        return value
    if isinstance(value, tuple) and value and isinstance(value[0], int):
        return Reply.of(value[0], *(str(line) for line in value[1:]))
    if isinstance(value, int) and not isinstance(value, bool):
        return Reply.of(value)
    raise TypeError(f"a handler must return a Reply or a (code, *lines) tuple, not {value!r}")


def strip_enhanced(reply: Reply) -> Reply:
    """``reply`` as read off the wire, with the enhanced code taken off its continuation lines too (RFC 2034 §3
    puts it on every line; `Reply` takes it off the first)."""
    code = reply.enhanced
    if code is None or len(reply.lines) == 1:
        return reply
    rest = tuple("" if line == code else line[len(code) + 1:] if line.startswith(code + " ") else line
                 for line in reply.lines[1:])
    return Reply(reply.code, reply.lines[:1] + rest, code)
