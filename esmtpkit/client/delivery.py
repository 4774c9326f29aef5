"""`Deliverer`: one message to the recipients of one domain, trying the domain's hops in order (RFC 5321 §5.1).

A recipient is done once a hop gives it a final answer (2xx or 5xx). When a session fails as a whole (no
connection, a 421 greeting, a 4xx to MAIL or to the data, ...) the recipients still temporary go to the next hop;
a 4xx to one RCPT is that recipient's answer and stays deferred, except 452 (or 552, RFC 5321 §4.5.3.1.10) in a
session that delivered to others: the server's recipient limit, so those recipients go again at once, in a new
session with the same hop, for as long as each round delivers to someone. A REQUIRETLS message that a hop could
not take (5.7.30: no verified TLS, or REQUIRETLS not offered) goes to the next hop too (RFC 8689 §4.2.1). What the
last hop said is what is kept.

Connections are limited as Postfix limits them (``default_process_limit``,
``default_destination_concurrency_limit``): at most ``max_connections`` at once for the whole Deliverer, and
``destination_concurrency`` per destination (a domain, or the smarthost every domain goes to); a session beyond
either limit waits its turn. `Deliverer.deliver` can be cancelled (a deadline): the session under way is aborted
and the Deferred fires at once with an outcome for every recipient.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Final, Sequence

from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from esmtpkit.client.mx import Hop, RouteError, Router
from esmtpkit.client.options import ClientOptions
from esmtpkit.client.session import Attempt, OpenContent, send as session_send
from esmtpkit.core.outbound import Message, Outcome

__all__ = ["Deliverer", "MAX_CONNECTIONS", "DESTINATION_CONCURRENCY"]

#: Sessions open at once across a Deliverer (Postfix's default_process_limit).
MAX_CONNECTIONS: Final = 100
#: Sessions open at once to one destination (Postfix's default_destination_concurrency_limit).
DESTINATION_CONCURRENCY: Final = 20

#: Sends one message to one host, as `esmtpkit.client.session.send` does.
Send = Callable[..., "Deferred[Attempt]"]


def _one_line(text: str) -> str:
    """``text`` fit for a reply text and a DSN's Diagnostic-Code: one line, bounded."""
    return " ".join(text.split())[:500]


def _no_route(reason: str) -> Outcome:
    return Outcome.local(451, "4.4.3", _one_line(f"Routing failed: {reason}"))


def _no_requiretls(outcome: Outcome) -> bool:
    """A hop that could not take a REQUIRETLS message (no verified TLS, or no REQUIRETLS offered): RFC 8689
    §4.2.1 has the next MX tried; the last one's 5.7.30 is final."""
    return outcome.enhanced == "5.7.30" and not outcome.remote


def _failed_attempt(hop: Hop, reason: str) -> Outcome:
    return Outcome.local(451, "4.3.0", _one_line(f"Delivery to {hop.label} failed: {reason}"))


class _Destination:
    """The connection limit of one destination, and how many sessions are using or awaiting it."""

    def __init__(self, limit: int) -> None:
        self.semaphore = DeferredSemaphore(limit)
        self.users = 0


class _Run:
    """One `Deliverer.deliver`: the outcomes so far, what it does now, and what it awaits (to cancel it)."""

    def __init__(self, indexes: list[int]) -> None:
        self.indexes = indexes
        self.outcomes: dict[int, Outcome] = {}
        self.stage = "before routing"
        self.cancelled = False
        self.cut: dict[int, Outcome] = {}
        self._waiting: Deferred[Any] | None = None

    async def wait(self, d: "Deferred[Any]") -> Any:
        """Await ``d``, as what a cancellation cancels; CancelledError when cancelled already."""
        if self.cancelled:
            raise CancelledError()
        self._waiting = d
        try:
            return await d
        finally:
            self._waiting = None

    def cancel(self) -> None:
        self.cancelled = True
        if self._waiting is not None:
            self._waiting.cancel()

    def as_cancelled(self) -> dict[int, Outcome]:
        """Every index's outcome once cancelled: final answers kept, 4.4.2 "attempt timed out" for the rest (as
        the session cut short put it, else naming what was under way)."""
        timed_out = Outcome.local(451, "4.4.2", _one_line(f"attempt timed out {self.stage}"))
        kept = {i: o for i, o in self.cut.items() if o.enhanced == "4.4.2"}
        kept.update((i, o) for i, o in self.outcomes.items() if not o.temporary)
        return {i: kept.get(i, timed_out) for i in self.indexes}


class Deliverer:
    """Delivers to the recipients of one domain through ``router`` (`MXRouter`, `Smarthost`), one session per hop.

    ``endpoint_for`` turns a `Hop` into a client endpoint (default: TCP with the connect timeout of
    ``options.timeouts``, from ``source_address`` when it is of the hop's address family). ``send`` is
    `esmtpkit.client.session.send` unless given. ``max_connections`` limits the sessions open at once across
    every delivery of this Deliverer, ``destination_concurrency`` those to one destination (the router's
    ``destination(domain)`` when it has one, else the domain); sessions beyond a limit wait, they never fail.
    """

    log = Logger()

    def __init__(self, reactor: Any, router: Router, options: ClientOptions, *,
                 endpoint_for: Callable[[Hop], IStreamClientEndpoint] | None = None, send: Send | None = None,
                 source_address: str | None = None, max_connections: int = MAX_CONNECTIONS,
                 destination_concurrency: int = DESTINATION_CONCURRENCY) -> None:
        if max_connections < 1 or destination_concurrency < 1:
            raise ValueError("max_connections and destination_concurrency must be at least 1")
        self.reactor = reactor
        self.router = router
        self.options = options
        self.source_address = str(ipaddress.ip_address(source_address)) if source_address else None
        self.max_connections = max_connections
        self.destination_concurrency = destination_concurrency
        self._endpoint_for = endpoint_for
        self._send = send if send is not None else session_send
        self._connections = DeferredSemaphore(max_connections)
        self._destinations: dict[str, _Destination] = {}

    def endpoint_for(self, hop: Hop) -> IStreamClientEndpoint:
        """The endpoint that reaches ``hop``: TCP over IPv4 or IPv6, as its address is."""
        if self._endpoint_for is not None:
            return self._endpoint_for(hop)
        version = ipaddress.ip_address(hop.address).version
        bind = None
        if self.source_address is not None and ipaddress.ip_address(self.source_address).version == version:
            bind = (self.source_address, 0)
        timeout = self.options.timeouts.connect
        kind = TCP4ClientEndpoint if version == 4 else TCP6ClientEndpoint
        return kind(self.reactor, hop.address, hop.port, timeout=timeout, bindAddress=bind)

    def destination(self, domain: str) -> str:
        """What the per-destination limit counts ``domain``'s sessions under."""
        name = getattr(self.router, "destination", None)
        return str(name(domain)) if callable(name) else domain.lower()

    def deliver(self, message: Message, indexes: Sequence[int],
                open_content: OpenContent) -> "Deferred[dict[int, Outcome]]":
        """Deliver to ``message.recipients[i]`` for each of ``indexes`` (one domain); fires with every index's
        outcome, and never fails. Cancelled, it aborts the session under way (or stops waiting for a route or a
        connection slot) and fires at once with every index's outcome: the final answers (2xx, 5xx) already
        given, and 4.4.2 "attempt timed out" for the others; never with CancelledError."""
        wanted = list(dict.fromkeys(indexes))
        run = _Run(wanted)

        def cancel(result: "Deferred[dict[int, Outcome]]") -> None:
            run.cancel()
            if not result.called:
                result.callback(run.as_cancelled())

        result: Deferred[dict[int, Outcome]] = Deferred(cancel)

        def unexpected(failure: Failure) -> dict[int, Outcome]:
            self.log.failure("delivery of {id} failed unexpectedly", failure, id=message.id)
            return {i: _no_route(f"{type(failure.value).__name__}: {failure.value}") for i in wanted}

        def done(outcomes: dict[int, Outcome]) -> None:
            if not result.called:
                result.callback(outcomes)

        work = Deferred.fromCoroutine(self._deliver(run, message, open_content))
        work.addErrback(unexpected).addCallback(done)
        return result

    async def _deliver(self, run: _Run, message: Message, open_content: OpenContent) -> dict[int, Outcome]:
        try:
            outcomes = await self._route_and_send(run, message, open_content)
        except CancelledError:
            if not run.cancelled:
                raise
        return run.as_cancelled() if run.cancelled else outcomes

    async def _route_and_send(self, run: _Run, message: Message, open_content: OpenContent) -> dict[int, Outcome]:
        indexes = run.indexes
        if not indexes:
            return {}
        domain = message.recipients[indexes[0]].domain
        run.stage = f"while looking up where mail for {domain} goes"
        try:
            hops = await run.wait(maybeDeferred(self.router.route, domain))
        except Exception as e:
            if run.cancelled:
                raise CancelledError() from e
            if isinstance(e, RouteError):
                return {i: e.outcome for i in indexes}
            self.log.failure("routing {domain} failed", Failure(), domain=domain)
            return {i: _no_route(f"{type(e).__name__}: {e}") for i in indexes}
        if not hops:
            return {i: _no_route(f"no mail exchanger for {domain}") for i in indexes}
        key = self.destination(domain)
        outcomes = run.outcomes
        pending = indexes
        hops = list(hops)
        for number, hop in enumerate(hops, 1):
            pending, session_failed = await self._rounds(run, key, hop, message, pending, open_content)
            refused = [i for i in pending if message.requiretls and _no_requiretls(outcomes[i])]
            if not session_failed and not refused:
                break
            pending = [i for i in pending if (session_failed and outcomes[i].temporary) or i in refused]
            if not pending:
                break
            after = "left for the next hop" if number < len(hops) else "left for a later attempt"
            self.log.info("{id}: {hop} failed ({outcome}); {count} recipient(s) {after}",
                          id=message.id, hop=hop.label, outcome=str(outcomes[pending[0]]), count=len(pending),
                          after=after)
        return dict(outcomes)

    async def _rounds(self, run: _Run, key: str, hop: Hop, message: Message, indexes: list[int],
                      open_content: OpenContent) -> tuple[list[int], bool]:
        """Sessions with one hop until the recipients over its recipient limit (452) are sent too, while each
        round delivers to someone; the last round's indexes, and whether its session failed as a whole."""
        while True:
            attempted, session_failed = await self._session(run, key, hop, message, indexes, open_content)
            run.outcomes.update(attempted)
            if run.cancelled:
                run.cut = attempted
                raise CancelledError()
            if session_failed:
                return indexes, True
            again = [i for i in indexes if attempted[i].code == 452]
            if not again or not any(attempted[i].delivered for i in indexes):
                return indexes, False
            self.log.info("{id}: {hop} took {count} recipient(s) fewer than offered ({outcome}); sending those "
                          "again", id=message.id, hop=hop.label, count=len(again), outcome=str(attempted[again[0]]))
            indexes = again

    async def _session(self, run: _Run, key: str, hop: Hop, message: Message, indexes: list[int],
                       open_content: OpenContent) -> tuple[dict[int, Outcome], bool]:
        """One session with ``hop`` once the destination's limit and the Deliverer's allow it."""
        destination = self._destinations.get(key)
        if destination is None:
            destination = self._destinations[key] = _Destination(self.destination_concurrency)
        destination.users += 1
        try:
            run.stage = f"while waiting for a connection to {hop.label} (limit for {key})"
            await run.wait(destination.semaphore.acquire())
            try:
                run.stage = f"while waiting for a connection to {hop.label} (limit for every destination)"
                await run.wait(self._connections.acquire())
                try:
                    run.stage = f"while delivering to {hop.label}"
                    return await self._attempt(run, hop, message, indexes, open_content)
                finally:
                    self._connections.release()
            finally:
                destination.semaphore.release()
        finally:
            destination.users -= 1
            if not destination.users:
                del self._destinations[key]

    async def _attempt(self, run: _Run, hop: Hop, message: Message, indexes: list[int],
                       open_content: OpenContent) -> tuple[dict[int, Outcome], bool]:
        """One session with one hop: every index's outcome, and whether the session failed as a whole."""
        try:
            attempt = await run.wait(maybeDeferred(self._send, self.reactor, self.endpoint_for(hop), message,
                                                   open_content, self.options, indexes=indexes, host=hop.label))
        except Exception as e:
            if run.cancelled:
                raise CancelledError() from e
            self.log.failure("delivery to {hop} failed", Failure(), hop=hop.label)
            outcome = _failed_attempt(hop, f"{type(e).__name__}: {e}")
            return {i: outcome for i in indexes}, True
        missing = _failed_attempt(hop, "no answer for this recipient")
        outcomes = {i: attempt.outcomes.get(i, missing) for i in indexes}
        return outcomes, bool(attempt.session_failed) or any(i not in attempt.outcomes for i in indexes)
