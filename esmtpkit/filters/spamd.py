"""SpamAssassin's spamd as a filter: each message is sent to spamd (the SPAMC/SPAMD protocol, ``SYMBOLS``) and its
score becomes header fields, or a refusal at a score of your choosing.

The request is ``SYMBOLS SPAMC/1.5``, ``Content-length:`` (the message's size), ``User:`` (option ``user``), a
blank line and the message, streamed; spamd answers ``SPAMD/1.1 0 EX_OK``, ``Spam: True ; 1000.0 / 5.0`` and the
names of the rules that matched. A message gets ``X-Spam-Status:`` (and ``X-Spam-Flag: YES`` when spam; fields of
those names the client sent are removed), or a ``550 5.7.1`` refusal once its score reaches ``reject-score``. Any
other answer (a non-zero code) or trouble is raised, for the chain to count as this filter's failure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger

from esmtpkit.core.reply import Reply
from esmtpkit.filters.base import MessageFilter
from esmtpkit.filters.interfaces import HeldMessage
from esmtpkit.filters.stream import FilterProtocolError, client_endpoint, common_options, converse
from esmtpkit.filters.verdict import Action, HeaderEdit, Verdict

__all__ = ["SpamdFilter", "SpamdError", "SpamdAnswer", "from_spec", "parse_answer", "ANSWER_LIMIT", "MAX_SIZE"]

#: The most octets of spamd's answer read (its status, two fields and the rule names).
ANSWER_LIMIT = 64 * 1024
#: Messages larger than this are not sent (spamc's default, 500 KiB): spamd holds each message whole.
MAX_SIZE = 500 * 1024
#: The reply to a message whose score reaches ``reject-score``.
REJECTED = Reply.of(550, "Message refused as spam", enhanced="5.7.1")

_STATUS = re.compile(rb"SPAMD/(\d+)\.(\d+) +(\d+) *(.*)")
_SPAM = re.compile(r"(True|False|Yes|No) *; *(-?\d+(?:\.\d+)?) */ *(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_SYMBOL = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_USER = re.compile(r"[!-~]{1,128}")


class SpamdError(Exception):
    """spamd answered with a non-zero code."""


@dataclass(frozen=True)
class SpamdAnswer:
    """What spamd said of a message: spam or not, its score, the threshold, the rules that matched."""

    spam: bool
    score: float
    threshold: float
    symbols: tuple[str, ...]


def parse_answer(received: bytes, closed: bool) -> SpamdAnswer | None:
    """spamd's answer to ``SYMBOLS`` once whole (None until then); SpamdError for a non-zero code."""
    line_end = received.find(b"\r\n")
    if line_end < 0:
        if closed and received:
            _status(received)
        return None
    _status(received[:line_end])
    head_end = received.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    fields: dict[str, str] = {}
    for line in received[line_end + 2:head_end].split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon:
            raise FilterProtocolError(f"spamd answered a line that is not a field: {line[:100]!r}")
        fields[name.strip().decode("ascii", "replace").lower()] = value.strip().decode("ascii", "replace")
    body = received[head_end + 4:]
    if "content-length" in fields:
        try:
            length = int(fields["content-length"])
        except ValueError:
            raise FilterProtocolError(f"spamd's Content-length is not a number: {fields['content-length']!r}")
        if len(body) < length:
            return None
        body = body[:length]
    elif not closed:
        return None
    spam = _SPAM.fullmatch(fields.get("spam", ""))
    if spam is None:
        raise FilterProtocolError(f"spamd's answer has no Spam: field as SPAMC/1.5 has it: {fields.get('spam')!r}")
    words = [w.strip() for w in body.decode("ascii", "replace").split(",")]
    symbols = tuple(w for w in words if _SYMBOL.fullmatch(w))
    return SpamdAnswer(spam.group(1).lower() in ("true", "yes"), float(spam.group(2)), float(spam.group(3)),
                       symbols)


def _status(line: bytes) -> None:
    match = _STATUS.fullmatch(line.rstrip(b"\r\n"))
    if match is None:
        raise FilterProtocolError(f"not an answer of spamd: {line[:100]!r}")
    if match.group(3) != b"0":
        raise SpamdError(f"spamd answered {line[:200].decode('ascii', 'replace')!r}")


def _exactly(chunks: Iterator[bytes], size: int) -> Iterator[bytes]:
    """``chunks`` as they are, checking that they add up to ``size`` (the Content-length sent before them)."""
    sent = 0
    try:
        for chunk in chunks:
            sent += len(chunk)
            if sent > size:
                raise FilterProtocolError(f"the message is longer than its size ({size} octets)")
            yield chunk
        if sent != size:
            raise FilterProtocolError(f"the message is {sent} octets, not its size ({size})")
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


class SpamdFilter(MessageFilter):
    """Asks spamd at ``endpoint`` about each message no larger than ``max_size`` octets, for ``user`` (spamd's
    ``User:``; None: spamd's default). A score of ``reject_score`` or more is refused (None: never)."""

    name = "spamd"
    log = Logger()

    def __init__(self, endpoint: IStreamClientEndpoint, *, user: str | None = None,
                 reject_score: float | None = None, max_size: int = MAX_SIZE, **options: Any) -> None:
        super().__init__(**options)
        if user is not None and not _USER.fullmatch(user):
            raise ValueError(f"user is one word of printable ASCII, not {user!r}")
        if reject_score is not None and reject_score != reject_score:
            raise ValueError("reject-score is a number")
        if max_size < 1:
            raise ValueError("max-size is a number of octets above 0")
        self.endpoint = endpoint
        self.user = user
        self.reject_score = reject_score
        self.max_size = max_size

    def check(self, message: HeldMessage) -> Deferred[Verdict]:
        """Send ``message`` to spamd; its verdict."""
        if message.size > self.max_size:
            self.log.info("message of {size} octets larger than max-size {limit}, not checked",
                          size=message.size, limit=self.max_size)
            return succeed(Verdict(reason=f"not checked by spamd: larger than {self.max_size} octets",
                                   details={"too_big": True, "size": message.size}))
        head = f"SYMBOLS SPAMC/1.5\r\nContent-length: {message.size}\r\n"
        if self.user is not None:
            head += f"User: {self.user}\r\n"
        d = converse(self.endpoint, (head + "\r\n").encode("ascii"), _exactly(message.chunks(), message.size),
                     parse_answer, limit=ANSWER_LIMIT)
        return d.addCallback(self.verdict)

    def verdict(self, answer: SpamdAnswer) -> Verdict:
        """What spamd's ``answer`` means for the message."""
        details = {"spam": answer.spam, "score": answer.score, "threshold": answer.threshold,
                   "symbols": list(answer.symbols)}
        if self.reject_score is not None and answer.score >= self.reject_score:
            return Verdict(Action.REJECT, REJECTED, reason=f"spam, score {answer.score}", details=details)
        status = (f"{'Yes' if answer.spam else 'No'}, score={answer.score:.1f} required={answer.threshold:.1f} "
                  f"tests={','.join(answer.symbols) or 'none'}")
        edits = [HeaderEdit("delete", "X-Spam-Flag"), HeaderEdit("delete", "X-Spam-Status")]
        if answer.spam:
            edits.append(HeaderEdit("add", "X-Spam-Flag", "YES"))
        edits.append(HeaderEdit("add", "X-Spam-Status", status))
        return Verdict(edits=tuple(edits), reason=f"spam, score {answer.score}" if answer.spam else "",
                       details=details)


KEYS = ("user", "reject-score", "max-size")


def from_spec(target: str, options: Mapping[str, str], *, reactor: Any = None) -> SpamdFilter:
    """``spamd:TARGET[,KEY=VALUE...]``: a SpamdFilter for spamd at the client endpoint ``target``
    (``tcp:HOST:PORT`` or ``unix:PATH``), with ``name``, ``timeout``, ``on-failure``, ``user``, ``reject-score``
    and ``max-size``."""
    common = common_options(options, KEYS)
    endpoint = client_endpoint(target, reactor)
    reject_score = None
    if options.get("reject-score", "").strip():
        try:
            reject_score = float(options["reject-score"])
        except ValueError:
            raise ValueError(f"reject-score is a number, not {options['reject-score']!r}") from None
        if not -1e6 < reject_score < 1e6:
            raise ValueError(f"reject-score is a number, not {options['reject-score']!r}")
    max_size = MAX_SIZE
    if "max-size" in options:
        try:
            max_size = int(options["max-size"])
        except ValueError:
            max_size = 0
        if max_size < 1:
            raise ValueError(f"max-size is a number of octets above 0, not {options['max-size']!r}")
    return SpamdFilter(endpoint, user=options.get("user"), reject_score=reject_score, max_size=max_size, **common)
