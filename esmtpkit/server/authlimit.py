"""Password guessing: wrong AUTH passwords counted per client address and per user name, across connections.

RFC 4954 §6 gives a server ``454 4.7.0`` to refuse AUTH for a while; how long and for whom is left to it. Here each
key (an IPv4 address, an IPv6 /64, a user name) has a leaky bucket of failures: a wrong password adds one, and one is
forgotten every ``cool_off / limit`` seconds. Failures beyond ``delay_after`` are answered late, after a delay that
starts at ``delay`` and doubles (Dovecot's auth penalty: 2 s, doubling, capped). A key whose failures reach
``limit`` is refused for ``cool_off`` seconds, by which time its bucket is empty again. Checks still in progress
count toward the limit, so parallel connections cannot have more than ``limit`` guesses judged before it.

Pure Python, no clock of its own (every call takes the time), no I/O; memory is bounded by ``max_entries`` per
kind of key, least recently touched first out.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

from esmtpkit.core.reply import Reply

__all__ = ["AuthThrottle", "Attempt", "Verdict", "client_key", "user_key", "AUTH_THROTTLED", "DEFAULT_MAX_ENTRIES",
           "MAX_DELAY_FACTOR", "ADDRESS", "USER"]

#: The reply to AUTH from an address, or for a user name, in its cool-off (RFC 4954 §6: a temporary failure).
AUTH_THROTTLED: Final = Reply(454, ("Too many failed authentications, try again later",), "4.7.0")

#: Keys kept per kind (addresses, user names): each costs about 260 bytes, so a full table takes about 4 MiB.
DEFAULT_MAX_ENTRIES: Final = 16384
#: How many of the oldest records a full table looks at for one it can drop without forgetting a cool-off.
EVICTION_SCAN: Final = 64
#: The longest delay, as a multiple of the first: 2 s, 4 s, 8 s, then 16 s (Dovecot caps its penalty at 15 s).
MAX_DELAY_FACTOR: Final = 8
#: The scopes a cool-off can have: a client address (or IPv6 /64), or a user name.
ADDRESS: Final = "address"
USER: Final = "user"


def client_key(ip: str) -> bytes | None:
    """What a client address is counted as: its 4 octets for IPv4 (also IPv4-mapped IPv6), the first 8 octets
    (the /64 network, one site's LAN) for IPv6; None for no address (a UNIX socket) or text that is none.
    """
    if not ip:
        return None
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        return mapped.packed if mapped is not None else address.packed[:8]
    return address.packed


def user_key(user: str | bytes | None) -> bytes | None:
    """What a user name is counted as: a 16-octet digest, so a table entry is small whatever the name's length
    and no name (a mistyped password, perhaps) is kept in memory. None when the exchange named no user.
    """
    if user is None:
        return None
    data = user if isinstance(user, bytes) else user.encode("utf-8", "surrogateescape")
    return hashlib.blake2b(data, digest_size=16).digest()


class _Record:
    """One key's state: failures not yet forgotten (since ``stamp``), checks in progress, end of its cool-off."""

    __slots__ = ("count", "stamp", "pending", "until")

    def __init__(self) -> None:
        self.count = 0
        self.stamp = 0.0
        self.pending = 0
        self.until = 0.0


class _Table:
    """The records of one scope, least recently touched first; at most ``max_entries`` of them."""

    __slots__ = ("scope", "limit", "cool_off", "max_entries", "records")

    def __init__(self, scope: str, limit: int, cool_off: float, max_entries: int) -> None:
        self.scope = scope
        self.limit = limit
        self.cool_off = cool_off
        self.max_entries = max_entries
        self.records: OrderedDict[bytes, _Record] = OrderedDict()

    def settled(self, key: bytes, now: float) -> _Record | None:
        """The record of ``key`` brought up to ``now`` (failures forgotten, a cool-off over); None if it has none."""
        record = self.records.get(key)
        if record is None:
            return None
        if record.until:
            if now >= record.until:
                record.until = 0.0
            elif record.until - now > self.cool_off:
                record.until = now + self.cool_off  # the clock went back: never refuse longer than a cool-off
        if record.count:
            if record.stamp > now:
                record.stamp = now  # the clock went back: forget from now on
            forgotten = int((now - record.stamp) * self.limit // self.cool_off)
            if forgotten >= record.count:
                record.count = 0
            elif forgotten:
                record.count -= forgotten
                record.stamp += forgotten * self.cool_off / self.limit
        if not (record.count or record.pending or record.until):
            del self.records[key]
            return None
        return record

    def touched(self, key: bytes, now: float) -> _Record:
        """The record of ``key``, made if missing, moved to the young end; the oldest go if there are too many."""
        record = self.settled(key, now)
        if record is None:
            record = self.records[key] = _Record()
            if len(self.records) > self.max_entries:
                self._evict(now)
        else:
            self.records.move_to_end(key)
        return record

    def _evict(self, now: float) -> None:
        """Make room: drop the least recently touched record that is in no cool-off and has no check in progress,
        looking at the oldest `EVICTION_SCAN` only; if all of those are busy, the oldest of all goes anyway (memory
        stays bounded even against an attacker with more addresses than the table holds)."""
        for scanned, (key, record) in enumerate(self.records.items()):
            if scanned >= EVICTION_SCAN:
                break
            if not record.pending and record.until <= now:
                del self.records[key]
                return
        self.records.popitem(last=False)

    def refuses(self, key: bytes, now: float) -> bool:
        """True while ``key`` is in a cool-off, or its failures and checks in progress fill its limit."""
        record = self.settled(key, now)
        return record is not None and (record.until > now or record.count + record.pending >= self.limit)

    def failed(self, key: bytes, now: float) -> tuple[int, bool]:
        """A check of ``key`` found a wrong password: its failures now, and whether a cool-off began."""
        record = self.touched(key, now)
        if record.pending:
            record.pending -= 1
        if not record.count:
            record.stamp = now
        record.count += 1
        if record.count >= self.limit and record.until <= now:
            record.until = now + self.cool_off
            return record.count, True
        return record.count, False

    def ended(self, key: bytes, now: float) -> None:
        """A check of ``key`` ended without a wrong password (it succeeded, or could not be made)."""
        record = self.records.get(key)
        if record is not None and record.pending:
            record.pending -= 1
        self.settled(key, now)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One credentials check admitted by `AuthThrottle.begin`; `AuthThrottle.failed` or `AuthThrottle.ended` ends it."""

    address: bytes | None
    user: bytes | None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a wrong password costs: ``delay`` seconds before its reply (for ``failures``, the larger count of its
    address and user name), and the ``scopes`` whose cool-off it began."""

    delay: float
    failures: int
    scopes: tuple[str, ...]


class AuthThrottle:
    """Counts AUTH failures per client address and per user name for every connection of one server.

    ``address_limit`` and ``user_limit``: failures (within the decay) that start a cool-off of ``cool_off``
    seconds; 0 leaves that kind of key uncounted. ``delay``: the wait before the reply to a failure beyond
    ``delay_after`` failures, doubled for each further one up to `MAX_DELAY_FACTOR` times; 0 for none.
    """

    def __init__(self, *, address_limit: int = 10, user_limit: int = 30, cool_off: float = 300.0,
                 delay: float = 2.0, delay_after: int = 3, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if min(address_limit, user_limit, delay_after) < 0 or delay < 0 or cool_off <= 0 or max_entries < 1:
            raise ValueError("AuthThrottle needs a positive cool_off and max_entries, and no negative numbers")
        self.cool_off = cool_off
        self.delay = delay
        self.delay_after = delay_after
        self._addresses = _Table(ADDRESS, address_limit, cool_off, max_entries) if address_limit else None
        self._users = _Table(USER, user_limit, cool_off, max_entries) if user_limit else None

    @classmethod
    def from_policy(cls, policy: Any) -> "AuthThrottle | None":
        """The throttle a `Policy` asks for; None when it turns it off (both limits 0, or no cool-off)."""
        if not policy.auth_cool_off or not (policy.auth_failure_limit or policy.auth_user_failure_limit):
            return None
        return cls(address_limit=policy.auth_failure_limit, user_limit=policy.auth_user_failure_limit,
                   cool_off=policy.auth_cool_off, delay=policy.auth_failure_delay,
                   delay_after=policy.auth_delay_after)

    def __len__(self) -> int:
        """Keys remembered now (both kinds)."""
        return sum(len(t.records) for t in (self._addresses, self._users) if t is not None)

    def _keys(self, ip: str, user: str | bytes | None) -> list[tuple[_Table, bytes]]:
        keys = []
        if self._addresses is not None and (address := client_key(ip)) is not None:
            keys.append((self._addresses, address))
        if self._users is not None and (name := user_key(user)) is not None:
            keys.append((self._users, name))
        return keys

    def refuses(self, ip: str, user: str | bytes | None, now: float) -> bool:
        """True when AUTH from ``ip`` (naming ``user``, if known yet) must get 454 4.7.0 now."""
        return any(table.refuses(key, now) for table, key in self._keys(ip, user))

    def begin(self, ip: str, user: str | bytes | None, now: float) -> Attempt | None:
        """Admit one credentials check (counted as in progress until it ends), or None when it must be refused."""
        keys = self._keys(ip, user)
        if any(table.refuses(key, now) for table, key in keys):
            return None
        for table, key in keys:
            table.touched(key, now).pending += 1
        tables = {table.scope: key for table, key in keys}
        return Attempt(tables.get(ADDRESS), tables.get(USER))

    def failed(self, attempt: Attempt, now: float) -> Verdict:
        """The check found a wrong password: count it, and say how long to hold its reply."""
        failures, scopes = 0, []
        for table, key in self._attempt_keys(attempt):
            count, began = table.failed(key, now)
            failures = max(failures, count)
            if began:
                scopes.append(table.scope)
        return Verdict(self.delay_for(failures), failures, tuple(scopes))

    def ended(self, attempt: Attempt, now: float) -> None:
        """The check ended otherwise (success, or the checker failed): it no longer counts. A success clears no
        earlier failure, so one valid account cannot wipe out the failures of guesses made beside it.
        """
        for table, key in self._attempt_keys(attempt):
            table.ended(key, now)

    def delay_for(self, failures: int) -> float:
        """Seconds to hold the reply to the ``failures``-th failure of a key."""
        beyond = failures - self.delay_after
        if beyond < 1 or not self.delay:
            return 0.0
        return self.delay * min(2 ** min(beyond - 1, 16), MAX_DELAY_FACTOR)

    def _attempt_keys(self, attempt: Attempt) -> list[tuple[_Table, bytes]]:
        keys = []
        if attempt.address is not None and self._addresses is not None:
            keys.append((self._addresses, attempt.address))
        if attempt.user is not None and self._users is not None:
            keys.append((self._users, attempt.user))
        return keys
