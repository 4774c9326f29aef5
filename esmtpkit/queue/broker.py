"""`Broker`: one RabbitMQ connection with a confirm-mode channel, kept open; the AMQP handler and the queue use it.

It connects with pika's Twisted adapter (``amqp://``, or ``amqps://`` with the server's certificate checked),
declares its queues on every connection, and after a failed attempt or a lost connection tries again after
``retry_min`` seconds, doubling up to ``retry_max``. A publish (`Broker.send`) counts only once the broker acked
it: a nack, a returned (unroutable) message, a lost connection or no answer in time fail it with `NotQueued`.
`Link` is an open channel as its users see it; `open_pika_link` makes the real one, tests pass their own opener.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, TypeVar
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from esmtpkit.queue.shared import DefaultReactor

__all__ = ["Broker", "Link", "Delivery", "State", "NotQueued", "Unroutable", "check_url", "safe_url", "positive",
           "describe", "deadline", "within", "open_pika_link", "DEFAULT_URL", "BROKER_MAX_SIZE", "QUORUM"]

T = TypeVar("T")

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
#: RabbitMQ's default ``max_message_size`` since 4.0 (3.8 to 3.13: 128 MiB); a larger publish closes the channel.
BROKER_MAX_SIZE = 16 * 1024 * 1024
#: The arguments of a replicated, durable quorum queue.
QUORUM: Mapping[str, Any] = {"x-queue-type": "quorum"}


class NotQueued(Exception):
    """The broker did not take a message (or the new state of one). ``reason`` is short and safe to tell a client
    (in a 451); ``detail`` (the broker's or the network's own words) goes only to the log.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


class Unroutable(NotQueued):
    """The broker returned the message: no queue is bound to its routing key (the queue was deleted). The `Broker`
    declares that queue again."""


class State(enum.Enum):
    """Where a `Broker` stands."""

    IDLE = "idle"  # never started
    CONNECTING = "connecting"  # an attempt (connection, channel, declarations) is under way
    READY = "ready"  # a confirm-mode channel is open and the queues declared
    DOWN = "down"  # the last attempt failed or the connection was lost; a retry is scheduled
    STOPPED = "stopped"


@dataclass(frozen=True)
class Delivery:
    """One message handed out by the broker (``basic.deliver`` or ``basic.get-ok``) on a `Link`."""

    tag: int
    body: bytes
    redelivered: bool = False


class Link(Protocol):
    """One open broker connection with its confirm-mode channel."""

    #: Fires once, with a text saying why, when the channel or the connection closes.
    lost: "Deferred[str]"

    def declare(self, queue: str, arguments: Mapping[str, Any], passive: bool = False) -> "Deferred[int]":
        """Declare ``queue`` durable with ``arguments`` (or only check it exists); fire with its ready messages."""

    def publish(self, queue: str, body: bytes, properties: Mapping[str, Any]) -> "Deferred[Any]":
        """Publish persistently with ``mandatory`` and ``properties`` (fields of pika's ``BasicProperties``);
        fire on the broker's ack, fail with `NotQueued` otherwise."""

    def consume(self, queue: str, prefetch: int, deliver: Callable[[Delivery], None]) -> "Deferred[str]":
        """Consume with manual acks and ``prefetch`` unacknowledged at most; fire with the consumer tag."""

    def cancel(self, tag: str) -> "Deferred[Any]":
        """Cancel a consumer; its unacknowledged deliveries may still be acked or nacked."""

    def get(self, queue: str) -> "Deferred[Delivery | None]":
        """``basic.get`` one message (to be acked), or None when the queue is empty."""

    def ack(self, tag: int) -> None:
        """Acknowledge a delivery: the broker forgets the message."""

    def nack(self, tag: int, requeue: bool) -> None:
        """Give a delivery back (``requeue``) so that a consumer gets it again."""

    def close(self) -> "Deferred[Any]":
        """Close the connection politely; fires once it is closed."""

    def abort(self) -> None:
        """Drop the connection at once."""


def check_url(url: str) -> str:
    """Return ``url`` if it is an ``amqp://`` or ``amqps://`` URL with a host; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ValueError(f"not an amqp:// or amqps:// URL with a host: {url!r}")
    return url


def safe_url(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def positive(name: str, value: float | str) -> float:
    """``value`` as a number above zero; ValueError naming the setting ``name`` otherwise."""
    number = float(value)
    if not number > 0:
        raise ValueError(f"{name} must be positive, not {value!r}")
    return number


def describe(failure: Failure, cancelled: str) -> str:
    """A short text for a failure: the exception's message, or ``cancelled`` for a cancelled attempt."""
    if failure.check(CancelledError):
        return cancelled
    text = str(failure.value).strip().rstrip(".") or type(failure.value).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def deadline(reactor: Any, waiting: "Deferred[T]", seconds: float, expired: Exception) -> "Deferred[T]":
    """``waiting``'s result (or failure), or the failure ``expired`` once ``seconds`` pass first; whatever
    ``waiting`` gives later is dropped."""
    result: Deferred[T] = Deferred()

    def settle(outcome: Any) -> None:
        if timer.active():
            timer.cancel()
        if result.called:
            return
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)

    timer = reactor.callLater(seconds, settle, Failure(expired))
    waiting.addBoth(settle)
    return result


def within(reactor: Any, waiting: "Deferred[T]", timeout: float) -> "Deferred[T]":
    """``waiting``'s result, or `NotQueued` when it has not come within ``timeout`` seconds; any other failure
    becomes `NotQueued` too (the broker's answer never came)."""

    def unanswered(failure: Failure) -> Failure:
        if failure.check(NotQueued):
            return failure
        return Failure(NotQueued("no confirmation from the broker", describe(failure, "cancelled")))

    expired = NotQueued(f"no confirmation from the broker within {timeout:g} s")
    return deadline(reactor, waiting, timeout, expired).addErrback(unanswered)


class Broker:
    """Keeps one confirm-mode channel open to RabbitMQ at ``url``, declaring ``topology`` (queue name -> arguments)
    on every connection; after a failed attempt or a lost connection the next one waits ``retry_min`` seconds,
    doubling up to ``retry_max``. ``on_ready`` is called with each new `Link`. ``reactor`` is the global one unless
    given. ``opener`` (tests) replaces the pika connection.
    """

    log = Logger()
    reactor = DefaultReactor()

    def __init__(self, url: str = DEFAULT_URL, *, topology: Mapping[str, Mapping[str, Any]], reactor: Any = None,
                 connect_timeout: float = 10.0, retry_min: float = 0.5, retry_max: float = 30.0,
                 ca_file: str | None = None, opener: Callable[[], "Deferred[Link]"] | None = None,
                 on_ready: Callable[[Link], None] | None = None) -> None:
        self.url = check_url(url)
        self.reactor = reactor
        self.topology = dict(topology)
        self.connect_timeout = positive("connect_timeout", connect_timeout)
        self.retry_min = positive("retry_min", retry_min)
        self.retry_max = max(self.retry_min, float(retry_max))
        self.ca_file = ca_file
        self.on_ready = on_ready
        self.state = State.IDLE
        self.last_error = ""
        self.link: Link | None = None
        self._opener = opener
        self._attempt: Deferred[Any] | None = None
        self._attempt_timer: IDelayedCall | None = None
        self._retry: IDelayedCall | None = None
        self._delay = self.retry_min
        self._waiters: list[Callable[[bool], None]] = []
        self._declaring: set[str] = set()

    # ---- connection life --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect now unless connected, connecting, waiting to retry or stopped."""
        if self.state is State.IDLE:
            self._connect()

    def _connect(self) -> None:
        self._retry = None
        self.state = State.CONNECTING
        attempt = Deferred.fromCoroutine(self._open())
        self._attempt = attempt
        self._attempt_timer = self.reactor.callLater(self.connect_timeout, attempt.cancel)
        attempt.addCallbacks(self._connected, self._attempt_failed)

    async def _open(self) -> Link:
        if self._opener is not None:
            link = await self._opener()
        else:
            link = await open_pika_link(self.reactor, self.url, self.ca_file, self.connect_timeout)
        try:
            for queue, arguments in self.topology.items():
                await link.declare(queue, arguments)
        except BaseException:
            link.abort()
            raise
        return link

    def _end_attempt(self) -> None:
        timer, self._attempt_timer, self._attempt = self._attempt_timer, None, None
        if timer is not None and timer.active():
            timer.cancel()

    def _connected(self, link: Link) -> None:
        self._end_attempt()
        if self.state is State.STOPPED:
            link.abort()
            return
        self.link = link
        self.state = State.READY
        self._delay = self.retry_min
        if self.last_error:
            self.log.info("AMQP broker {url} reachable again", url=safe_url(self.url))
        self.last_error = ""
        link.lost.addCallback(self._lost, link)
        self._tell_waiters(True)
        if self.on_ready is not None and self.link is link:
            try:
                self.on_ready(link)
            except Exception:
                self.log.failure("setting up the new AMQP connection failed")
                self.drop(link, "set-up failed")

    def _attempt_failed(self, failure: Failure) -> None:
        self._end_attempt()
        if self.state is State.STOPPED:
            return
        self.last_error = describe(failure, f"no answer within {self.connect_timeout:g} s")
        self.log.warn("AMQP broker {url} unreachable: {error}; next attempt in {delay:g} s",
                      url=safe_url(self.url), error=self.last_error, delay=self._delay)
        self._down()

    def _lost(self, reason: str, link: Link, polite: bool = True) -> str:
        if link is not self.link:
            return reason
        self.link = None
        if self.state is State.STOPPED:
            return reason
        if getattr(self.reactor, "running", True) is False:
            # The reactor has left its main loop: twistd shutting down drops every connection; no reason to retry.
            self.log.info("AMQP connection to {url} closed as the process stops", url=safe_url(self.url))
            self.state = State.STOPPED
            return reason
        self.last_error = reason
        self.log.warn("AMQP connection to {url} lost: {error}; reconnecting in {delay:g} s",
                      url=safe_url(self.url), error=reason, delay=self._delay)
        if polite:
            self._close(link)  # what is left of it: the connection, when only the channel closed
        self._down()
        return reason

    def _down(self) -> None:
        self.state = State.DOWN
        self._tell_waiters(False)
        self._retry = self.reactor.callLater(self._delay, self._connect)
        self._delay = min(self._delay * 2, self.retry_max)

    def _tell_waiters(self, ready: bool) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter(ready)

    def drop(self, link: Link, why: str) -> None:
        """Give up on ``link`` (its channel cannot be trusted any more): drop it at once and reconnect."""
        if link is self.link:
            self.log.warn("dropping the AMQP connection: {why}", why=why)
            link.abort()
            self._lost(why, link, polite=False)

    def when_ready(self, timeout: float) -> "Deferred[Link]":
        """The link once connected; fails with `NotQueued` when the broker is down, the attempt under way fails or
        ``timeout`` passes first."""
        self.start()
        if self.state is State.READY and self.link is not None:
            return succeed(self.link)
        if self.state is not State.CONNECTING:
            return fail(NotQueued("broker unavailable", self.last_error))
        waiting: Deferred[Link] = Deferred()

        def answer(ready: bool) -> None:
            if ready and self.link is not None:
                waiting.callback(self.link)
            else:
                waiting.errback(NotQueued("broker unavailable", self.last_error))

        self._waiters.append(answer)
        expired = NotQueued("broker unavailable", self.last_error or "no connection in time")
        return deadline(self.reactor, waiting, timeout, expired)

    def stop(self) -> "Deferred[None]":
        """Stop for good: cancel retries and the attempt under way, fail what waits for a connection, and close the
        connection (dropped if the broker has not answered within ``connect_timeout``)."""
        if self.state is State.STOPPED:
            return succeed(None)
        self.state = State.STOPPED
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        self._tell_waiters(False)
        link, self.link = self.link, None
        if link is None:
            return succeed(None)
        return self._close(link)

    def _close(self, link: Link) -> "Deferred[None]":
        """Close politely, but drop the connection if the broker has not answered within ``connect_timeout``."""
        try:
            closed = link.close()
        except Exception:
            closed = succeed(None)
        if closed.called:
            return closed.addBoth(lambda _: None)
        timer = self.reactor.callLater(self.connect_timeout, link.abort)

        def done(_: object) -> None:
            if timer.active():
                timer.cancel()

        return closed.addBoth(done)

    # ---- publishing -------------------------------------------------------------------------------------------

    def send(self, queue: str, body: bytes, properties: Mapping[str, Any], timeout: float,
             link: Link | None = None) -> "Deferred[None]":
        """Publish ``body`` to ``queue`` on ``link`` (by default the current one, once an attempt under way has
        connected); fire once the broker confirmed it, fail with `NotQueued` otherwise.

        ``timeout`` covers everything: the wait for a connection, sending and the confirmation. ``properties`` are
        fields of pika's ``BasicProperties``; ``timestamp`` is the time of sending unless given.
        """
        sent: Deferred[Any] = Deferred()
        result = within(self.reactor, sent, timeout)

        def go(ready: bool) -> None:
            on = link if link is not None else self.link
            if result.called:
                return  # the deadline passed while the connection was under way
            if not ready or on is None:
                sent.errback(NotQueued("broker unavailable", self.last_error))
                return
            fields = {"timestamp": int(self.reactor.seconds()), **properties}

            def late(outcome: object) -> object:
                if result.called and not isinstance(outcome, Failure):
                    self.log.info("message {id} confirmed after its deadline: it may be queued twice",
                                  id=fields.get("message_id", ""))
                return outcome

            self._publish(on, queue, body, fields).addBoth(late).chainDeferred(sent)

        if link is not None:
            go(True)
            return result
        self.start()
        if self.state is State.READY:
            go(True)
        elif self.state is State.CONNECTING:
            self._waiters.append(go)
        else:
            go(False)
        return result

    def _publish(self, link: Link, queue: str, body: bytes, properties: Mapping[str, Any]) -> "Deferred[Any]":
        try:
            confirmed = link.publish(queue, body, properties)
        except Exception as e:
            return fail(NotQueued("cannot publish", str(e)))

        def refused(failure: Failure) -> Failure:
            if failure.check(Unroutable):
                self._redeclare(link, queue)
            return failure

        return confirmed.addErrback(refused)

    def _redeclare(self, link: Link, queue: str) -> None:
        """The queue is gone (a message came back unroutable): declare it again, once at a time."""
        arguments = self.topology.get(queue)
        if arguments is None or queue in self._declaring or link is not self.link:
            return
        self._declaring.add(queue)
        self.log.warn("queue {queue} is missing; declaring it again", queue=queue)

        def done(result: object) -> None:
            self._declaring.discard(queue)
            if isinstance(result, Failure):
                self.log.error("cannot declare queue {queue}: {error}", queue=queue, error=describe(result, "failed"))

        try:
            declared = link.declare(queue, arguments)
        except Exception as e:
            declared = fail(e)
        declared.addBoth(done)


# ---- the pika link --------------------------------------------------------------------------------------------


async def open_pika_link(reactor: Any, url: str, ca_file: str | None, timeout: float) -> Link:
    """Connect with pika's Twisted adapter and open a confirm-mode channel; ``ca_file`` is trusted for amqps://."""
    import pika
    from pika.exceptions import AMQPConnectionError
    from twisted.internet import endpoints
    from twisted.internet.protocol import Factory

    params = pika.URLParameters(url)
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    endpoint: Any = endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    if parts.scheme == "amqps":
        from twisted.internet import ssl

        trust = None
        if ca_file:
            with open(ca_file, "rb") as f:
                trust = ssl.Certificate.loadPEM(f.read())
        endpoint = endpoints.wrapClientTLS(ssl.optionsForClientTLS(host, trustRoot=trust), endpoint)
    factory = Factory.forProtocol(lambda: _connection_class()(params, custom_reactor=reactor))
    factory.noisy = False
    connection = await endpoint.connect(factory)
    try:
        try:
            await connection.ready
        except AMQPConnectionError:
            raise ConnectionError(connection.why or "the AMQP handshake failed") from None
        channel = await connection.channel()
        await channel.confirm_delivery()
    except BaseException:
        if connection.transport is not None:
            connection.transport.abortConnection()
        raise
    return _PikaLink(connection, channel)


@functools.lru_cache(maxsize=None)
def _connection_class() -> type:
    """pika's `TwistedProtocolConnection`, keeping why the handshake failed (pika itself reports a count of tries).

    Built on first use: importing pika's Twisted adapter imports the global reactor.
    """
    from pika.adapters.twisted_connection import TwistedProtocolConnection
    from twisted.internet.protocol import connectionDone

    class Connection(TwistedProtocolConnection):  # type: ignore[misc]
        why = ""

        def connectionLost(self, reason: Failure = connectionDone) -> None:
            # The adapter replaces the broker's own reason (e.g. 403 ACCESS_REFUSED) with "closed cleanly": keep it.
            pending = getattr(self._impl, "_error", None)
            if isinstance(pending, Exception) and not self.why:
                self.why = describe(Failure(pending), "cancelled")
            super().connectionLost(reason)

        def _on_connection_failed(self, connection: Any, error: Any = None) -> None:
            if error is not None and not self.why:
                self.why = describe(Failure(error), "cancelled")
            super()._on_connection_failed(connection, error)

    return Connection


class _PikaLink:
    """A pika `TwistedProtocolConnection` and its confirm-mode `TwistedChannel`, seen as a `Link`."""

    def __init__(self, connection: Any, channel: Any) -> None:
        self.connection = connection
        self.channel = channel
        self.lost: Deferred[str] = Deferred()
        self._cancelled: set[str] = set()
        channel.on_closed.addBoth(self._gone, "channel closed")
        if connection.closed is not None:
            connection.closed.addBoth(self._gone, "connection closed")

    def _gone(self, reason: Any, what: str) -> None:
        if not self.lost.called:
            detail = str(getattr(reason, "value", reason) or "").strip()
            self.lost.callback(f"{what}: {detail}" if detail else what)

    def declare(self, queue: str, arguments: Mapping[str, Any], passive: bool = False) -> "Deferred[int]":
        declared = self.channel.queue_declare(queue=queue, durable=True, passive=passive,
                                              arguments=None if passive else dict(arguments))
        return declared.addCallback(lambda frame: int(frame.method.message_count))

    def publish(self, queue: str, body: bytes, properties: Mapping[str, Any]) -> "Deferred[Any]":
        from pika import BasicProperties, DeliveryMode
        from pika.exceptions import ChannelClosed, NackError, UnroutableError

        fields = {"delivery_mode": DeliveryMode.Persistent, "app_id": "esmtpkit", **properties}
        try:
            confirmed = self.channel.basic_publish(exchange="", routing_key=queue, body=body,
                                                   properties=BasicProperties(**fields), mandatory=True)
        except Exception as e:
            return fail(NotQueued("cannot publish", str(e)))

        def refused(failure: Failure) -> Failure:
            if failure.check(UnroutableError):
                return Failure(Unroutable("no queue to route it to", f"queue {queue!r} is missing"))
            if failure.check(NackError):
                return Failure(NotQueued("the broker refused it (nack)"))
            detail = describe(failure, "cancelled")
            if failure.check(ChannelClosed):
                return Failure(NotQueued("the broker closed the channel before confirming", detail))
            return Failure(NotQueued("connection to the broker lost before confirming", detail))

        return confirmed.addErrback(refused)

    def consume(self, queue: str, prefetch: int, deliver: Callable[[Delivery], None]) -> "Deferred[str]":
        async def start() -> str:
            await self.channel.basic_qos(prefetch_count=prefetch)
            messages, tag = await self.channel.basic_consume(queue=queue, auto_ack=False)
            Deferred.fromCoroutine(self._pump(messages, tag, deliver))
            return str(tag)

        return Deferred.fromCoroutine(start())

    async def _pump(self, messages: Any, tag: str, deliver: Callable[[Delivery], None]) -> None:
        while True:
            try:
                item = await messages.get()
            except Exception as e:
                if tag not in self._cancelled and not self.lost.called:
                    self._gone(e, "consumer ended")
                    self.abort()
                return
            deliver(Delivery(int(item.method.delivery_tag), bytes(item.body), bool(item.method.redelivered)))

    def cancel(self, tag: str) -> "Deferred[Any]":
        self._cancelled.add(tag)
        return self.channel.basic_cancel(tag)

    def get(self, queue: str) -> "Deferred[Delivery | None]":
        def found(item: Any) -> Delivery | None:
            if item is None:
                return None
            return Delivery(int(item.method.delivery_tag), bytes(item.body), bool(item.method.redelivered))

        return self.channel.basic_get(queue=queue, auto_ack=False).addCallback(found)

    def ack(self, tag: int) -> None:
        self.channel.basic_ack(delivery_tag=tag)

    def nack(self, tag: int, requeue: bool) -> None:
        self.channel.basic_nack(delivery_tag=tag, requeue=requeue)

    def close(self) -> "Deferred[Any]":
        if self.connection.is_closed:
            return succeed(None)
        closed = self.connection.close()
        return closed if closed is not None else succeed(None)

    def abort(self) -> None:
        transport = self.connection.transport
        if transport is not None:
            transport.abortConnection()
