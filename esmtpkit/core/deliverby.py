"""DELIVERBY (RFC 2852): the sender gives the time within which the message must be delivered, and what to do
when it cannot be: return it (mode R) or only notify (mode N), optionally with a trace of its way (T).

Pure core. EHLO offers ``DELIVERBY`` with the server's fixed minimum by-time when there is one (RFC 2852 §4,
``min-by-time``); MAIL takes ``BY=<by-time>;<by-mode>[T]`` and handlers find a `By` in ``mail_params["BY"]``.
The parser cannot know the time: a handler notes when the message arrived and asks `By.deadline` (or
`By.remaining` when relaying: RFC 2852 §4 has each hop pass on what is left of the by-time).

The queue and the Relay do so to a next hop that offers DELIVERBY. In mode R a message whose deadline has passed,
or whose next hop lacks DELIVERBY or asks a longer minimum than what is left, is returned with 554 5.4.7, and the
queue never retries past the deadline; in mode N it goes on, and the queue sends a delay notice once it is late.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

from esmtpkit.core.extension import Extension, ParamContext, param_error
from esmtpkit.core.session import Session

__all__ = ["DeliverBy", "By", "parse_by", "BY_ALLOWANCE", "MAX_BY_TIME"]

#: RFC 2852 §4: by-time has at most 9 digits.
MAX_BY_TIME: Final = 999_999_999
#: RFC 2852 §4: the BY parameter adds at most 17 octets to a MAIL line (" BY=-999999999;RT").
BY_ALLOWANCE: Final = len(" BY=-999999999;RT")

_BY: Final = re.compile(r"([+-]?[0-9]{1,9});([A-Za-z])([A-Za-z]?)\Z")


@dataclass(frozen=True)
class By:
    """A Deliver By request (RFC 2852 §4): ``seconds`` (the by-time, signed: in mode N it may be zero or negative,
    a deadline already past), ``mode`` ("R": return the message once the time is up; "N": deliver on, but send a
    delayed DSN) and ``trace`` (T: ask for a relayed DSN from each hop)."""

    seconds: int
    mode: Literal["R", "N"]
    trace: bool = False

    def deadline(self, received_at: float) -> float:
        """When the message must be delivered, for a message that arrived at ``received_at`` (POSIX seconds)."""
        return received_at + self.seconds

    def remaining(self, received_at: float, now: float) -> int:
        """The by-time to pass on to the next hop at ``now`` (RFC 2852 §4: less the time spent here; rounded down
        to whole seconds, so that a hop never lengthens it); zero or less once the deadline has passed."""
        return math.floor(self.deadline(received_at) - now)

    def expired(self, received_at: float, now: float) -> bool:
        """Whether the deadline has passed at ``now`` (less than a whole second left counts: the next hop could not
        be given a by-time above zero): a mode R message is then returned, not relayed."""
        return self.remaining(received_at, now) <= 0

    def param(self, seconds: int | None = None) -> str:
        """The parameter's value as sent (``600;RT``), with ``seconds`` in place of the by-time if given."""
        return f"{self.seconds if seconds is None else seconds};{self.mode}{'T' if self.trace else ''}"


def parse_by(value: str | None, minimum: int | None = None) -> By:
    """``BY=<by-time>;<by-mode>[T]`` (RFC 2852 §4): 501 5.5.4 for bad syntax or a mode R by-time of zero or less;
    555 5.5.4 for a mode R by-time below the server's advertised ``minimum``."""
    match = _BY.match(value or "")
    if match is None:
        raise param_error("BY needs <seconds>;R or <seconds>;N, optionally followed by T")
    seconds = int(match.group(1))
    mode = match.group(2).upper()
    trace = match.group(3).upper()
    if mode not in ("R", "N") or trace not in ("", "T"):
        raise param_error("BY mode must be R or N, optionally followed by T")
    if mode == "R":
        if seconds <= 0:
            raise param_error("BY with mode R needs a by-time above zero")
        if minimum is not None and seconds < minimum:
            raise param_error(f"BY time {seconds} is below this server's minimum of {minimum} seconds", 555)
    return By(seconds, "R" if mode == "R" else "N", trace == "T")


class DeliverBy(Extension):
    """DELIVERBY (RFC 2852 §4): EHLO ``DELIVERBY [min-by-time]``; MAIL ``BY=`` parsed into a `By`.

    ``minimum`` is the fixed minimum by-time this server can honour (its queue delay, say), 1 to 999999999
    seconds, or None for none. Only mode R is held to it: in mode N a shorter time means a delayed DSN, not a
    refusal.
    """

    name = keyword = "DELIVERBY"
    rfc = "RFC 2852"
    mail_line_allowance = BY_ALLOWANCE

    def __init__(self, minimum: int | None = None) -> None:
        if minimum is not None and not 0 < minimum <= MAX_BY_TIME:
            raise ValueError(f"DELIVERBY minimum must be 1 to {MAX_BY_TIME} seconds, or None")
        self.minimum = minimum
        self.mail_params = {"BY": self._parse}

    def _parse(self, value: str | None, context: ParamContext) -> By:
        return parse_by(value, self.minimum)

    def ehlo_params(self, session: Session, settings: Any) -> str:
        return str(self.minimum) if self.minimum is not None else ""
