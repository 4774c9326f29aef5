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
broker does not take is retried only after a pause, and one too big for it is set aside. The connection itself
(reconnection, confirms, timeouts) is a `esmtpkit.queue.broker.Broker`. See docs/queue-amqp.md.
"""

from __future__ import annotations

import functools
import io
import json
import tempfile
from collections import OrderedDict
from dataclasses import replace
from typing import IO, TYPE_CHECKING, Any, Callable, Mapping, TypeVar

from twisted.internet.defer import Deferred, DeferredLock, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpkit.core.outbound import Message, Status
from esmtpkit.queue.broker import (BROKER_MAX_SIZE, DEFAULT_URL, QUORUM, Broker, Delivery, Link, NotQueued, State,
                                   Unroutable, deadline, describe, positive, within)
from esmtpkit.queue.broker import check_url, safe_url  # esmtpkit.cli.queuectl imports them from here
from esmtpkit.queue.interfaces import (ICheckpoint, IQueueEntry, IQueueStore, MessageTooBig, Worker, final_notice,
                                      finished)

if TYPE_CHECKING:
    from esmtpkit.core.schedule import Schedule

__all__ = ["AMQPStore", "Broker", "Delivery", "Link", "State", "NotQueued", "TooBig", "Unroutable",
           "encode", "decode", "delay_queue_name", "DEFAULT_URL", "DEFAULT_QUEUE", "BROKER_MAX_SIZE",
           "STATE_ROOM", "CONTENT_TYPE", "DELIVERY_LIMIT", "ATTEMPT_TIMEOUT", "ATTEMPT_GRACE", "COUNTS_INTERVAL",
           "TRIMMED_TEXT", "AttemptOverdue"]

T = TypeVar("T")

DEFAULT_QUEUE = "outbound"
#: Room kept free in every message for its delivery state to grow (outcomes of later attempts) under the limit.
STATE_ROOM = 64 * 1024
#: The AMQP ``content_type`` of a queued message: one JSON line (the `Message`), ``LF``, then the content.
CONTENT_TYPE = "application/x-esmtpkit-queued"
#: The ``format`` header of a queued message; a body that does not decode goes to the ``.unreadable`` queue.
FORMAT = 1

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


class TooBig(NotQueued, MessageTooBig):
    """The message cannot fit in one broker message (``max_size``): retrying cannot help, so it is also the shared
    `MessageTooBig` (the Queue handler answers 552 5.3.4)."""


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
        self.confirm_timeout = positive("confirm_timeout", confirm_timeout)
        self.failure_pause = max(0.0, float(failure_pause))
        self.max_size = int(max_size)
        self.spool_max = max(1, int(spool_max))  # SpooledTemporaryFile reads 0 as "never roll over"
        self.attempt_timeout = positive("attempt_timeout", attempt_timeout)
        self.counts_interval = positive("counts_interval", counts_interval)
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
        self._pauses = _Pauses(reactor)
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
        return self._send(self.queue, body, self._properties(message))

    def _properties(self, message: Message) -> dict[str, Any]:
        return {"message_id": message.id, "timestamp": int(self.reactor.seconds()),
                "headers": {"format": FORMAT, "attempts": message.attempts}}

    def _send(self, queue: str, body: bytes, properties: Mapping[str, Any],
              link: Link | None = None) -> "Deferred[None]":
        """Publish a queued message's body on ``link`` (or the current one, waiting for one under way); fires once
        the broker confirmed it, all within ``confirm_timeout``."""
        return self.broker.send(queue, body, {"content_type": CONTENT_TYPE, **properties}, self.confirm_timeout, link)

    def _within(self, waiting: "Deferred[T]") -> "Deferred[T]":
        """``waiting``'s result, or `NotQueued` when it has not come within ``confirm_timeout``."""
        return within(self.reactor, waiting, self.confirm_timeout)

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
            self.broker.drop(link, f"cannot consume {self.queue}: {describe(failure, 'cancelled')}")

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
        limit = self.attempt_timeout + ATTEMPT_GRACE
        try:
            working = maybeDeferred(worker, message, functools.partial(io.BytesIO, content))
            result = await deadline(self.reactor, working, limit, AttemptOverdue(f"no answer within {limit:g} s"))
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
            await self._send(target, new_body, self._properties(result), link)
        except NotQueued as e:
            refused = _one_more(self._save_failures, result.id)
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

    def _fitted(self, message: Message, content: bytes) -> bytes | None:
        """The body of ``message``'s new state, `_trimmed` if need be to fit in ``max_size``; None if it still does
        not fit."""
        body = encode(message, content)
        if len(body) <= self.max_size:
            return body
        body = encode(_trimmed(message), content)
        if len(body) > self.max_size:
            return None
        self.log.warn("message {id}: new state trimmed to fit in one broker message", id=message.id)
        return body

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
            await self._send(self.unreadable_queue, body, {**properties, "headers": headers}, link)
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
        if not self._stopping:
            await self._pauses.wait(link, self.failure_pause if pause is None else pause)
        _nack(link, tag)

    def _lost(self, reason: str, link: Link) -> str:
        self._pauses.end(link)
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
                await self._within(consumer[0].cancel(consumer[1]))
            except NotQueued:
                pass
        self._pauses.end()
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
                found[name] = await self._within(link.declare(name, {}, passive=True))
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
            waiting = await self._within(link.declare(name, {}, passive=True))
            for _ in range(waiting):
                delivery = await self._within(link.get(name))
                if delivery is None:
                    break
                try:
                    message, _ = decode(delivery.body)
                    properties = self._properties(message)
                except ValueError:
                    properties = {"timestamp": int(self.reactor.seconds())}
                try:
                    await self._send(self.queue, delivery.body, properties, link)
                except NotQueued:
                    _nack(link, delivery.tag)
                    raise
                _ack(link, delivery.tag)
                moved += 1
        return moved


def _trimmed(message: Message) -> Message:
    """A copy of ``message`` with less state: the outcomes of final recipients owed nothing more dropped, the
    others' reply texts cut to `TRIMMED_TEXT`."""
    trimmed = message.copy()
    for index, recipient in enumerate(trimmed.recipients):
        if recipient.outcome is None:
            continue
        if recipient.status is not Status.PENDING and final_notice(trimmed, index) is None:
            recipient.outcome = None
        else:
            recipient.outcome = replace(recipient.outcome, text=recipient.outcome.text[:TRIMMED_TEXT])
    return trimmed


def _one_more(counts: OrderedDict[str, int], id: str) -> int:
    """Count one more refused new state for ``id``; how many in a row (the last `_SAVE_FAILURES_KEPT` ids)."""
    count = counts.pop(id, 0) + 1
    counts[id] = count
    while len(counts) > _SAVE_FAILURES_KEPT:
        counts.popitem(last=False)
    return count


class _Pauses:
    """Pauses before a delivery is given back, each ended early when the link it came on is lost (or all at once)."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._pending: dict[Deferred[None], tuple[IDelayedCall, Link]] = {}

    def wait(self, link: Link, seconds: float) -> "Deferred[None]":
        """Fires after ``seconds``, or at once when ``link`` is lost or `end` is called."""
        done: Deferred[None] = Deferred()
        if seconds <= 0:
            done.callback(None)
            return done

        def over() -> None:
            self._pending.pop(done, None)
            done.callback(None)

        self._pending[done] = (self._reactor.callLater(seconds, over), link)
        return done

    def end(self, link: Link | None = None) -> None:
        """End the pauses of deliveries on ``link`` (every pause when None)."""
        for done, (call, on) in list(self._pending.items()):
            if link is None or on is link:
                del self._pending[done]
                if call.active():
                    call.cancel()
                done.callback(None)


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
