"""RRVS (RFC 7293): the sender asks that a recipient be refused if its mailbox changed owner since a date-time.

Pure core. EHLO offers ``RRVS``; RCPT takes ``RRVS=<date-time>[;C|;R]`` (an RFC 3339 date-time) and handlers
find a `ValidSince` in ``rcpt_params[i]["RRVS"]``.

Only the mailbox's keeper knows when it was last assigned. RFC 7293 §3.1: a server that cannot tell (it has no
registration date for the mailbox) must not deliver unless the sender said ``;C`` (continue); the refusal is 550
5.7.19 ("RRVS test cannot be completed"). So by default (``handler_checks=False``) this server, which keeps no
such dates, refuses ``RRVS=`` without ``;C`` at RCPT and accepts it with ``;C``. A deployment whose handler knows
the dates passes ``handler_checks=True``: every well-formed value reaches the handler, whose ``rcpt`` answers
with `ValidSince.verdict` (550 5.7.17 for a mailbox that changed owner).

The queue and the Relay pass the value on (`ValidSince.param`) to a next hop that offers RRVS. To one that does
not, a value with ``;C`` is dropped and the recipient goes on; without ``;C`` that recipient fails with 550 5.7.19.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Final, Literal

from esmtpkit.core.extension import Extension, ParamContext, param_error
from esmtpkit.core.reply import Reply

__all__ = ["Rrvs", "ValidSince", "parse_rrvs", "RRVS_ALLOWANCE", "OWNER_CHANGED", "CANNOT_CHECK"]

#: The octets the parameter may add to a RCPT line: " RRVS=" and an RFC 3339 date-time with a fraction of up to
#: 9 digits (RFC 3339 leaves the fraction unbounded; nanoseconds are the finest any clock gives) and ";C".
RRVS_ALLOWANCE: Final = len(" RRVS=2014-01-01T00:00:00.123456789+00:00;C")

#: RFC 7293 §3.1: the mailbox changed owner since the date-time.
OWNER_CHANGED: Final = Reply(550, ("Mailbox owner has changed",), "5.7.17")
#: RFC 7293 §3.1: no registration date to compare with, and the sender did not say ";C".
CANNOT_CHECK: Final = Reply(550, ("RRVS test cannot be completed",), "5.7.19")

_DATE_TIME: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))(?:;([CcRr]))?\Z")


@dataclass(frozen=True)
class ValidSince:
    """An RRVS request (RFC 7293 §3): ``since``, a timezone-aware datetime (the offset as the client gave it),
    and ``action``, the ``;C`` or ``;R`` the client added ("C": go on when the date cannot be checked; "R" or
    None, which means the same: refuse then)."""

    since: datetime
    action: Literal["C", "R"] | None = None

    @property
    def may_continue(self) -> bool:
        """Whether the sender allows delivery when the check cannot be made (``;C``)."""
        return self.action == "C"

    def verdict(self, registered: datetime | None) -> Reply | None:
        """The refusal for a mailbox (last) assigned to its owner at ``registered`` (aware; None: not known), or
        None to go on: 5.7.17 if it was assigned after ``since``, 5.7.19 if unknown and not ``;C``."""
        if registered is None:
            return None if self.may_continue else CANNOT_CHECK
        return OWNER_CHANGED if registered > self.since else None

    def param(self) -> str:
        """The value to pass on to a next hop that offers RRVS."""
        text = self.since.isoformat().replace("+00:00", "Z")
        return f"{text};{self.action}" if self.action else text


def parse_rrvs(value: str | None) -> ValidSince:
    """``RRVS=<date-time>[;C|;R]`` (RFC 7293 §3, RFC 3339 §5.6 date-time); 501 5.5.4 unless well formed and a
    real instant (a leap second, :60, counts as the next second)."""
    match = _DATE_TIME.match(value or "")
    if match is None:
        raise param_error("RRVS needs an RFC 3339 date-time, optionally followed by ;C or ;R")
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    fraction = (match.group(7) or "").ljust(6, "0")[:6]
    if match.group(8):
        zone = timezone.utc
    else:
        hours, minutes = int(match.group(10)), int(match.group(11))
        if hours > 23 or minutes > 59:
            raise param_error("RRVS date-time has a bad time zone offset")
        offset = timedelta(hours=hours, minutes=minutes)
        zone = timezone(-offset if match.group(9) == "-" else offset)
    leap = second == 60
    try:
        since = datetime(year, month, day, hour, minute, 59 if leap else second, int(fraction), tzinfo=zone)
    except ValueError:
        raise param_error("RRVS date-time is not a real date and time") from None
    if leap:
        since += timedelta(seconds=1)
    action = match.group(12)
    return ValidSince(since, "C" if action in ("C", "c") else "R" if action else None)


class Rrvs(Extension):
    """RRVS (RFC 7293 §3): RCPT ``RRVS=`` parsed into a `ValidSince`. Without ``handler_checks`` the server
    cannot compare registration dates, so a value without ``;C`` is refused with 550 5.7.19 (RFC 7293 §3.1)."""

    name = keyword = "RRVS"
    rfc = "RFC 7293"
    rcpt_line_allowance = RRVS_ALLOWANCE

    def __init__(self, handler_checks: bool = False) -> None:
        self.handler_checks = handler_checks
        self.rcpt_params = {"RRVS": self._parse}

    def _parse(self, value: str | None, context: ParamContext) -> ValidSince:
        parsed = parse_rrvs(value)
        if not self.handler_checks and not parsed.may_continue:
            raise param_error("RRVS test cannot be completed: no registration dates here", 550, "5.7.19")
        return parsed
