"""The queue runner over an in-memory store, a scripted deliverer and a Clock: outcomes, retries on the schedule,
expiry, the notices it queues (read back as RFC 3464 reports), and a deliverer that fails.

The in-memory store (`esmtpkit.queue.memory.MemoryStore`) is tested here too, as the runner's partner.
"""

from __future__ import annotations

from typing import Any, Sequence

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from esmtpkit.core.outbound import Message, Outcome, Recipient, Status
from esmtpkit.core.schedule import Schedule
from esmtpkit.queue.interfaces import ICheckpoint, IQueueEntry, IQueueStore, OpenContent
from esmtpkit.queue.memory import MemoryStore
from esmtpkit.queue.runner import (ATTEMPT_TIMED_OUT, DELIVERER_FAILED, EVENTS, NO_OUTCOME, QueueMonitor, QueueRunner,
                                   expired)

from .support import OK, QUEUE_CONTENT, SCHEDULE, Queue, RecordingStore, report

LATER = Outcome(451, "4.7.1", "Try again later", "mx.example.net[192.0.2.1]")
UNKNOWN = Outcome(550, "5.1.1", "No such user", "mx.example.net[192.0.2.1]")


# ---- the store ----------------------------------------------------------------------------------------------------

def test_memory_store_provides_the_interfaces() -> None:
    store = MemoryStore(reactor=Clock())
    assert verifyObject(IQueueStore, store) and verifyObject(ICheckpoint, store)
    assert verifyObject(IQueueEntry, store.open_entry())


def test_memory_store_keeps_what_an_entry_commits() -> None:
    store = MemoryStore(reactor=Clock())
    entry = store.open_entry()
    entry.write(b"Subject: x\r\n\r\n")
    entry.write(b"body\r\n")
    message = Message("A1", "a@example.org", [Recipient("b@example.net")])
    done = entry.commit(message)
    assert done.called and done.result is None
    assert store.contents["A1"] == b"Subject: x\r\n\r\nbody\r\n"
    assert [m.id for m in store.list()] == ["A1"]
    with pytest.raises(ValueError):
        entry.write(b"more")


def test_memory_store_refuses_while_failing_and_forgets_discarded_content() -> None:
    store = MemoryStore(reactor=Clock())
    store.failing = OSError("No space left on device")
    entry = store.open_entry()
    entry.write(b"x")
    failures: list[Any] = []
    entry.commit(Message("A1", "a@example.org", [Recipient("b@example.net")])).addErrback(failures.append)
    assert failures[0].check(OSError) and store.messages == {}
    other = store.open_entry()
    other.write(b"y")
    other.discard()
    assert store.messages == {} and store.contents == {}


def test_memory_store_hands_out_at_most_concurrency_messages() -> None:
    clock = Clock()
    store = MemoryStore(reactor=clock, concurrency=2)
    waiting: list[Deferred[Message]] = []

    def worker(message: Message, open_content: OpenContent) -> Deferred[Message]:
        d: Deferred[Message] = Deferred()
        waiting.append(d)
        return d

    store.start(worker)
    for n in range(3):
        store.enqueue(Message(f"A{n}", "a@example.org", [Recipient("b@example.net")]), b"x")
    clock.advance(0)
    assert len(waiting) == 2 and store.active == 2
    stopping = store.stop()
    assert not stopping.called
    first = store.messages["A0"].copy()
    first.recipients[0].status = Status.DELIVERED
    waiting[0].callback(first)
    assert "A0" not in store.messages and not stopping.called
    second = store.messages["A1"].copy()
    second.next_attempt = 300.0
    waiting[1].callback(second)
    assert stopping.called
    assert store.messages["A1"].next_attempt == 300.0
    clock.advance(1000)
    assert len(waiting) == 2  # stopped: nothing more handed out
    assert clock.getDelayedCalls() == []


# ---- delivery -----------------------------------------------------------------------------------------------------

def test_a_delivered_message_leaves_the_queue_with_one_event_per_recipient() -> None:
    q = Queue()
    q.add("bob@example.net", "carol@example.net")
    assert [c.addresses for c in q.deliverer.calls] == [("bob@example.net", "carol@example.net")]
    assert q.store.messages == {}
    events = q.named("queue.delivered")
    assert [(e["recipient"], e["queue_id"], e["remote"], e["status"], e["code"]) for e in events] == [
        ("bob@example.net", "M1", "mx.example.net[192.0.2.1]", "2.0.0", 250),
        ("carol@example.net", "M1", "mx.example.net[192.0.2.1]", "2.0.0", 250)]
    assert all(e["log_level"] is EVENTS["queue.delivered"] for e in events)
    assert q.notices() == []
    assert q.monitor.calls == [("started", "M1"), ("recipient", "bob@example.net", "delivered"),
                               ("recipient", "carol@example.net", "delivered"), ("finished", "M1", 0.0)]
    q.finish()


def test_each_domain_is_delivered_at_the_same_time() -> None:
    q = Queue(hold=True)
    q.add("bob@example.net", "dave@example.com", "carol@EXAMPLE.net")
    assert [c.addresses for c in q.deliverer.calls] == [("bob@example.net", "carol@EXAMPLE.net"),
                                                         ("dave@example.com",)]
    assert q.store.active == 1
    q.deliverer.release()
    assert q.store.messages == {}
    q.finish()


def test_the_deliverer_reads_the_content_as_queued() -> None:
    q = Queue(hold=True)
    q.add("bob@example.net")
    with q.deliverer.calls[0].open_content() as f:
        assert f.read() == QUEUE_CONTENT
    q.deliverer.release()
    q.finish()


def test_temporary_failures_are_retried_on_the_schedule() -> None:
    q = Queue({"bob@example.net": [LATER] * 5 + [OK]})
    start = q.clock.seconds()
    q.add("bob@example.net")
    q.run_for(10_000 - 1)  # within the lifetime
    times = [c.time - start for c in q.deliverer.calls]
    assert times == [0.0, 300.0, 900.0, 2100.0, 3300.0, 4500.0]  # 300, 600, 1200 (capped), 1200, 1200
    assert q.store.messages == {}
    deferred = q.named("queue.deferred")
    assert len(deferred) == 5 and {e["status"] for e in deferred} == {"4.7.1"}
    assert [e["attempts"] for e in deferred] == [1, 2, 3, 4, 5]
    assert q.notices() == []
    q.finish()


def test_the_saved_state_carries_attempts_outcome_and_next_attempt() -> None:
    q = Queue({"bob@example.net": [LATER]})
    start = q.clock.seconds()
    q.add("bob@example.net")
    saved = q.store.messages["M1"]
    assert (saved.attempts, saved.next_attempt - start) == (1, 300.0)
    assert saved.recipients[0].status is Status.PENDING and saved.recipients[0].outcome == LATER
    q.finish()


def test_only_pending_recipients_are_tried_again() -> None:
    q = Queue({"carol@example.net": [UNKNOWN], "dave@example.com": [LATER, OK]})
    q.add("bob@example.net", "carol@example.net", "dave@example.com")
    saved = q.store.messages["M1"]
    assert [r.status for r in saved.recipients] == [Status.DELIVERED, Status.FAILED, Status.PENDING]
    [(notice, data)] = q.notices()
    _, _, blocks = report(data)
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; carol@example.net"]
    q.clock.advance(300)
    assert [c.addresses for c in q.deliverer.calls] == [
        ("bob@example.net", "carol@example.net"), ("dave@example.com",),  # first attempt, two domains
        ("alice@example.org",),  # the bounce
        ("dave@example.com",)]  # the retry: the pending recipient only
    assert "M1" not in q.store.messages
    assert len(q.named("queue.bounced")) == 1
    q.finish()


# ---- failures and their notices -----------------------------------------------------------------------------------

def test_a_permanent_failure_bounces_to_the_sender_with_the_dsn_fields() -> None:
    q = Queue({"bob@example.net": [UNKNOWN]}, hold=True)
    q.add(Recipient("bob@example.net", orcpt="rfc822;Bob@Example.NET"), envid="QQ314159")
    q.deliverer.release()
    assert "M1" not in q.store.messages
    [(notice, data)] = q.notices()
    assert notice.sender == "" and [r.address for r in notice.recipients] == ["alice@example.org"]
    assert notice.recipients[0].notify == ("NEVER",)
    assert notice.next_attempt <= q.clock.seconds()
    whole, per_message, [block] = report(data)
    assert whole["To"] == "<alice@example.org>"
    assert per_message["Reporting-MTA"] == "dns; mx.test"
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert per_message["Received-From-MTA"] == "dns; client.example (192.0.2.7)"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Final-Recipient"] == "rfc822; bob@example.net"
    assert block["Original-Recipient"].replace(" ", "") == "rfc822;Bob@Example.NET"
    assert block["Remote-MTA"] == "dns; mx.example.net"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    returned = whole.get_payload()[2]
    assert returned.get_content_type() == "message/rfc822"
    assert b"Message-ID: <m1@example.org>" in returned.as_bytes()
    [bounced] = q.named("queue.bounced")
    assert (bounced["recipient"], bounced["code"], bounced["status"]) == ("bob@example.net", 550, "5.1.1")
    assert q.named("queue.notice")[0]["action"] == "failed"
    assert ("notice", "failed", "alice@example.org") in q.monitor.calls
    assert ("queued", "", "notice") in q.monitor.calls
    q.deliverer.hold = False
    q.clock.advance(0)
    assert q.deliverer.calls[-1].addresses == ("alice@example.org",)  # the bounce itself goes out
    assert q.store.messages == {}
    q.finish()


def test_a_recipient_is_reported_once() -> None:
    q = Queue({"bob@example.net": [UNKNOWN], "carol@example.net": [LATER]})
    q.add("bob@example.net", "carol@example.net")
    assert q.store.messages["M1"].recipients[0].reported
    q.clock.advance(300)
    q.clock.advance(600)
    assert q.store.messages["M1"].attempts == 3
    assert len(q.notices()) == 1
    assert len([c for c in q.deliverer.calls if c.addresses == ("alice@example.org",)]) == 1
    q.finish()


def test_no_bounce_for_a_null_sender() -> None:
    q = Queue({"alice@example.org": [UNKNOWN]})
    q.add("alice@example.org", sender="")
    assert q.store.messages == {}
    assert [c.addresses for c in q.deliverer.calls] == [("alice@example.org",)]
    assert q.named("queue.bounced")[0]["recipient"] == "alice@example.org"
    assert q.named("queue.notice") == []
    q.finish()


def test_notify_never_sends_no_bounce_and_failure_only_when_asked() -> None:
    q = Queue({"bob@example.net": [UNKNOWN], "carol@example.net": [UNKNOWN], "dave@example.net": [UNKNOWN]},
              hold=True)
    q.add(Recipient("bob@example.net", notify=("NEVER",)), Recipient("carol@example.net", notify=("SUCCESS",)),
          Recipient("dave@example.net", notify=("SUCCESS", "FAILURE")))
    q.deliverer.release()
    [(notice, data)] = q.notices()
    _, _, blocks = report(data)
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; dave@example.net"]
    q.finish()


def test_notify_success_reports_relayed_where_the_next_hop_does_not_report() -> None:
    """RFC 3461 §5.2.2: a next hop that did not offer DSN (no ``dsn`` on the outcome) cannot report delivery, so
    the notice says ``relayed``."""
    q = Queue(hold=True)
    q.add(Recipient("bob@example.net", notify=("SUCCESS",)), "carol@example.net")
    q.deliverer.release()
    [(notice, data)] = q.notices()
    whole, _, [block] = report(data)
    assert (block["Action"], block["Status"], block["Final-Recipient"]) == ("relayed", "2.0.0",
                                                                             "rfc822; bob@example.net")
    assert whole.get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert q.named("queue.notice")[0]["action"] == "relayed"
    assert ("notice", "relayed", "alice@example.org") in q.monitor.calls
    q.finish()


def test_no_success_notice_when_the_next_hop_took_over_reporting() -> None:
    """A next hop that offered DSN and was given NOTIFY and ORCPT (``Outcome.dsn``) reports itself (RFC 3461
    §5.2.1): no notice here, and the message is done."""
    took_over = Outcome(250, "2.0.0", "Ok: queued as X1", "mx.example.net[192.0.2.1]", dsn=True)
    q = Queue({"bob@example.net": [took_over]})
    q.add(Recipient("bob@example.net", notify=("SUCCESS", "FAILURE")))
    assert q.notices() == [] and q.named("queue.notice") == []
    assert q.store.messages == {}
    q.finish()


def test_expired_recipients_fail_with_4_4_7_and_bounce() -> None:
    q = Queue({"bob@example.net": [LATER]}, schedule=Schedule(min_backoff=300, max_backoff=600, lifetime=1000))
    start = q.clock.seconds()
    q.add("bob@example.net")
    q.run_for(2000)
    assert [c.time - start for c in q.deliverer.calls if c.message_id == "M1"] == [0.0, 300.0, 900.0, 1500.0]
    assert "M1" not in q.store.messages
    deferred, bounced = q.named("queue.deferred"), q.named("queue.bounced")
    assert len(deferred) == 3
    assert [(e["code"], e["status"], e["remote"]) for e in bounced] == [(554, "4.4.7", "none")]
    notices = [c for c in q.deliverer.calls if c.addresses == ("alice@example.org",)]
    assert len(notices) == 1
    q.finish()


def test_the_expiry_notice_says_why() -> None:
    q = Queue({"bob@example.net": [LATER]}, schedule=Schedule(min_backoff=300, max_backoff=300, lifetime=300),
              hold=True)
    q.add("bob@example.net")
    q.deliverer.release()
    q.clock.advance(300)
    q.deliverer.release()
    [(notice, data)] = q.notices()
    _, _, [block] = report(data)
    assert (block["Action"], block["Status"]) == ("failed", "4.4.7")
    diagnostic = " ".join(block["Diagnostic-Code"].split())
    assert diagnostic.startswith("X-esmtpkit; Message expired: not delivered within 300 seconds")
    assert "451 4.7.1 Try again later" in diagnostic
    q.finish()


def test_expired_outcome_text() -> None:
    assert expired(None, 5 * 86400) == Outcome(554, "4.4.7", "Message expired: not delivered within 5 days")
    assert expired(LATER, 86400).text == ("Message expired: not delivered within 1 day; last attempt from "
                                          "mx.example.net[192.0.2.1]: 451 4.7.1 Try again later")
    assert expired(LATER, 86400).permanent


def test_a_delay_notice_goes_once_when_the_schedule_warns() -> None:
    schedule = Schedule(min_backoff=300, max_backoff=300, lifetime=10000, delay_warning=500)
    q = Queue({"bob@example.net": [LATER], "carol@example.net": [LATER]}, schedule=schedule, hold=True)
    q.add("bob@example.net", Recipient("carol@example.net", notify=("FAILURE",)))
    for _ in range(4):  # attempts at 0, 300, 600, 900
        q.deliverer.release()
        q.clock.advance(300)
    delays = q.notices()
    assert len(delays) == 1
    _, _, [block] = report(delays[0][1])
    assert (block["Action"], block["Final-Recipient"]) == ("delayed", "rfc822; bob@example.net")
    assert "Will-Retry-Until" in block
    saved = q.store.messages["M1"]
    assert saved.recipients[0].delay_reported and not saved.recipients[1].delay_reported
    q.deliverer.release()
    q.finish()


# ---- the unexpected -----------------------------------------------------------------------------------------------

class BrokenDeliverer:
    """Fails in one of the ways a deliverer should not: an errback, an exception, or a wrong result."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.calls = 0

    def deliver(self, message: Message, indexes: Sequence[int], open_content: OpenContent) -> Any:
        self.calls += 1
        if self.calls > 1:
            return succeed({i: OK for i in indexes})
        if self.how == "errback":
            return fail(RuntimeError("resolver exploded"))
        if self.how == "raise":
            raise RuntimeError("resolver exploded")
        if self.how == "partial":
            return succeed({indexes[0]: OK})
        return succeed([OK])


@pytest.mark.parametrize("how", ["errback", "raise", "garbage"])
def test_a_failing_deliverer_defers_every_recipient(how: str) -> None:
    deliverer = BrokenDeliverer(how)
    q = Queue(deliverer=deliverer)
    q.add("bob@example.net", "carol@example.net")
    saved = q.store.messages["M1"]
    assert [r.outcome for r in saved.recipients] == [DELIVERER_FAILED, DELIVERER_FAILED]
    assert [r.status for r in saved.recipients] == [Status.PENDING, Status.PENDING]
    [event] = q.named("queue.deliverer_failed")
    assert event["domain"] == "example.net" and event["count"] == 2 and event["log_failure"] is not None
    assert len(q.named("queue.deferred")) == 2
    q.clock.advance(300)
    assert "M1" not in q.store.messages and deliverer.calls == 2
    q.finish()


def test_a_recipient_without_an_outcome_is_deferred() -> None:
    deliverer = BrokenDeliverer("partial")
    q = Queue(deliverer=deliverer)
    q.add("bob@example.net", "carol@example.net")
    saved = q.store.messages["M1"]
    assert [r.status for r in saved.recipients] == [Status.DELIVERED, Status.PENDING]
    assert saved.recipients[1].outcome == NO_OUTCOME
    q.finish()


def test_a_notice_the_store_refuses_is_tried_again_with_the_next_attempt() -> None:
    q = Queue({"bob@example.net": [UNKNOWN], "carol@example.net": [LATER, OK]}, hold=True)
    q.add("bob@example.net", "carol@example.net")
    q.store.failing = OSError("No space left on device")
    q.deliverer.release()
    saved = q.store.messages["M1"]
    assert saved.recipients[0].status is Status.FAILED and not saved.recipients[0].reported
    [event] = q.named("queue.notice_failed")
    assert event["action"] == "failed" and "tried again" in event["later"]
    q.store.failing = None
    q.clock.advance(300)
    q.deliverer.release()
    assert "M1" not in q.store.messages
    [(notice, data)] = q.notices()
    assert [b["Final-Recipient"] for b in report(data)[2]] == ["rfc822; bob@example.net"]
    q.finish()


def test_a_bounce_the_store_refuses_keeps_the_message_until_it_is_queued() -> None:
    """The only recipient failed and its bounce could not be queued (a full disk): the message stays in the store,
    and the next attempt queues the bounce without delivering again; only then is the message gone."""
    q = Queue({"bob@example.net": [UNKNOWN]}, hold=True)
    q.add("bob@example.net")
    q.store.failing = OSError("No space left on device")
    q.deliverer.release()
    saved = q.store.messages["M1"]
    assert saved.recipients[0].status is Status.FAILED and not saved.recipients[0].reported
    assert saved.next_attempt == q.clock.seconds() + 300
    assert q.named("queue.notice_failed")[0]["later"] == "tried again at the next attempt"
    q.store.failing = None
    q.deliverer.hold = False
    q.clock.advance(300)
    assert "M1" not in q.store.messages
    [(notice, data)] = q.notices()
    assert [b["Final-Recipient"] for b in report(data)[2]] == ["rfc822; bob@example.net"]
    assert [c.addresses for c in q.deliverer.calls] == [("bob@example.net",), ("alice@example.org",)]
    assert len(q.named("queue.bounced")) == 1
    q.finish()


def test_a_notice_that_cannot_be_written_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault in writing the notice (not the store refusing it) cannot get better by waiting: logged, and the
    message is not kept for it."""
    from esmtpkit.core import bounce

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("a fault")

    monkeypatch.setattr(bounce, "report", broken)
    q = Queue({"bob@example.net": [UNKNOWN]})
    q.add("bob@example.net")
    assert q.store.messages == {} and q.notices() == []
    [event] = q.named("queue.notice_failed")
    assert event["later"] == "not sent" and event["log_failure"].check(ValueError)
    q.finish()


def test_progress_is_saved_after_each_domain_while_others_are_under_way() -> None:
    """example.net answers while example.com hangs: its outcome is in the store already (a checkpoint), so a
    process killed now would not deliver to example.net again."""
    q = Queue(hold=True)
    q.add("bob@example.net", "dave@example.com")
    (net, net_outcomes), (com, com_outcomes) = q.deliverer.held
    assert q.store.checkpoints == 0
    net.callback(net_outcomes)
    assert q.store.checkpoints == 1
    saved = q.store.messages["M1"]
    assert [r.status for r in saved.recipients] == [Status.DELIVERED, Status.PENDING]
    assert q.store.active == 1
    com.callback(com_outcomes)
    assert q.store.messages == {} and q.store.checkpoints == 1  # the last domain: saved with the result
    q.finish()


class SlowCheckpoints(RecordingStore):
    """Checkpoints that end only when the test fires them (``saving``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.saving: list[Deferred[None]] = []

    def checkpoint(self, message: Message) -> Deferred[None]:
        super().checkpoint(message)
        d: Deferred[None] = Deferred()
        self.saving.append(d)
        return d


def test_the_result_waits_for_the_checkpoints_under_way() -> None:
    """Checkpoints run one after the other, and none may land after the store has saved (or forgotten) the
    attempt's result."""
    q = Queue(hold=True)
    q.store = store = SlowCheckpoints(reactor=q.clock)
    q.runner.store = store
    q.runner.start()
    q.add("bob@example.net", "dave@example.com", "erin@example.org")
    first, second, third = q.deliverer.held
    first[0].callback(first[1])
    second[0].callback(second[1])
    third[0].callback(third[1])
    assert len(store.saving) == 1 and store.checkpoints == 1  # the second waits for the first
    assert store.active == 1 and "M1" in store.messages
    store.saving[0].callback(None)
    assert len(store.saving) == 2 and store.active == 1
    store.saving[1].callback(None)
    assert store.active == 0 and store.messages == {}
    q.finish()


class TimedStore(RecordingStore):
    """A store that must have each attempt back within ``attempt_timeout`` seconds (as RabbitMQ's must)."""

    attempt_timeout = 100.0


def test_an_attempt_ends_by_the_stores_attempt_timeout() -> None:
    """A domain still hanging when the store's time is up is deferred (4.4.2) and its session cancelled; what
    the other domains got is kept, and the message is back with the store on time."""
    q = Queue(hold=True)
    q.store = store = TimedStore(reactor=q.clock)
    q.runner.store = store
    q.runner.start()
    q.add("bob@example.net", "dave@example.com")
    (net, net_outcomes), (com, _) = q.deliverer.held
    net.callback(net_outcomes)
    q.clock.advance(99)
    assert store.active == 1
    q.clock.advance(1)
    assert store.active == 0
    assert com.called  # cancelled
    saved = store.messages["M1"]
    assert [r.status for r in saved.recipients] == [Status.DELIVERED, Status.PENDING]
    assert saved.recipients[1].outcome == ATTEMPT_TIMED_OUT
    assert (saved.attempts, saved.next_attempt) == (1, q.clock.seconds() + 300)
    [cut] = q.named("queue.attempt_cut")
    assert (cut["count"], cut["timeout"]) == (1, 100.0) and cut["log_level"] is EVENTS["queue.attempt_cut"]
    assert q.named("queue.deliverer_failed") == []
    q.deliverer.hold = False
    q.clock.advance(300)
    assert store.messages == {}
    assert [c.addresses for c in q.deliverer.calls] == [("bob@example.net",), ("dave@example.com",),
                                                         ("dave@example.com",)]
    q.finish()


def test_the_queue_counts_reach_every_monitor() -> None:
    class Counts(QueueMonitor):
        seen: list[Any] = []

        def queue_counts(self, counts: Any) -> None:
            self.seen.append(dict(counts))

    from esmtpkit.queue.runner import Monitors

    monitors = Monitors([Counts()])
    monitors.queue_counts({"queued": 3, "held": 1, "active": 2})
    assert Counts.seen == [{"queued": 3, "held": 1, "active": 2}]


def test_an_unreadable_content_still_gives_a_notice() -> None:
    q = Queue({"bob@example.net": [UNKNOWN]}, hold=True)
    q.add("bob@example.net")
    del q.store.contents["M1"]  # the content vanished while the attempt was under way
    q.deliverer.held[0][0].callback(q.deliverer.held[0][1])
    q.deliverer.held.clear()
    [(notice, data)] = q.notices()
    assert report(data)[2][0]["Action"] == "failed"
    q.finish()


def test_stop_waits_for_the_attempts_under_way() -> None:
    q = Queue(hold=True)
    q.add("bob@example.net")
    stopping = q.runner.stop()
    assert not stopping.called
    q.deliverer.release()
    assert stopping.called and q.store.messages == {}
    assert q.clock.getDelayedCalls() == []


def test_events_go_to_the_queue_namespace() -> None:
    runner = QueueRunner(MemoryStore(reactor=Clock()), object(), reactor=Clock(), schedule=SCHEDULE, hostname="h")
    assert runner.log.namespace == "esmtpkit.queue"
