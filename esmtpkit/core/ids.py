"""Message and connection ids: short, time-ordered, and unique across processes and hosts without coordination.

An id is 20 characters of Crockford base32 (digits and capitals, no I, L, O or U): 48 bits of the time in
milliseconds, then 52 random bits. Ids sort by creation time, and two ids made in the same millisecond anywhere
collide with a chance of 1 in 2**52, so a fleet of servers never needs to share a counter. The random bits come
from `random`'s generator, seeded from the system's entropy and reseeded in every forked child: ids need to be
unique, not secret. Operators grep for
them the way they grep for a Postfix queue id.
"""

from __future__ import annotations

import time
from random import getrandbits

__all__ = ["new_id", "id_time", "ID_LENGTH"]

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ID_LENGTH = 20
_RANDOM_BITS = 52
_TIME_MASK = (1 << 48) - 1
_PAIRS = [a + b for a in ALPHABET for b in ALPHABET]


def new_id(now: float | None = None) -> str:
    """A new id for ``now`` (seconds since the epoch; default the current time)."""
    millis = int((time.time() if now is None else now) * 1000) & _TIME_MASK
    n = (millis << _RANDOM_BITS) | getrandbits(_RANDOM_BITS)
    pairs = _PAIRS  # two digits per lookup: this runs once per message, so it is kept cheap
    return (pairs[n >> 90] + pairs[n >> 80 & 1023] + pairs[n >> 70 & 1023] + pairs[n >> 60 & 1023]
            + pairs[n >> 50 & 1023] + pairs[n >> 40 & 1023] + pairs[n >> 30 & 1023] + pairs[n >> 20 & 1023]
            + pairs[n >> 10 & 1023] + pairs[n & 1023])


def id_time(value: str) -> float:
    """When an id was made, in seconds since the epoch (millisecond precision); ValueError if it is no id."""
    if len(value) != ID_LENGTH:
        raise ValueError(f"not an id: {value!r}")
    number = 0
    for char in value:
        digit = ALPHABET.find(char)
        if digit < 0:
            raise ValueError(f"not an id: {value!r}")
        number = number << 5 | digit
    return (number >> _RANDOM_BITS) / 1000
