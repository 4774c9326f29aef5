"""`ESMTPFactory`: builds one `ESMTPProtocol` and one handler per connection, for any Twisted endpoint."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from .interfaces import IMessageHandler
from .policy import Policy
from .protocol import ESMTPProtocol

__all__ = ["ESMTPFactory"]


class ESMTPFactory(Factory):
    """Serve ESMTP: ``serverFromString(reactor, "tcp:2525").listen(ESMTPFactory(MyHandler, policy=Policy()))``.

    ``handler_factory`` is called with no arguments once per connection (a class is fine) and must return an
    `IMessageHandler` provider. ``clock`` drives timeouts; it defaults to the global reactor, looked up lazily.
    """

    protocol = ESMTPProtocol
    noisy = False
    log = Logger()

    def __init__(self, handler_factory: Callable[[], Any], policy: Policy | None = None,
                 clock: IReactorTime | None = None) -> None:
        self.handler_factory = handler_factory
        self.policy = policy if policy is not None else Policy()
        self._clock = clock

    @property
    def clock(self) -> IReactorTime:
        """The clock used for timeouts (the reactor unless one was given)."""
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor  # type: ignore[assignment]
        return self._clock  # type: ignore[return-value]

    def make_handler(self) -> IMessageHandler:
        """A new handler for one connection; refuses objects that do not provide IMessageHandler."""
        handler = self.handler_factory()
        if not IMessageHandler.providedBy(handler):
            raise TypeError(f"{handler!r} does not provide IMessageHandler")
        return handler

    def buildProtocol(self, addr: IAddress) -> ESMTPProtocol:
        proto = self.protocol(self.make_handler(), self.policy, self.clock)
        proto.factory = self
        return proto
