"""What a filter answers: an `Action`, the reply that goes with it, and the header changes it asks for.

Pure values, shared by every filter (rspamd, clamd, spamd, milter) and by the chain that runs them, so that a
handler or a test can make and compare them without any network.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from esmtpkit.core.reply import Reply

__all__ = ["Action", "HeaderEdit", "Verdict", "CONTINUE", "FILTER_FAILED"]


_LINE_END = re.compile(r"\r\n|\r|\n")
_SPACE = re.compile(rb"[ \t]")
#: A line end that is not a fold (not followed by a space or a tab).
_UNFOLDED = re.compile(r"(?:\r\n|\r|\n)(?![ \t])")


class Action(enum.Enum):
    """A filter's decision at one stage (the names are the milter protocol's, and rspamd's map onto them)."""

    #: Go on: later stages of this filter, and the filters after it, still look.
    CONTINUE = "continue"
    #: This filter has nothing more to say about this message (milter SMFIR_ACCEPT); the others still look.
    ACCEPT = "accept"
    #: Refuse with the verdict's reply (5xx).
    REJECT = "reject"
    #: Refuse for now with the verdict's reply (4xx): the client tries again later.
    TEMPFAIL = "tempfail"
    #: Answer the client as if accepted, and deliver nothing (the handler behind is told ``abort``).
    DISCARD = "discard"
    #: Accept, but mark the message to be held (``envelope.quarantine``), with the verdict's reason.
    QUARANTINE = "quarantine"


#: The actions that end a message's filtering at once.
FINAL = frozenset({Action.REJECT, Action.TEMPFAIL, Action.DISCARD})


@dataclass(frozen=True)
class HeaderEdit:
    """One change to the header section, as the milter protocol puts them (RFC 5322 field names, any case).

    ``add`` appends a field at the end of the header section; ``insert`` puts it before the ``index``-th field
    (0: at the top); ``change`` replaces the value of the ``index``-th field named ``name`` (1-based) and
    ``delete`` removes it (``index`` 0 for ``delete``: every field of that name). A ``change`` whose field is not
    there adds it at the end, and one with an empty value deletes it, as the milter protocol has them. ``value``
    may be folded (a line end followed by a space or a tab).
    """

    kind: str
    name: str
    value: str = ""
    index: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("add", "insert", "change", "delete"):
            raise ValueError(f"unknown header edit {self.kind!r}")
        if not self.name or any(c <= " " or c == ":" or c > "~" for c in self.name):
            raise ValueError(f"not a header field name: {self.name!r}")
        if "\0" in self.value or _UNFOLDED.search(self.value):
            raise ValueError("a line end in a header field value must be followed by a space or a tab (folding)")
        if self.index < 0:
            raise ValueError("index is never negative")

    @property
    def line(self) -> bytes:
        """The field as it goes into the message: ``Name: value``, its folds ending in CRLF, and CRLF. The value
        is UTF-8, and octets a filter sent that are not (kept as surrogate escapes) go back as they came. A line
        longer than RFC 5322's 998 octets is folded at its spaces (a field that fits is left as the filter wrote
        it: a signature over it must still verify)."""
        value = _LINE_END.sub("\r\n", self.value)
        first, *rest = f"{self.name}: {value}".encode("utf-8", "surrogateescape").split(b"\r\n")
        lines = [first] + [line for line in rest if line.strip()]  # a line of blanks would end the header section
        return b"".join(piece + b"\r\n" for line in lines for piece in _folded(line))


def _folded(line: bytes, limit: int = 998, width: int = 78) -> list[bytes]:
    """``line`` as it is when it fits in ``limit`` octets; else cut before spaces or tabs into lines of about
    ``width`` (a run with no space in it stays whole, however long)."""
    if len(line) <= limit:
        return [line]
    pieces: list[bytes] = []
    start = 0
    for match in _SPACE.finditer(line, 1):
        at = match.start()
        if at - start > width and at > start:
            last = line.rfind(b" ", start + 1, start + width + 1)
            last = max(last, line.rfind(b"\t", start + 1, start + width + 1))
            cut = last if last > start else at
            pieces.append(line[start:cut])
            start = cut
    pieces.append(line[start:])
    return [p for p in pieces if p.strip()] or [line]


@dataclass(frozen=True)
class Verdict:
    """A filter's answer: ``action``, the ``reply`` for REJECT and TEMPFAIL (a default one when None), the header
    ``edits`` it asks for, a ``reason`` (for the log, and QUARANTINE's mark) and what it found (``details``: a
    score, the names of the rules or signatures that matched)."""

    action: Action = Action.CONTINUE
    reply: Reply | None = None
    edits: tuple[HeaderEdit, ...] = ()
    reason: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        """Whether it ends the message's filtering (reject, tempfail, discard)."""
        return self.action in FINAL


#: Nothing to say: go on.
CONTINUE = Verdict()

#: The default reply of a filter that could not answer (down, too slow) when the outcome is tempfail.
FILTER_FAILED = Reply.of(451, "Message filtering is unavailable, try again later", enhanced="4.7.1")
