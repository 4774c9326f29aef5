"""When a queued message is tried again, when it is given up, and when its sender hears that it is late.

Pure core: no clock of its own (every question takes ``now``). The defaults are Postfix's: ``minimal_backoff``
300 s, ``maximal_backoff`` 4000 s, ``maximal_queue_lifetime`` and ``bounce_queue_lifetime`` 5 days, and
``delay_warning_time`` off. The backoff doubles from one attempt to the next up to its cap, so the delays a
schedule can give are few and known in advance (`Schedule.intervals`: one broker delay queue per value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from esmtpkit.core.outbound import Message, Status

__all__ = ["Schedule"]

#: From this many doublings on, ``2.0 ** n`` is beyond any float: every backoff has long reached its cap.
_MAX_DOUBLINGS = 1024


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, not {value!r}")
    number = float(value)
    if math.isnan(number) or math.isinf(number):
        raise ValueError(f"{name} must be a finite number of seconds, not {value!r}")
    if number <= 0:
        raise ValueError(f"{name} must be more than 0 seconds, not {value!r}")
    return number


@dataclass(frozen=True)
class Schedule:
    """The retry and lifetime policy of a queue, in seconds (RFC 5321 §4.5.4.1 asks for growing retry intervals
    and a give-up time of at least 4-5 days).

    ``lifetime`` applies to ordinary mail, ``bounce_lifetime`` to mail with the null sender (a bounce nobody can
    be told about). ``delay_warning`` is how long after arrival a delay notice goes out; None sends none.
    """

    min_backoff: float = 300.0
    max_backoff: float = 4000.0
    lifetime: float = 5 * 86400.0
    bounce_lifetime: float = 5 * 86400.0
    delay_warning: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_backoff", "max_backoff", "lifetime", "bounce_lifetime"):
            object.__setattr__(self, name, _positive(name, getattr(self, name)))
        if self.delay_warning is not None:
            object.__setattr__(self, "delay_warning", _positive("delay_warning", self.delay_warning))
        if self.max_backoff < self.min_backoff:
            raise ValueError(f"max_backoff ({self.max_backoff:g} s) must not be less than "
                             f"min_backoff ({self.min_backoff:g} s)")

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt: ``min_backoff * 2 ** (attempts - 1)``,
        capped at ``max_backoff`` (fewer than 1 attempt counts as 1)."""
        doublings = max(int(attempts), 1) - 1
        if doublings >= _MAX_DOUBLINGS:
            return self.max_backoff
        return min(self.max_backoff, self.min_backoff * 2.0 ** doublings)

    def intervals(self) -> tuple[float, ...]:
        """Every distinct value `delay` can give, shortest first (a broker needs one delay queue for each)."""
        values: list[float] = []
        attempts = 1
        while True:
            value = self.delay(attempts)
            if values and value == values[-1]:
                return tuple(values)
            values.append(value)
            attempts += 1

    def expired(self, message: Message, now: float) -> bool:
        """Whether ``message`` has been queued for its whole lifetime (``bounce_lifetime`` for a null sender)."""
        limit = self.bounce_lifetime if message.sender == "" else self.lifetime
        return now - message.arrived >= limit

    def warn_due(self, message: Message, now: float) -> bool:
        """Whether a delay notice (RFC 3464 ``Action: delayed``) should go out now: warnings are on, the message
        is at least ``delay_warning`` old, and a pending recipient wants DELAY notices and has had none."""
        if self.delay_warning is None or message.sender == "" or now - message.arrived < self.delay_warning:
            return False
        return any(r.status is Status.PENDING and r.wants("DELAY") and not r.delay_reported
                   for r in message.recipients)
