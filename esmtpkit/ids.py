"""Message and connection ids: short, time-ordered, and unique across processes and hosts without coordination.

An id is 20 characters of Crockford base32 (digits and capitals, no I, L, O or U): 48 bits of the time in
milliseconds, then 52 random bits. Ids sort by creation time, and two ids made in the same millisecond anywhere
collide with a chance of 1 in 2**52, so a fleet of servers never needs to share a counter. Operators grep for
them the way they grep for a Postfix queue id.
"""

from __future__ import annotations

import os
import time

__all__ = ["new_id", "id_time", "ID_LENGTH"]

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ID_LENGTH = 20
_RANDOM_BITS = 52
_TIME_MASK = (1 << 48) - 1


def new_id(now: float | None = None) -> str:
    """A new id for ``now`` (seconds since the epoch; default the current time)."""
    millis = int((time.time() if now is None else now) * 1000) & _TIME_MASK
    number = (millis << _RANDOM_BITS) | (int.from_bytes(os.urandom(7), "big") >> 4)
    chars = []
    for _ in range(ID_LENGTH):
        chars.append(ALPHABET[number & 31])
        number >>= 5
    return "".join(reversed(chars))


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
