"""`AMQPStore`: the outbound queue on RabbitMQ, so that runners on many hosts drain one queue.

Each queued message is one persistent AMQP message in a durable quorum queue (``outbound`` by default): its body is
one line of JSON (`Message.to_json`, the envelope and the delivery state) ending in ``LF``, then the content as the
server received it. Every write is published with publisher confirms and counts as stored only once the broker
acked it. Runners consume with manual acknowledgement and a prefetch of ``concurrency``; after an attempt a message
with recipients still pending is published, in its new state, to the delay queue of its retry interval
(``outbound.delay.300``: a quorum queue whose ``x-message-ttl`` dead-letters it back to ``outbound``, with
at-least-once dead-lettering), and only once that publish is confirmed is the delivery acknowledged. Delivery is
therefore at least once: a runner that dies mid-attempt leaves the message unacknowledged and the broker hands it to
another runner. Each attempt ends within ``attempt_timeout``, below the broker's consumer timeout; a new state the
broker does not take is retried only after a pause, and one too big for it is set aside. See docs/queue-amqp.md.
"""

from __future__ import annotations

import enum
import functools
import io
import json
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import IO, TYPE_CHECKING, Any, Callable, Mapping, Protocol, TypeVar
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, DeferredLock, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpkit.core.outbound import Message, Status
from esmtpkit.queue.interfaces import (ICheckpoint, IQueueEntry, IQueueStore, MessageTooBig, Worker, final_notice,
                                      finished)

if TYPE_CHECKING:
    from esmtpkit.core.schedule import Schedule

__all__ = ["AMQPStore", "Broker", "Delivery", "Link", "State", "NotQueued", "TooBig", "Unroutable",
           "encode", "decode", "delay_queue_name", "DEFAULT_URL", "DEFAULT_QUEUE", "BROKER_MAX_SIZE",
           "STATE_ROOM", "CONTENT_TYPE", "DELIVERY_LIMIT", "ATTEMPT_TIMEOUT", "ATTEMPT_GRACE", "COUNTS_INTERVAL",
           "TRIMMED_TEXT", "AttemptOverdue"]

T = TypeVar("T")

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_QUEUE = "outbound"
#: RabbitMQ's default ``max_message_size`` since 4.0 (3.8 to 3.13: 128 MiB); a larger publish closes the channel.
BROKER_MAX_SIZE = 16 * 1024 * 1024
#: Room kept free in every message for its delivery state to grow (outcomes of later attempts) under the limit.
STATE_ROOM = 64 * 1024
#: The AMQP ``content_type`` of a queued message: one JSON line (the `Message`), ``LF``, then the content.
CONTENT_TYPE = "application/x-esmtpkit-queued"
#: The ``format`` header of a queued message; a body that does not decode goes to the ``.unreadable`` queue.
FORMAT = 1

QUORUM: Mapping[str, Any] = {"x-queue-type": "quorum"}
#: The main queue's ``x-delivery-limit``: out of reach. RabbitMQ 4 drops a message given back to a quorum queue 20
#: times by default (a failing attempt, a crashed runner), and the main queue has nowhere to dead-letter it to.
DELIVERY_LIMIT = 1_000_000
#: How long one attempt may take by default (seconds): well below RabbitMQ's ``consumer_timeout`` (30 minutes by
#: default), past which the broker closes the channel and gives back every message a runner holds.
ATTEMPT_TIMEOUT = 1200.0
#: Time allowed after ``attempt_timeout`` for the runner's notices and the new state's publish; a worker that has
#: not answered by then is not waited for. A delivery is held at most ``attempt_timeout`` + 2 × this.
ATTEMPT_GRACE = 120.0
#: How often (seconds) a started store counts the messages in its queues for the metrics (`AMQPStore.watch_counts`).
COUNTS_INTERVAL = 60.0
#: The reply text kept per outcome when a message's new state must be trimmed to fit in one broker message.
TRIMMED_TEXT = 64
#: How many message ids a store remembers whose new state the broker refused (each backs off further).
_SAVE_FAILURES_KEPT = 10_000


class NotQueued(Exception):
    """The broker did not take a message (or the new state of one). ``reason`` is short and safe to show a client;
    ``detail`` (the broker's or the network's own words) is for the log.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


class TooBig(NotQueued, MessageTooBig):
    """The message cannot fit in one broker message (``max_size``): retrying cannot help, so it is also the shared
    `MessageTooBig` (the Queue handler answers 552 5.3.4)."""


class Unroutable(NotQueued):
    """The broker returned the message: the queue it was published to is gone (declared again on reconnection)."""


class AttemptOverdue(Exception):
    """The worker did not answer within ``attempt_timeout`` + `ATTEMPT_GRACE`: the message is given back before
    the broker's consumer timeout would close the channel (and give back every other message with it)."""


# ---- the message format ---------------------------------------------------------------------------------------


def encode(message: Message, content: bytes) -> bytes:
    """The AMQP body of a queued message: its JSON (ASCII, on one line), ``LF``, then the content unchanged."""
    header = json.dumps(message.to_json(), ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return header + b"\n" + content


def decode(body: bytes) -> tuple[Message, bytes]:
    """The `Message` and content of an AMQP body written by `encode`; ValueError when it is not one."""
    end = body.find(b"\n")
    if end < 0:
        raise ValueError("no envelope line")
    try:
        data = json.loads(body[:end])
        message = Message.from_json(data)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"unreadable envelope: {e}") from None
    return message, body[end + 1:]


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def delay_queue_name(queue: str, seconds: float) -> str:
    """The delay queue holding messages of ``queue`` for ``seconds``: ``outbound.delay.300``."""
    return f"{queue}.delay.{_seconds(seconds)}"


def delay_queue_arguments(queue: str, seconds: float) -> dict[str, Any]:
    """A quorum queue whose messages expire after ``seconds`` into ``queue``, dead-lettered at least once.

    RabbitMQ (3.10 and later) dead-letters at least once only from a quorum queue with ``x-overflow:
    reject-publish``; otherwise it silently falls back to at most once.
    """
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": max(1, round(seconds * 1000)),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


# ---- the broker connection ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One message handed out by the broker (``basic.deliver`` or ``basic.get-ok``) on a `Link`."""

    tag: int
    body: bytes
    redelivered: bool = False


class Link(Protocol):
    """One open broker connection with its confirm-mode channel, as `Broker` and `AMQPStore` use it."""

    #: Fires once, with a text saying why, when the channel or the connection closes.
    lost: "Deferred[str]"

    def declare(self, queue: str, arguments: Mapping[str, Any], passive: bool = False) -> "Deferred[int]":
        """Declare ``queue`` durable with ``arguments`` (or only check it exists); fire with its ready messages."""

    def publish(self, queue: str, body: bytes, properties: Mapping[str, Any]) -> "Deferred[Any]":
        """Publish persistently with ``mandatory``; fire on the broker's ack, fail with `NotQueued` otherwise."""

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


class State(enum.Enum):
    """Where a `Broker` stands."""

    IDLE = "idle"  # never started
    CONNECTING = "connecting"  # an attempt (connection, channel, topology) is under way
    READY = "ready"  # a confirm-mode channel is open and the topology declared
    DOWN = "down"  # the last attempt failed or the connection was lost; a retry is scheduled
    STOPPED = "stopped"


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


def _positive(name: str, value: float) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(f"{name} must be positive, not {value!r}")
    return number


def _describe(failure: Failure, cancelled: str) -> str:
    """A short text for a failure: the exception's message, or ``cancelled`` for a cancelled attempt."""
    from twisted.internet.defer import CancelledError

    if failure.check(CancelledError):
        return cancelled
    text = str(failure.value).strip().rstrip(".") or type(failure.value).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class Broker:
    """Keeps one confirm-mode channel open to RabbitMQ, declaring ``topology`` (queue name -> arguments) on every
    connection; reconnects after ``retry_min`` seconds, doubling up to ``retry_max``. ``on_ready`` is called with
    each new `Link`. ``opener`` (tests) replaces the pika connection.
    """

    log = Logger()

    def __init__(self, url: str, *, reactor: Any, topology: Mapping[str, Mapping[str, Any]],
                 connect_timeout: float = 10.0, retry_min: float = 0.5, retry_max: float = 30.0,
                 ca_file: str | None = None, opener: Callable[[], "Deferred[Link]"] | None = None,
                 on_ready: Callable[[Link], None] | None = None) -> None:
        self.url = check_url(url)
        self.reactor = reactor
        self.topology = dict(topology)
        self.connect_timeout = _positive("connect_timeout", connect_timeout)
        self.retry_min = _positive("retry_min", retry_min)
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

    def start(self) -> None:
        """Connect now unless connected, connecting, waiting to retry or stopped."""
        if self.state is State.IDLE:
            self._connect()

    def _connect(self) -> None:
        self._retry = None
        self.state = State.CONNECTING
        try:
            attempt = Deferred.fromCoroutine(self._open())
        except Exception as e:
            self._attempt_failed(Failure(e))
            return
        self._attempt = attempt
        self._attempt_timer = self.reactor.callLater(self.connect_timeout, attempt.cancel)
        attempt.addCallbacks(self._connected, self._attempt_failed)

    async def _open(self) -> Link:
        if self._opener is not None:
            link = await self._opener()
        else:
            link = await _open_pika_link(self.reactor, self.url, self.ca_file, self.connect_timeout)
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
        self.last_error = _describe(failure, f"no answer within {self.connect_timeout:g} s")
        self.log.warn("AMQP broker {url} unreachable: {error}; next attempt in {delay:g} s",
                      url=safe_url(self.url), error=self.last_error, delay=self._delay)
        self._down()

    def _lost(self, reason: str, link: Link) -> str:
        if link is not self.link:
            return reason
        self.link = None
        if self.state is State.STOPPED:
            return reason
        self.last_error = reason
        self.log.warn("AMQP connection to {url} lost: {error}; reconnecting in {delay:g} s",
                      url=safe_url(self.url), error=reason, delay=self._delay)
        link.abort()
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
        """Give up on ``link`` (its channel cannot be trusted any more): drop it and reconnect."""
        if link is self.link:
            self.log.warn("dropping the AMQP connection: {why}", why=why)
            link.abort()
            self._lost(why, link)

    def when_ready(self, timeout: float) -> "Deferred[Link]":
        """The link once connected; fails with `NotQueued` when the broker is down or ``timeout`` passes first."""
        self.start()
        if self.state is State.READY and self.link is not None:
            return succeed(self.link)
        if self.state is not State.CONNECTING:
            return fail(NotQueued("broker unavailable", self.last_error))
        result: Deferred[Link] = Deferred()

        def answer(ready: bool) -> None:
            if timer.active():
                timer.cancel()
            if result.called:
                return
            if ready and self.link is not None:
                result.callback(self.link)
            else:
                result.errback(NotQueued("broker unavailable", self.last_error or "no connection in time"))

        timer = self.reactor.callLater(timeout, answer, False)
        self._waiters.append(answer)
        return result

    def stop(self) -> "Deferred[None]":
        """Stop for good: cancel retries and the attempt under way, close the connection."""
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
        try:
            closed = link.close()
        except Exception:
            closed = succeed(None)
        timer = self.reactor.callLater(self.connect_timeout, link.abort)

        def done(_: object) -> None:
            if timer.active():
                timer.cancel()

        return closed.addBoth(done)


# ---- the store ------------------------------------------------------------------------------------------------


@implementer(IQueueEntry)
class _Entry:
    """A message being written: content spooled (memory up to ``spool_max``, then disk) until `commit`."""

    def __init__(self, store: "AMQPStore") -> None:
        self._store = store
        self._spool: IO[bytes] | None = tempfile.SpooledTemporaryFile(max_size=store.spool_max)
        self._size = 0
        self._error: NotQueued | None = None
        self._done = False

    def write(self, data: bytes) -> None:
        """Append content; past the broker's limit (or on a spool error) the entry can only fail to commit."""
        if self._done:
            raise ValueError("this entry was already committed or discarded")
        if self._error is not None or self._spool is None:
            return
        self._size += len(data)
        limit = self._store.max_size - STATE_ROOM
        if self._size > limit:
            self._error = TooBig("message too big for the queue", f"over {limit} bytes")
            self._close()
            return
        try:
            self._spool.write(data)
        except OSError as e:
            self._error = NotQueued("cannot spool the message", str(e))
            self._close()

    def commit(self, message: Message) -> "Deferred[None]":
        """Publish ``message`` with the content; fires once the broker confirmed it."""
        if self._done:
            return fail(ValueError("this entry was already committed or discarded"))
        self._done = True
        spool, error = self._spool, self._error
        self._spool = None
        if error is not None or spool is None:
            return fail(error or NotQueued("nothing spooled"))
        try:
            spool.seek(0)
            content = spool.read()
        except OSError as e:
            return fail(NotQueued("cannot read back the spooled message", str(e)))
        finally:
            spool.close()
        return self._store.enqueue(message, content)

    def discard(self) -> None:
        """Forget the content."""
        self._done = True
        self._close()

    def _close(self) -> None:
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()


@implementer(IQueueStore, ICheckpoint)
class AMQPStore:
    """The outbound queue in RabbitMQ queue ``queue`` at ``url``: quorum queues, publisher confirms, one delay
    queue per retry interval of ``schedule`` (TTL and dead-lettering back to ``queue``, no broker plugin).

    ``concurrency`` bounds the attempts under way in this process (the consumer's prefetch). ``confirm_timeout``
    bounds every wait for the broker's ack (a connection under way included). ``failure_pause`` is how long a
    message whose attempt failed (the worker raised) stays with this runner before it is given back. ``max_size``
    is the broker's ``max_message_size``. ``attempt_timeout`` is how long one attempt may take (the runner defers
    what is still open then); keep it and `ATTEMPT_GRACE` twice below the broker's ``consumer_timeout``.
    ``counts_interval`` is how often a started store counts its queues for `watch_counts`. ``opener`` (tests)
    replaces the pika connection.
    """

    name = "amqp"
    log = Logger()

    def __init__(self, url: str = DEFAULT_URL, queue: str = DEFAULT_QUEUE, *, reactor: Any, schedule: "Schedule",
                 concurrency: int = 20, confirm_timeout: float = 30.0, connect_timeout: float = 10.0,
                 retry_min: float = 0.5, retry_max: float = 30.0, failure_pause: float = 5.0,
                 max_size: int = BROKER_MAX_SIZE, spool_max: int = 1024 * 1024, ca_file: str | None = None,
                 attempt_timeout: float = ATTEMPT_TIMEOUT, counts_interval: float = COUNTS_INTERVAL,
                 opener: Callable[[], "Deferred[Link]"] | None = None) -> None:
        if not queue:
            raise ValueError("queue must be named")
        if int(concurrency) < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency!r}")
        if int(max_size) <= STATE_ROOM:
            raise ValueError(f"max_size must be over {STATE_ROOM} bytes, not {max_size!r}")
        self.queue = queue
        self.reactor = reactor
        self.schedule = schedule
        self.concurrency = int(concurrency)
        self.confirm_timeout = _positive("confirm_timeout", confirm_timeout)
        self.failure_pause = max(0.0, float(failure_pause))
        self.max_size = int(max_size)
        self.spool_max = max(1, int(spool_max))  # SpooledTemporaryFile reads 0 as "never roll over"
        self.attempt_timeout = _positive("attempt_timeout", attempt_timeout)
        self.counts_interval = _positive("counts_interval", counts_interval)
        #: The longest a delivery stays with this runner before it is acknowledged or given back.
        self.hold_limit = self.attempt_timeout + 2 * ATTEMPT_GRACE
        intervals = sorted({float(s) for s in schedule.intervals() if float(s) > 0})
        if not intervals:
            raise ValueError("the schedule gives no retry interval")
        #: Retry interval (seconds) -> its delay queue, shortest first.
        self.delay_queues: dict[float, str] = {s: delay_queue_name(queue, s) for s in intervals}
        #: Where messages that do not decode are kept (published unchanged, never consumed here).
        self.unreadable_queue = f"{queue}.unreadable"
        #: Every queue declared on each connection, with its arguments.
        self.topology: dict[str, dict[str, Any]] = {queue: {**QUORUM, "x-delivery-limit": DELIVERY_LIMIT}}
        for seconds, name in self.delay_queues.items():
            self.topology[name] = delay_queue_arguments(queue, seconds)
        self.topology[self.unreadable_queue] = dict(QUORUM)
        self.broker = Broker(url, reactor=reactor, topology=self.topology, connect_timeout=connect_timeout,
                             retry_min=retry_min, retry_max=retry_max, ca_file=ca_file, opener=opener,
                             on_ready=self._ready)
        self._worker: Worker | None = None
        self._stopping = False
        self._stopped: Deferred[None] | None = None
        self._consumer: tuple[Link, str, int] | None = None  # link, consumer tag, prefetch
        self._running: dict[Deferred[None], Link] = {}
        self._pauses: dict[Deferred[None], tuple[IDelayedCall, Link]] = {}
        self._flushing = DeferredLock()
        self._save_failures: OrderedDict[str, int] = OrderedDict()  # id -> new states refused in a row
        self._counts_listener: Callable[[Mapping[str, int]], None] | None = None
        self._counts_loop: LoopingCall | None = None
        self._counting = False

    # ---- writing ----------------------------------------------------------------------------------------------

    def open_entry(self) -> IQueueEntry:
        """A new entry to write one message into; its commit publishes to the main queue."""
        return _Entry(self)

    def enqueue(self, message: Message, content: bytes) -> "Deferred[None]":
        """Publish a message to the main queue; fires once the broker confirmed it (`NotQueued`, `TooBig` else)."""
        body = encode(message, content)
        if len(body) + STATE_ROOM > self.max_size:
            return fail(TooBig("message too big for the queue", f"{len(body)} bytes, limit {self.max_size}"))
        return self._publish(self.queue, body, message)

    def _properties(self, message: Message) -> dict[str, Any]:
        return {"message_id": message.id, "timestamp": int(self.reactor.seconds()),
                "headers": {"format": FORMAT, "attempts": message.attempts}}

    def _publish(self, queue: str, body: bytes, message: Message) -> "Deferred[None]":
        """Publish on the current link (waiting for one under way), all within ``confirm_timeout``."""
        async def send() -> None:
            link = await self.broker.when_ready(self.confirm_timeout)
            await self._confirmed(link, queue, body, self._properties(message))

        return self._within(Deferred.fromCoroutine(send()), self.confirm_timeout)

    async def _confirmed(self, link: Link, queue: str, body: bytes, properties: Mapping[str, Any]) -> None:
        try:
            await self._within(link.publish(queue, body, properties), self.confirm_timeout)
        except Unroutable as e:
            self.broker.drop(link, f"queue {queue} is missing ({e.detail or e.reason})")
            raise

    def _within(self, waiting: "Deferred[T]", timeout: float) -> "Deferred[T]":
        """``waiting``'s result, or `NotQueued` when it has not come within ``timeout`` seconds."""
        result: Deferred[T] = Deferred()

        def settle(outcome: Any) -> None:
            if timer.active():
                timer.cancel()
            if result.called:
                return
            if isinstance(outcome, Failure):
                if not outcome.check(NotQueued):
                    outcome = Failure(NotQueued("no confirmation from the broker",
                                                _describe(outcome, "cancelled")))
                result.errback(outcome)
            else:
                result.callback(outcome)

        timer = self.reactor.callLater(
            timeout, settle, Failure(NotQueued(f"no confirmation from the broker within {timeout:g} s")))
        waiting.addBoth(settle)
        return result

    # ---- running ----------------------------------------------------------------------------------------------

    def start(self, worker: Worker) -> None:
        """Consume the main queue, handing each message to ``worker``; at most ``concurrency`` at a time."""
        if self._worker is not None:
            raise RuntimeError("this store was already started")
        self._worker = worker
        self.broker.start()
        link = self.broker.link
        if link is not None:
            self._ready(link)
        self._start_counting()

    @property
    def running(self) -> int:
        """Attempts under way in this process (the worker's, and the saving of their outcome)."""
        return len(self._running)

    def _ready(self, link: Link) -> None:
        if self._worker is None or self._stopping:
            return
        consumer = self._consumer
        if consumer is not None and consumer[0] is link:
            return
        link.lost.addCallback(self._lost, link)
        orphans = sum(1 for other in self._running.values() if other is not link)
        self._consume(link, max(1, self.concurrency - orphans))

    def _consume(self, link: Link, prefetch: int) -> None:
        self._consumer = None

        def consuming(tag: str) -> None:
            self._consumer = (link, tag, prefetch)

        def refused(failure: Failure) -> None:
            self.broker.drop(link, f"cannot consume {self.queue}: {_describe(failure, 'cancelled')}")

        link.consume(self.queue, prefetch, functools.partial(self._delivered, link)).addCallbacks(
            consuming, refused)

    def _widen(self) -> None:
        """Consume with the full prefetch again once attempts left over from a lost connection have ended."""
        consumer = self._consumer
        if consumer is None or self._stopping:
            return
        link, tag, prefetch = consumer
        if prefetch >= self.concurrency or link.lost.called:
            return
        if any(other is not link for other in self._running.values()):
            return
        self._consumer = None

        def again(_: object) -> None:
            if not link.lost.called and not self._stopping:
                self._consume(link, self.concurrency)

        link.cancel(tag).addCallbacks(again, lambda f: self.broker.drop(link, "cannot cancel the consumer"))

    def _delivered(self, link: Link, delivery: Delivery) -> None:
        if self._stopping or self._worker is None:
            _nack(link, delivery.tag)
            return
        attempt = Deferred.fromCoroutine(self._attempt(link, delivery.tag, delivery.body, self._worker))
        if attempt.called:
            return
        self._running[attempt] = link

        def ended(_: object) -> None:
            self._running.pop(attempt, None)
            self._widen()

        attempt.addBoth(ended)

    async def _attempt(self, link: Link, tag: int, body: bytes, worker: Worker) -> None:
        """One message: the worker, then its new state stored (or the message forgotten), then the ack."""
        started = self.reactor.seconds()
        try:
            message, content = decode(body)
        except ValueError as e:
            self.log.error("unreadable message in {queue} ({why}); moved to {target}", queue=self.queue, why=str(e),
                           target=self.unreadable_queue)
            await self._set_aside(link, tag, body, str(e), {"timestamp": int(started)})
            return
        del body  # the content is a copy: keep one
        original = message.copy()  # the state as it was, whatever the worker does to its own
        try:
            result = await self._overdue(maybeDeferred(worker, message, functools.partial(io.BytesIO, content)))
            if not isinstance(result, Message):
                raise TypeError(f"the worker returned {type(result).__name__}, not a Message")
        except AttemptOverdue as e:
            self.log.error("message {id}: {why}; given back now, before the broker's consumer timeout",
                           id=message.id, why=str(e))
            _nack(link, tag)
            return
        except Exception:
            self.log.failure("attempt on message {id} failed; it is given back in {pause:g} s",
                             id=message.id, pause=self.failure_pause)
            await self._give_back(link, tag)
            return
        if link.lost.called:
            self.log.info("message {id}: connection lost during the attempt; the broker gives it out again",
                          id=message.id)
            return
        if finished(result):
            self._save_failures.pop(result.id, None)
            _ack(link, tag)
            return
        target = self.delay_queue_for(result.attempts)
        new_body = self._fitted(result, content)
        if new_body is None:
            why = "its new state does not fit in one broker message"
            self.log.critical("message {id}: {why} (max_size {limit} bytes); moved in its old state to {target} "
                              "for a human to look at: deliveries of this attempt are not recorded there",
                              id=result.id, why=why, limit=self.max_size, target=self.unreadable_queue)
            await self._set_aside(link, tag, encode(original, content), why, self._properties(original))
            return
        try:
            await self._confirmed(link, target, new_body, self._properties(result))
        except NotQueued as e:
            refused = self._save_failed(result.id)
            pause = min(self.schedule.delay(refused),
                        max(0.0, started + self.hold_limit - self.reactor.seconds()))
            self.log.error("message {id}: new state not stored in {queue} ({why}); given back in {pause:g} s in its "
                           "old state (the deliveries of this attempt will be made again)",
                           id=result.id, queue=target, why=str(e), pause=pause)
            await self._give_back(link, tag, pause)
            return
        self._save_failures.pop(result.id, None)
        if not _ack(link, tag):
            self.log.warn("message {id}: connection lost after its new state was stored; the old state comes back"
                          " too (delivered twice at worst)", id=result.id)

    def checkpoint(self, message: Message) -> "Deferred[None]":
        """Saves nothing: a queued message is one broker message, whose state changes only by publishing a new one
        and acknowledging the old, which would end the attempt. A runner killed mid-attempt therefore leaves the
        whole attempt to be made again, domains already delivered included (docs/queue-amqp.md)."""
        return succeed(None)

    def _overdue(self, working: "Deferred[T]") -> "Deferred[T]":
        """``working``'s result, or `AttemptOverdue` once ``attempt_timeout`` + `ATTEMPT_GRACE` have passed."""
        limit = self.attempt_timeout + ATTEMPT_GRACE
        result: Deferred[T] = Deferred()

        def settle(outcome: Any) -> None:
            if timer.active():
                timer.cancel()
            if not result.called:
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(outcome)

        timer = self.reactor.callLater(limit, settle, Failure(AttemptOverdue(f"no answer within {limit:g} s")))
        working.addBoth(settle)
        return result

    def _fitted(self, message: Message, content: bytes) -> bytes | None:
        """The body of ``message``'s new state, trimmed if need be to fit in ``max_size``: the outcomes of final
        recipients owed nothing more are dropped, the others' texts cut to `TRIMMED_TEXT`; None if it still
        does not fit."""
        body = encode(message, content)
        if len(body) <= self.max_size:
            return body
        trimmed = message.copy()
        for index, recipient in enumerate(trimmed.recipients):
            if recipient.outcome is None:
                continue
            if recipient.status is not Status.PENDING and final_notice(trimmed, index) is None:
                recipient.outcome = None
            else:
                recipient.outcome = replace(recipient.outcome, text=recipient.outcome.text[:TRIMMED_TEXT])
        body = encode(trimmed, content)
        if len(body) > self.max_size:
            return None
        self.log.warn("message {id}: new state trimmed to fit in one broker message", id=message.id)
        return body

    def _save_failed(self, id: str) -> int:
        """Count one more refused new state for ``id``; how many in a row (a bounded memory of ids)."""
        count = self._save_failures.pop(id, 0) + 1
        self._save_failures[id] = count
        while len(self._save_failures) > _SAVE_FAILURES_KEPT:
            self._save_failures.popitem(last=False)
        return count

    def delay_queue_for(self, attempts: int) -> str:
        """The delay queue for a message after ``attempts`` attempts: the shortest interval at least the
        schedule's delay (the longest when none is)."""
        wanted = self.schedule.delay(max(1, attempts))
        for seconds, name in self.delay_queues.items():
            if seconds >= wanted - 1e-6:
                return name
        return list(self.delay_queues.values())[-1]

    async def _set_aside(self, link: Link, tag: int, body: bytes, why: str, properties: Mapping[str, Any]) -> None:
        """Keep ``body`` in the ``.unreadable`` queue (with a ``reason`` header), then ack the delivery."""
        headers = {**dict(properties.get("headers") or {}), "reason": why[:200]}
        try:
            await self._confirmed(link, self.unreadable_queue, body, {**properties, "headers": headers})
        except NotQueued as e:
            self.log.error("cannot move the message to {target}: {why}", target=self.unreadable_queue, why=str(e))
            await self._give_back(link, tag)
            return
        _ack(link, tag)

    async def _give_back(self, link: Link, tag: int, pause: float | None = None) -> None:
        """Requeue a delivery after ``pause`` seconds (``failure_pause`` by default, so that a failing message does
        not spin); a lost link has given it back already."""
        if link.lost.called:
            return
        await self._pause(link, self.failure_pause if pause is None else pause)
        _nack(link, tag)

    def _pause(self, link: Link, seconds: float) -> "Deferred[None]":
        """Fires after ``seconds``, or at once when ``link`` is lost or the store stops."""
        done: Deferred[None] = Deferred()
        if self._stopping or seconds <= 0:
            done.callback(None)
            return done

        def over() -> None:
            self._pauses.pop(done, None)
            done.callback(None)

        self._pauses[done] = (self.reactor.callLater(seconds, over), link)
        return done

    def _end_pauses(self, link: Link | None = None) -> None:
        """End the pauses of attempts on ``link`` (every pause when None)."""
        for done, (call, on) in list(self._pauses.items()):
            if link is None or on is link:
                del self._pauses[done]
                if call.active():
                    call.cancel()
                done.callback(None)

    def _lost(self, reason: str, link: Link) -> str:
        self._end_pauses(link)
        return reason

    def stop(self) -> "Deferred[None]":
        """Cancel the consumer, wait for the attempts under way (their state saved or given back), then close."""
        if self._stopped is None:
            self._stopped = Deferred.fromCoroutine(self._stop())
            self._stopped.addErrback(lambda f: self.log.failure("stopping the AMQP queue store failed", f))
        result: Deferred[None] = Deferred()
        self._stopped.addCallback(lambda _: result.callback(None))
        return result

    async def _stop(self) -> None:
        self._stopping = True
        loop, self._counts_loop = self._counts_loop, None
        if loop is not None and loop.running:
            loop.stop()
        consumer, self._consumer = self._consumer, None
        if consumer is not None and not consumer[0].lost.called:
            try:
                await self._within(consumer[0].cancel(consumer[1]), self.confirm_timeout)
            except NotQueued:
                pass
        self._end_pauses()
        if self._running:
            await DeferredList(list(self._running), consumeErrors=True)
        await self.broker.stop()

    # ---- management -------------------------------------------------------------------------------------------

    def watch_counts(self, listener: Callable[[Mapping[str, int]], None]) -> None:
        """Once started, every ``counts_interval`` seconds while the broker is reachable, give ``listener`` the
        messages waiting (``queued``: the main and delay queues, and this runner's attempts; other runners'
        attempts are not counted), ``held`` (always 0: nothing is held here) and ``active`` (this runner's)."""
        self._counts_listener = listener
        if self._worker is not None:
            self._start_counting()

    def _start_counting(self) -> None:
        if self._counts_listener is None or self._counts_loop is not None or self._stopping:
            return
        loop = self._counts_loop = LoopingCall(self._count)
        loop.clock = self.reactor
        loop.start(self.counts_interval, now=False)

    def _count(self) -> None:
        listener = self._counts_listener
        if listener is None or self._counting or self.broker.state is not State.READY:
            return
        self._counting = True

        def counted(found: Mapping[str, int]) -> None:
            waiting = sum(n for name, n in found.items() if name != self.unreadable_queue)
            listener({"queued": waiting + self.running, "held": 0, "active": self.running})

        def ended(result: object) -> None:
            self._counting = False
            if isinstance(result, Failure):
                self.log.debug("cannot count the queues: {why}", why=str(result.value))

        self.counts().addCallback(counted).addBoth(ended)

    def counts(self) -> "Deferred[dict[str, int]]":
        """Messages ready in each queue (main, every delay queue, unreadable), by passive declaration.

        Messages handed to a runner and not yet acknowledged are not counted.
        """
        async def count() -> dict[str, int]:
            link = await self.broker.when_ready(self.confirm_timeout)
            found = {}
            for name in self.topology:
                found[name] = await self._within(link.declare(name, {}, passive=True), self.confirm_timeout)
            return found

        return Deferred.fromCoroutine(count())

    def flush(self) -> "Deferred[int]":
        """Move every message waiting in a delay queue to the main queue now; fires with how many moved.

        Each is published to the main queue with confirm, then acknowledged in its delay queue; at most as many
        as each queue held at the start are moved (runners may be adding more meanwhile).
        """
        return self._flushing.run(lambda: Deferred.fromCoroutine(self._flush()))

    async def _flush(self) -> int:
        link = await self.broker.when_ready(self.confirm_timeout)
        moved = 0
        for name in self.delay_queues.values():
            waiting = await self._within(link.declare(name, {}, passive=True), self.confirm_timeout)
            for _ in range(waiting):
                delivery = await self._within(link.get(name), self.confirm_timeout)
                if delivery is None:
                    break
                try:
                    message, _ = decode(delivery.body)
                    properties = self._properties(message)
                except ValueError:
                    properties = {"timestamp": int(self.reactor.seconds())}
                try:
                    await self._confirmed(link, self.queue, delivery.body, properties)
                except NotQueued:
                    _nack(link, delivery.tag)
                    raise
                _ack(link, delivery.tag)
                moved += 1
        return moved


def _ack(link: Link, tag: int) -> bool:
    """Ack on ``link`` if it is still open; False when it is gone (the broker gives the message out again)."""
    if link.lost.called:
        return False
    try:
        link.ack(tag)
    except Exception:
        return False
    return True


def _nack(link: Link, tag: int) -> None:
    """Give a delivery back to its queue, if its link is still open (a closed one gave it back already)."""
    if link.lost.called:
        return
    try:
        link.nack(tag, True)
    except Exception:
        pass


# ---- the pika link --------------------------------------------------------------------------------------------


async def _open_pika_link(reactor: Any, url: str, ca_file: str | None, timeout: float) -> Link:
    """Connect with pika's Twisted adapter and open a confirm-mode channel."""
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

        props = BasicProperties(content_type=CONTENT_TYPE, delivery_mode=DeliveryMode.Persistent, app_id="esmtpkit",
                                **properties)
        try:
            confirmed = self.channel.basic_publish(exchange="", routing_key=queue, body=body, properties=props,
                                                   mandatory=True)
        except Exception as e:
            return fail(NotQueued("cannot publish", str(e)))

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

