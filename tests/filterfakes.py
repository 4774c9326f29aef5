"""Fakes for the tests of the stream filters (clamd, spamd): a message held as the server holds it, one that counts
what is read of it, an endpoint that connects each protocol to a `StringTransport` when the test says so, and the
one-line error a filter's ``from_spec`` refuses a setting with."""

from __future__ import annotations

import io
from typing import Any, Callable

import pytest

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from zope.interface import implementer

from esmtpkit.core.session import Session
from esmtpkit.filters import HeldMessage


def held_message(content: bytes) -> HeldMessage:
    """``content`` held for the filters as the server holds it: its head, its size, and a way to read it."""
    return HeldMessage(Session(hostname="mx.test"), content.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n", len(content),
                       lambda: io.BytesIO(content))


class Content(io.BytesIO):
    """The held message's content, counting the octets read and whether it was closed."""

    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        super().__init__(data)
        self.read_octets = 0
        self.fail_after = fail_after

    def read(self, size: int | None = -1) -> bytes:
        if self.fail_after is not None and self.read_octets >= self.fail_after:
            raise OSError("the spool file went away")
        data = super().read(size)
        self.read_octets += len(data)
        return data


class Held:
    """A HeldMessage over `Content`, remembering the streams it opened."""

    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        self.data = data
        self.fail_after = fail_after
        self.opened: list[Content] = []
        self.message = HeldMessage(Session(hostname="mx.test"), data[:64], len(data), self._open)

    def _open(self) -> Content:
        stream = Content(self.data, self.fail_after)
        self.opened.append(stream)
        return stream


@implementer(IStreamClientEndpoint)
class Endpoint:
    """Connects each protocol to a StringTransport when the test says so (`accept`), or fails it (`refuse`)."""

    def __init__(self) -> None:
        self.pending: list[tuple[Factory, Deferred[Any]]] = []
        self.cancelled = 0

    def connect(self, factory: Factory) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        d: Deferred[Any] = Deferred(cancel)
        self.pending.append((factory, d))
        return d

    def accept(self) -> tuple[Protocol, StringTransport]:
        factory, d = self.pending.pop(0)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        d.callback(protocol)
        return protocol, transport

    def refuse(self, error: Exception) -> None:
        self.pending.pop(0)[1].errback(error)


def results(d: Deferred[Any]) -> list[Any]:
    found: list[Any] = []
    d.addBoth(found.append)
    return found


def pump(transport: StringTransport, times: int = 1000) -> None:
    """Let the transport ask for more (its buffer drained) until the message and its end are written."""
    for _ in range(times):
        if transport.producer is None:
            return
        transport.producer.resumeProducing()
    raise AssertionError("the producer never finished")


def spec_mistake(from_spec: Callable[..., Any], target: str, options: dict[str, str]) -> str:
    """The error a filter's ``from_spec`` refuses ``target`` and ``options`` with, which must be one line."""
    with pytest.raises(ValueError) as caught:
        from_spec(target, options, reactor=MemoryReactor())
    text = str(caught.value)
    assert "\n" not in text, text
    return text
