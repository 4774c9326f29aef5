"""The spool-directory queue: durable commits in a safe order, crash leftovers cleaned, scheduling from mtimes with
bounded memory, held messages, flush and locks shared between processes."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from esmtpkit.core.ids import new_id
from esmtpkit.core.outbound import Message, Outcome, Recipient, Status
from esmtpkit.queue import spool, spool_files
from esmtpkit.queue.interfaces import ICheckpoint, IQueueEntry, IQueueStore
from esmtpkit.queue.spool import HELD_MTIME, STALE_AGE, MessageBusy, NoSuchMessage, SpoolStore
from esmtpkit.queue.spool_admin import SpoolAdmin

from .support import SPOOL_CONTENT, Worker, commit, envelope


# ---- support ------------------------------------------------------------------------------------------------------

class QueuedPool:
    """A thread pool that runs its jobs only when the test says (`run`), in the test's thread."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[..., None], Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def callInThreadWithCallback(self, on_result: Callable[..., None], function: Callable[..., Any], *args: Any,
                                 **kwargs: Any) -> None:
        self.jobs.append((on_result, function, args, kwargs))

    def run(self) -> list[str]:
        """Run every queued job (and those they queue); the names of the functions run."""
        names = []
        while self.jobs:
            on_result, function, args, kwargs = self.jobs.pop(0)
            names.append(function.__name__)
            try:
                result = function(*args, **kwargs)
            except Exception:
                on_result(False, Failure())
            else:
                on_result(True, result)
        return names


@implementer(IReactorThreads)
class PoolClock(Clock):
    """A Clock with a thread pool the test drives, so a store takes its threaded path deterministically."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = QueuedPool()

    def getThreadPool(self) -> QueuedPool:
        return self.pool

    def callFromThread(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        function(*args, **kwargs)


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def mtime(path: Path) -> float:
    return path.stat().st_mtime_ns / 1e9


@pytest.fixture
def clock() -> Clock:
    """A clock at the real time: the files' own mtimes (cleanup) are compared with it."""
    clock = Clock()
    clock.advance(time.time())
    return clock


@pytest.fixture
def stores(clock: Clock, tmp_path: Path) -> Iterator[Callable[..., SpoolStore]]:
    """Makes stores on ``tmp_path/spool``; at the end each must stop at once, leaving no timer behind."""
    made: list[SpoolStore] = []

    def make(**options: Any) -> SpoolStore:
        options.setdefault("reactor", clock)
        store = SpoolStore(str(tmp_path / "spool"), **options)
        made.append(store)
        return store

    yield make
    for store in made:
        stopped: list[Any] = []
        store.stop().addBoth(stopped.append)
        assert stopped == [None]
    assert clock.getDelayedCalls() == []


# ---- the contract -------------------------------------------------------------------------------------------------

def test_store_and_entry_provide_the_interfaces(stores: Callable[..., SpoolStore]) -> None:
    store = stores()
    assert verifyObject(IQueueStore, store) and verifyObject(ICheckpoint, store)
    entry = store.open_entry()
    assert verifyObject(IQueueEntry, entry)
    entry.discard()
    assert store.name == "spool"


def test_commit_stores_content_and_envelope(stores: Callable[..., SpoolStore], clock: Clock, tmp_path: Path) -> None:
    store = stores()
    id = commit(store, clock, envid="ENV1", recipients=[Recipient("a@example.net", notify=("SUCCESS",))])
    messages = tmp_path / "spool" / "messages"
    assert files(messages) == [f"{id}.eml", f"{id}.json"]
    assert (messages / f"{id}.eml").read_bytes() == SPOOL_CONTENT
    stored = Message.from_json(json.loads((messages / f"{id}.json").read_text()))
    assert (stored.id, stored.envid, stored.size, stored.recipients[0].notify) == (id, "ENV1", len(SPOOL_CONTENT),
                                                                                   ("SUCCESS",))
    assert mtime(messages / f"{id}.json") == pytest.approx(clock.seconds(), abs=1e-6)
    assert files(tmp_path / "spool" / "incoming") == []
    assert store.get(id).envid == "ENV1"


def test_commit_is_durable_in_order_before_it_fires(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync content, rename to .eml, fsync dir; envelope to a temporary file, its mtime (the schedule: set before
    the fsync, so a power cut cannot make it early), fsync, rename to .json, fsync dir; the Deferred fires only
    after the last step (the file work runs in the pool, here driven by the test)."""
    clock = PoolClock()
    clock.advance(time.time())
    root = tmp_path / "spool"
    store = SpoolStore(str(root), reactor=clock, threads=True)
    steps: list[tuple[str, str, list[str]]] = []

    def recording(name: str) -> Callable[..., Any]:
        real = getattr(os, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            target = os.readlink(f"/proc/self/fd/{args[0]}") if isinstance(args[0], int) else str(args[0])
            result = real(*args, **kwargs)
            where = os.path.relpath(target, root)
            steps.append((name, where, files(root / "messages")))
            return result

        return call

    entry = store.open_entry()
    entry.write(SPOOL_CONTENT)
    id = entry.id
    for name in ("fsync", "rename", "utime"):
        monkeypatch.setattr(os, name, recording(name))
    d = entry.commit(envelope(id, clock))
    assert files(root / "messages") == []
    assert not d.called
    assert clock.pool.run() == ["commit_files"]
    monkeypatch.undo()
    assert d.called and d.result is None
    names = [(name, where.split(".", 1)[0] if where.startswith("incoming/") else where) for name, where, _ in steps]
    assert names == [
        ("fsync", f"incoming/{id}"),  # the content
        ("rename", f"incoming/{id}"),  # to messages/<id>.eml
        ("fsync", "messages"),
        ("utime", f"incoming/{id}"),  # the schedule of the envelope's temporary file, before its fsync
        ("fsync", f"incoming/{id}"),  # the envelope's temporary file
        ("rename", f"incoming/{id}"),  # to messages/<id>.json
        ("fsync", "messages"),
    ]
    assert steps[0][1] == f"incoming/{id}.tmp"
    assert steps[3][1].endswith(".json.tmp")
    # What messages/ held after each step: nothing until the content is there, the envelope only after it.
    assert [seen for _, _, seen in steps] == [[], [f"{id}.eml"], [f"{id}.eml"], [f"{id}.eml"], [f"{id}.eml"],
                                              [f"{id}.eml", f"{id}.json"], [f"{id}.eml", f"{id}.json"]]


def test_a_failed_commit_fails_and_leaves_nothing(stores: Callable[..., SpoolStore], clock: Clock,
                                                  tmp_path: Path) -> None:
    store = stores()
    entry = store.open_entry()
    entry.write(SPOOL_CONTENT)
    results: list[Any] = []
    entry.commit(envelope(entry.id, clock, extra={"bad": object()})).addBoth(results.append)
    assert isinstance(results[0], Failure) and results[0].check(TypeError)
    assert files(tmp_path / "spool" / "messages") == []
    assert files(tmp_path / "spool" / "incoming") == []


def test_a_second_commit_of_one_id_fails_and_keeps_the_first(stores: Callable[..., SpoolStore], clock: Clock,
                                                             tmp_path: Path) -> None:
    store = stores()
    id = commit(store, clock)
    entry = store.open_entry()
    entry.write(b"other content")
    results: list[Any] = []
    entry.commit(envelope(id, clock)).addBoth(results.append)
    assert results[0].check(FileExistsError)
    assert (tmp_path / "spool" / "messages" / f"{id}.eml").read_bytes() == SPOOL_CONTENT
    assert files(tmp_path / "spool" / "incoming") == []


def test_a_write_error_makes_the_commit_fail(stores: Callable[..., SpoolStore], clock: Clock,
                                             tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "incoming").write_text("not a folder")
    store = stores()
    entry = store.open_entry()
    entry.write(SPOOL_CONTENT)
    results: list[Any] = []
    entry.commit(envelope(entry.id, clock)).addBoth(results.append)
    assert results[0].check(OSError)


def test_discard_removes_the_content(stores: Callable[..., SpoolStore], tmp_path: Path) -> None:
    entry = stores().open_entry()
    entry.write(SPOOL_CONTENT)
    assert files(tmp_path / "spool" / "incoming") == [f"{entry.id}.tmp"]
    entry.discard()
    assert files(tmp_path / "spool" / "incoming") == []


def test_enqueue_stores_a_whole_message(stores: Callable[..., SpoolStore], clock: Clock, tmp_path: Path) -> None:
    store = stores()
    bounce = Message(id=new_id(), sender="", recipients=[Recipient("sender@example.org", notify=("NEVER",))])
    results: list[Any] = []
    store.enqueue(bounce, b"a bounce\r\n").addBoth(results.append)
    assert results == [None]
    assert (tmp_path / "spool" / "messages" / f"{bounce.id}.eml").read_bytes() == b"a bounce\r\n"
    assert store.get(bounce.id).size == len(b"a bounce\r\n")


# ---- kill -9 at any instant ---------------------------------------------------------------------------------------

class Crash(Exception):
    """The process died here: nothing it would have done afterwards reaches the disk."""


class CrashingOS:
    """The ``os`` module as spool_files.py sees it, dying at its ``at``-th call that could change the disk."""

    POINTS = frozenset({"open", "write", "fsync", "utime", "rename", "unlink", "makedirs"})

    def __init__(self) -> None:
        self.at: int | None = None
        self.count = 0
        self.crashed = False

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name not in self.POINTS:
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.at is not None:
                if self.crashed or self.count == self.at:
                    self.crashed = True
                    raise Crash(name)
                self.count += 1
            return real(*args, **kwargs)

        return call


def check_spool(root: Path) -> set[str]:
    """Every envelope in messages/ is readable and has its content; the ids of the messages there."""
    messages = root / "messages"
    ids = {name[:-5] for name in files(messages) if name.endswith(".json")}
    for id in ids:
        assert (messages / f"{id}.eml").exists(), f"{id}: an envelope without its content"
        assert Message.from_json(json.loads((messages / f"{id}.json").read_text())).id == id
    return ids


def restart(root: Path, clock: Clock) -> tuple[Worker, SpoolStore]:
    """A new process, started over an hour later, with a worker."""
    clock.advance(STALE_AGE + 60)
    store = SpoolStore(str(root), reactor=clock)
    worker = Worker()
    store.start(worker)
    return worker, store


def stop(store: SpoolStore) -> None:
    done: list[Any] = []
    store.stop().addBoth(done.append)
    assert done == [None]


def test_a_crash_at_any_step_of_a_commit_loses_nothing_accepted(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed at each step in turn: either the message is queued whole (and delivered after a restart) or the
    commit had not fired and nothing of it is left after the cleanup."""
    fake = CrashingOS()
    monkeypatch.setattr(spool_files, "os", fake)
    step = 0
    while True:
        root = tmp_path / f"run{step}"
        clock = Clock()
        clock.advance(time.time())
        fake.at, fake.count, fake.crashed = None, 0, False
        store = SpoolStore(str(root), reactor=clock)
        entry = store.open_entry()
        entry.write(SPOOL_CONTENT)
        fake.at = step
        results: list[Any] = []
        entry.commit(envelope(entry.id, clock)).addBoth(results.append)
        crashed = fake.crashed
        fake.at = None
        if crashed:
            assert isinstance(results[0], Failure)  # no 250 was given
        ids = check_spool(root)
        worker, store = restart(root, clock)
        assert worker.ids == sorted(ids)
        if not crashed:
            assert ids == {entry.id} and worker.calls[0][1] == SPOOL_CONTENT
        for index in range(len(worker.calls)):
            worker.deliver(index)
        stop(store)
        assert files(root / "incoming") == [] and files(root / "messages") == []
        if not crashed:
            break
        step += 1
    assert step >= 7


def test_a_crash_while_saving_state_keeps_the_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed at each step of saving an attempt's outcome (or of removing a finished message): the message is
    there with its old or its new state, or (finished) gone; never an envelope without content."""
    fake = CrashingOS()
    monkeypatch.setattr(spool_files, "os", fake)
    for finished in (False, True):
        step = 0
        while True:
            root = tmp_path / f"run{finished}{step}"
            clock = Clock()
            clock.advance(time.time())
            fake.at, fake.count, fake.crashed = None, 0, False
            store = SpoolStore(str(root), reactor=clock)
            id = commit(store, clock)
            worker = Worker()
            store.start(worker)
            fake.at = step
            with capturedLogs():
                if finished:
                    worker.deliver(0)
                else:
                    worker.defer(0, clock.seconds() + 600)
            crashed = fake.crashed
            fake.at = None
            stop(store)
            ids = check_spool(root)
            if ids:
                attempts = store.get(id).attempts
                assert attempts in ((0,) if finished else (0, 1))
            else:
                assert finished
            if not crashed:
                assert ids == (set() if finished else {id})
                break
            step += 1
        assert step >= 2


def test_a_killed_process_holding_a_lock_releases_it(tmp_path: Path, clock: Clock) -> None:
    """flock dies with its process: after ``kill -9`` another store takes the message."""
    root = tmp_path / "spool"
    store = SpoolStore(str(root), reactor=clock)
    id = commit(store, clock)
    holder = lock_in_subprocess(root / "messages" / f"{id}.json")
    holder.kill()
    holder.wait()
    worker = Worker()
    store.start(worker)
    assert worker.ids == [id]
    worker.deliver()
    stop(store)


# ---- cleanup at start ---------------------------------------------------------------------------------------------

def test_start_removes_stale_leftovers_and_logs_each(stores: Callable[..., SpoolStore], clock: Clock,
                                                     tmp_path: Path) -> None:
    root = tmp_path / "spool"
    store = stores()
    kept = commit(store, clock)
    incoming, messages = root / "incoming", root / "messages"
    old = time.time() - STALE_AGE - 60
    for path in (incoming / "OLD.tmp", incoming / "OLD.x.json.tmp", incoming / "NEW.tmp", messages / "ORPHAN.eml",
                 messages / "YOUNGORPHAN.eml"):
        path.write_bytes(b"x")
    for path in (incoming / "OLD.tmp", incoming / "OLD.x.json.tmp", messages / "ORPHAN.eml",
                 messages / f"{kept}.eml"):
        os.utime(path, (old, old))
    worker = Worker()
    with capturedLogs() as events:
        store.start(worker)
    assert files(incoming) == ["NEW.tmp"]
    assert files(messages) == sorted([f"{kept}.eml", f"{kept}.json", "YOUNGORPHAN.eml"])
    logged = sorted(event["file"] for event in events if "file" in event)
    assert logged == ["incoming/OLD.tmp", "incoming/OLD.x.json.tmp", "messages/ORPHAN.eml"]
    assert worker.ids == [kept]
    worker.deliver()


def test_an_unreadable_envelope_is_set_aside(stores: Callable[..., SpoolStore], clock: Clock,
                                             tmp_path: Path) -> None:
    store = stores()
    id = commit(store, clock)
    good = commit(store, clock)
    broken = tmp_path / "spool" / "messages" / f"{id}.json"
    broken.write_text("{not json")
    os.utime(broken, (clock.seconds() - 1, clock.seconds() - 1))
    worker = Worker()
    with capturedLogs() as events:
        store.start(worker)
    assert worker.ids == [good]
    assert files(tmp_path / "spool" / "corrupt") == [f"{id}.eml", f"{id}.json"]
    assert [e["id"] for e in events if "problem" in e] == [id]
    worker.deliver()


# ---- scheduling ---------------------------------------------------------------------------------------------------

def test_due_messages_go_to_the_worker_in_due_order(stores: Callable[..., SpoolStore], clock: Clock) -> None:
    store = stores(concurrency=1, scan_interval=60)
    now = clock.seconds()
    later = commit(store, clock, next_attempt=now + 100)
    first = commit(store, clock, next_attempt=now - 20)
    second = commit(store, clock, next_attempt=now - 10)
    much_later = commit(store, clock, next_attempt=now + 1000)
    worker = Worker()
    store.start(worker)
    assert worker.ids == [first]
    worker.deliver()
    assert worker.ids == [first, second]
    worker.deliver()
    clock.advance(60)
    assert worker.ids == [first, second]
    clock.advance(60)
    assert worker.ids == [first, second, later]
    worker.defer(-1, clock.seconds() + 300)
    clock.advance(60 * 5)
    assert worker.ids == [first, second, later, later]
    worker.deliver()
    clock.advance(1000)
    assert worker.ids[-1] == much_later
    worker.deliver()


def test_an_attempt_saves_the_new_state_and_schedule(stores: Callable[..., SpoolStore], clock: Clock,
                                                     tmp_path: Path) -> None:
    store = stores()
    id = commit(store, clock)
    worker = Worker()
    store.start(worker)
    retry = clock.seconds() + 300
    worker.defer(0, retry)
    saved = store.get(id)
    assert (saved.attempts, saved.next_attempt, saved.recipients[0].outcome) == (
        1, pytest.approx(retry, abs=1e-6), Outcome(451, "4.4.1", "Connection refused", ""))
    assert mtime(tmp_path / "spool" / "messages" / f"{id}.json") == pytest.approx(retry, abs=1e-6)


def test_a_finished_message_is_removed(stores: Callable[..., SpoolStore], clock: Clock, tmp_path: Path) -> None:
    store = stores()
    commit(store, clock, recipients=[Recipient("a@example.net"), Recipient("b@example.org")])
    worker = Worker()
    store.start(worker)
    message, _, d = worker.calls[0]
    message.recipients[0].status = Status.DELIVERED
    message.recipients[1].status = Status.FAILED
    message.recipients[1].reported = True  # its failure notice was queued
    d.callback(message)
    assert files(tmp_path / "spool" / "messages") == []


def test_a_message_owing_a_notice_is_kept(stores: Callable[..., SpoolStore], clock: Clock, tmp_path: Path) -> None:
    """Every recipient final, but a failure notice not queued (the disk was full): the message stays, scheduled,
    until an attempt has queued the notice; then it goes."""
    store = stores()
    id = commit(store, clock, recipients=[Recipient("a@example.net"), Recipient("b@example.org")])
    worker = Worker()
    store.start(worker)
    message, _, d = worker.calls[0]
    message.recipients[0].status = Status.DELIVERED
    message.recipients[1].status = Status.FAILED
    message.attempts, message.next_attempt = 1, clock.seconds() + 300
    d.callback(message)
    assert files(tmp_path / "spool" / "messages") == [f"{id}.eml", f"{id}.json"]
    assert store.get(id).recipients[1].status is Status.FAILED
    clock.advance(300)
    again, _, d = worker.calls[1]
    assert again.id == id and again.pending == []
    again.recipients[1].reported = True
    d.callback(again)
    assert files(tmp_path / "spool" / "messages") == []


def test_at_most_concurrency_attempts_at_once(stores: Callable[..., SpoolStore], clock: Clock) -> None:
    store = stores(concurrency=3, active_limit=5)
    ids = [commit(store, clock) for _ in range(12)]
    worker = Worker()
    store.start(worker)
    assert len(worker.calls) == 3
    worker.deliver(0)
    assert len(worker.calls) == 4
    for index in range(1, 12):
        worker.deliver(index)
    assert sorted(worker.ids) == sorted(ids), "a backlog beyond active_limit is drained without waiting"


def test_a_local_commit_goes_straight_to_the_worker(stores: Callable[..., SpoolStore], clock: Clock) -> None:
    store = stores(concurrency=1, scan_interval=600)
    worker = Worker()
    store.start(worker)
    first = commit(store, clock)
    assert worker.ids == [first]
    second = commit(store, clock)
    assert worker.ids == [first], "no room: it waits for a free slot"
    worker.deliver()
    assert worker.ids == [first, second]
    worker.deliver()
    future = commit(store, clock, next_attempt=clock.seconds() + 100)
    assert worker.ids == [first, second], f"{future} is not due"


def test_commits_beyond_the_active_limit_go_out_without_waiting_for_a_scan(stores: Callable[..., SpoolStore],
                                                                           clock: Clock) -> None:
    store = stores(concurrency=2, active_limit=3, scan_interval=600)
    worker = Worker()
    store.start(worker)
    ids = [commit(store, clock) for _ in range(8)]
    assert len(worker.calls) == 2
    for index in range(8):
        worker.deliver(index)
    assert sorted(worker.ids) == sorted(ids), "messages committed while the active set was full wait for no scan"


def test_a_failing_worker_postpones_the_message(stores: Callable[..., SpoolStore], clock: Clock) -> None:
    store = stores()
    id = commit(store, clock)
    calls: list[str] = []

    def broken(message: Message, open_content: Any) -> Deferred[Message]:
        calls.append(message.id)
        raise RuntimeError("a bug")

    with capturedLogs() as events:
        store.start(broken)
    assert calls == [id]
    assert any(e.get("log_failure") and e["log_failure"].check(RuntimeError) for e in events)
    assert store.get(id).next_attempt == pytest.approx(clock.seconds() + spool.WORKER_FAILED_DELAY, abs=1e-6)
    clock.advance(spool.WORKER_FAILED_DELAY)
    assert calls == [id, id]


def test_stop_waits_for_attempts_under_way(stores: Callable[..., SpoolStore], clock: Clock) -> None:
    store = stores()
    id = commit(store, clock)
    worker = Worker()
    store.start(worker)
    stopped = store.stop()
    assert not stopped.called
    assert clock.getDelayedCalls() == []
    worker.defer(0, clock.seconds() + 60)
    assert stopped.called
    assert store.get(id).attempts == 1
    commit(store, clock)
    assert len(worker.calls) == 1, "a stopped store hands nothing out"


def test_file_work_in_the_thread_pool(tmp_path: Path) -> None:
    """With a reactor that has threads, claims, saves and scans go through its pool."""
    clock = PoolClock()
    clock.advance(time.time())
    store = SpoolStore(str(tmp_path / "spool"), reactor=clock)
    d = store.enqueue(envelope(new_id(), clock), SPOOL_CONTENT)
    assert clock.pool.run() == ["enqueue_files"] and d.called
    worker = Worker()
    store.start(worker)
    assert clock.pool.run() == ["cleanup_files", "scan_files", "claim_files"]
    worker.defer(0, clock.seconds() + 10)
    stopped = store.stop()
    assert not stopped.called
    assert clock.pool.run() == ["settle_files"]
    assert stopped.called and clock.getDelayedCalls() == []


@pytest_twisted.inlineCallbacks
def test_with_the_real_reactor(tmp_path: Path) -> Iterator[Deferred[Any]]:
    from twisted.internet import reactor

    store = SpoolStore(str(tmp_path / "spool"), reactor=reactor)
    handed: Deferred[Message] = Deferred()

    def worker(message: Message, open_content: Any) -> Deferred[Message]:
        with open_content() as file:
            assert file.read() == SPOOL_CONTENT
        message.recipients[0].status = Status.DELIVERED
        handed.callback(message)
        return succeed(message)

    store.start(worker)
    entry = store.open_entry()
    entry.write(SPOOL_CONTENT)
    yield entry.commit(envelope(entry.id, reactor))  # type: ignore[arg-type]
    message = yield handed
    yield store.stop()
    assert message.id == entry.id
    assert files(tmp_path / "spool" / "messages") == []


# ---- held messages, flush, management -----------------------------------------------------------------------------

def test_held_messages_are_skipped_until_released(stores: Callable[..., SpoolStore], clock: Clock,
                                                  tmp_path: Path) -> None:
    store = stores(scan_interval=60)
    held = commit(store, clock)
    other = commit(store, clock)
    born_held = commit(store, clock, held=True)
    store.hold(held)
    assert store.get(held).held
    assert mtime(tmp_path / "spool" / "messages" / f"{held}.json") == HELD_MTIME
    worker = Worker()
    store.start(worker)
    assert worker.ids == [other]
    worker.deliver()
    assert store.flush() == 0, "flush leaves held messages alone"
    clock.advance(60)
    assert worker.ids == [other]
    store.release(held)
    assert not store.get(held).held
    clock.advance(60)
    assert worker.ids == [other, held]
    worker.deliver()
    assert store.get(born_held).held


def test_a_held_flag_wins_over_a_due_mtime(stores: Callable[..., SpoolStore], clock: Clock,
                                           tmp_path: Path) -> None:
    """Should the mtime say due while the envelope says held, the message is not handed out."""
    store = stores()
    id = commit(store, clock, held=True)
    path = tmp_path / "spool" / "messages" / f"{id}.json"
    os.utime(path, (clock.seconds() - 1, clock.seconds() - 1))
    worker = Worker()
    store.start(worker)
    assert worker.calls == []
    assert mtime(path) == HELD_MTIME


def test_flush_from_another_store_makes_the_running_one_scan(stores: Callable[..., SpoolStore],
                                                             clock: Clock) -> None:
    running = stores(scan_interval=3600)
    id = commit(running, clock, next_attempt=clock.seconds() + 3000)
    worker = Worker()
    running.start(worker)
    assert worker.calls == []
    assert stores().flush([id]) == 1
    clock.advance(spool.TRIGGER_INTERVAL)
    assert worker.ids == [id]
    worker.deliver()
    later = commit(running, clock, next_attempt=clock.seconds() + 3000)
    assert stores().flush() == 1
    clock.advance(spool.TRIGGER_INTERVAL)
    assert worker.ids == [id, later]
    worker.deliver()


def test_a_retry_sooner_than_the_scan_interval_is_made_on_time(stores: Callable[..., SpoolStore],
                                                                clock: Clock) -> None:
    store = stores(scan_interval=600)
    id = commit(store, clock)
    worker = Worker()
    store.start(worker)
    assert worker.ids == [id]
    worker.defer(0, clock.seconds() + 5)
    clock.advance(4)
    assert worker.ids == [id]
    clock.advance(1)
    assert worker.ids == [id, id], "tried again at its next_attempt, not at the next scan"
    worker.defer(1, clock.seconds() + 700)
    clock.advance(699)
    assert worker.ids == [id, id]
    clock.advance(1)
    assert worker.ids == [id, id, id], "a retry later than scan_interval is made on time too, not up to a scan late"
    worker.deliver()


def test_a_commit_without_a_local_runner_wakes_the_runners_of_other_processes(stores: Callable[..., SpoolStore],
                                                                             clock: Clock) -> None:
    running = stores(scan_interval=3600)
    worker = Worker()
    running.start(worker)
    accepting = stores(scan_interval=3600, wake_others=True)
    id = commit(accepting, clock)
    assert worker.calls == []
    clock.advance(spool.TRIGGER_INTERVAL)
    assert worker.ids == [id], "seen within a second, not at the next scan"
    worker.deliver()


def test_delete_removes_a_message(stores: Callable[..., SpoolStore], clock: Clock, tmp_path: Path) -> None:
    store = stores()
    id = commit(store, clock)
    kept = commit(store, clock)
    store.delete(id)
    assert files(tmp_path / "spool" / "messages") == [f"{kept}.eml", f"{kept}.json"]
    assert [m.id for m in store.list()] == [kept]


def test_management_needs_no_store_nor_reactor(stores: Callable[..., SpoolStore], clock: Clock,
                                               tmp_path: Path) -> None:
    """`SpoolAdmin` alone (what the queue command uses) sees and changes what a store wrote, on its own clock."""
    id = commit(stores(), clock, next_attempt=clock.seconds() + 600)
    admin = SpoolAdmin(str(tmp_path / "spool"), clock=lambda: clock.seconds() + 60)
    assert [m.id for m in admin.list()] == [id]
    admin.hold(id)
    assert admin.get(id).held and mtime(tmp_path / "spool" / "messages" / f"{id}.json") == HELD_MTIME
    admin.release(id)
    assert admin.flush() == 1
    assert admin.get(id).next_attempt == pytest.approx(clock.seconds() + 60, abs=1e-6)


@pytest.mark.parametrize("id", ["0" * 20, "../messages/x", ".hidden", "", "A" * 65])
def test_management_calls_on_unknown_ids(stores: Callable[..., SpoolStore], id: str) -> None:
    store = stores()
    for call in (store.hold, store.release, store.delete, store.get, lambda i: store.flush([i])):
        with pytest.raises(NoSuchMessage, match="no such message"):
            call(id)


def test_list_reads_every_message(stores: Callable[..., SpoolStore], clock: Clock, tmp_path: Path) -> None:
    store = stores()
    ids = sorted(commit(store, clock) for _ in range(3))
    (tmp_path / "spool" / "messages" / f"{ids[0]}.json").write_text("[]")
    skipped: list[str] = []
    listed = sorted(m.id for m in store.list(lambda id, error: skipped.append(id)))
    assert (listed, skipped) == (ids[1:], ids[:1])


def test_several_stores_on_one_spool_never_share_a_message(stores: Callable[..., SpoolStore],
                                                           clock: Clock) -> None:
    """The second store skips what the first has locked, and takes it once the first let it go."""
    one, two = stores(), stores()
    ids = [commit(one, clock) for _ in range(4)]
    first, second = Worker(), Worker()
    one.start(first)
    two.start(second)
    assert sorted(first.ids) == sorted(ids) and second.calls == []
    clock.advance(60)
    assert second.calls == []
    for index in range(2):
        first.defer(index, clock.seconds())
    for index in range(2, 4):
        first.deliver(index)
    stop(one)
    clock.advance(60)
    assert sorted(second.ids) == sorted(first.ids[:2])
    for index in range(2):
        second.deliver(index)


# ---- saving: checkpoints, a state that cannot be saved, counts ---------------------------------------------------

def test_a_state_that_cannot_be_saved_postpones_the_message(stores: Callable[..., SpoolStore], clock: Clock,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk is full when the attempt's outcome is saved: the old state stays, but its next attempt moves
    ``save_failed_delay`` ahead (a utime needs no space), so the deliveries are not repeated at every scan."""
    store = stores(save_failed_delay=4000)
    id = commit(store, clock)
    worker = Worker()
    store.start(worker)

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_files, "write_json", full)
    with capturedLogs() as events:
        worker.defer(0, clock.seconds() + 300)
    monkeypatch.undo()
    assert any(e.get("log_failure") and e["log_failure"].check(OSError) for e in events)
    assert mtime(tmp_path / "spool" / "messages" / f"{id}.json") == pytest.approx(clock.seconds() + 4000, abs=1e-6)
    assert store.get(id).attempts == 0
    clock.advance(60 * 60)
    assert len(worker.calls) == 1, "not offered again at the next scans"
    clock.advance(400)
    assert len(worker.calls) == 2 and worker.calls[1][0].attempts == 0
    worker.deliver()


def test_a_checkpoint_saves_the_state_keeps_the_lock_and_schedules_ahead(stores: Callable[..., SpoolStore],
                                                                         clock: Clock, tmp_path: Path) -> None:
    store = stores()
    id = commit(store, clock, recipients=[Recipient("a@example.net"), Recipient("b@example.org")])
    worker = Worker()
    store.start(worker)
    message, _, d = worker.calls[0]
    message.recipients[0].status = Status.DELIVERED
    done: list[Any] = []
    store.checkpoint(message.copy()).addBoth(done.append)
    assert done == [None]
    path = tmp_path / "spool" / "messages" / f"{id}.json"
    assert store.get(id).recipients[0].status is Status.DELIVERED
    assert mtime(path) == pytest.approx(clock.seconds() + spool.CHECKPOINT_DELAY, abs=1e-6)
    assert spool_files.try_lock(store.paths, id) is None, "the new envelope is locked too"
    store.flush()
    other = stores()
    second = Worker()
    other.start(second)
    assert second.calls == [], "due after the flush, but locked"
    message.recipients[1].status = Status.DELIVERED
    d.callback(message)
    assert files(tmp_path / "spool" / "messages") == []
    failed: list[Any] = []
    store.checkpoint(message).addErrback(failed.append)
    assert failed[0].check(KeyError), "not being attempted any more"


CHECKPOINT_THEN_HANG = """
import sys, time
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from esmtpkit.core.outbound import Outcome
from esmtpkit.core.schedule import Schedule
from esmtpkit.queue.runner import QueueRunner
from esmtpkit.queue.spool import SpoolStore


class Deliverer:
    def deliver(self, message, indexes, open_content):
        if message.recipients[indexes[0]].domain == "example.net":
            return succeed({i: Outcome(250, "2.0.0", "Ok", "mx.example.net[192.0.2.1]") for i in indexes})
        return Deferred()  # example.com hangs


class Store(SpoolStore):
    def checkpoint(self, message):
        return super().checkpoint(message).addCallback(lambda _: print("checkpointed", flush=True))


clock = Clock()
clock.advance(time.time())
store = Store(sys.argv[1], reactor=clock)
QueueRunner(store, Deliverer(), reactor=clock, schedule=Schedule(), hostname="mx.test").start()
sys.stdin.read()
"""


class Recording:
    """A deliverer that delivers everything and records the addresses of each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def deliver(self, message: Message, indexes: list[int], open_content: Any) -> Deferred[dict[int, Outcome]]:
        self.calls.append(tuple(message.recipients[i].address for i in indexes))
        return succeed({i: Outcome(250, "2.0.0", "Ok", "mx[192.0.2.9]") for i in indexes})


def test_kill_9_while_one_domain_hangs_does_not_deliver_the_finished_domain_again(
        stores: Callable[..., SpoolStore], clock: Clock, tmp_path: Path) -> None:
    """A runner process delivers to example.net, then hangs on example.com and is killed: the next runner
    delivers to example.com only (the checkpoint saved example.net's 250)."""
    from esmtpkit.core.schedule import Schedule
    from esmtpkit.queue.runner import QueueRunner

    store = stores()
    id = commit(store, clock, recipients=[Recipient("bob@example.net"), Recipient("dave@example.com")])
    process = subprocess.Popen([sys.executable, "-c", CHECKPOINT_THEN_HANG, str(tmp_path / "spool")],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline() == "checkpointed\n"
        assert mtime(tmp_path / "spool" / "messages" / f"{id}.json") > time.time() + 200  # not due for others
        store.flush()
        deliverer = Recording()
        runner = QueueRunner(store, deliverer, reactor=clock, schedule=Schedule(), hostname="mx.test")
        runner.start()
        assert deliverer.calls == [], "due after the flush, but the runner under way holds its lock"
    finally:
        process.kill()
        process.wait()
    clock.advance(60)
    assert deliverer.calls == [("dave@example.com",)]
    assert files(tmp_path / "spool" / "messages") == []


def test_each_scan_reports_the_queue_counts(stores: Callable[..., SpoolStore], clock: Clock) -> None:
    store = stores(concurrency=1)
    counts: list[dict[str, int]] = []
    store.watch_counts(lambda found: counts.append(dict(found)))
    for _ in range(3):
        commit(store, clock)
    held = commit(store, clock)
    store.hold(held)
    worker = Worker()
    store.start(worker)
    assert counts == [{"queued": 3, "held": 1, "active": 0}]
    clock.advance(60)
    assert counts[-1] == {"queued": 3, "held": 1, "active": 1}
    worker.deliver()
    worker.deliver()
    worker.deliver()
    clock.advance(60)
    assert counts[-1] == {"queued": 0, "held": 1, "active": 0}


# ---- locks held by another process -------------------------------------------------------------------------------

LOCKER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def lock_in_subprocess(path: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", LOCKER, str(path)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline() == "locked\n"
    return process


def test_a_message_locked_by_another_process_is_skipped_and_busy(stores: Callable[..., SpoolStore], clock: Clock,
                                                                 tmp_path: Path) -> None:
    store = stores(lock_wait=0.2)
    id = commit(store, clock)
    other = commit(store, clock)
    holder = lock_in_subprocess(tmp_path / "spool" / "messages" / f"{id}.json")
    try:
        worker = Worker()
        store.start(worker)
        assert worker.ids == [other]
        worker.deliver()
        for call in (store.hold, store.delete):
            with pytest.raises(MessageBusy, match=id):
                call(id)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()
    store.hold(id)
    assert store.get(id).held
    store.delete(id)
    assert list(store.list()) == []


def test_a_management_call_waits_for_the_lock(stores: Callable[..., SpoolStore], clock: Clock,
                                              tmp_path: Path) -> None:
    """A lock released within ``lock_wait`` is waited for, not reported busy."""
    store = stores(lock_wait=60)
    id = commit(store, clock)
    path = tmp_path / "spool" / "messages" / f"{id}.json"
    holder = subprocess.Popen([sys.executable, "-c", LOCKER.replace("sys.stdin.read()", "import time; time.sleep(0.3)"),
                               str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    store.delete(id)
    holder.wait()
    assert list(store.list()) == []


def test_the_running_lock_is_on_the_current_envelope(stores: Callable[..., SpoolStore], clock: Clock,
                                                     tmp_path: Path) -> None:
    """While a worker has a message, another process cannot lock its envelope."""
    store = stores()
    id = commit(store, clock)
    worker = Worker()
    store.start(worker)
    fd = os.open(tmp_path / "spool" / "messages" / f"{id}.json", os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    worker.deliver()


# ---- a large queue ------------------------------------------------------------------------------------------------

MEASURE = """
import json, resource, sys, time
from twisted.internet import reactor  # LoopingCall imports it: loaded before the baseline
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from esmtpkit.queue.spool import SpoolStore

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

clock = Clock()
clock.advance(time.time())
warm = SpoolStore(sys.argv[2], reactor=clock, concurrency=1, active_limit=1)
warm.start(lambda message, content: Deferred())
before = peak()
store = SpoolStore(sys.argv[1], reactor=clock, concurrency=10, active_limit=int(sys.argv[3]))
handed = []
store.start(lambda message, content: handed.append(message.id) or Deferred())
clock.advance(60)
clock.advance(1)
scanned = peak()
listed = sum(1 for _ in store.list())
print(json.dumps({"before": before, "scanned": scanned, "listed": peak(), "handed": len(handed),
                  "count": listed}))
"""


def write_file(path: Path, data: bytes) -> None:
    """A small file written with two system calls (pathlib's text layers take ten times as long here)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_a_hundred_thousand_messages_in_flat_memory(tmp_path: Path) -> None:
    """Scanning and listing 100,000 queued messages takes memory for ``active_limit`` of them, not for all."""
    messages = tmp_path / "big" / "messages"
    messages.mkdir(parents=True)
    template = json.dumps(Message(id="@", sender="sender@example.org", recipients=[Recipient("rcpt@example.net")],
                                  size=3).to_json())
    count = 100_000
    try:
        for number in range(count):
            id = new_id()
            if number % 50_000 == 0:  # the contents share inodes (ext4 allows 65,000 links to one)
                content = tmp_path / "big" / f"content{number}"
                write_file(content, b"x\r\n")
            os.link(content, messages / f"{id}.eml")
            write_file(messages / f"{id}.json", template.replace('"@"', f'"{id}"').encode())
        warm = tmp_path / "warm"
        warm.mkdir()
        active_limit = 100
        run = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "big"), str(warm), str(active_limit)],
                             capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(tmp_path / "big")  # not left for pytest's keep-three-runs rotation: 200,000 files
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert (seen["handed"], seen["count"]) == (10, count)
    # Generous: 100,000 Message objects alone would take well over 100 MB.
    bound = 16 * 2**20 + active_limit * 64 * 2**10
    assert seen["scanned"] - seen["before"] < bound
    assert seen["listed"] - seen["before"] < bound
