"""One request to a filter server over a stream connection (clamd, spamd): connect, send a head, the message in
chunks as fast as the connection drains, a tail, and read one bounded answer.

The message is read from `HeldMessage.chunks` one chunk at a time, and a chunk is only read when the transport
asks for more (a pull producer), so memory stays bounded whatever the message's size. The answer is read while
the message is still being sent (a server may answer early, clamd when a stream is too long) and may not grow
beyond a limit. Cancelling the Deferred closes the connection.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Collection, Iterator, Mapping, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IPullProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["FilterProtocolError", "client_endpoint", "converse", "Answer", "common_options", "flag"]

T = TypeVar("T")

#: Parses what was received so far: the answer once it is whole, None to read on. ``closed`` is True when the
#: server has closed the connection (nothing more will come). Raises `FilterProtocolError` on nonsense.
Answer = Callable[[bytes, bool], "T | None"]


class FilterProtocolError(Exception):
    """The filter server said something we cannot take: garbage, an answer too long, an early close."""


#: The keywords a target may give, by kind: what `client_endpoint` can check (no ``checkPID``, no TLS).
_KEYWORDS = {"tcp": ("host", "port", "timeout", "bindAddress"), "unix": ("path", "timeout")}
#: The longest UNIX socket path (Linux's sun_path holds 108 octets, its NUL included).
_MAX_PATH = 107


def client_endpoint(target: str, reactor: Any) -> IStreamClientEndpoint:
    """``target`` (``tcp:HOST:PORT``, ``tcp:host=H:port=P``, ``unix:PATH``, maybe ``timeout=SECONDS``, and for
    tcp ``bindAddress=IP``) as a client endpoint on ``reactor`` (None: the global reactor, looked up only when
    connecting). Checked whole here, so a bad one fails at start rather than at every connection: a port from 1
    to 65535, a non-empty socket path, a whole timeout above 0, no keyword that cannot be checked. ValueError
    naming ``target``."""
    _fields(target)
    try:
        endpoint = clientFromString(reactor if reactor is not None else object(), target)
    except Exception as e:
        raise ValueError(f"{target!r} is not a client endpoint (tcp:HOST:PORT or unix:PATH): {e}") from None
    return endpoint if reactor is not None else _GlobalReactorEndpoint(target)


def _split(text: str) -> list[str]:
    """``text`` cut at each colon, as Twisted's endpoint strings are (a backslash escapes the next character)."""
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _fields(target: str) -> dict[str, str]:
    """The checked fields of ``target`` by name (``host``, ``port``, ``path``, ``timeout``, ``bindAddress``)."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{target!r} is not a client endpoint (tcp:HOST:PORT or unix:PATH): {why}")

    kind, _, rest = target.partition(":")
    if kind not in _KEYWORDS or not _:
        raise bad("it names no tcp or unix endpoint")
    allowed = _KEYWORDS[kind]
    positional = allowed[:2] if kind == "tcp" else allowed[:1]
    fields: dict[str, str] = {}
    places = 0
    for part in _split(rest):
        key, equals, value = part.partition("=")
        if not equals:
            key, value = "", part
        if not key:
            if places >= len(positional):
                raise bad(f"one field too many, {part!r}")
            key = positional[places]
            places += 1
        elif key not in allowed:
            raise bad(f"{key!r} is not one of {', '.join(allowed)}")
        if key in fields:
            raise bad(f"{key} is given twice")
        fields[key] = value
    if kind == "unix":
        path = fields.get("path", "")
        if not path:
            raise ValueError(f"{target!r} names no socket path (unix:PATH)")
        if len(path.encode("utf-8", "surrogateescape")) > _MAX_PATH or "\0" in path:
            raise bad(f"a socket path is at most {_MAX_PATH} octets, without NUL")
    else:
        host = fields.get("host", "")
        if not host or any(c.isspace() for c in host):
            raise bad("no host")
        port = fields.get("port", "")
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise bad(f"the port is a number from 1 to 65535, not {port!r}" if port else "no port")
        if "bindAddress" in fields:
            try:
                ipaddress.ip_address(fields["bindAddress"])
            except ValueError:
                raise bad(f"bindAddress is an IP address, not {fields['bindAddress']!r}") from None
    seconds = fields.get("timeout", "1")
    if not (seconds.isascii() and seconds.isdigit() and int(seconds) > 0):
        raise bad(f"timeout is a whole number of seconds above 0, not {seconds!r}")
    return fields


@implementer(IStreamClientEndpoint)
class _GlobalReactorEndpoint:
    """An endpoint on the global reactor, made at the first connect (so that making a filter installs none)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def connect(self, factory: Any) -> Deferred[Any]:
        from twisted.internet import reactor

        return clientFromString(reactor, self.target).connect(factory)


@implementer(IPullProducer)
class _Sender:
    """Writes the message's chunks (each through ``frame``), then ``tail``, one chunk per call for more."""

    def __init__(self, exchange: "_Exchange", chunks: Iterator[bytes], frame: Callable[[bytes], list[bytes]],
                 tail: bytes) -> None:
        self.exchange = exchange
        self.chunks = chunks
        self.frame = frame
        self.tail = tail
        self.done = False

    def resumeProducing(self) -> None:
        if self.done:
            return
        try:
            chunk = next(self.chunks, None)
        except Exception:
            self.exchange.fail(Failure())
            return
        transport = self.exchange.transport
        if chunk is None:
            self.stopProducing()
            transport.unregisterProducer()
            if self.tail:
                transport.write(self.tail)
            return
        if chunk:
            transport.writeSequence(self.frame(chunk))

    def stopProducing(self) -> None:
        if not self.done:
            self.done = True
            close = getattr(self.chunks, "close", None)
            if close is not None:
                close()


class _Exchange(Protocol):
    """Sends the request and reads the answer; fires ``deferred`` once, with the answer or a failure."""

    def __init__(self, deferred: Deferred[Any], head: bytes, chunks: Iterator[bytes],
                 frame: Callable[[bytes], list[bytes]], tail: bytes, answer: Answer[Any], limit: int) -> None:
        self.deferred = deferred
        self.head = head
        self.sender = _Sender(self, chunks, frame, tail)
        self.answer = answer
        self.limit = limit
        self.received = bytearray()
        self.finished = False
        self.lost = False

    def connectionMade(self) -> None:
        if self.finished:  # cancelled while connecting
            self.transport.abortConnection()
            return
        nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if nodelay is not None:
            nodelay(True)  # the last frame and the wait for the answer: Nagle would hold it
        self.transport.write(self.head)
        self.transport.registerProducer(self.sender, False)

    def dataReceived(self, data: bytes) -> None:
        if self.finished:
            return
        self.received += data
        if len(self.received) > self.limit:
            self.fail(Failure(FilterProtocolError(f"the answer is longer than {self.limit} octets")))
            return
        self._parse(closed=False)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.lost = True
        self.sender.stopProducing()
        if not self.finished:
            self._parse(closed=True)
        if not self.finished:
            why = reason.getErrorMessage() if reason is not None else "closed"
            self.fail(Failure(FilterProtocolError(
                f"the connection closed before a whole answer ({len(self.received)} octets: "
                f"{bytes(self.received[:80])!r}): {why}")), close=False)

    def _parse(self, closed: bool) -> None:
        try:
            result = self.answer(bytes(self.received), closed)
        except Exception:
            self.fail(Failure())
            return
        if result is not None:
            self.finished = True
            self._close()
            self.deferred.callback(result)

    def fail(self, failure: Failure, close: bool = True) -> None:
        """End the exchange with ``failure``: stop sending, close the connection, errback."""
        if self.finished:
            return
        self.finished = True
        if close:
            self._close()
        self.deferred.errback(failure)

    def cancel(self) -> None:
        """The Deferred was cancelled: close the connection (the Deferred fails with CancelledError)."""
        self.finished = True
        if self.transport is not None:
            self._close()

    def _close(self) -> None:
        self.sender.stopProducing()
        transport = self.transport
        if transport is not None and not self.lost:
            if getattr(transport, "producer", None) is self.sender:
                transport.unregisterProducer()
            transport.abortConnection()


def converse(endpoint: IStreamClientEndpoint, head: bytes, chunks: Iterator[bytes], answer: Answer[T], *,
             limit: int, frame: Callable[[bytes], list[bytes]] = lambda chunk: [chunk],
             tail: bytes = b"") -> Deferred[T]:
    """Connect to ``endpoint``, send ``head``, every chunk of ``chunks`` through ``frame`` and ``tail``, and
    read an answer of at most ``limit`` octets, which ``answer`` parses. Cancelling the result closes the
    connection (or stops the connecting); ``chunks`` is closed in any case."""
    connecting: Deferred[Any] | None = None

    def cancel(d: Deferred[T]) -> None:
        exchange.cancel()
        if exchange.transport is None and connecting is not None:
            connecting.cancel()
        _close(chunks)

    result: Deferred[T] = Deferred(cancel)
    exchange = _Exchange(result, head, chunks, frame, tail, answer, limit)

    def failed(failure: Failure) -> None:
        _close(chunks)
        if not result.called:  # else cancelled while connecting: the CancelledError is already the result's
            result.errback(failure)

    factory = Factory.forProtocol(lambda: exchange)  # type: ignore[arg-type]
    factory.noisy = False  # a connection per message: not worth two log lines each
    connecting = endpoint.connect(factory)
    connecting.addErrback(failed)
    return result


def _close(chunks: Iterator[bytes]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


def common_options(options: Mapping[str, str], known: Collection[str]) -> dict[str, Any]:
    """The ``name``, ``timeout`` and ``on-failure`` of a ``--filter`` spec as `MessageFilter` keywords; ValueError
    (one sentence naming the option) for a key not in ``known`` (those three are always known) or a bad value."""
    keys = ("name", "timeout", "on-failure", *known)
    unknown = sorted(set(options) - set(keys))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} (known: {', '.join(keys)})")
    found: dict[str, Any] = {"name": options.get("name") or None, "on_failure": options.get("on-failure")}
    if "timeout" in options:
        try:
            seconds = float(options["timeout"])
        except ValueError:
            seconds = 0.0
        if not 0 < seconds < float("inf"):
            raise ValueError(f"timeout is a number of seconds above 0, not {options['timeout']!r}")
        found["timeout"] = seconds
    if found["on_failure"] is not None and found["on_failure"].strip().lower() not in ("tempfail", "accept"):
        raise ValueError(f"on-failure is tempfail or accept, not {found['on_failure']!r}")
    return found


def flag(option: str, value: str) -> bool:
    """A yes/no option's value; ValueError naming ``option`` for anything else."""
    word = value.strip().lower()
    if word in ("yes", "on", "true", "1"):
        return True
    if word in ("no", "off", "false", "0"):
        return False
    raise ValueError(f"{option} is yes or no, not {value!r}")
