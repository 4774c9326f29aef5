"""`AMQP`: hand each accepted message to RabbitMQ, answering 250 only once the broker has confirmed it.

One `Publisher` per process (per URL and queue) keeps an AMQP connection with a channel in publisher-confirm mode,
opened with pika's Twisted adapter and shared by every SMTP connection. Messages are published persistent, with
``mandatory`` set, to a durable quorum queue through the default exchange; the envelope travels in the AMQP
headers, the message bytes (after our ``Received:`` field) as the body. The broker's ``basic.ack`` is what turns
the end of DATA into ``250``; a nack, a returned (unroutable) message, a lost connection or no answer in time turn
it into ``451 4.3.0`` and the client keeps the message and retries. Delivery is therefore at least once: a message
the broker stored but could not confirm before a failure comes again on the client's retry.
"""

from __future__ import annotations

import enum
import functools
import secrets
import tempfile
from typing import Any, Callable, Mapping, Protocol
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from esmtpkit.core.address import Address
from esmtpkit.core.content import ContentMode
from esmtpkit.core.reply import Reply, SMTPReply
from esmtpkit.core.session import Session
from esmtpkit.core.trace import received_header
from esmtpkit.handlers.base import MessageHandler
from esmtpkit.handlers.settings import flag

__all__ = ["AMQP", "Publisher", "State", "NotQueued", "Unroutable", "stop_publishers",
           "DEFAULT_URL", "DEFAULT_QUEUE", "BROKER_MAX_SIZE"]

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_QUEUE = "mail"
#: RabbitMQ's default ``max_message_size`` since 4.0 (3.8 to 3.13: 128 MiB); larger publishes close the channel.
BROKER_MAX_SIZE = 16 * 1024 * 1024

#: Queue arguments the publisher declares with: a replicated, durable quorum queue.
QUEUE_ARGUMENTS: Mapping[str, Any] = {"x-queue-type": "quorum"}

#: The greeting that turns clients away while the broker is unreachable (RFC 5321 §3.1: 421, try later).
BROKER_DOWN = Reply(421, ("Service not available: message queue unreachable, try again later",), "4.3.0")
TOO_BIG = Reply(552, ("Message size exceeds the message queue's limit",), "5.3.4")
SPOOL_FAILED = Reply(451, ("Requested action aborted: error in local storage, try again later",), "4.3.0")


def not_queued_reply(reason: str) -> Reply:
    """``451 4.3.0``: the broker did not confirm the message, so the client keeps it and tries again later."""
    return Reply(451, (f"Message not queued ({reason}), try again later",), "4.3.0")


class NotQueued(Exception):
    """The broker did not confirm a message. ``reason`` is short and safe to tell the client (in the 451);
    ``detail`` (the broker's or the network's own words) goes only to the log.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


class Unroutable(NotQueued):
    """The broker returned the message: no queue is bound to its routing key (the queue was deleted)."""


class State(enum.Enum):
    """Where a `Publisher` stands with its broker."""

    IDLE = "idle"  # never started
    CONNECTING = "connecting"  # an attempt is under way
    READY = "ready"  # a confirm-mode channel is open and the queue declared
    DOWN = "down"  # the last attempt failed or the connection was lost; a retry is scheduled
    STOPPED = "stopped"


class Link(Protocol):
    """One open broker connection with its confirm-mode channel, as the `Publisher` uses it."""

    #: Fires once, with a text saying why, when the channel or the connection closes.
    lost: "Deferred[str]"

    def publish(self, queue: str, body: bytes, message_id: str, headers: Mapping[str, Any],
                timestamp: int) -> "Deferred[Any]":
        """Publish persistently with ``mandatory``; fire on the broker's ack, fail with `NotQueued` otherwise."""

    def declare(self, queue: str) -> "Deferred[Any]":
        """Declare ``queue`` durable with `QUEUE_ARGUMENTS`."""

    def close(self) -> "Deferred[Any]":
        """Close the connection politely; fires once it is closed."""

    def abort(self) -> None:
        """Drop the connection at once (a polite close took too long)."""


def _positive(name: str, value: float | str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(f"{name} must be positive, not {value!r}")
    return number


def check_url(url: str) -> str:
    """Return ``url`` if it is an ``amqp://`` or ``amqps://`` URL with a host; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ValueError(f"not an amqp:// or amqps:// URL with a host: {url!r}")
    return url


# ---- the shared connection -----------------------------------------------------------------------------------


class Publisher:
    """One AMQP connection and confirm-mode channel shared by every handler of a process; reconnects with back-off.

    `publish` fires once the broker has acknowledged the message, or fails with `NotQueued` on a nack, a returned
    message, a lost connection or when ``timeout`` passes. After a failed attempt or a lost connection the next
    attempt waits ``retry_min`` seconds, doubling up to ``retry_max``. ``opener`` (tests) replaces the pika link.
    """

    log = Logger()
    _shared: dict[tuple[str, str, str | None], "Publisher"] = {}

    def __init__(self, url: str = DEFAULT_URL, queue: str = DEFAULT_QUEUE, *, reactor: Any = None,
                 connect_timeout: float = 10.0, retry_min: float = 0.5, retry_max: float = 30.0,
                 ca_file: str | None = None, opener: Callable[[], "Deferred[Link]"] | None = None) -> None:
        self.url = check_url(url)
        self.queue = queue
        self.connect_timeout = _positive("connect_timeout", connect_timeout)
        self.retry_min = _positive("retry_min", retry_min)
        self.retry_max = max(self.retry_min, float(retry_max))
        self.ca_file = ca_file
        self.state = State.IDLE
        self.last_error = ""
        self._reactor = reactor
        self._opener = opener
        self._link: Link | None = None
        self._attempt: Deferred[Any] | None = None
        self._attempt_timer: IDelayedCall | None = None
        self._retry: IDelayedCall | None = None
        self._delay = self.retry_min
        self._waiters: list[Callable[[bool], None]] = []
        self._pending: set[Deferred[None]] = set()
        self._declaring = False

    @classmethod
    def shared(cls, url: str = DEFAULT_URL, queue: str = DEFAULT_QUEUE, ca_file: str | None = None,
               reactor: Any = None) -> "Publisher":
        """The process's publisher for ``url`` and ``queue``, made on first use."""
        key = (url, queue, ca_file)
        found = cls._shared.get(key)
        if found is None or found.state is State.STOPPED:
            found = cls._shared[key] = cls(url, queue, ca_file=ca_file, reactor=reactor)
        return found

    @property
    def reactor(self) -> Any:
        """The reactor used for connections and timers (the global one unless given)."""
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    # ---- connection life --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect now unless connected, connecting, or waiting to retry."""
        if self.state is State.IDLE:
            self._connect()

    def _connect(self) -> None:
        self._retry = None
        self.state = State.CONNECTING
        opener = self._opener or self._open_pika
        try:
            attempt = opener()
        except Exception as e:
            self._attempt_failed(Failure(e))
            return
        self._attempt = attempt
        self._attempt_timer = self.reactor.callLater(self.connect_timeout, attempt.cancel)
        attempt.addCallbacks(self._connected, self._attempt_failed)

    def _end_attempt(self) -> None:
        timer, self._attempt_timer, self._attempt = self._attempt_timer, None, None
        if timer is not None and timer.active():
            timer.cancel()

    def _connected(self, link: Link) -> None:
        self._end_attempt()
        self._link = link
        self.state = State.READY
        self._delay = self.retry_min
        if self.last_error:
            self.log.info("AMQP broker {url} reachable again (queue {queue})", url=self._safe_url, queue=self.queue)
        self.last_error = ""
        link.lost.addCallback(self._lost, link)
        self._tell_waiters(True)

    def _attempt_failed(self, failure: Failure) -> None:
        self._end_attempt()
        if self.state is State.STOPPED:
            return
        self.last_error = _describe(failure, f"no answer within {self.connect_timeout:g} s")
        self.log.warn("AMQP broker {url} unreachable: {error}; next attempt in {delay:g} s",
                      url=self._safe_url, error=self.last_error, delay=self._delay)
        self._down()

    def _lost(self, reason: str, link: Link) -> None:
        if link is not self._link:
            return
        self._link = None
        if self.state is State.STOPPED:
            return
        if self._reactor_stopping():
            self.log.info("AMQP connection to {url} closed as the process stops", url=self._safe_url)
            self.state = State.STOPPED
            return
        self.last_error = reason
        self.log.warn("AMQP connection to {url} lost: {error}; reconnecting in {delay:g} s",
                      url=self._safe_url, error=reason, delay=self._delay)
        self._close_link(link)
        self._down()

    def _reactor_stopping(self) -> bool:
        """True once the reactor has left its main loop (twistd shutting down drops every connection)."""
        return getattr(self.reactor, "running", True) is False

    def _down(self) -> None:
        self.state = State.DOWN
        self._tell_waiters(False)
        self._retry = self.reactor.callLater(self._delay, self._connect)
        self._delay = min(self._delay * 2, self.retry_max)

    def _tell_waiters(self, ready: bool) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter(ready)

    def wait_ready(self, timeout: float) -> "Deferred[bool]":
        """Fire True once connected, False when the attempt under way fails or ``timeout`` seconds pass."""
        self.start()
        if self.state is State.READY:
            return succeed(True)
        if self.state is not State.CONNECTING:
            return succeed(False)
        result: Deferred[bool] = Deferred()

        def answer(ready: bool) -> None:
            if timer.active():
                timer.cancel()
            if not result.called:
                result.callback(ready)

        timer = self.reactor.callLater(timeout, answer, False)
        self._waiters.append(answer)
        return result

    def stop(self) -> "Deferred[None]":
        """Stop for good: fail publishes awaiting confirmation, cancel retries, close the connection."""
        if self.state is State.STOPPED:
            return succeed(None)
        self.state = State.STOPPED
        if self._shared.get((self.url, self.queue, self.ca_file)) is self:
            del self._shared[self.url, self.queue, self.ca_file]
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        self._tell_waiters(False)
        link, self._link = self._link, None
        if link is None:
            return succeed(None)
        return self._close_link(link)

    def _close_link(self, link: Link) -> "Deferred[None]":
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

    def publish(self, body: bytes, message_id: str, headers: Mapping[str, Any], timeout: float) -> "Deferred[None]":
        """Publish ``body`` to the queue; fire once the broker confirmed it, or fail with `NotQueued`.

        The ``timeout`` covers everything: waiting for a connection under way, sending, and the confirmation.
        """
        outcome: Deferred[None] = Deferred()
        self._pending.add(outcome)

        def settle(result: Failure | None) -> None:
            if timer.active():
                timer.cancel()
            if outcome.called:
                if result is None:
                    self.log.info("message {id} confirmed after its deadline: the client will send it again",
                                  id=message_id)
                return
            self._pending.discard(outcome)
            if result is None:
                outcome.callback(None)
            else:
                outcome.errback(result)

        def send() -> None:
            link = self._link
            if outcome.called:
                return
            if link is None or self.state is not State.READY:
                settle(Failure(NotQueued("broker unavailable", self.last_error)))
                return
            timestamp = int(self.reactor.seconds())
            try:
                confirmed = link.publish(self.queue, body, message_id, headers, timestamp)
            except Exception as e:
                settle(Failure(NotQueued("cannot publish", str(e))))
                return
            confirmed.addCallbacks(lambda _: settle(None), lambda f: settle(self._refused(f)))

        timer = self.reactor.callLater(timeout, settle,
                                       Failure(NotQueued(f"no confirmation from the broker within {timeout:g} s")))
        self.start()
        if self.state is State.READY:
            send()
        elif self.state is State.CONNECTING:
            self._waiters.append(lambda ready: send())
        else:
            settle(Failure(NotQueued("broker unavailable", self.last_error)))
        return outcome

    @property
    def pending(self) -> int:
        """Publishes awaiting the broker's confirmation (or a connection)."""
        return len(self._pending)

    def _refused(self, failure: Failure) -> Failure:
        if failure.check(Unroutable):
            self._redeclare()
        if failure.check(NotQueued):
            return failure
        return Failure(NotQueued("no confirmation from the broker", _describe(failure, "cancelled")))

    def _redeclare(self) -> None:
        """The queue is gone (messages come back unroutable): declare it again, once at a time."""
        link = self._link
        if link is None or self._declaring:
            return
        self._declaring = True
        self.log.warn("queue {queue} is missing; declaring it again", queue=self.queue)

        def done(result: Any) -> None:
            self._declaring = False
            if isinstance(result, Failure):
                self.log.error("cannot declare queue {queue}: {error}", queue=self.queue,
                               error=_describe(result, "failed"))

        link.declare(self.queue).addBoth(done)

    # ---- the pika link ----------------------------------------------------------------------------------------

    @property
    def _safe_url(self) -> str:
        """The URL without its password, for logs."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return parts._replace(netloc=netloc).geturl()

    def _open_pika(self) -> "Deferred[Link]":
        return Deferred.fromCoroutine(_open_pika_link(self.reactor, self.url, self.queue, self.ca_file,
                                                      self.connect_timeout))


def _describe(failure: Failure, cancelled: str) -> str:
    """A short text for a failure: the exception's message, or ``cancelled`` for a cancelled attempt."""
    from twisted.internet.defer import CancelledError

    if failure.check(CancelledError):
        return cancelled
    value = failure.value
    text = str(value).strip().rstrip(".") or type(value).__name__
    return text if len(text) <= 200 else text[:197] + "..."


async def _open_pika_link(reactor: Any, url: str, queue: str, ca_file: str | None, timeout: float) -> Link:
    """Connect with pika's Twisted adapter, open a confirm-mode channel and declare the queue."""
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
        link = _PikaLink(connection, channel)
        await link.declare(queue)
    except BaseException:
        if connection.transport is not None:
            connection.transport.abortConnection()
        raise
    return link


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
                self.why = _describe(Failure(pending), "cancelled")
            super().connectionLost(reason)

        def _on_connection_failed(self, connection: Any, error: Any = None) -> None:
            if error is not None and not self.why:
                self.why = _describe(Failure(error), "cancelled")
            super()._on_connection_failed(connection, error)

    return Connection


class _PikaLink:
    """A pika `TwistedProtocolConnection` and its confirm-mode `TwistedChannel`, seen as a `Link`."""

    def __init__(self, connection: Any, channel: Any) -> None:
        self.connection = connection
        self.channel = channel
        self.lost: Deferred[str] = Deferred()
        channel.on_closed.addBoth(self._gone, "channel closed")
        if connection.closed is not None:
            connection.closed.addBoth(self._gone, "connection closed")

    def _gone(self, reason: Any, what: str) -> None:
        if not self.lost.called:
            detail = str(getattr(reason, "value", reason) or "").strip()
            self.lost.callback(f"{what}: {detail}" if detail else what)

    def publish(self, queue: str, body: bytes, message_id: str, headers: Mapping[str, Any],
                timestamp: int) -> "Deferred[Any]":
        from pika import BasicProperties, DeliveryMode
        from pika.exceptions import ChannelClosed, NackError, UnroutableError

        properties = BasicProperties(content_type="message/rfc822", delivery_mode=DeliveryMode.Persistent,
                                     message_id=message_id, timestamp=timestamp, app_id="esmtpkit",
                                     headers=dict(headers))
        confirmed = self.channel.basic_publish(exchange="", routing_key=queue, body=body, properties=properties,
                                               mandatory=True)

        def refused(failure: Failure) -> Failure:
            if failure.check(UnroutableError):
                return Failure(Unroutable("no queue to route it to", f"queue {queue!r} is missing"))
            if failure.check(NackError):
                return Failure(NotQueued("the broker refused it (nack)"))
            detail = _describe(failure, "cancelled")
            if failure.check(ChannelClosed):
                return Failure(NotQueued("the broker closed the channel before confirming", detail))
            return Failure(NotQueued("connection to the broker lost before confirming", detail))

        return confirmed.addErrback(refused)

    def declare(self, queue: str) -> "Deferred[Any]":
        return self.channel.queue_declare(queue=queue, durable=True, arguments=dict(QUEUE_ARGUMENTS))

    def close(self) -> "Deferred[Any]":
        if self.connection.is_closed:
            return succeed(None)
        closed = self.connection.close()
        return closed if closed is not None else succeed(None)

    def abort(self) -> None:
        transport = self.connection.transport
        if transport is not None:
            transport.abortConnection()


def stop_publishers() -> "Deferred[None]":
    """Stop every shared publisher of this process (tests; an embedding application shutting down)."""
    from twisted.internet.defer import gatherResults

    stopping = [publisher.stop() for publisher in list(Publisher._shared.values())]
    return gatherResults(stopping).addCallback(lambda _: None)


# ---- the handler --------------------------------------------------------------------------------------------


def new_message_id() -> str:
    """An id for a message whose session has none (a handler driven outside the protocol): 96 random bits, hex.

    Under the protocol the AMQP message_id, the trace id and the id in the 250 reply are the transaction's
    ``session.envelope.id``, the id every log event about the message carries.
    """
    return secrets.token_hex(12).upper()


class AMQP(MessageHandler):
    """Publish every accepted message to the RabbitMQ queue ``queue`` at ``url``; 250 only after the broker's ack.

    The content streams into a spool file while it arrives (memory up to ``spool_max`` bytes) and is published
    whole at the end of DATA, so it must fit the broker's ``max_message_size``: ``max_size`` (default 16 MiB,
    RabbitMQ 4's default) refuses bigger messages with 552 5.3.4. ``confirm_timeout`` bounds the wait for the
    broker; ``refuse_when_down`` greets with 421 4.3.0 while the broker is unreachable. ``trace`` writes our
    ``Received:`` field first. ``ca_file`` is the authority trusted for ``amqps://``. ``publisher`` (tests,
    embedders) replaces the process-wide shared `Publisher`.
    """

    content_mode = ContentMode.RAW
    log = Logger()

    def __init__(self, url: str = DEFAULT_URL, queue: str = DEFAULT_QUEUE, confirm_timeout: float | str = 30.0,
                 refuse_when_down: bool | str = False, max_size: int | str = BROKER_MAX_SIZE,
                 spool_max: int | str = 1024 * 1024, trace: bool | str = True, ca_file: str | None = None,
                 reactor: Any = None, publisher: Publisher | None = None) -> None:
        self.url = check_url(str(url))
        self.queue = str(queue)
        if not self.queue:
            raise ValueError("queue must be named")
        self.confirm_timeout = _positive("confirm_timeout", confirm_timeout)
        self.refuse_when_down = flag(refuse_when_down)
        self.max_size = int(max_size)
        self.spool_max = max(1, int(spool_max))  # SpooledTemporaryFile reads 0 as "never roll over"
        self.trace = flag(trace)
        self.ca_file = ca_file or None
        self.reactor = reactor
        self.publisher = publisher
        if publisher is None:
            _require_pika()
        self._spool: Any = None
        self._size = 0
        self._too_big = False
        self.message_id = ""

    def _publisher(self) -> Publisher:
        if self.publisher is None:
            self.publisher = Publisher.shared(self.url, self.queue, ca_file=self.ca_file, reactor=self.reactor)
        return self.publisher

    def connect(self, session: Session) -> Any:
        """Greet (and start the shared connection); with ``refuse_when_down``, 421 4.3.0 while the broker is away."""
        greeting = super().connect(session)
        publisher = self._publisher()
        publisher.start()
        if not self.refuse_when_down:
            return greeting
        wait = min(self.confirm_timeout, publisher.connect_timeout)
        return publisher.wait_ready(wait).addCallback(lambda ready: greeting if ready else BROKER_DOWN)

    def mail(self, sender: Address, params: Mapping[str, Any]) -> Any:
        """552 5.3.4 when the declared SIZE (RFC 1870) cannot fit one broker message; else the default."""
        if self.max_size and int(params.get("SIZE") or 0) > self.max_size:
            return TOO_BIG
        return super().mail(sender, params)

    def data(self) -> Any:
        """Open the spool, choose the message id, and write our ``Received:`` field (RFC 5321 §4.4) first."""
        self._discard()
        envelope_id = self.session.envelope.id if self.session is not None else ""
        self.message_id = envelope_id or new_message_id()
        self._spool = tempfile.SpooledTemporaryFile(max_size=self.spool_max)
        self._size = 0
        self._too_big = False
        session = self.session
        if self.trace and session is not None:
            self._write(received_header(session, id=self.message_id, show_user=False))
        return super().data()

    def body(self, chunk: bytes) -> None:
        """Append to the spool; past ``max_size`` the content is dropped and the end of DATA answers 552."""
        if self._too_big or self._spool is None:
            return
        self._write(chunk)

    def _write(self, data: bytes) -> None:
        self._size += len(data)
        if self.max_size and self._size > self.max_size:
            self._too_big = True
            self._discard(keep_id=True)
            return
        try:
            self._spool.write(data)
        except OSError as e:
            self.log.error("cannot spool message {id}: {error}", id=self.message_id, error=e)
            self._discard()
            raise SMTPReply(SPOOL_FAILED) from None

    def eom(self) -> Any:
        """Publish the spooled message; the Deferred fires 250 on the broker's ack, 451 4.3.0 on anything else."""
        session = self.session
        spool, self._spool = self._spool, None
        message_id = self.message_id
        if self._too_big:
            self._too_big = False
            self.log.warn("message {id} refused: over {limit} bytes", id=message_id, limit=self.max_size)
            return TOO_BIG
        if spool is None or session is None:
            return SPOOL_FAILED
        try:
            spool.seek(0)
            body = spool.read()
        except OSError as e:
            self.log.error("cannot read back message {id}: {error}", id=message_id, error=e)
            return SPOOL_FAILED
        finally:
            spool.close()
        confirmed = self._publisher().publish(body, message_id, envelope_headers(session), self.confirm_timeout)

        def queued(_: None) -> Reply:
            return Reply(250, (f"Ok: queued as {message_id}",), "2.0.0")

        def refused(failure: Failure) -> Reply:
            if not failure.check(NotQueued):
                self.log.failure("publishing message {id} failed", failure, id=message_id)
                return not_queued_reply("internal error")
            self.log.warn("message {id} not queued: {why}", id=message_id, why=str(failure.value))
            return not_queued_reply(failure.value.reason)

        return confirmed.addCallbacks(queued, refused)

    def abort(self, reason: str) -> None:
        """Drop the spooled content: nothing is published for an unfinished message."""
        self._discard()

    def _discard(self, keep_id: bool = False) -> None:
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()
        if not keep_id:
            self.message_id = ""
            self._too_big = False


def envelope_headers(session: Session) -> dict[str, Any]:
    """The AMQP headers that carry the envelope and the client's identity (all text, recipients a list)."""
    envelope = session.envelope
    headers: dict[str, Any] = {
        "sender": str(envelope.sender or ""),
        "recipients": [str(r) for r in envelope.recipients],
        "client-ip": session.peer_ip,
        "client-helo": session.helo or "",
        "protocol": session.with_protocol,
        "received-by": session.hostname,
    }
    if session.authenticated:
        headers["authenticated"] = session.authenticated
    if envelope.mail_params.get("SMTPUTF8"):
        headers["smtputf8"] = True
    body_type = envelope.mail_params.get("BODY")
    if body_type:
        headers["body-type"] = str(body_type)
    return headers


def _require_pika() -> None:
    import importlib.util

    if importlib.util.find_spec("pika") is None:
        raise ImportError("the AMQP handler needs pika: pip install 'esmtpkit[amqp]'")
