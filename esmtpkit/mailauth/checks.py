"""`MailAuth`: which checks a server runs, what they share (twisted.names lookups, a worker pool for the libraries
that block), and what it refuses when told to.

It is given to `esmtpkit.handlers.mailauth.MailAuthFront` (or ``twistd esmtpkit --verify``), which asks it for
SPF at MAIL FROM and for DKIM, ARC and DMARC once the whole message is in. Nothing here ever fails a message by
accident: any trouble becomes a ``temperror`` verdict, and every check is bounded in time by DNS timeouts.
"""

from __future__ import annotations

import contextlib
import random
import socket
import time
from typing import Any, Callable, IO, Sequence

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from esmtpkit.core.reply import Reply
from esmtpkit.core.session import Session
from esmtpkit.mailauth import dkim as dkim_check, dmarc as dmarc_check, spf as spf_check
from esmtpkit.mailauth.lookups import DEFAULT_TIMEOUT, Lookups, in_worker
from esmtpkit.mailauth.verdicts import AuthVerdicts, DkimVerdict, SpfVerdict
from esmtpkit.server.monitor import EventLog, Monitor, guarded

__all__ = ["MailAuth", "CHECKS", "SPF_FAILED", "SPF_ERROR", "DMARC_REJECTED", "DMARC_DEFERRED"]

#: The checks by name, as ``twistd esmtpkit --verify`` takes them.
CHECKS = ("spf", "dkim", "dmarc", "arc")

#: RFC 7372's codes: SPF said fail (X.7.23), SPF could not say (X.7.24), and DMARC's reject (X.7.26, both
#: authentication methods failed to align).
SPF_FAILED = 550, "5.7.23"
SPF_ERROR = 451, "4.7.24"
DMARC_REJECTED = Reply.of(550, "Message refused by the author domain's DMARC policy", enhanced="5.7.26")
DMARC_DEFERRED = Reply.of(451, "The author domain's DMARC policy could not be checked, try again later",
                          enhanced="4.7.26")


class MailAuth:
    """The mail-authentication checks one server runs.

    ``spf``, ``dkim``, ``dmarc`` and ``arc`` turn each check on (DMARC uses the SPF and DKIM verdicts, so it runs
    them too). ``authserv_id`` names this server in ``Authentication-Results:`` (the host name by default).
    ``dns_servers`` (``[("127.0.0.1", 53)]``) are asked instead of ``/etc/resolv.conf``'s; ``timeout`` is each
    query's tries in seconds. ``spf_reject`` refuses MAIL FROM when SPF says ``fail`` (550 5.7.23) or cannot
    say (451 4.7.24); ``dmarc_reject`` refuses at end of data a message whose author domain asks ``p=reject``
    and that failed (550 5.7.26), or asks it to try again later (451 4.7.26) when the failure may be SPF's or a
    signature's temporary DNS error. ``threads`` bound each of the two worker pools, one running pyspf and one
    dkimpy, and so the messages held in memory while they are verified. ``monitor`` hears every verdict
    (`Monitor.checked`).
    """

    log = Logger()

    def __init__(self, reactor: Any = None, *, spf: bool = True, dkim: bool = True, dmarc: bool = True,
                 arc: bool = True, check_helo: bool = True, authserv_id: str | None = None,
                 dns_servers: Sequence[tuple[str, int]] | None = None,
                 timeout: Sequence[float] = DEFAULT_TIMEOUT, lookups: Lookups | None = None,
                 spf_reject: bool = False, dmarc_reject: bool = False, max_signatures: int = 5,
                 threads: int = 4, spf_querytime: float = 20.0, minkey: int = 1024,
                 monitor: Monitor | None = None, rng: random.Random | None = None) -> None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        if max_signatures < 1:
            raise ValueError("max_signatures must be at least 1")
        if reactor is None:
            from twisted.internet import reactor as default

            reactor = default
        self.reactor = reactor
        self.spf = spf or dmarc
        self.dkim = dkim or dmarc
        self.dmarc = dmarc
        self.arc = arc
        self.check_helo = check_helo
        self.authserv_id = authserv_id or socket.getfqdn()
        self.lookups = lookups if lookups is not None else Lookups(reactor, servers=dns_servers, timeout=timeout)
        self.spf_reject = spf_reject
        self.dmarc_reject = dmarc_reject
        self.max_signatures = max_signatures
        self.spf_querytime = spf_querytime
        self.minkey = minkey
        self.monitor = guarded(monitor if monitor is not None else EventLog())
        self.rng = rng if rng is not None else random.SystemRandom()
        self.threads = threads
        self._pools: dict[str, ThreadPool] = {}
        self._triggers: list[Any] = []
        self._in_flight: set[Deferred[None]] = set()

    @property
    def enabled(self) -> tuple[str, ...]:
        """The names of the checks that run."""
        on = {"spf": self.spf, "dkim": self.dkim, "dmarc": self.dmarc, "arc": self.arc}
        return tuple(name for name in CHECKS if on[name])

    # ---- the worker pool ----------------------------------------------------------------------------------------

    @property
    def spf_pool(self) -> ThreadPool:
        """The worker threads that run pyspf (each may wait on DNS for up to ``spf_querytime``)."""
        return self._pool_named("spf")

    @property
    def pool(self) -> ThreadPool:
        """The worker threads that verify DKIM and ARC signatures (CPU only: their keys are fetched first), apart
        from SPF's so that senders whose DNS is slow cannot hold up the verification of other messages."""
        return self._pool_named("dkim")

    def _pool_named(self, name: str) -> ThreadPool:
        pool = self._pools.get(name)
        if pool is None:
            self._stop_with_the_reactor()
            pool = self._pools[name] = ThreadPool(minthreads=0, maxthreads=self.threads,
                                                  name=f"esmtpkit-mailauth-{name}")
            pool.start()
        return pool

    def _stop_with_the_reactor(self) -> None:
        """Have the reactor's shutdown call `drain`, then `close` (once, from the first check or pool on)."""
        if not self._triggers:
            self._triggers = [self.reactor.addSystemEventTrigger("before", "shutdown", self.drain),
                              self.reactor.addSystemEventTrigger("during", "shutdown", self.close)]

    def _track(self, d: "Deferred[Any]") -> "Deferred[Any]":
        """Count ``d`` among the checks in flight until it fires (`drain` waits for them); call it with the
        check's whole chain, so that what `drain` releases never sees a half-made result."""
        self._stop_with_the_reactor()
        settled: Deferred[None] = Deferred()
        self._in_flight.add(settled)

        def done(result: Any) -> Any:
            self._in_flight.discard(settled)
            settled.callback(None)
            return result

        return d.addBoth(done)

    def drain(self) -> "Deferred[Any] | None":
        """As the reactor begins to stop: fail the DNS queries worker threads wait for (they end as temperror) and
        wait for the checks in flight, so that `close` finds the threads idle."""
        self.lookups.stop()
        if not self._in_flight:
            return None
        return DeferredList(list(self._in_flight))

    def close(self) -> None:
        """Stop the worker threads (the reactor's shutdown does it; tests that make their own call it)."""
        self.lookups.stop()
        pools, self._pools = self._pools, {}
        for trigger in self._triggers:
            with contextlib.suppress(KeyError, ValueError):
                self.reactor.removeSystemEventTrigger(trigger)
        self._triggers = []
        for pool in pools.values():
            pool.stop()
        self.lookups.resume()

    # ---- the checks ---------------------------------------------------------------------------------------------

    def _told(self, session: Session, method: str, result: str, domain: str, started: float) -> None:
        self.monitor.checked(session, method, result, domain, time.monotonic() - started)

    def check_sender(self, session: Session, sender: str) -> "Deferred[AuthVerdicts]":
        """SPF for the client, its HELO name and ``sender`` (text, ``""`` for ``<>``); never fails. A client
        without an IP address (on a UNIX socket) gets no SPF verdict."""
        verdicts = AuthVerdicts(remote_ip=session.peer_ip)
        if not self.spf or not verdicts.remote_ip:
            return succeed(verdicts)  # a client with no IP address (a UNIX socket) has nothing SPF can check
        started = time.monotonic()
        d = in_worker(self.spf_pool, self.lookups, spf_check.evaluate, verdicts.remote_ip, sender,
                      session.helo or "", check_helo=self.check_helo, querytime=self.spf_querytime)

        def found(result: tuple[SpfVerdict | None, SpfVerdict]) -> AuthVerdicts:
            verdicts.spf_helo, verdicts.spf_mailfrom = result
            for verdict in result:
                if verdict is not None:
                    self._told(session, f"spf.{verdict.scope}", verdict.result, verdict.domain, started)
            return verdicts

        def broken(failure: Failure) -> AuthVerdicts:
            self.log.failure("SPF check failed", failure)
            domain = sender.rpartition("@")[2].lower()
            verdicts.spf_mailfrom = SpfVerdict("temperror", "mailfrom", sender, domain, "internal error")
            self._told(session, "spf.mailfrom", "temperror", domain, started)
            return verdicts

        return self._track(d.addCallbacks(found, broken))

    def refusal_at_mail(self, verdicts: AuthVerdicts) -> Reply | None:
        """With ``spf_reject``: the reply refusing a sender SPF failed (or could not check), else None."""
        verdict = verdicts.spf_mailfrom
        if not self.spf_reject or verdict is None:
            return None
        if verdict.result == "fail":
            text = f"SPF check failed for {verdict.domain}" + (f": {verdict.explanation}"
                                                               if verdict.explanation else "")
            return Reply.of(SPF_FAILED[0], _printable(text), enhanced=SPF_FAILED[1])
        if verdict.result == "temperror":
            return Reply.of(SPF_ERROR[0], f"SPF check for {verdict.domain} could not complete, try again later",
                            enhanced=SPF_ERROR[1])
        return None

    def check_message(self, session: Session, verdicts: AuthVerdicts, head: bytes,
                      open_message: Callable[[], IO[bytes]]) -> "Deferred[AuthVerdicts]":
        """DKIM, ARC and DMARC for the message whose header section is ``head`` and whose whole content
        ``open_message`` opens; fills in and fires with ``verdicts`` (never fails)."""
        async def run() -> AuthVerdicts:
            if self.dkim or self.arc:
                await self._signatures(session, verdicts, head, open_message)
            if self.dmarc:
                started = time.monotonic()
                from_values = [v.decode("utf-8", "replace") for n, v in dkim_check.header_section(head)
                               if n.lower() == b"from"]
                verdict = await dmarc_check.check(self.lookups, from_values, verdicts.spf_mailfrom,
                                                  verdicts.dkim, self.rng)
                verdicts.dmarc = verdict
                self._told(session, "dmarc", verdict.result, verdict.domain, started)
            return verdicts

        def broken(failure: Failure) -> AuthVerdicts:
            self.log.failure("mail authentication check failed", failure)
            if self.dmarc and verdicts.dmarc is None:
                verdicts.dmarc = dmarc_check.DmarcVerdict("temperror", "", reason="internal error")
            return verdicts

        return self._track(Deferred.fromCoroutine(run()).addErrback(broken))

    async def _signatures(self, session: Session, verdicts: AuthVerdicts, head: bytes,
                          open_message: Callable[[], IO[bytes]]) -> None:
        started = time.monotonic()
        found = dkim_check.signers(head, self.max_signatures, arc=self.arc)
        keys = await dkim_check.fetch_keys(self.lookups, found.names) if found.names else {}
        if found.dkim or (self.arc and found.any_arc):
            signatures, chain = await _in_pool(self, dkim_check.verify, open_message, found, keys,
                                               arc=self.arc, minkey=self.minkey)
        else:
            signatures, chain = [], (dkim_check.ArcVerdict("none") if self.arc else None)
        if self.dkim:
            verdicts.dkim = tuple(signatures)
            verdicts.dkim_checked = True
            for signature in signatures or [DkimVerdict("none", "", "")]:
                self._told(session, "dkim", signature.result, signature.domain, started)
        if chain is not None:
            verdicts.arc = chain
            self._told(session, "arc", chain.result, chain.as_domain, started)

    def refusal_at_end(self, verdicts: AuthVerdicts) -> Reply | None:
        """With ``dmarc_reject``: `DMARC_REJECTED` for a message that failed DMARC under ``p=reject``, or
        `DMARC_DEFERRED` when SPF or a signature of the author's organization could not be checked (a temporary
        DNS failure), since it may pass when tried again (RFC 7489 §6.6.2 leaves that to the receiver)."""
        verdict = verdicts.dmarc
        if not (self.dmarc_reject and verdict is not None and verdict.result == "fail"
                and verdict.disposition == "reject"):
            return None
        if _maybe_temporary(verdicts, verdict.domain):
            return DMARC_DEFERRED
        return DMARC_REJECTED


def _in_pool(checks: MailAuth, function: Callable[..., Any], *args: Any, **kwargs: Any) -> "Deferred[Any]":
    from twisted.internet.threads import deferToThreadPool

    return deferToThreadPool(checks.reactor, checks.pool, function, *args, **kwargs)


def _maybe_temporary(verdicts: AuthVerdicts, author: str) -> bool:
    """Whether a DMARC failure for ``author`` may be a temporary one: SPF could not say, or a signature whose
    domain could align (the author's organization) could not be checked."""
    organization = dmarc_check.organizational_domain(author) if author else ""

    def aligns(domain: str) -> bool:
        return not organization or not domain or dmarc_check.organizational_domain(domain) == organization

    spf = verdicts.spf_mailfrom
    if spf is not None and spf.result == "temperror" and aligns(spf.domain):
        return True
    return any(v.result == "temperror" and aligns(v.domain) for v in verdicts.dkim)


def _printable(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:400]
