"""`ESMTPService`: listeners plus graceful shutdown (stop accepting, let transactions finish, then stop)."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred

from esmtpkit.server.factory import ESMTPFactory

__all__ = ["ESMTPService"]


class ESMTPService(MultiService):
    """A MultiService of listeners for one factory. Stopping it (SIGTERM under twistd) first closes the listeners,
    then waits for the factory's connections to finish (up to ``Policy.shutdown_timeout``), so no message that got
    250 is lost and no transaction is cut short needlessly.
    """

    def __init__(self, factory: ESMTPFactory) -> None:
        super().__init__()
        self.factory = factory

    def stopService(self) -> "Deferred[Any]":
        async def stop() -> None:
            await super(ESMTPService, self).stopService()
            await self.factory.shutdown()

        return ensureDeferred(stop())
