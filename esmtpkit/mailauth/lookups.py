"""DNS for the mail-authentication checks, through twisted.names so the reactor never waits on it.

`Lookups` answers the queries the checks need as Deferreds: TXT records for DKIM keys and DMARC policies, and
any type in pyspf's answer format. `in_worker` runs a function in a worker thread with `Lookups` standing in for
pyspf's DNS: pyspf evaluates a record recursively and can only call DNS synchronously, so from its thread each
query is handed back to the reactor and answered by the same twisted.names resolver; the thread waits for it
with a bound, and `Lookups.stop` releases every waiting thread when the server stops.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.names import client, dns, error
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from esmtpkit.client.mx import answer_records, dns_name

__all__ = ["Lookups", "DNSTempError", "parse_servers", "in_worker"]

#: The seconds each query waits for an answer before it is asked again, then given up (a temperror).
DEFAULT_TIMEOUT: tuple[float, ...] = (1, 3)

_TYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "PTR": dns.PTR, "TXT": dns.TXT, "SPF": dns.SPF,
          "CNAME": dns.CNAME}


class DNSTempError(Exception):
    """A query got no usable answer (timed out, SERVFAIL, REFUSED): the checks' temperror, never a verdict."""


def parse_servers(text: str) -> tuple[str, int]:
    """``HOST`` or ``HOST:PORT`` (``[v6]:PORT`` for IPv6) as ``(host, port)``; ValueError when it is not one."""
    text = text.strip()
    host, port = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"not HOST[:PORT]: {text!r}")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not HOST[:PORT]: {text!r}")
    return host, int(port)


def _reason(failure: Failure) -> str:
    if failure.check(defer.CancelledError):
        return "the server is stopping"
    if failure.check(error.DNSServerError):
        return "server failure"
    if failure.check(error.DNSQueryRefusedError):
        return "query refused"
    if failure.check(defer.TimeoutError, error.DNSQueryTimeoutError):
        return "timed out"
    if failure.check(error.DNSFormatError):
        return "format error"
    return f"{type(failure.value).__name__}"


class Lookups:
    """twisted.names queries for the checks. ``servers`` are the name servers to ask (``[("127.0.0.1", 5353)]``);
    None reads ``resolv_conf``. ``resolver`` (any IResolver) replaces the one built from them. ``timeout`` is
    twisted.names': the seconds of each try, so its sum bounds one query."""

    def __init__(self, reactor: Any = None, *, servers: Sequence[tuple[str, int]] | None = None,
                 timeout: Sequence[float] = DEFAULT_TIMEOUT, resolv_conf: str = "/etc/resolv.conf",
                 resolver: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default

            reactor = default
        self.reactor = reactor
        self.timeout = tuple(timeout)
        if resolver is None:
            if servers:
                resolver = client.Resolver(servers=list(servers), timeout=self.timeout, reactor=reactor)
            else:
                resolver = client.Resolver(resolv=resolv_conf, timeout=self.timeout, reactor=reactor)
        self.resolver = resolver
        #: Set by `stop`: queries from worker threads then fail at once (temperror) instead of waiting on a
        #: reactor that is shutting down.
        self.stopping = False
        self._lock = threading.Lock()
        self._waiting: set[threading.Event] = set()
        self._queries: set[Deferred[Any]] = set()

    @property
    def worker_wait(self) -> float:
        """The longest a worker thread waits for one answer: every try of the query, and some slack."""
        return sum(self.timeout) + 5.0

    def stop(self) -> None:
        """Fail every query in flight (each becomes its check's temperror) and those asked from now on, and
        release the worker threads waiting for one: the reactor's thread calls it as the server stops, so that no
        check keeps the server waiting on a name server, and no worker waits for a reactor that no longer answers."""
        with self._lock:
            self.stopping = True
            waiting = list(self._waiting)
        for event in waiting:
            event.set()
        for d in list(self._queries):
            d.cancel()

    def resume(self) -> None:
        """Answer worker threads again after `stop` (once the threads that were waiting are gone)."""
        with self._lock:
            self.stopping = False

    def answer_from_worker(self, name: str, kind: str,
                           timeout: float | None = None) -> list[tuple[tuple[str, str], Any]]:
        """`spf_answers`, asked from a worker thread and waited for there (never from the reactor's thread): the
        reactor's resolver answers it. Waits at most ``timeout`` seconds (what pyspf has left of its query time)
        and `worker_wait`; fails with `DNSTempError` once `stop` is called."""
        wait = self.worker_wait
        try:
            if timeout is not None and float(timeout) > 0:
                wait = min(float(timeout), wait)
        except (TypeError, ValueError):
            pass
        done = threading.Event()
        box: list[Any] = []
        with self._lock:
            if self.stopping:
                raise DNSTempError(f"{kind} {name}: the server is stopping")
            self._waiting.add(done)

        def start() -> None:
            if done.is_set():
                return  # the worker stopped waiting (its time ran out, or the server is stopping): ask nothing
            d = self.spf_answers(name, kind)

            def settle(result: Any) -> None:
                box.append(result)
                done.set()

            d.addBoth(settle)

        try:
            self.reactor.callFromThread(start)
            done.wait(wait)
        finally:
            with self._lock:
                self._waiting.discard(done)
            done.set()
        if not box:
            raise DNSTempError(f"{kind} {name}: " + ("the server is stopping" if self.stopping else "no answer"))
        if isinstance(box[0], Failure):
            if box[0].check(DNSTempError):
                raise box[0].value
            raise DNSTempError(f"{kind} {name}: {_reason(box[0])}")
        return box[0]

    def records(self, name: str, kind: str) -> "Deferred[list[Any] | None]":
        """The records of type ``kind`` at ``name`` (twisted.names payloads): None when the name does not exist,
        ``[]`` when it has none of that type; fails with `DNSTempError` when DNS could not answer."""
        qtype = _TYPES[kind]
        name = dns_name(name)

        def answered(result: Any) -> list[Any]:
            answers = result[0] if isinstance(result, tuple) else result
            return answer_records(answers, name, qtype)

        def failed(failure: Failure) -> Any:
            if failure.check(error.DNSNameError):
                return None
            raise DNSTempError(f"{kind} {name}: {_reason(failure)}")

        if self.stopping:
            return defer.fail(DNSTempError(f"{kind} {name}: the server is stopping"))
        try:
            query = dns.Query(name.encode("idna"), qtype, dns.IN)
        except UnicodeError:
            return defer.succeed(None)
        d = defer.maybeDeferred(self.resolver.query, query, self.timeout)
        self._queries.add(d)

        def settled(result: Any) -> Any:
            self._queries.discard(d)
            return result

        return d.addBoth(settled).addCallbacks(answered, failed)

    def txt(self, name: str) -> "Deferred[list[bytes] | None]":
        """Each TXT record at ``name`` with its strings joined, as `records` says for the rest."""
        def joined(payloads: list[Any] | None) -> list[bytes] | None:
            if payloads is None:
                return None
            return [b"".join(p.data) for p in payloads]

        return self.records(name, "TXT").addCallback(joined)

    def spf_answers(self, name: str, kind: str) -> "Deferred[list[tuple[tuple[str, str], Any]]]":
        """``name``'s records of ``kind`` in the form pyspf's DNS functions return: ``((name, kind), value)`` with
        an address as text, an MX as ``(preference, exchange)``, a PTR as a name and a TXT as its strings."""
        def shaped(payloads: list[Any] | None) -> list[tuple[tuple[str, str], Any]]:
            values: list[Any] = []
            for payload in payloads or ():
                if kind in ("A", "AAAA"):
                    values.append(payload.dottedQuad() if kind == "A" else _v6(payload.address))
                elif kind == "MX":
                    values.append((payload.preference, dns_name(payload.name)))
                elif kind == "PTR":
                    values.append(dns_name(payload.name))
                else:
                    values.append(list(payload.data))
            return [((name, kind), value) for value in values]

        return self.records(name, kind).addCallback(shaped)


def _v6(packed: bytes) -> str:
    import ipaddress

    return str(ipaddress.IPv6Address(packed))


# ---- pyspf in a worker thread ---------------------------------------------------------------------------------

_local = threading.local()
_installed: list[Callable[..., Any]] = []


def _install() -> None:
    """Route pyspf's DNS through the `Lookups` bound to the calling thread (once per process). A thread with none
    bound keeps pyspf's own DNS, so other users of pyspf in the process are untouched."""
    import spf

    if _installed:
        return
    own = spf.DNSLookup

    def lookup(name: str, qtype: str, strict: Any = True, timeout: Any = 20) -> list[Any]:
        lookups = getattr(_local, "lookups", None)
        if lookups is None:
            return own(name, qtype, strict, timeout)
        try:
            return lookups.answer_from_worker(name, qtype, timeout)
        except DNSTempError as e:
            raise spf.TempError(f"DNS {e}") from None

    spf.DNSLookup = lookup
    _installed.append(own)


def in_worker(pool: ThreadPool, lookups: Lookups, function: Callable[..., Any], *args: Any,
              **kwargs: Any) -> "Deferred[Any]":
    """Run ``function(*args, **kwargs)`` on ``pool`` with ``lookups`` answering pyspf's DNS from that thread."""
    _install()

    def bound() -> Any:
        _local.lookups = lookups
        try:
            return function(*args, **kwargs)
        finally:
            _local.lookups = None

    return deferToThreadPool(lookups.reactor, pool, bound)
