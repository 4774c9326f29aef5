"""`SpoolScheduler`: finds the due messages of a spool directory and hands them to the worker, with bounded memory.

It scans ``messages/`` now, every ``scan_interval`` seconds and whenever the flush trigger changes, keeping at most
``active_limit`` ids (the earliest due); it hands them to the worker at most ``concurrency`` at a time, the higher
MT-PRIORITY (RFC 6710) first and then the earliest due, each
claimed under its lock, and saves what the worker made of each (`esmtpkit.queue.spool_files` does the file work),
along with the worker's checkpoints in between. Each scan's counts (messages queued, held, and being attempted
here) go to ``on_counts``. Once an hour it removes what killed processes left behind. `stop` waits for everything
under way.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Mapping

from twisted.internet.defer import Deferred, DeferredLock, fail, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from esmtpkit.core.outbound import Message
from esmtpkit.queue import spool_files as files
from esmtpkit.queue.interfaces import OpenContent, Worker, finished

__all__ = ["SpoolScheduler", "RunFileWork", "TRIGGER_INTERVAL", "WORKER_FAILED_DELAY", "CHECKPOINT_DELAY",
           "SAVE_FAILED_DELAY"]

#: How often (seconds) a running store looks at the flush trigger file.
TRIGGER_INTERVAL = 1.0
#: How long (seconds) a message waits after its worker failed unexpectedly (a bug, not a delivery failure).
WORKER_FAILED_DELAY = 300.0
#: How far in the future (seconds) a checkpoint puts the next attempt: how long a message waits if the process
#: attempting it dies, so that no scan takes it while the attempt goes on.
CHECKPOINT_DELAY = 300.0
#: How long (seconds) a message waits by default when its new state could not be saved (a full disk): the old
#: state is attempted again then, not at every scan (the schedule's default ``max_backoff``).
SAVE_FAILED_DELAY = 4000.0

#: Runs a blocking function with its arguments (in a thread pool, or inline) and fires with its result.
RunFileWork = Callable[..., "Deferred[Any]"]


@dataclass
class _Attempt:
    """A message with the worker: its claim (the locked envelope) and the lock that orders its file work."""

    claim: files.Claim
    order: DeferredLock = field(default_factory=DeferredLock)


class SpoolScheduler:
    """Hands the due messages of the spool at ``paths`` to a worker: ``concurrency`` at once at most, at most
    ``active_limit`` ids in memory, a scan every ``scan_interval`` seconds. ``work`` runs the file work.
    ``save_failed_delay`` is how long a message waits when its new state could not be saved; ``on_counts``, when
    set, hears each scan's counts (``{"queued": n, "held": n, "active": n}``)."""

    log = Logger()

    def __init__(self, paths: files.SpoolPaths, *, reactor: IReactorTime, work: RunFileWork, concurrency: int,
                 scan_interval: float, active_limit: int, save_failed_delay: float = SAVE_FAILED_DELAY) -> None:
        self.paths = paths
        self.reactor = reactor
        self.concurrency = concurrency
        self.scan_interval = scan_interval
        self.active_limit = active_limit
        self.save_failed_delay = save_failed_delay
        self.on_counts: Callable[[Mapping[str, int]], None] | None = None
        self._work = work
        self._attempts: dict[str, _Attempt] = {}  # ids with the worker
        self._worker: Worker | None = None
        self._running = False
        self._ready: list[tuple[int, int, str]] = []  # heap of (-priority, due ns, id): waiting for the worker
        self._known: set[str] = set()  # ids in _ready or with the worker
        self._busy: set[str] = set()  # ids being claimed, with the worker, or being saved
        self._tracked = 0  # other work under way that stop waits for (commits)
        self._scanning = False
        self._cleaning = False
        self._pumping = False
        self._pump_again = False
        self._rescan = False
        self._more = False  # the last scan found more due messages than it kept
        self._claimed = False  # a message of the last scan's batch was taken
        self._trigger_seen: int | None = None
        self._last_cleanup = float("-inf")
        self._loops: list[LoopingCall] = []
        self._wake: IDelayedCall | None = None  # an extra scan for a retry due before the next regular one
        self._idle: list[Deferred[None]] = []

    @property
    def running(self) -> bool:
        """Whether messages are being handed to a worker."""
        return self._running

    def start(self, worker: Worker) -> None:
        """Clean up after killed processes, then scan now, every ``scan_interval`` seconds, and whenever the
        flush trigger changes, handing due messages to ``worker``."""
        if self._running:
            raise RuntimeError("the spool store is already started")
        self.paths.prepare()
        self._worker = worker
        self._running = True
        self._trigger_seen = files.trigger_mtime(self.paths)
        self._cleanup()
        scan = LoopingCall(self._scan)
        scan.clock = self.reactor
        trigger = LoopingCall(self._check_trigger)
        trigger.clock = self.reactor
        self._loops = [scan, trigger]
        scan.start(self.scan_interval, now=True)
        trigger.start(TRIGGER_INTERVAL, now=False)

    def stop(self) -> "Deferred[None]":
        """Stop scanning and handing out; fires once attempts, saves, scans and tracked work have finished."""
        self._running = False
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = None
        for _, _, id in self._ready:
            self._known.discard(id)
        self._ready = []
        done: Deferred[None] = Deferred()
        self._idle.append(done)
        self._check_idle()
        return done

    def track(self, work: "Deferred[Any]") -> "Deferred[Any]":
        """Count ``work`` (a commit) as under way until it fires, so that `stop` waits for it; returns it."""
        self._tracked += 1

        def ended(result: object) -> object:
            self._tracked -= 1
            self._check_idle()
            return result

        return work.addBoth(ended)

    def offer(self, id: str, due_ns: int, rank: int = 0) -> None:
        """A message just committed here (MT-PRIORITY ``rank``): to the worker now if it is due and there is
        room."""
        if not self._running or id in self._known:
            return
        if len(self._known) >= self.active_limit:
            self._more = True  # no room now: scan again as soon as the active set drains, not at the next interval
            return
        if due_ns > files.to_ns(self._now()):
            return
        self._known.add(id)
        heapq.heappush(self._ready, (-rank, due_ns, id))
        self._pump()

    def _now(self) -> float:
        return self.reactor.seconds()

    # -- scanning --

    def _scan(self) -> None:
        """Look for due messages (at most enough to fill ``active_limit``) and hand them out."""
        if not self._running:
            return
        if self._scanning:
            self._rescan = True
            return
        if self._now() - self._last_cleanup >= files.STALE_AGE and not self._cleaning:
            self._cleanup()
        room = self.active_limit - len(self._known)
        if room <= 0:
            self._more = True
            return
        self._scanning = True
        self._rescan = False
        d = self._work(files.scan_files, self.paths, files.to_ns(self._now()), room, frozenset(self._known))
        d.addCallbacks(self._scanned,
                       lambda f: self.log.failure("spool {path}: scan failed", f, path=self.paths.root))
        d.addBoth(self._scan_ended)

    def _scanned(self, scan: files.Scan) -> None:
        if not self._running:
            return
        self._count(scan)
        found = scan.found
        self._more = scan.more
        self._claimed = False
        for due, id in found:
            if id not in self._known and len(self._known) < self.active_limit:
                self._known.add(id)
                heapq.heappush(self._ready, (-scan.ranks.get(id, 0), due, id))
        self._pump()

    def _count(self, scan: files.Scan) -> None:
        if self.on_counts is None:
            return
        try:
            self.on_counts({"queued": scan.queued, "held": scan.held, "active": len(self._attempts)})
        except Exception:
            self.log.failure("spool {path}: the queue counts' listener failed", path=self.paths.root)

    def _scan_ended(self, _: object) -> None:
        self._scanning = False
        if self._rescan and self._running:
            self._scan()
        else:
            self._pump()
        self._check_idle()

    # -- handing out --

    def _pump(self) -> None:
        """Hand ready messages to the worker while there is room; fetch more when a large backlog is left.

        Re-entered (a worker that answers at once, file work done inline), it only asks the running loop to go
        round again, so the stack stays flat however many messages pass.
        """
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            again = True
            while again:
                self._pump_again = False
                while self._running and self._ready and len(self._busy) < self.concurrency:
                    _, _, id = heapq.heappop(self._ready)
                    self._attempt(id)
                if self._running and not self._ready and self._more and self._claimed and not self._scanning:
                    self._claimed = False
                    self._scan()
                again = self._pump_again
        finally:
            self._pumping = False

    def _attempt(self, id: str) -> None:
        self._busy.add(id)
        d = self._work(files.claim_files, self.paths, id, files.to_ns(self._now()))
        d.addCallback(self._claimed_one, id)
        d.addErrback(lambda f: self.log.failure("spool {path}: attempt on {id} failed", f, path=self.paths.root,
                                                id=id))
        d.addBoth(self._attempt_ended, id)

    def _claimed_one(self, claim: files.Claim, id: str) -> "Deferred[None] | None":
        if claim.problem:
            self.log.error("spool {path}: {id} set aside in corrupt/: {problem}", path=self.paths.root, id=id,
                           problem=claim.problem)
        if claim.message is None:
            return None
        message = claim.message
        if not self._running:
            os.close(claim.fd)
            return None
        self._claimed = True
        assert self._worker is not None
        attempt = self._attempts[id] = _Attempt(claim)
        eml = self.paths.eml(id)

        def open_content() -> IO[bytes]:
            return open(eml, "rb")

        content: OpenContent = open_content
        d = maybeDeferred(self._worker, message, content)

        def worked(result: Message) -> "Deferred[None]":
            fallback = files.to_ns(self._now() + self.save_failed_delay)
            saving = attempt.order.run(self._work, files.settle_files, self.paths, claim, id, result, self._now(),
                                       fallback)
            if not finished(result):
                saving.addCallback(lambda _: self._wake_at(result.next_attempt))
            return saving.addErrback(not_saved)

        def not_saved(failure: Failure) -> None:
            self.log.failure("spool {path}: cannot save the new state of {id}; its old state is tried again in "
                             "{delay:g} s (deliveries of this attempt may then be made again)", failure,
                             path=self.paths.root, id=id, delay=self.save_failed_delay)

        def failed(failure: Failure) -> "Deferred[None]":
            self.log.failure("spool {path}: worker failed on {id}; next try in {delay:g} s", failure,
                             path=self.paths.root, id=id, delay=WORKER_FAILED_DELAY)
            return attempt.order.run(self._work, files.postpone_files, self.paths, claim, id,
                                     files.to_ns(self._now() + WORKER_FAILED_DELAY))

        return d.addCallbacks(worked, failed)

    def checkpoint(self, message: Message) -> "Deferred[None]":
        """Save the state so far of ``message``, being attempted here; its lock stays this process's."""
        attempt = self._attempts.get(message.id)
        if attempt is None:
            return fail(KeyError(f"{message.id} is not being attempted by this store"))
        due = files.to_ns(self._now() + CHECKPOINT_DELAY)
        return attempt.order.run(self._work, files.checkpoint_files, self.paths, attempt.claim, message.id,
                                 message.copy(), due)

    def _wake_at(self, when: float) -> None:
        """Scan at ``when`` too, so a retry is made at its ``next_attempt`` rather than at the first regular scan
        after it. One timer, for the earliest retry saved here, and never sooner than a second from now (so a burst
        of short retries costs one scan a second at most)."""
        if not self._running:
            return
        when = max(when, self._now() + TRIGGER_INTERVAL)
        if self._wake is not None and self._wake.active():
            if self._wake.getTime() <= when:
                return
            self._wake.cancel()
        self._wake = self.reactor.callLater(max(0.0, when - self._now()), self._woken)

    def _woken(self) -> None:
        self._wake = None
        self._scan()

    def _attempt_ended(self, _: object, id: str) -> None:
        self._attempts.pop(id, None)
        self._busy.discard(id)
        self._known.discard(id)
        self._pump()
        self._check_idle()

    def _check_idle(self) -> None:
        if self._running or self._busy or self._tracked or self._scanning or self._cleaning:
            return
        waiting, self._idle = self._idle, []
        for d in waiting:
            d.callback(None)

    # -- flush trigger and cleanup --

    def _check_trigger(self) -> None:
        seen = files.trigger_mtime(self.paths)
        if seen != self._trigger_seen:
            self._trigger_seen = seen
            self._scan()

    def _cleanup(self) -> None:
        self._last_cleanup = self._now()
        self._cleaning = True
        d = self._work(files.cleanup_files, self.paths, self._now())

        def removed(paths: list[str]) -> None:
            for path in paths:
                self.log.warn("spool {path}: removed {file}, left by a process that stopped mid-write",
                              path=self.paths.root, file=os.path.relpath(path, self.paths.root))

        d.addCallbacks(removed, lambda f: self.log.failure("spool {path}: cleanup failed", f,
                                                           path=self.paths.root))

        def ended(_: object) -> None:
            self._cleaning = False
            self._check_idle()

        d.addBoth(ended)
