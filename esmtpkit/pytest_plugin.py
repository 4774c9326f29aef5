"""pytest fixtures for testing handlers against a real loopback server (registered as the ``esmtpkit`` plugin).

Needs pytest-twisted (the reactor runs beside the tests). Override ``esmtpkit_handler`` or ``esmtpkit_policy`` in
your conftest.py to serve your own handler.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.server.interfaces import IMessageHandler
from esmtpkit.server.policy import Policy
from esmtpkit.testing import LoopbackServer, RecordingHandler, serve

__all__ = ["Recorder", "esmtpkit_handler", "esmtpkit_policy", "esmtpkit_server"]


class Recorder:
    """A handler factory making one RecordingHandler per connection and keeping them all."""

    def __init__(self) -> None:
        self.handlers: list[RecordingHandler] = []

    def __call__(self) -> RecordingHandler:
        handler = RecordingHandler()
        self.handlers.append(handler)
        return handler

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Every message finished on any connection, in order of connection."""
        return [m for h in self.handlers for m in h.messages]


@pytest.fixture
def esmtpkit_handler() -> Callable[[], IMessageHandler]:
    """The handler factory the server uses: a Recorder by default."""
    return Recorder()


@pytest.fixture
def esmtpkit_policy() -> Policy:
    """The Policy the server uses: defaults with hostname "localhost"."""
    return Policy(hostname="localhost")


@pytest.fixture
def esmtpkit_server(esmtpkit_handler: Callable[[], IMessageHandler],
                    esmtpkit_policy: Policy) -> Iterator[LoopbackServer]:
    """A server on a free 127.0.0.1 port for the duration of one test; ``.address`` is ``(host, port)``."""
    import pytest_twisted

    server: LoopbackServer = pytest_twisted.blockon(serve(ESMTPFactory(esmtpkit_handler, policy=esmtpkit_policy,
                                                                       clock=_reactor())))
    try:
        yield server
    finally:
        pytest_twisted.blockon(server.stop())


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor
