"""`MemoryStore`: an `IQueueStore` kept in memory, for tests of the queue handler and runner (yours and ours).

It behaves as the durable backends do (messages offered when due, the higher MT-PRIORITY (RFC 6710) first, at
most ``concurrency`` at a time, state saved from what the worker returns and from its checkpoints, finished
messages forgotten: `esmtpkit.queue.interfaces.finished`) but keeps nothing across a restart. Time is the injected reactor's, so a test
drives retries with `twisted.internet.task.Clock`. Setting ``failing`` makes every commit and enqueue fail, as a
full disk or an unreachable broker would.
"""

from __future__ import annotations

import io
from typing import IO, Any, Iterator

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpkit.core.outbound import Message
from esmtpkit.queue.interfaces import ICheckpoint, IQueueEntry, IQueueStore, Worker, finished
from esmtpkit.queue.shared import DefaultReactor

__all__ = ["MemoryStore", "MemoryEntry"]


@implementer(IQueueEntry)
class MemoryEntry:
    """One message being written into a `MemoryStore`."""

    def __init__(self, store: "MemoryStore") -> None:
        self._store = store
        self._content = io.BytesIO()
        self.closed = False

    def write(self, data: bytes) -> None:
        """Append content."""
        if self.closed:
            raise ValueError("write to a committed or discarded entry")
        self._content.write(data)

    def commit(self, message: Message) -> "Deferred[None]":
        """Store the message and its content, unless the store is ``failing``."""
        if self.closed:
            return fail(ValueError("entry already committed or discarded"))
        self.closed = True
        return self._store.enqueue(message, self._content.getvalue())

    def discard(self) -> None:
        """Forget the content written so far."""
        self.closed = True
        self._content = io.BytesIO()


@implementer(IQueueStore, ICheckpoint)
class MemoryStore:
    """Queued messages in two dictionaries: ``messages`` (id -> `Message`, as last saved) and ``contents``.

    ``retry_after`` is how long a message waits when the worker failed on it (its state is left as it was).
    ``failing``, when set to an exception, makes `MemoryEntry.commit` and `enqueue` fail with it.
    """

    name = "memory"
    log = Logger()

    #: The reactor whose clock and timers the store uses (the global one unless given).
    reactor = DefaultReactor()

    def __init__(self, *, reactor: Any = None, concurrency: int = 20, retry_after: float = 60.0) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.messages: dict[str, Message] = {}
        self.contents: dict[str, bytes] = {}
        self.concurrency = concurrency
        self.retry_after = retry_after
        self.failing: BaseException | None = None
        self.checkpoints = 0
        self.reactor = reactor
        self._worker: Worker | None = None
        self._active: dict[str, Deferred[None]] = {}
        self._timer: IDelayedCall | None = None
        self._stopping: Deferred[None] | None = None

    @property
    def running(self) -> bool:
        """True between `start` and `stop`."""
        return self._worker is not None

    @property
    def active(self) -> int:
        """Messages the worker is attempting now."""
        return len(self._active)

    # ---- IQueueStore ------------------------------------------------------------------------------------------

    def open_entry(self) -> MemoryEntry:
        """A new entry to write one message into."""
        return MemoryEntry(self)

    def enqueue(self, message: Message, content: bytes) -> "Deferred[None]":
        """Store ``message`` with ``content`` (replacing one with the same id); fails while ``failing`` is set."""
        if self.failing is not None:
            return fail(self.failing)
        self.messages[message.id] = message.copy()
        self.contents[message.id] = bytes(content)
        self._schedule()
        return succeed(None)

    def checkpoint(self, message: Message) -> "Deferred[None]":
        """Save the state so far of a message being attempted (``checkpoints`` counts the calls)."""
        self.checkpoints += 1
        if message.id in self._active and message.id in self.messages:
            self._keep(message)
        return succeed(None)

    def start(self, worker: Worker) -> None:
        """Offer due messages to ``worker`` from now on."""
        self._worker = worker
        self._stopping = None
        self._schedule()

    def stop(self) -> "Deferred[None]":
        """Offer no more messages; fires once the attempts under way have finished and their state is saved."""
        self._worker = None
        self._cancel_timer()
        if not self._active:
            return succeed(None)
        if self._stopping is None:
            self._stopping = Deferred()
        return self._stopping

    # ---- management, as a queue command would do it -----------------------------------------------------------

    def list(self) -> Iterator[Message]:
        """Copies of the queued messages, oldest first."""
        for message in sorted(self.messages.values(), key=lambda m: (m.arrived, m.id)):
            yield message.copy()

    def open_content(self, id: str) -> IO[bytes]:
        """A readable file of message ``id``'s content (KeyError if there is no such message)."""
        return io.BytesIO(self.contents[id])

    def hold(self, id: str) -> None:
        """Keep message ``id`` from being offered until `release`."""
        self.messages[id].held = True

    def release(self, id: str) -> None:
        """Let a held message be offered again, now."""
        message = self.messages[id]
        message.held = False
        message.next_attempt = 0.0
        self._schedule()

    def delete(self, id: str) -> None:
        """Forget message ``id`` (an attempt under way still saves nothing for it)."""
        self.messages.pop(id, None)
        self.contents.pop(id, None)

    def flush(self, ids: Any = None) -> None:
        """Make the given messages (default: all) due now."""
        for id in (list(self.messages) if ids is None else ids):
            if id in self.messages:
                self.messages[id].next_attempt = 0.0
        self._schedule()

    # ---- handing out ------------------------------------------------------------------------------------------

    def _due(self, now: float) -> list[Message]:
        waiting = [m for m in self.messages.values() if not m.held and m.id not in self._active]
        return sorted((m for m in waiting if m.next_attempt <= now), key=lambda m: (-m.rank, m.next_attempt, m.id))

    def _schedule(self) -> None:
        """Hand out what is due now (on the next turn of the reactor) and set a timer for the next one."""
        if self._worker is None:
            return
        self._cancel_timer()
        waiting = [m.next_attempt for m in self.messages.values() if not m.held and m.id not in self._active]
        if waiting and len(self._active) < self.concurrency:
            delay = max(0.0, min(waiting) - self.reactor.seconds())
            self._timer = self.reactor.callLater(delay, self._run)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _run(self) -> None:
        self._timer = None
        worker = self._worker
        if worker is None:
            return
        for message in self._due(self.reactor.seconds()):
            if len(self._active) >= self.concurrency:
                break
            self._offer(worker, message)
        self._schedule()

    def _offer(self, worker: Worker, message: Message) -> None:
        content = self.contents[message.id]
        done: Deferred[None] = Deferred()
        self._active[message.id] = done
        attempt = maybeDeferred(worker, message.copy(), lambda: io.BytesIO(content))
        attempt.addCallbacks(self._save, self._failed, errbackArgs=(message.id,))
        attempt.addBoth(self._finished, message.id)

    def _save(self, message: Message) -> None:
        if message.id not in self.messages:
            return
        if finished(message):
            self.delete(message.id)
            return
        self._keep(message)

    def _keep(self, message: Message) -> None:
        held = self.messages[message.id].held  # held while the attempt was under way: stays held
        saved = self.messages[message.id] = message.copy()
        saved.held = saved.held or held

    def _failed(self, failure: Failure, id: str) -> None:
        self.log.failure("worker failed on message {id}; trying again in {delay:g} s", failure, id=id,
                         delay=self.retry_after)
        if id in self.messages:
            self.messages[id].next_attempt = self.reactor.seconds() + self.retry_after

    def _finished(self, _: object, id: str) -> None:
        self._active.pop(id).callback(None)
        if not self._active and self._stopping is not None:
            stopping, self._stopping = self._stopping, None
            stopping.callback(None)
        self._schedule()
