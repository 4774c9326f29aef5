"""`Deliverer`: one message to the recipients of one domain, trying the domain's hops in order (RFC 5321 §5.1).

A recipient is done once a hop gives it a final answer (2xx or 5xx). When a session fails as a whole (no
connection, a 421 greeting, a 4xx to MAIL or to the data, ...) the recipients still temporary go to the next hop;
a 4xx to one RCPT is that recipient's answer and stays deferred. What the last hop said is what is kept.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from esmtpkit.client.mx import Hop, RouteError, Router
from esmtpkit.client.options import ClientOptions
from esmtpkit.client.session import Attempt, OpenContent, send as session_send
from esmtpkit.core.outbound import Message, Outcome

__all__ = ["Deliverer"]

#: Sends one message to one host, as `esmtpkit.client.session.send` does.
Send = Callable[..., "Deferred[Attempt]"]


def _one_line(text: str) -> str:
    """``text`` fit for a reply text and a DSN's Diagnostic-Code: one line, bounded."""
    return " ".join(text.split())[:500]


def _no_route(reason: str) -> Outcome:
    return Outcome.local(451, "4.4.3", _one_line(f"Routing failed: {reason}"))


def _failed_attempt(hop: Hop, reason: str) -> Outcome:
    return Outcome.local(451, "4.3.0", _one_line(f"Delivery to {hop.label} failed: {reason}"))


class Deliverer:
    """Delivers to the recipients of one domain through ``router`` (`MXRouter`, `Smarthost`), one session per hop.

    ``endpoint_for`` turns a `Hop` into a client endpoint (default: TCP with the connect timeout of
    ``options.timeouts``, from ``source_address`` when it is of the hop's address family). ``send`` is
    `esmtpkit.client.session.send` unless given.
    """

    log = Logger()

    def __init__(self, reactor: Any, router: Router, options: ClientOptions, *,
                 endpoint_for: Callable[[Hop], IStreamClientEndpoint] | None = None, send: Send | None = None,
                 source_address: str | None = None) -> None:
        self.reactor = reactor
        self.router = router
        self.options = options
        self.source_address = str(ipaddress.ip_address(source_address)) if source_address else None
        self._endpoint_for = endpoint_for
        self._send = send if send is not None else session_send

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

    def deliver(self, message: Message, indexes: Sequence[int],
                open_content: OpenContent) -> "Deferred[dict[int, Outcome]]":
        """Deliver to ``message.recipients[i]`` for each of ``indexes`` (one domain); fires with every index's
        outcome, and never fails."""
        wanted = list(dict.fromkeys(indexes))

        def unexpected(failure: Failure) -> dict[int, Outcome]:
            self.log.failure("delivery of {id} failed unexpectedly", failure, id=message.id)
            return {i: _no_route(f"{type(failure.value).__name__}: {failure.value}") for i in wanted}

        return Deferred.fromCoroutine(self._deliver(message, wanted, open_content)).addErrback(unexpected)

    async def _deliver(self, message: Message, indexes: list[int],
                       open_content: OpenContent) -> dict[int, Outcome]:
        if not indexes:
            return {}
        domain = message.recipients[indexes[0]].domain
        try:
            hops = await maybeDeferred(self.router.route, domain)
        except RouteError as e:
            return {i: e.outcome for i in indexes}
        except Exception as e:
            self.log.failure("routing {domain} failed", Failure(), domain=domain)
            return {i: _no_route(f"{type(e).__name__}: {e}") for i in indexes}
        if not hops:
            return {i: _no_route(f"no mail exchanger for {domain}") for i in indexes}
        outcomes: dict[int, Outcome] = {}
        pending = indexes
        for hop in hops:
            attempted, session_failed = await self._attempt(hop, message, pending, open_content)
            outcomes.update(attempted)
            if not session_failed:
                break
            pending = [i for i in pending if outcomes[i].temporary]
            if not pending:
                break
            self.log.info("{id}: {hop} failed ({outcome}); {count} recipient(s) left for the next hop",
                          id=message.id, hop=hop.label, outcome=str(outcomes[pending[0]]), count=len(pending))
        return outcomes

    async def _attempt(self, hop: Hop, message: Message, indexes: list[int],
                       open_content: OpenContent) -> tuple[dict[int, Outcome], bool]:
        """One session with one hop: every index's outcome, and whether the session failed as a whole."""
        try:
            attempt = await maybeDeferred(self._send, self.reactor, self.endpoint_for(hop), message, open_content,
                                          self.options, indexes=indexes, host=hop.label)
        except Exception as e:
            self.log.failure("delivery to {hop} failed", Failure(), hop=hop.label)
            outcome = _failed_attempt(hop, f"{type(e).__name__}: {e}")
            return {i: outcome for i in indexes}, True
        missing = _failed_attempt(hop, "no answer for this recipient")
        outcomes = {i: attempt.outcomes.get(i, missing) for i in indexes}
        return outcomes, bool(attempt.session_failed) or any(i not in attempt.outcomes for i in indexes)
