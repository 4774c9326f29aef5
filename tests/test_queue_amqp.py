"""The RabbitMQ queue backend: stored only once the broker confirmed, acked only once the new state is stored.

Unit tests drive `AMQPStore` in memory (a `Clock` and a scripted link in place of pika). Integration tests run a
private RabbitMQ node (tests/rabbitmq.py) and, for the many-runners cases, runner processes on loopback; they are
skipped when Debian's ``rabbitmq-server`` or pika is not installed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from esmtpkit.core.outbound import Message, Outcome, Recipient, Status
from esmtpkit.core.schedule import Schedule
from esmtpkit.queue.amqp import (ATTEMPT_GRACE, ATTEMPT_TIMEOUT, CONTENT_TYPE, COUNTS_INTERVAL, STATE_ROOM, AMQPStore,
                                 Delivery, NotQueued, State, TooBig, Unroutable, decode, delay_queue_name, encode)
from esmtpkit.queue.interfaces import ICheckpoint, IQueueEntry, IQueueStore, MessageTooBig

from .rabbitmq import RabbitMQ, ScriptedLink, ScriptedOpener, private_node

ROOT = Path(__file__).resolve().parent.parent

CONTENT = b"Received: from client.test\r\nSubject: queued\r\n\r\n.leading dot\r\n8-bit \xe9\xff\r\n"


def message(id: str = "M1", recipients: int = 1, attempts: int = 0) -> Message:
    return Message(id=id, sender="alice@example.com",
                   recipients=[Recipient(f"rcpt{i}@example.net", notify=("FAILURE",)) for i in range(recipients)],
                   size=len(CONTENT), arrived=1000.0, attempts=attempts, extra={"note": "é"})


def delivered(m: Message) -> Message:
    for r in m.recipients:
        r.status = Status.DELIVERED
    return m


class Worker:
    """A worker whose attempts the test finishes by hand."""

    def __init__(self) -> None:
        self.calls: list[tuple[Message, bytes, Deferred[Message]]] = []

    def __call__(self, m: Message, open_content: Callable[[], Any]) -> "Deferred[Message]":
        result: Deferred[Message] = Deferred()
        self.calls.append((m, open_content().read(), result))
        return result


class StoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.opener = ScriptedOpener()
        self.store = AMQPStore("amqp://guest:secret@broker.test:5672/%2F", "outbound", reactor=self.clock,
                               schedule=Schedule(), concurrency=3, confirm_timeout=30, failure_pause=5,
                               opener=self.opener)
        self.worker = Worker()

    def tearDown(self) -> None:
        self.store.stop()
        if self.opener.attempts and not self.opener.attempts[-1].called:
            self.opener.attempts[-1].cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def connect(self) -> ScriptedLink:
        self.store.broker.start()
        return self.opener.succeed()

    def running(self) -> ScriptedLink:
        self.store.start(self.worker)
        return self.opener.succeed()

    def attempt(self, link: ScriptedLink, attempts: int) -> tuple[Message, Any]:
        """Deliver a message (tag 7); the worker's copy of it, with ``attempts`` made, and the Deferred it returns."""
        link.deliver(7, encode(message(), CONTENT))
        [(m, _, result)] = self.worker.calls
        m.attempts = attempts
        return m, result

    def test_provides_the_interfaces(self) -> None:
        self.assertTrue(verifyObject(IQueueStore, self.store))
        entry = self.store.open_entry()
        self.assertTrue(verifyObject(IQueueEntry, entry))
        entry.discard()
        self.assertEqual(self.store.name, "amqp")

    def test_topology_is_declared_on_connecting(self) -> None:
        """The main quorum queue, one delay queue per interval (TTL, at-least-once dead-lettering back), unreadable."""
        link = self.connect()
        delay = {
            "x-queue-type": "quorum", "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "outbound",
            "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish",
        }
        self.assertEqual(link.declared, [
            ("outbound", {"x-queue-type": "quorum", "x-delivery-limit": 1_000_000}, False),
            ("outbound.delay.300", {**delay, "x-message-ttl": 300_000}, False),
            ("outbound.delay.600", {**delay, "x-message-ttl": 600_000}, False),
            ("outbound.delay.1200", {**delay, "x-message-ttl": 1_200_000}, False),
            ("outbound.delay.2400", {**delay, "x-message-ttl": 2_400_000}, False),
            ("outbound.delay.4000", {**delay, "x-message-ttl": 4_000_000}, False),
            ("outbound.unreadable", {"x-queue-type": "quorum"}, False),
        ])
        self.assertIs(self.store.broker.state, State.READY)
        self.assertEqual(link.consumers, [])  # not started: nothing consumed

    def test_delay_queue_names(self) -> None:
        self.assertEqual(delay_queue_name("q", 1.0), "q.delay.1")
        self.assertEqual(delay_queue_name("q", 0.5), "q.delay.0.5")
        self.assertEqual([self.store.delay_queue_for(n) for n in (0, 1, 2, 3, 4, 5, 40)],
                         ["outbound.delay.300", "outbound.delay.300", "outbound.delay.600", "outbound.delay.1200",
                          "outbound.delay.2400", "outbound.delay.4000", "outbound.delay.4000"])

    def test_format_round_trip(self) -> None:
        m = message(recipients=2)
        body = encode(m, CONTENT)
        self.assertEqual(body.count(b"\n"), CONTENT.count(b"\n") + 1)
        again, content = decode(body)
        self.assertEqual(again, m)
        self.assertEqual(content, CONTENT)
        for bad in (b"no newline", b"{not json\n", b"[1, 2]\nx", b'{"id": "x"}\n'):
            with self.assertRaises(ValueError):
                decode(bad)

    def test_commit_fires_only_on_the_brokers_ack(self) -> None:
        link = self.connect()
        entry = self.store.open_entry()
        for i in range(0, len(CONTENT), 7):
            entry.write(CONTENT[i:i + 7])
        committed = entry.commit(message())
        self.assertNoResult(committed)
        [published] = link.published
        self.assertEqual(published["queue"], "outbound")
        self.assertEqual(decode(published["body"]), (message(), CONTENT))
        self.assertEqual((published["properties"]["message_id"], published["properties"]["content_type"]),
                         ("M1", CONTENT_TYPE))
        published["confirm"].callback(None)
        self.assertIsNone(self.successResultOf(committed))
        self.assertIsInstance(self.failureResultOf(entry.commit(message())).value, ValueError)

    def test_commit_fails_on_nack_timeout_or_lost_connection(self) -> None:
        link = self.connect()
        nacked = self.store.enqueue(message("A"), CONTENT)
        link.published[-1]["confirm"].errback(NotQueued("the broker refused it (nack)"))
        self.assertEqual(self.failureResultOf(nacked, NotQueued).value.reason, "the broker refused it (nack)")
        late = self.store.enqueue(message("B"), CONTENT)
        self.clock.advance(30)
        self.assertIn("within 30 s", self.failureResultOf(late, NotQueued).value.reason)
        link.published[-1]["confirm"].callback(None)  # too late: nothing happens
        lost = self.store.enqueue(message("C"), CONTENT)
        link.drop()
        self.failureResultOf(lost, NotQueued)
        down = self.store.enqueue(message("D"), CONTENT)  # down: refused at once, no publish
        self.assertEqual(self.failureResultOf(down, NotQueued).value.reason, "broker unavailable")
        self.assertEqual(len(link.published), 3)
        self.clock.advance(0.5)
        self.opener.succeed()

    def test_commit_waits_for_a_connection_under_way(self) -> None:
        committed = self.store.enqueue(message(), CONTENT)
        self.assertNoResult(committed)
        link = self.opener.succeed()
        link.published[0]["confirm"].callback(None)
        self.successResultOf(committed)

    def test_broker_unreachable_then_reachable(self) -> None:
        committed = self.store.enqueue(message(), CONTENT)
        self.opener.refuse()
        self.assertIn("nobody listening", str(self.failureResultOf(committed, NotQueued).value))
        self.assertIs(self.store.broker.state, State.DOWN)
        self.clock.advance(0.5)
        self.opener.refuse()
        self.clock.advance(0.5)
        self.assertEqual(len(self.opener.attempts), 2)  # backoff doubled: not yet
        self.clock.advance(0.5)
        self.opener.succeed()
        self.assertIs(self.store.broker.state, State.READY)

    def test_too_big_for_the_broker_is_refused_without_publishing(self) -> None:
        store = AMQPStore("amqp://broker.test/", reactor=self.clock, schedule=Schedule(), opener=self.opener,
                          max_size=STATE_ROOM + 1000)
        entry = store.open_entry()
        entry.write(b"x" * 600)
        entry.write(b"x" * 600)
        self.assertIsInstance(self.failureResultOf(entry.commit(message()), NotQueued).value, TooBig)
        self.failureResultOf(store.enqueue(message(), b"x" * 1200), TooBig)
        # The shared exception of the queue contract: the Queue handler answers 552 5.3.4 for it, not 451.
        self.failureResultOf(store.enqueue(message(), b"x" * 1200), MessageTooBig)
        self.assertEqual(self.opener.attempts, [])
        store.stop()

    def test_a_finished_message_is_acked_after_the_worker(self) -> None:
        link = self.running()
        self.assertEqual([(c["queue"], c["prefetch"]) for c in link.consumers], [("outbound", 3)])
        link.deliver(7, encode(message(), CONTENT))
        [(m, content, result)] = self.worker.calls
        self.assertEqual((m, content), (message(), CONTENT))
        self.assertEqual(link.acked, [])
        result.callback(delivered(m))
        self.assertEqual(link.acked, [7])
        self.assertEqual(link.published, [])

    def test_pending_recipients_go_to_the_delay_queue_before_the_ack(self) -> None:
        link = self.running()
        m, result = self.attempt(link, 2)
        result.callback(m)
        [published] = link.published
        self.assertEqual(published["queue"], "outbound.delay.600")  # delay(2) = 600 s
        self.assertEqual(decode(published["body"]), (m, CONTENT))
        self.assertEqual(published["properties"]["headers"]["attempts"], 2)
        self.assertEqual(link.acked, [])
        published["confirm"].callback(None)
        self.assertEqual(link.acked, [7])
        self.assertEqual(link.nacked, [])

    def test_new_state_refused_gives_the_message_back_after_a_backoff(self) -> None:
        """The broker does not take the new state: the delivery is given back unacked, but only after the schedule's
        delay (doubling while it goes on), so confirmed recipients are not delivered again in a tight loop."""
        link = self.running()
        for attempt, pause in ((1, 300), (2, 600)):
            link.deliver(7, encode(message(), CONTENT))
            m, _, result = self.worker.calls[-1]
            m.attempts = 1
            result.callback(m)
            link.published[-1]["confirm"].errback(NotQueued("the broker refused it (nack)"))
            self.clock.advance(pause - 1)
            self.assertEqual((len(link.nacked), self.store.running), (attempt - 1, 1))
            self.clock.advance(1)
            self.assertEqual(link.nacked[-1], (7, True))
            self.assertEqual(self.store.running, 0)
        self.assertEqual(link.acked, [])

    def test_the_backoff_ends_before_the_brokers_consumer_timeout(self) -> None:
        """However long the backoff, a delivery is not held past ``hold_limit`` (attempt_timeout + 2 × grace)."""
        link = self.running()
        self.store._save_failures["M1"] = 10  # refused many times before: the schedule's delay is 4000 s
        link.deliver(7, encode(message(), CONTENT))
        m, _, result = self.worker.calls[0]
        self.clock.advance(1000)
        m.attempts = 1
        result.callback(m)
        link.published[-1]["confirm"].errback(NotQueued("the broker refused it (nack)"))
        self.clock.advance(self.store.hold_limit - 1000 - 1)
        self.assertEqual(link.nacked, [])
        self.clock.advance(1)
        self.assertEqual(link.nacked, [(7, True)])
        self.assertLess(self.store.hold_limit, 30 * 60)  # RabbitMQ's default consumer_timeout

    def attempted_in_a_small_store(self, original: Message) -> tuple[AMQPStore, ScriptedLink, Message, Any]:
        """A started store with room for 2000 bytes of state, the worker attempting ``original`` (delivery 7)."""
        store = AMQPStore("amqp://broker.test/", reactor=self.clock, schedule=Schedule(), opener=self.opener,
                          max_size=STATE_ROOM + 2000)
        store.start(self.worker)
        link = self.opener.succeed()
        link.deliver(7, encode(original, CONTENT))
        m, _, result = self.worker.calls[0]
        m.attempts = 1
        return store, link, m, result

    def test_a_new_state_too_big_for_the_broker_is_trimmed(self) -> None:
        """Outcomes the message no longer needs (final, reported) are dropped, the others' texts cut."""
        store, link, m, result = self.attempted_in_a_small_store(message(recipients=150))
        for r in m.recipients[:149]:
            r.status, r.reported = Status.FAILED, True
            r.outcome = Outcome(550, "5.1.1", "x" * 500, "mx.example.net[192.0.2.1]")
        m.recipients[149].outcome = Outcome(451, "4.7.1", "y" * 500, "mx.example.net[192.0.2.1]")
        self.assertGreater(len(encode(m, CONTENT)), store.max_size)
        result.callback(m)
        [published] = link.published
        self.assertEqual(published["queue"], "outbound.delay.300")
        kept, _ = decode(published["body"])
        self.assertEqual([r.outcome for r in kept.recipients[:149]], [None] * 149)
        self.assertEqual(kept.recipients[149].outcome.text, "y" * 64)
        published["confirm"].callback(None)
        self.assertEqual(link.acked, [7])
        store.stop()

    def test_a_new_state_that_cannot_fit_is_set_aside_not_given_back(self) -> None:
        """Still too big once trimmed: the message goes, in its old state, to the unreadable queue with a reason
        (and a critical log line); it is not given back to be attempted again forever."""
        original = message(recipients=1)
        store, link, m, result = self.attempted_in_a_small_store(original)
        m.extra["note"] = "z" * (store.max_size + 1)  # nothing trimming can shorten
        result.callback(m)
        [published] = link.published
        self.assertEqual(published["queue"], "outbound.unreadable")
        self.assertEqual(decode(published["body"]), (original, CONTENT))
        self.assertIn("does not fit", published["properties"]["headers"]["reason"])
        published["confirm"].callback(None)
        self.assertEqual((link.acked, link.nacked), ([7], []))
        store.stop()

    def test_a_worker_that_never_answers_is_given_up_before_the_consumer_timeout(self) -> None:
        link = self.running()
        self.assertEqual(self.store.attempt_timeout, ATTEMPT_TIMEOUT)
        link.deliver(7, encode(message(), CONTENT))
        self.clock.advance(ATTEMPT_TIMEOUT + ATTEMPT_GRACE - 1)
        self.assertEqual(link.nacked, [])
        self.clock.advance(1)
        self.assertEqual((link.nacked, self.store.running), ([(7, True)], 0))
        m, _, result = self.worker.calls[0]
        result.callback(delivered(m))  # too late: nothing more happens
        self.assertEqual(link.acked, [])

    def test_the_runner_ends_its_attempt_within_the_attempt_timeout(self) -> None:
        """With a deliverer that hangs, the runner gives the message back by ``attempt_timeout``: its new state
        (the recipient deferred) goes to a delay queue and the delivery is acked, long before RabbitMQ would close
        the channel (consumer_timeout)."""
        from esmtpkit.queue.runner import ATTEMPT_TIMED_OUT, QueueRunner

        class Hanging:
            def deliver(self, m: Message, indexes: Any, open_content: Any) -> "Deferred[Any]":
                return Deferred()

        store = AMQPStore("amqp://broker.test/", reactor=self.clock, schedule=Schedule(), opener=self.opener,
                          attempt_timeout=600)
        runner = QueueRunner(store, Hanging(), reactor=self.clock, schedule=Schedule(), hostname="mx.test")
        runner.start()
        link = self.opener.succeed()
        link.deliver(7, encode(message(), CONTENT))
        self.clock.advance(599)
        self.assertEqual(link.published, [])
        self.clock.advance(1)
        [published] = link.published
        saved, _ = decode(published["body"])
        self.assertEqual((published["queue"], saved.attempts), ("outbound.delay.300", 1))
        self.assertEqual(saved.recipients[0].outcome, ATTEMPT_TIMED_OUT)
        published["confirm"].callback(None)
        self.assertEqual(link.acked, [7])
        self.successResultOf(runner.stop())

    def test_checkpoints_save_nothing(self) -> None:
        self.assertTrue(verifyObject(ICheckpoint, self.store))
        self.assertIsNone(self.successResultOf(self.store.checkpoint(message())))
        self.assertEqual(self.opener.attempts, [])

    def test_started_it_counts_its_queues_every_minute(self) -> None:
        seen: list[dict[str, int]] = []
        self.store.watch_counts(lambda counts: seen.append(dict(counts)))
        link = self.running()
        link.ready = {"outbound": 2, "outbound.delay.300": 3, "outbound.unreadable": 4}
        link.deliver(7, encode(message(), CONTENT))
        self.assertEqual(seen, [])
        self.clock.advance(COUNTS_INTERVAL)
        self.assertEqual(seen, [{"queued": 6, "held": 0, "active": 1}])
        link.drop()
        self.clock.advance(COUNTS_INTERVAL)
        self.assertEqual(len(seen), 1, "no count while the broker is away")
        m, _, result = self.worker.calls[0]
        result.callback(delivered(m))
        self.clock.advance(0.5)
        self.opener.succeed()

    def test_worker_failure_gives_the_message_back_after_a_pause(self) -> None:
        link = self.running()
        link.deliver(7, encode(message(), CONTENT))
        self.worker.calls[0][2].errback(RuntimeError("boom"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(link.nacked, [])
        self.clock.advance(5)
        self.assertEqual(link.nacked, [(7, True)])
        self.assertEqual(link.acked, [])
        self.assertEqual(link.published, [])

    def test_connection_lost_during_an_attempt_acks_nothing_and_publishes_nothing(self) -> None:
        link = self.running()
        link.deliver(7, encode(message(), CONTENT))
        link.drop()
        [(m, _, result)] = self.worker.calls
        m.attempts = 1
        result.callback(m)
        self.assertEqual((link.published, link.acked, link.nacked), ([], [], []))
        self.clock.advance(0.5)
        again = self.opener.succeed()
        self.assertEqual([c["prefetch"] for c in again.consumers], [3])

    def test_connection_lost_while_the_new_state_awaits_its_confirm(self) -> None:
        link = self.running()
        m, result = self.attempt(link, 1)
        result.callback(m)
        link.drop()
        self.assertEqual((link.acked, link.nacked), ([], []))
        self.assertEqual(self.store.running, 0)
        self.clock.advance(0.5)
        self.opener.succeed()

    def test_attempts_left_from_a_lost_connection_count_against_the_prefetch(self) -> None:
        link = self.running()
        link.deliver(1, encode(message("A"), CONTENT))
        link.deliver(2, encode(message("B"), CONTENT))
        link.drop()
        self.clock.advance(0.5)
        again = self.opener.succeed()
        self.assertEqual([c["prefetch"] for c in again.consumers], [1])
        self.worker.calls[0][2].callback(delivered(self.worker.calls[0][0]))
        self.assertEqual(again.cancelled, [])
        self.worker.calls[1][2].callback(delivered(self.worker.calls[1][0]))
        self.assertEqual(again.cancelled, ["ctag1"])
        self.assertEqual([c["prefetch"] for c in again.consumers], [1, 3])
        self.assertEqual((link.acked, again.acked), ([], []))

    def test_unreadable_message_is_kept_aside(self) -> None:
        link = self.running()
        link.deliver(7, b"garbage without an envelope")
        self.assertEqual(self.worker.calls, [])
        [published] = link.published
        self.assertEqual((published["queue"], published["body"]), ("outbound.unreadable",
                                                                    b"garbage without an envelope"))
        self.assertEqual(published["properties"]["content_type"], CONTENT_TYPE)
        self.assertEqual(link.acked, [])
        published["confirm"].callback(None)
        self.assertEqual(link.acked, [7])

    def test_a_missing_queue_is_declared_again_on_the_same_connection(self) -> None:
        """A new state returned unroutable (its delay queue was deleted): that queue is declared again at once, with
        its arguments, and the connection (with the other attempts on it) is kept."""
        link = self.running()
        m, result = self.attempt(link, 1)
        result.callback(m)
        declared = len(link.declared)
        link.published[-1]["confirm"].errback(Unroutable("no queue to route it to", "queue 'x' is missing"))
        self.assertEqual(link.declared[declared:],
                         [("outbound.delay.300", self.store.topology["outbound.delay.300"], False)])
        self.assertFalse(link.aborted or link.closed)
        self.assertIs(self.store.broker.link, link)
        self.clock.advance(300)
        self.assertEqual(link.nacked, [(7, True)])

    def test_a_lost_connection_is_closed_politely_and_a_dropped_one_at_once(self) -> None:
        """Only the channel may have closed: what is left of the connection is closed, not cut. A link the store
        gives up on (it cannot consume) is dropped."""
        link = self.running()
        link.drop("channel closed: (406, 'PRECONDITION_FAILED')")
        self.assertEqual((link.closed, link.aborted), (True, False))
        self.assertEqual(self.store.broker.last_error, "channel closed: (406, 'PRECONDITION_FAILED')")
        self.clock.advance(0.5)
        again = self.opener.succeed()
        self.store.broker.drop(again, "cannot consume outbound")
        self.assertEqual((again.closed, again.aborted), (False, True))
        self.assertIs(self.store.broker.state, State.DOWN)
        self.clock.advance(1)
        self.opener.succeed()

    def test_stop_waits_for_attempts_under_way(self) -> None:
        link = self.running()
        link.deliver(7, encode(message(), CONTENT))
        stopped = self.store.stop()
        self.assertEqual(link.cancelled, ["ctag1"])
        self.assertNoResult(stopped)
        link.deliver(8, encode(message("late"), CONTENT))  # sent before the cancel took effect: given back
        self.assertEqual(link.nacked, [(8, True)])
        self.assertFalse(link.closed)
        self.worker.calls[0][2].callback(delivered(self.worker.calls[0][0]))
        self.assertEqual(link.acked, [7])
        self.successResultOf(stopped)
        self.assertTrue(link.closed)
        self.assertEqual(len(self.worker.calls), 1)

    def test_stop_ends_a_failure_pause(self) -> None:
        link = self.running()
        link.deliver(7, encode(message(), CONTENT))
        self.worker.calls[0][2].errback(RuntimeError("boom"))
        self.flushLoggedErrors(RuntimeError)
        stopped = self.store.stop()
        self.assertEqual(link.nacked, [(7, True)])
        self.successResultOf(stopped)

    def test_counts_and_flush(self) -> None:
        link = self.connect()
        link.ready = {"outbound": 2, "outbound.delay.300": 2, "outbound.delay.4000": 1}
        counts = self.successResultOf(self.store.counts())
        self.assertEqual(counts, {"outbound": 2, "outbound.delay.300": 2, "outbound.delay.600": 0,
                                  "outbound.delay.1200": 0, "outbound.delay.2400": 0, "outbound.delay.4000": 1,
                                  "outbound.unreadable": 0})
        bodies = [encode(message(f"M{i}", attempts=1), CONTENT) for i in range(3)]
        link.waiting = {"outbound.delay.300": [Delivery(11, bodies[0]), Delivery(12, bodies[1])],
                        "outbound.delay.4000": [Delivery(13, bodies[2])]}
        flushed = self.store.flush()
        for expected in range(3):
            self.assertNoResult(flushed)
            self.assertEqual(link.acked, [11, 12, 13][:expected])
            published = link.published[expected]
            self.assertEqual((published["queue"], published["body"]), ("outbound", bodies[expected]))
            published["confirm"].callback(None)
        self.assertEqual(self.successResultOf(flushed), 3)
        self.assertEqual(link.acked, [11, 12, 13])


# ---- integration: a real RabbitMQ ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker() -> Iterator[RabbitMQ]:
    yield from private_node()


def store_for(broker: RabbitMQ, queue: str, schedule: Schedule | None = None, **options: Any) -> AMQPStore:
    from twisted.internet import reactor

    return AMQPStore(broker.url, queue, reactor=reactor, schedule=schedule or Schedule(min_backoff=1, max_backoff=2),
                     connect_timeout=5, retry_min=0.1, retry_max=1, **options)


async def until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Poll ``condition`` until it holds; fail saying ``what`` was awaited after ``timeout`` seconds."""
    from twisted.internet import reactor

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.05, lambda: None)


async def settled(store: AMQPStore) -> dict[str, int]:
    """The queues' counts once every one is empty (a quorum queue may report late), or the last counts seen."""
    from twisted.internet import reactor

    deadline = time.monotonic() + 30
    while True:
        counts = await store.counts()
        if not any(counts.values()) or time.monotonic() > deadline:
            return counts
        await deferLater(reactor, 0.1, lambda: None)


async def one_message_until(store: AMQPStore, worker: Any, condition: Callable[[], bool], what: str) -> dict[str, int]:
    """Start ``store`` with ``worker``, queue one message, wait for ``condition``, then stop the store; the queues'
    counts once settled."""
    try:
        store.start(worker)
        await store.enqueue(message(), CONTENT)
        await until(condition, what)
        return await settled(store)
    finally:
        await store.stop()


async def consuming(broker: RabbitMQ, queue: str, count: int) -> None:
    """Wait until ``queue`` has ``count`` consumers (asked over a blocking connection, in a thread)."""
    from twisted.internet import reactor

    def consumers() -> int:
        connection = broker.connection()
        try:
            return int(connection.channel().queue_declare(queue, passive=True).method.consumer_count)
        finally:
            connection.close()

    deadline = time.monotonic() + 60
    while (found := await threads.deferToThread(consumers)) != count:
        assert time.monotonic() < deadline, f"{queue}: {found} consumers, not {count}"
        await deferLater(reactor, 0.1, lambda: None)


@pytest_twisted.ensureDeferred
async def test_queues_are_declared_with_the_documented_arguments(broker: RabbitMQ) -> None:
    """Declaring again with the same arguments is accepted; with another TTL, or as a classic queue, refused."""
    import pika.exceptions

    store = store_for(broker, "q-topology")
    try:
        counts = await store.counts()
    finally:
        await store.stop()
    assert counts == {"q-topology": 0, "q-topology.delay.1": 0, "q-topology.delay.2": 0, "q-topology.unreadable": 0}

    def redeclare() -> list[str]:
        outcomes = []
        connection = broker.connection()
        try:
            for name, arguments in store.topology.items():
                connection.channel().queue_declare(name, durable=True, arguments=arguments)
                outcomes.append("same")
            for name, arguments in (("q-topology", {}), ("q-topology.delay.1", {**store.topology[
                    "q-topology.delay.1"], "x-message-ttl": 5000})):
                try:
                    connection.channel().queue_declare(name, durable=True, arguments=arguments)
                    outcomes.append("accepted")
                except pika.exceptions.ChannelClosedByBroker as e:
                    outcomes.append(str(e.reply_code))
        finally:
            connection.close()
        return outcomes

    assert await threads.deferToThread(redeclare) == ["same"] * 4 + ["406", "406"]


@pytest_twisted.ensureDeferred
async def test_committed_message_reaches_the_worker_and_is_gone_when_done(broker: RabbitMQ) -> None:
    store = store_for(broker, "q-basic", spool_max=16)
    got: list[tuple[Message, bytes]] = []

    def worker(m: Message, open_content: Callable[[], Any]) -> "Deferred[Message]":
        got.append((m.copy(), open_content().read()))
        return succeed(delivered(m))

    try:
        entry = store.open_entry()
        for i in range(0, len(CONTENT), 10):
            entry.write(CONTENT[i:i + 10])
        await entry.commit(message())
        store.start(worker)
        await until(lambda: len(got) == 1, "the delivery")
        counts = await settled(store)
    finally:
        await store.stop()
    assert got == [(message(), CONTENT)]
    assert not any(counts.values()), counts


@pytest_twisted.ensureDeferred
async def test_pending_recipients_come_back_after_the_delay(broker: RabbitMQ) -> None:
    """Through the 1 s then the 2 s delay queue (TTL, dead-lettered back), with the attempts the worker counted."""
    store = store_for(broker, "q-retry")
    seen: list[tuple[int, str]] = []

    def worker(m: Message, open_content: Callable[[], Any]) -> "Deferred[Message]":
        seen.append((m.attempts, m.recipients[0].status.value))
        m.attempts += 1
        if m.attempts == 3:
            delivered(m)
        return succeed(m)

    counts = await one_message_until(store, worker, lambda: len(seen) == 3, "three attempts")
    assert seen == [(0, "pending"), (1, "pending"), (2, "pending")]
    assert not any(counts.values()), counts


@pytest_twisted.ensureDeferred
async def test_delayed_message_waits_in_its_delay_queue_until_flushed(broker: RabbitMQ) -> None:
    from twisted.internet import reactor

    store = store_for(broker, "q-flush", schedule=Schedule(min_backoff=600, max_backoff=1200))
    seen: list[int] = []

    def worker(m: Message, open_content: Callable[[], Any]) -> "Deferred[Message]":
        seen.append(m.attempts)
        m.attempts += 1
        return succeed(delivered(m) if m.attempts == 2 else m)

    try:
        store.start(worker)
        await store.enqueue(message(), CONTENT)
        await until(lambda: seen == [0], "the first attempt")
        deadline = time.monotonic() + 30
        while (waiting := await store.counts())["q-flush.delay.600"] != 1:
            assert time.monotonic() < deadline, waiting
            await deferLater(reactor, 0.05, lambda: None)
        assert waiting == {"q-flush": 0, "q-flush.delay.600": 1, "q-flush.delay.1200": 0, "q-flush.unreadable": 0}
        assert await store.flush() == 1
        await until(lambda: len(seen) == 2, "the second attempt")
        counts = await settled(store)
    finally:
        await store.stop()
    assert seen == [0, 1]
    assert not any(counts.values()), counts


@pytest_twisted.ensureDeferred
async def test_a_failed_attempt_acks_nothing(broker: RabbitMQ) -> None:
    """The worker fails: the message comes back in its old state (nothing was acked or stored in between)."""
    store = store_for(broker, "q-fail", failure_pause=0.1)
    seen: list[Message] = []

    def worker(m: Message, open_content: Callable[[], Any]) -> "Deferred[Message]":
        seen.append(m.copy())
        if len(seen) == 1:
            m.attempts = 5
            raise RuntimeError("the worker broke")
        return succeed(delivered(m))

    counts = await one_message_until(store, worker, lambda: len(seen) == 2, "the second attempt")
    assert seen == [message(), message()]
    assert not any(counts.values()), counts


# ---- many runners -------------------------------------------------------------------------------------------

RUNNER = '''\
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import globalLogBeginner, textFileLogObserver

from esmtpkit.core.outbound import Status
from esmtpkit.core.schedule import Schedule
from esmtpkit.queue.amqp import AMQPStore

url, queue, record, mode = sys.argv[1:5]
globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])


def note(line):
    with open(record, "a") as f:
        f.write(line + "\\n")


async def attempt(message, open_content):
    note(f"begin {message.id}")
    await deferLater(reactor, 3600 if mode == "slow" else 0.005, lambda: None)
    size = len(open_content().read())
    for recipient in message.recipients:
        recipient.status = Status.DELIVERED
    note(f"done {message.id} {size}")
    return message


store = AMQPStore(url, queue, reactor=reactor, schedule=Schedule(min_backoff=1, max_backoff=2), concurrency=5,
                  retry_min=0.2, retry_max=1)
store.start(lambda message, open_content: Deferred.fromCoroutine(attempt(message, open_content)))
reactor.addSystemEventTrigger("before", "shutdown", store.stop)
reactor.run()
'''


class Runner:
    """A runner process: an `AMQPStore` whose worker notes ``begin ID`` and ``done ID SIZE`` in a file."""

    def __init__(self, broker: RabbitMQ, queue: str, folder: Path, name: str, mode: str = "quick") -> None:
        script = folder / "runner.py"
        if not script.exists():
            script.write_text(RUNNER)
        self.record = folder / f"{name}.txt"
        self.record.touch()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen([sys.executable, str(script), broker.url, queue, str(self.record), mode],
                                        cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def lines(self, kind: str) -> list[str]:
        return [line.split()[1] for line in self.record.read_text().splitlines() if line.startswith(kind + " ")]

    def terminate(self) -> str:
        """Stop it cleanly (SIGTERM: its store stops), and return what it logged."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self._reap()

    def kill(self) -> str:
        """Crash it (SIGKILL), and return what it logged."""
        if self.process.poll() is None:
            self.process.kill()
        return self._reap()

    def _reap(self) -> str:
        if self.process.stderr is None or self.process.stderr.closed:
            self.process.wait()
            return ""
        try:
            _, errors = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, errors = self.process.communicate()
        return errors.decode(errors="replace")


@pytest_twisted.ensureDeferred
async def test_two_runner_processes_handle_each_message_once(broker: RabbitMQ, tmp_path: Path) -> None:
    runners = [Runner(broker, "q-two", tmp_path, name) for name in ("a", "b")]
    store = store_for(broker, "q-two")
    try:
        await store.counts()  # the queues exist before the runners consume
        await consuming(broker, "q-two", 2)
        ids = [f"T{n:03d}" for n in range(120)]
        await gatherResults([store.enqueue(message(id), CONTENT) for id in ids])
        await until(lambda: sum(len(r.lines("done")) for r in runners) >= len(ids), "every message handled")
        counts = await settled(store)
    finally:
        await store.stop()
        errors = [runner.terminate() for runner in runners]
    done = [runner.lines("done") for runner in runners]
    assert sorted(done[0] + done[1]) == ids, errors
    assert done[0] and done[1]  # the broker shared them out
    assert not any(counts.values()), counts
    assert all("Traceback" not in text for text in errors), errors
    assert all(runner.process.returncode == 0 for runner in runners), errors


@pytest_twisted.ensureDeferred
async def test_a_killed_runners_message_goes_to_the_other_runner(broker: RabbitMQ, tmp_path: Path) -> None:
    store = store_for(broker, "q-kill")
    slow = Runner(broker, "q-kill", tmp_path, "slow", mode="slow")
    quick: Runner | None = None
    try:
        await store.counts()
        await consuming(broker, "q-kill", 1)
        await store.enqueue(message("K1"), CONTENT)
        await until(lambda: slow.lines("begin") == ["K1"], "the first runner's attempt")
        quick = Runner(broker, "q-kill", tmp_path, "quick")
        await consuming(broker, "q-kill", 2)
        slow.kill()
        await until(lambda: quick.lines("done") == ["K1"], "the second runner's attempt")
        counts = await settled(store)
    finally:
        await store.stop()
        slow.kill()
        errors = quick.terminate() if quick is not None else ""
    assert (slow.lines("begin"), slow.lines("done")) == (["K1"], [])
    assert (quick.lines("begin"), quick.lines("done")) == (["K1"], ["K1"]), errors
    assert not any(counts.values()), counts


@pytest_twisted.ensureDeferred
async def test_broker_crash_while_publishing_loses_no_confirmed_message(broker: RabbitMQ) -> None:
    """Three publishers keep committing while the broker is crashed (SIGKILL) and restarted: every commit that
    fired is in the queue afterwards, once; the others failed (some of those may be stored all the same)."""
    from twisted.internet import reactor

    store = store_for(broker, "q-outage", confirm_timeout=5)
    await store.counts()
    # RabbitMQ 3.x brings a quorum queue back after a crash only once its declaration reached disk: a clean
    # restart makes sure of that before the crash.
    await threads.deferToThread(broker.terminate)
    await threads.deferToThread(broker.start)
    results: list[tuple[str, bool, float]] = []
    stop = False

    async def publisher(number: int) -> None:
        sent = 0
        while not stop:
            sent += 1
            id = f"P{number}-{sent}"
            try:
                await store.enqueue(message(id), CONTENT)
                results.append((id, True, time.monotonic()))
            except NotQueued:
                results.append((id, False, time.monotonic()))
                await deferLater(reactor, 0.02, lambda: None)

    def confirmed(since: float = 0.0) -> int:
        return sum(1 for _, ok, when in results if ok and when > since)

    running = [Deferred.fromCoroutine(publisher(n)) for n in range(3)]
    try:
        await until(lambda: confirmed() >= 30, "commits before the crash")
        await threads.deferToThread(broker.kill)
        crashed = time.monotonic()
        await until(lambda: any(not ok and when > crashed for _, ok, when in results), "a failed commit")
        await threads.deferToThread(broker.start)
        back = time.monotonic()
        await until(lambda: confirmed(back) >= 30, "commits after the restart")
    finally:
        stop = True
        await gatherResults(running)
        await store.stop()
    queued = [decode(body)[0].id for _, body in await threads.deferToThread(broker.drain, "q-outage")]
    attempted = {id for id, _, _ in results}
    confirmed_ids = {id for id, ok, _ in results if ok}
    assert len(queued) == len(set(queued))
    assert set(queued) <= attempted
    missing = confirmed_ids - set(queued)
    assert not missing, f"{len(missing)} confirmed messages are not in the queue"
    assert len(confirmed_ids) < len(attempted)  # the crash was seen
    print(f"\noutage run: {len(confirmed_ids)} commits fired, {len(attempted) - len(confirmed_ids)} failed, of which"
          f" {len(set(queued) - confirmed_ids)} were stored all the same")


def test_runner_script_is_plain_python() -> None:
    """The runner the many-runner tests start compiles (a syntax slip would show only as a timeout)."""
    compile(RUNNER, "runner.py", "exec")

