"""`ESMTPFactory`: builds one `ESMTPProtocol` and one handler per connection, for any Twisted endpoint."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from esmtpkit.core.reply import Reply
from esmtpkit.server.authlimit import AuthThrottle
from esmtpkit.server.interfaces import IMessageHandler
from esmtpkit.server.monitor import EventLog, Monitor, guarded
from esmtpkit.server.policy import Policy
from esmtpkit.server.protocol import SHUTTING_DOWN, ESMTPProtocol

__all__ = ["ESMTPFactory"]

TOO_MANY_CONNECTIONS = Reply(421, ("Too many connections, try again later",), "4.3.2")
TOO_MANY_FROM_CLIENT = Reply(421, ("Too many connections from your address, try again later",), "4.7.0")


class ESMTPFactory(Factory):
    """Serve ESMTP: ``serverFromString(reactor, "tcp:2525").listen(ESMTPFactory(MyHandler, policy=Policy()))``.

    ``handler_factory`` is called with no arguments once per connection (a class is fine) and must return an
    `IMessageHandler` provider. ``clock`` drives timeouts; it defaults to the global reactor, looked up lazily.
    ``monitor`` hears what happens on every connection (`esmtpkit.server.monitor`); the default, `EventLog`, logs the
    documented events. Pass ``Monitors([EventLog(), Metrics()])`` to add Prometheus metrics. ``auth_throttle``
    counts wrong AUTH passwords across all its connections (`esmtpkit.server.authlimit`; None when the policy turns it off).
    """

    protocol = ESMTPProtocol
    noisy = False
    log = Logger()

    def __init__(self, handler_factory: Callable[[], Any], policy: Policy | None = None,
                 clock: IReactorTime | None = None, monitor: Monitor | None = None) -> None:
        self.handler_factory = handler_factory
        self.policy = policy if policy is not None else Policy()
        self._clock = clock
        self.monitor = guarded(monitor if monitor is not None else EventLog())
        self.auth_throttle = AuthThrottle.from_policy(self.policy)
        self.connections: set[ESMTPProtocol] = set()
        self._per_client: Counter[str] = Counter()
        self._stopping = False
        self._drained: list[Deferred[None]] = []

    @property
    def clock(self) -> IReactorTime:
        """The clock used for timeouts (the reactor unless one was given)."""
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor  # type: ignore[assignment]
        return self._clock  # type: ignore[return-value]

    def make_handler(self) -> IMessageHandler:
        """A new handler for one connection, behind the policy's fronts; refuses objects that do not provide
        IMessageHandler."""
        handler = self.handler_factory()
        if not IMessageHandler.providedBy(handler):
            raise TypeError(f"{handler!r} does not provide IMessageHandler")
        for front in reversed(self.policy.fronts):
            handler = front(handler)
        return handler

    def buildProtocol(self, addr: IAddress) -> ESMTPProtocol:
        proto = self.protocol(self.make_handler(), self.policy, self.clock, self.monitor)
        proto.factory = self
        return proto

    # ---- admission and shutdown (called by the protocol once the peer is known) --------------------------------

    def admit(self, proto: ESMTPProtocol) -> Reply | None:
        """Count a new connection, or return the 421 that refuses it (shutting down, or over a limit)."""
        if self._stopping:
            return SHUTTING_DOWN
        policy = self.policy
        if policy.max_connections and len(self.connections) >= policy.max_connections:
            return TOO_MANY_CONNECTIONS  # the monitor reports it (connection.refused)
        client = proto.session.peer_ip
        if client and policy.max_connections_per_client and \
                self._per_client[client] >= policy.max_connections_per_client:
            return TOO_MANY_FROM_CLIENT
        self.connections.add(proto)
        if client:
            self._per_client[client] += 1
        return None

    def release(self, proto: ESMTPProtocol) -> None:
        """A connection admitted by admit() has closed."""
        if proto not in self.connections:
            return
        self.connections.discard(proto)
        client = proto.session.peer_ip
        if client:
            self._per_client[client] -= 1
            if self._per_client[client] <= 0:
                del self._per_client[client]
        if not self.connections:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def shutdown(self, timeout: float | None = None) -> "Deferred[None]":
        """Refuse new connections, close idle ones (421 4.3.2), let transactions in flight finish.

        Fires once every connection is closed; after ``timeout`` seconds (default ``Policy.shutdown_timeout``)
        the remaining ones are closed by force and their handlers get abort().
        """
        self._stopping = True
        for proto in list(self.connections):
            proto.shutdown()
        if not self.connections:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._drained.append(done)
        seconds = self.policy.shutdown_timeout if timeout is None else timeout
        deadline = self.clock.callLater(seconds, self._force_close)
        done.addBoth(lambda result: (deadline.cancel() if deadline.active() else None, result)[1])
        return done

    def _force_close(self) -> None:
        if self.connections:
            self.log.warn("shutdown deadline passed: closing {count} connection(s)", count=len(self.connections))
        for proto in list(self.connections):
            proto.force_close()
