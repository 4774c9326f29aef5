"""`SpoolAdmin`: look into and change a spool directory from any process, while stores deliver from it.

The calls (`list`, `get`, `hold`, `release`, `delete`, `flush`) are synchronous and meant for the command line or
a thread. A call that changes a message first takes the lock a delivery holds (see `esmtpkit.queue.spool_files`),
waiting up to ``lock_wait`` seconds (`LOCK_WAIT` by default) before it calls the message busy. Errors a user can
act on are raised as `SpoolError`, whose text is one line.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Iterable, Iterator

from twisted.logger import Logger

from esmtpkit.core.outbound import Message
from esmtpkit.queue import spool_files as files

__all__ = ["SpoolAdmin", "SpoolError", "NoSuchMessage", "MessageBusy", "LOCK_WAIT"]

#: How long (seconds) a management call waits by default for a message being delivered before calling it busy.
LOCK_WAIT = 5.0


class SpoolError(Exception):
    """A management call could not be done; the message says why in one line."""


class NoSuchMessage(SpoolError, LookupError):
    """No message with this id is in the queue."""

    def __init__(self, id: str) -> None:
        super().__init__(f"no such message: {id}")
        self.id = id

    def __str__(self) -> str:
        return str(self.args[0])


class MessageBusy(SpoolError):
    """The message stayed locked by a delivery attempt for longer than the ``lock_wait`` of the call."""

    def __init__(self, id: str) -> None:
        super().__init__(f"message is being delivered, try again: {id}")
        self.id = id


class SpoolAdmin:
    """Management of the spool directory ``path``: list, read, hold, release, delete and flush messages.

    ``clock`` gives the current time (seconds since the epoch) for a release and a flush; ``lock_wait`` is how
    long (seconds) a call waits for a message being delivered.
    """

    log = Logger()

    def __init__(self, path: str, *, clock: Callable[[], float] = time.time, lock_wait: float = LOCK_WAIT) -> None:
        self.path = os.path.abspath(os.path.expanduser(str(path)))
        self.clock = clock
        self.lock_wait = lock_wait
        self.paths = files.SpoolPaths(self.path)

    def ids(self) -> Iterator[str]:
        """The id of every queued message, in no particular order."""
        try:
            entries = os.scandir(self.paths.messages)
        except FileNotFoundError:
            return
        with entries:
            for entry in entries:
                if entry.name.endswith(".json"):
                    yield entry.name[:-5]

    def list(self, skipped: Callable[[str, ValueError], None] | None = None) -> Iterator[Message]:
        """Every queued message, in no particular order, read one at a time (memory stays flat).

        ``next_attempt`` is the schedule the spool keeps (after a `flush`, now). An unreadable envelope is passed
        over, with its id and the error given to ``skipped`` (default: a log line).
        """
        for id in self.ids():
            try:
                yield self.get(id)
            except NoSuchMessage:
                continue
            except ValueError as e:
                if skipped is None:
                    self.log.warn("spool {path}: skipped {id}: {error}", path=self.path, id=id, error=e)
                else:
                    skipped(id, e)

    def get(self, id: str) -> Message:
        """The message ``id`` as stored now; NoSuchMessage if there is none, ValueError if it is unreadable."""
        path = self._checked(id)
        try:
            with open(path, "rb") as file:
                mtime = os.fstat(file.fileno()).st_mtime_ns
                message = files.decode(file.read())
        except FileNotFoundError:
            raise NoSuchMessage(id) from None
        message.id = id
        if not message.held and mtime < files.HELD_NS:
            message.next_attempt = mtime / 1_000_000_000
        return message

    def hold(self, id: str) -> bool:
        """Keep ``id`` from delivery until `release` (Postfix ``postsuper -h``); False when it was held already."""
        self.paths.prepare()
        with self._locked(id) as message:
            if message.held:
                return False
            message.held = True
            files.write_json(self.paths, message, files.HELD_NS)
        return True

    def release(self, id: str) -> bool:
        """Let a held message go again, at its ``next_attempt`` (Postfix ``postsuper -H``); False when it was not
        held."""
        self.paths.prepare()
        with self._locked(id) as message:
            if not message.held:
                return False
            message.held = False
            files.write_json(self.paths, message, files.due_ns(message, self.clock()))
        return True

    def delete(self, id: str) -> None:
        """Remove ``id`` from the queue, without a bounce (Postfix ``postsuper -d``)."""
        with self._locked(id):
            os.unlink(self.paths.json(id))
            files.unlink(self.paths.eml(id))
            files.fsync_dir(self.paths.messages)

    def flush(self, ids: Iterable[str] | None = None) -> int:
        """Make ``ids`` (default: every message) due now, held ones excepted, and tell a running store to scan
        at once (Postfix ``postqueue -f`` / ``-i``). Returns how many were made due."""
        now = files.to_ns(self.clock())
        count = 0
        if ids is None:
            count = sum(files.make_due(self.paths, id, now) for id in self.ids())
        else:
            for id in ids:
                if not os.path.exists(self._checked(id)):
                    raise NoSuchMessage(id)
                count += files.make_due(self.paths, id, now)
        files.touch_trigger(self.paths)
        return count

    def _checked(self, id: str) -> str:
        """The envelope path of ``id``; NoSuchMessage for a name no message can have."""
        if not files.valid_id(id):
            raise NoSuchMessage(id)
        return self.paths.json(id)

    @contextlib.contextmanager
    def _locked(self, id: str) -> Iterator[Message]:
        """Lock ``id`` (waiting up to ``lock_wait`` seconds) and give its message; NoSuchMessage, MessageBusy."""
        self._checked(id)
        deadline = time.monotonic() + self.lock_wait
        while True:
            try:
                fd = files.try_lock(self.paths, id)
            except FileNotFoundError:
                raise NoSuchMessage(id) from None
            if fd is not None:
                break
            if time.monotonic() >= deadline:
                raise MessageBusy(id)
            time.sleep(0.05)
        try:
            message = files.read_fd(fd)
            message.id = id
            yield message
        finally:
            os.close(fd)
