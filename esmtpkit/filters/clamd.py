"""ClamAV's clamd as a filter: each message is streamed to clamd (``zINSTREAM``) and its answer becomes a verdict.

clamd is sent ``zINSTREAM\\0``, then the message in chunks, each a 4-octet big-endian length and the octets, then
a zero length; it answers one NUL-ended line: ``stream: OK``, ``stream: NAME FOUND``, ``INSTREAM size limit
exceeded. ERROR`` (the message is longer than its StreamMaxLength) or ``... ERROR``. A virus is rejected (or
discarded, or quarantined: ``action``), a message too long for clamd accepted (or not: ``too-big``), any other
answer or trouble raised, for the chain to count as this filter's failure.
"""

from __future__ import annotations

import re
import struct
from typing import Any, Mapping

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger

from esmtpkit.core.reply import Reply
from esmtpkit.filters.base import MessageFilter
from esmtpkit.filters.interfaces import HeldMessage
from esmtpkit.filters.stream import FilterProtocolError, client_endpoint, common_options, converse, flag
from esmtpkit.filters.verdict import CONTINUE, Action, HeaderEdit, Verdict

__all__ = ["ClamdFilter", "ClamdError", "from_spec", "parse_answer", "safe_name", "ANSWER_LIMIT", "CHUNK"]

#: The most octets of clamd's answer read: one line naming a signature is far shorter.
ANSWER_LIMIT = 4096
#: The octets of one INSTREAM chunk.
CHUNK = 64 * 1024
#: The longest signature name put in a reply or a field.
NAME_LIMIT = 100

_VIRUS_ACTIONS = {"reject": Action.REJECT, "discard": Action.DISCARD, "quarantine": Action.QUARANTINE}
_TOO_BIG = {"accept": Action.CONTINUE, "tempfail": Action.TEMPFAIL, "reject": Action.REJECT}
_UNSAFE = re.compile(r"[^A-Za-z0-9._:/+()\-]")
_TOO_BIG_ANSWER = "INSTREAM size limit exceeded. ERROR"


class ClamdError(Exception):
    """clamd answered an error (other than a stream too long)."""


def safe_name(name: str) -> str:
    """A signature name as it may go into a reply or a header field: printable ASCII without spaces, bounded."""
    return _UNSAFE.sub("?", name)[:NAME_LIMIT] or "?"


def _frame(chunk: bytes) -> list[bytes]:
    return [struct.pack(">I", len(chunk)), chunk]


def parse_answer(received: bytes, closed: bool) -> str | None:
    """clamd's NUL-ended answer as text once whole (None until then)."""
    end = received.find(b"\0")
    if end < 0:
        return None
    return received[:end].decode("utf-8", "replace").strip()


class ClamdFilter(MessageFilter):
    """Streams each message to clamd at ``endpoint``. ``action``: what a virus gets (reject, discard,
    quarantine); ``too_big``: what a message longer than clamd's StreamMaxLength gets (accept, tempfail,
    reject); ``header``: add ``X-Virus-Scanned: clamav`` to a clean message."""

    name = "clamd"
    log = Logger()

    def __init__(self, endpoint: IStreamClientEndpoint, *, action: str | Action = Action.REJECT,
                 too_big: str | Action = Action.CONTINUE, header: bool = False, **options: Any) -> None:
        super().__init__(**options)
        self.endpoint = endpoint
        self.action = _choose("action", action, _VIRUS_ACTIONS)
        self.too_big = _choose("too-big", too_big, _TOO_BIG)
        self.header = header

    def check(self, message: HeldMessage) -> Deferred[Verdict]:
        """Stream ``message`` to clamd; its verdict."""
        d = converse(self.endpoint, b"zINSTREAM\0", message.chunks(CHUNK), parse_answer, limit=ANSWER_LIMIT,
                     frame=_frame, tail=struct.pack(">I", 0))
        return d.addCallback(self.verdict, message)

    def verdict(self, answer: str, message: HeldMessage | None = None) -> Verdict:
        """What clamd's ``answer`` (without its NUL) means for the message."""
        if answer == "stream: OK":
            if self.header:
                return Verdict(edits=(HeaderEdit("add", "X-Virus-Scanned", "clamav"),))
            return CONTINUE
        if answer.startswith("stream: ") and answer.endswith(" FOUND"):
            return self._found(safe_name(answer[len("stream: "):-len(" FOUND")].strip()))
        if answer == _TOO_BIG_ANSWER:
            return self._too_long(message)
        if answer.endswith(" ERROR"):
            raise ClamdError(f"clamd answered {answer[:200]!r}")
        raise FilterProtocolError(f"not an answer of clamd: {answer[:200]!r}")

    def _found(self, name: str) -> Verdict:
        details = {"signature": name}
        reason = f"virus found: {name}"
        if self.action is Action.REJECT:
            return Verdict(Action.REJECT, Reply.of(554, f"Virus found: {name}", enhanced="5.7.1"), reason=reason,
                           details=details)
        return Verdict(self.action, reason=reason, details=details)

    def _too_long(self, message: HeldMessage | None) -> Verdict:
        size = message.size if message is not None else None
        reason = "longer than clamd's StreamMaxLength: not scanned"
        details = {"too_big": True, "size": size}
        if self.too_big is Action.CONTINUE:
            self.log.info("message of {size} octets longer than its StreamMaxLength, accepted unscanned",
                          size=size)
            return Verdict(reason=reason, details=details)
        if self.too_big is Action.TEMPFAIL:
            return Verdict(Action.TEMPFAIL, Reply.of(451, "Message too big to scan, try again later",
                                                     enhanced="4.3.4"), reason=reason, details=details)
        return Verdict(Action.REJECT, Reply.of(552, "Message too big to scan", enhanced="5.3.4"), reason=reason,
                       details=details)


def _choose(option: str, value: str | Action, choices: Mapping[str, Action]) -> Action:
    if isinstance(value, Action):
        if value not in choices.values():
            raise ValueError(f"{option} is one of {', '.join(choices)}, not {value.value}")
        return value
    found = choices.get(value.strip().lower())
    if found is None:
        raise ValueError(f"{option} is one of {', '.join(choices)}, not {value!r}")
    return found


KEYS = ("action", "too-big", "header")


def from_spec(target: str, options: Mapping[str, str], *, reactor: Any = None) -> ClamdFilter:
    """``clamd:TARGET[,KEY=VALUE...]``: a ClamdFilter for clamd at the client endpoint ``target`` (``tcp:HOST:PORT``
    or ``unix:PATH``), with ``name``, ``timeout``, ``on-failure``, ``action``, ``too-big`` and ``header``."""
    common = common_options(options, KEYS)
    endpoint = client_endpoint(target, reactor)
    header = flag("header", options["header"]) if "header" in options else False
    return ClamdFilter(endpoint, action=options.get("action", "reject"), too_big=options.get("too-big", "accept"),
                       header=header, **common)
