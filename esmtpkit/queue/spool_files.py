"""The spool directory on disk: where each file lives, and the atomic file operations that keep it consistent.

Layout of the spool directory::

    incoming/<entry id>.tmp        content being written (an entry not yet committed)
    incoming/<id>.<rand>.json.tmp  an envelope being written, before its rename into messages/
    messages/<id>.eml              content, immutable once committed (RAW: header + body, CRLF, no dot-stuffing)
    messages/<id>.json             envelope and delivery state (`Message.to_json`): its presence commits the message
    corrupt/<id>.json, <id>.eml    a message whose envelope could not be read, set aside for a human
    flush                          touched by a management ``flush`` so that a running store rescans at once

Rules that make it safe:

- **Commit order**: the content is flushed and fsynced, renamed to ``messages/<id>.eml`` and the directory
  fsynced; only then is the envelope written to a temporary file, fsynced, renamed to ``messages/<id>.json`` and
  the directory fsynced again. A killed process therefore never leaves an envelope without its content; what it
  may leave (a ``.tmp`` file, an ``.eml`` without envelope) is removed once `STALE_AGE` old (`cleanup_files`).
  Finished messages go the other way: envelope first, then content.
- **Schedule in the mtime**: the envelope file's modification time is the message's next attempt (written on the
  temporary file before the rename, so time and state change together). A scan (`scan_files`) is
  ``os.scandir`` + ``stat``, keeping a bounded number of ids (the earliest due) whatever the size of the queue;
  only the envelopes it keeps are read, for their MT-PRIORITY.
  ``next_attempt`` in the JSON says what the runner asked for; the mtime wins (a flush moves only the mtime).
- **Held**: ``"held": true`` in the JSON and the mtime set to `HELD_MTIME` (2100-01-01), so a scan skips a held
  message without reading it; a release restores the mtime from ``next_attempt``.
- **Locking**: a process delivering a message holds ``flock(LOCK_EX)`` on its ``.json``; another process skips a
  locked message. A lock holder that replaces the file (rename) leaves the lock on the old inode, so whoever
  locks checks that the file it locked is still the one the name points to (`try_lock`); a checkpoint in the
  middle of an attempt locks the new file before its rename, so the lock never lapses (`checkpoint_files`).
- **Finished**: a message leaves the spool only once `esmtpkit.queue.interfaces.finished` (no recipient pending, no
  notice owed). If its new state cannot be written, its next attempt is pushed back instead (a ``utime``, which
  needs no free space), so the old state is not attempted again at every scan.

Everything here is plain blocking file work with the standard library's ``os``, no reactor: the store runs it in a
thread pool or inline, and the management calls run it directly.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import json
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import IO, Iterator

from esmtpkit.core.ids import new_id
from esmtpkit.core.outbound import Message
from esmtpkit.queue.interfaces import finished

__all__ = ["SpoolPaths", "Claim", "HELD_MTIME", "HELD_NS", "STALE_AGE", "valid_id", "to_ns", "due_ns",
           "encode", "decode", "write_json", "create", "commit_files", "enqueue_files", "Scan", "scan_files", "read_rank",
           "cleanup_files", "quarantine", "try_lock", "read_fd", "claim_files", "checkpoint_files", "settle_files",
           "postpone_files",
           "make_due", "trigger_mtime", "touch_trigger", "fsync_dir", "unlink", "forget"]

#: The envelope mtime marking a held message (2100-01-01T00:00:00Z): a scan never finds it due.
HELD_MTIME = 4102444800
#: `HELD_MTIME` in nanoseconds, as ``stat`` gives it.
HELD_NS = HELD_MTIME * 1_000_000_000
#: A temporary file, or content without an envelope, older than this (seconds) was left by a killed process.
STALE_AGE = 3600.0
#: Names a message may have in the spool: letters, digits, ``_`` and ``-``, starting with a letter or digit.
_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]{0,63}")


def valid_id(id: str) -> bool:
    """Whether ``id`` can name a message in the spool (so that no id can reach outside ``messages/``)."""
    return _ID.fullmatch(id) is not None


def to_ns(seconds: float) -> int:
    """Seconds since the epoch as the nanoseconds of an mtime."""
    return int(seconds * 1_000_000_000)


@dataclass(frozen=True)
class SpoolPaths:
    """Where everything of one spool directory is."""

    root: str

    @property
    def incoming(self) -> str:
        return os.path.join(self.root, "incoming")

    @property
    def messages(self) -> str:
        return os.path.join(self.root, "messages")

    @property
    def corrupt(self) -> str:
        return os.path.join(self.root, "corrupt")

    @property
    def trigger(self) -> str:
        return os.path.join(self.root, "flush")

    def json(self, id: str) -> str:
        """The envelope of message ``id``."""
        return os.path.join(self.messages, id + ".json")

    def eml(self, id: str) -> str:
        """The content of message ``id``."""
        return os.path.join(self.messages, id + ".eml")

    def prepare(self) -> None:
        """Make the folders a store writes into, if they are missing."""
        for folder in (self.incoming, self.messages):
            os.makedirs(folder, mode=0o700, exist_ok=True)


def fsync_dir(path: str) -> None:
    """Make the entries of folder ``path`` (a rename, an unlink) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink(path: str) -> None:
    """Remove ``path`` if it is there; other errors are raised (what is removed next may depend on it)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def forget(path: str) -> None:
    """Remove a temporary file if possible: one left behind is cleaned up later."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def encode(message: Message) -> bytes:
    """The envelope file's bytes: `Message.to_json` as compact UTF-8 JSON."""
    return json.dumps(message.to_json(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode(data: bytes) -> Message:
    """The message a JSON envelope holds; ValueError if it holds none."""
    try:
        value = json.loads(data)
        return Message.from_json(value)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"unreadable envelope: {e}") from None


def due_ns(message: Message, now: float) -> int:
    """The envelope mtime that schedules ``message``: `HELD_NS` when held, else its next attempt (or now)."""
    if message.held:
        return HELD_NS
    return to_ns(message.next_attempt if message.next_attempt > 0 else now)


def write_json(paths: SpoolPaths, message: Message, mtime_ns: int, *, locked: bool = False) -> int | None:
    """Replace ``messages/<id>.json`` atomically: temporary file, its mtime, fsync, rename, directory fsync.

    The mtime is set before the fsync, so a power cut cannot leave the new state with an earlier schedule. With
    ``locked`` the new file is locked (``flock``) before its rename and its open fd is returned: whoever held the
    old file's lock holds the new one's from the instant it has the name (`checkpoint_files`).
    """
    tmp = os.path.join(paths.incoming, f"{message.id}.{secrets.token_hex(4)}.json.tmp")
    data = encode(message)
    fd = -1
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.utime(fd, ns=(mtime_ns, mtime_ns))
        os.fsync(fd)
        if locked:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, paths.json(message.id))
    except BaseException:
        if fd >= 0:
            os.close(fd)
        forget(tmp)
        raise
    if not locked:
        os.close(fd)
        fsync_dir(paths.messages)
        return None
    try:
        fsync_dir(paths.messages)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _install(paths: SpoolPaths, tmp: str, message: Message, now: float) -> None:
    """Make committed content at ``tmp`` and ``message`` durable in messages/, or leave nothing there."""
    eml, envelope = paths.eml(message.id), paths.json(message.id)
    if os.path.exists(envelope) or os.path.exists(eml):
        raise FileExistsError(errno.EEXIST, f"message {message.id} is already queued", envelope)
    os.rename(tmp, eml)
    try:
        fsync_dir(paths.messages)
        write_json(paths, message, due_ns(message, now))
    except BaseException:
        unlink(envelope)
        unlink(eml)
        raise


def create(paths: SpoolPaths, name: str) -> IO[bytes]:
    """A new file ``incoming/<name>`` open for writing (the spool's folders made when missing)."""
    path = os.path.join(paths.incoming, name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileNotFoundError:
        paths.prepare()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    return os.fdopen(fd, "wb")


def commit_files(paths: SpoolPaths, file: IO[bytes], tmp: str, message: Message, now: float) -> None:
    """Sync and close the content ``file`` written at ``tmp``, then install it with its envelope (commit order
    above); on failure nothing of the message is left in messages/ and ``tmp`` is removed."""
    try:
        try:
            file.flush()
            os.fsync(file.fileno())
        finally:
            file.close()
        _install(paths, tmp, message, now)
    except BaseException:
        forget(tmp)
        raise


def enqueue_files(paths: SpoolPaths, content: bytes, message: Message, now: float) -> None:
    """Write ``content`` to a new incoming file and commit it with ``message``, as `commit_files` does."""
    name = f"{new_id()}.tmp"
    file = create(paths, name)
    try:
        file.write(content)
    except BaseException:
        file.close()
        forget(os.path.join(paths.incoming, name))
        raise
    commit_files(paths, file, os.path.join(paths.incoming, name), message, now)


@dataclass
class Scan:
    """What one scan of messages/ found: the earliest due ids, whether more were due, and the queue's size."""

    found: list[tuple[int, str]]  # (mtime ns, id), earliest first
    more: bool  # more were due than ``found`` holds
    queued: int = 0  # envelopes not held (those being attempted included)
    held: int = 0
    ranks: dict[str, int] = field(default_factory=dict)  # MT-PRIORITY of the found ids that have one (not 0)


def read_rank(paths: SpoolPaths, id: str) -> int:
    """The MT-PRIORITY of message ``id`` (RFC 6710), read from its envelope: 0 when none, or unreadable (the claim
    then deals with it)."""
    try:
        with open(paths.json(id), "rb") as f:
            priority = json.loads(f.read()).get("priority")
    except (OSError, ValueError, AttributeError):
        return 0
    return priority if isinstance(priority, int) and not isinstance(priority, bool) and -9 <= priority <= 9 else 0


def scan_files(paths: SpoolPaths, now_ns: int, limit: int, exclude: frozenset[str]) -> Scan:
    """The ``limit`` earliest due envelopes (mtime, id) not in ``exclude``, whether more were due, and how many
    messages are queued and held (ids in ``exclude`` count as queued, unread). The envelopes found are read for
    their MT-PRIORITY (``ranks``), by which the scheduler orders them."""
    count = 0
    queued = held = 0

    def due() -> Iterator[tuple[int, str]]:
        nonlocal count, queued, held
        try:
            entries = os.scandir(paths.messages)
        except FileNotFoundError:
            return
        with entries:
            for entry in entries:
                name = entry.name
                if not name.endswith(".json"):
                    continue
                if name[:-5] in exclude:
                    queued += 1
                    continue
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime_ns
                except FileNotFoundError:
                    continue
                if mtime >= HELD_NS:
                    held += 1
                    continue
                queued += 1
                if mtime <= now_ns:
                    count += 1
                    yield mtime, name[:-5]

    found = heapq.nsmallest(limit, due())
    ranks = {id: rank for id, rank in ((id, read_rank(paths, id)) for _, id in found) if rank}
    return Scan(found, count > len(found), queued, held, ranks)


def cleanup_files(paths: SpoolPaths, now: float) -> list[str]:
    """Remove what killed processes left (``.tmp`` files, content without envelope) older than `STALE_AGE`;
    the paths removed."""
    removed: list[str] = []
    limit = now - STALE_AGE

    def old(entry: os.DirEntry[str]) -> bool:
        try:
            return entry.stat(follow_symlinks=False).st_mtime < limit
        except FileNotFoundError:
            return False

    for folder, wanted in ((paths.incoming, ".tmp"), (paths.messages, ".eml")):
        try:
            entries = os.scandir(folder)
        except FileNotFoundError:
            continue
        with entries:
            for entry in entries:
                if not entry.name.endswith(wanted) or not old(entry):
                    continue
                if wanted == ".eml" and os.path.exists(paths.json(entry.name[:-4])):
                    continue
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                removed.append(entry.path)
    return removed


def quarantine(paths: SpoolPaths, id: str) -> None:
    """Move a message whose envelope cannot be used to corrupt/ (the envelope first, as in a deletion)."""
    os.makedirs(paths.corrupt, mode=0o700, exist_ok=True)
    for source in (paths.json(id), paths.eml(id)):
        with contextlib.suppress(FileNotFoundError):
            os.rename(source, os.path.join(paths.corrupt, os.path.basename(source)))
    fsync_dir(paths.messages)


def try_lock(paths: SpoolPaths, id: str) -> int | None:
    """An fd holding ``flock(LOCK_EX)`` on the current ``<id>.json``; None if another process holds it.

    FileNotFoundError if there is no such envelope (any more).
    """
    path = paths.json(id)
    while True:
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)  # replaced while we locked: lock the new file


def read_fd(fd: int) -> Message:
    """The message of the envelope open at ``fd`` (read from its start); ValueError if it is unreadable."""
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, 65536, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return decode(b"".join(chunks))


@dataclass
class Claim:
    """What trying to take one message for delivery gave: the locked envelope's fd and its message, or nothing."""

    fd: int = -1
    message: Message | None = None
    problem: str = ""  # set when the message was set aside as corrupt


def claim_files(paths: SpoolPaths, id: str, now_ns: int) -> Claim:
    """Lock ``id`` and read it if it is still due, not held and whole; an empty claim otherwise (a message that
    cannot be read is moved to corrupt/, and the claim says why)."""
    try:
        fd = try_lock(paths, id)
    except FileNotFoundError:
        return Claim()
    if fd is None:
        return Claim()
    keep = False
    try:
        if os.fstat(fd).st_mtime_ns > now_ns:
            return Claim()
        try:
            message = read_fd(fd)
            if not os.path.exists(paths.eml(id)):
                raise ValueError("its content is missing")
        except ValueError as e:
            quarantine(paths, id)
            return Claim(problem=str(e))
        if message.held:
            os.utime(paths.json(id), ns=(HELD_NS, HELD_NS))
            return Claim()
        message.id = id
        keep = True
        return Claim(fd, message)
    finally:
        if not keep:
            os.close(fd)


def checkpoint_files(paths: SpoolPaths, claim: Claim, id: str, message: Message, due: int) -> None:
    """Save the state so far of the claimed message ``id``, its next attempt at ``due`` (ns: in the future, so
    that if this process dies the message waits a while rather than being taken again at once); the claim's lock
    moves to the new file with it (``claim.fd`` is replaced)."""
    message.id = id
    fd = write_json(paths, message, due, locked=True)
    assert fd is not None
    old, claim.fd = claim.fd, fd
    os.close(old)


def settle_files(paths: SpoolPaths, claim: Claim, id: str, message: Message, now: float, fallback: int) -> None:
    """Save what an attempt made of the message, or forget it once `finished`; then unlock.

    When that fails (a full disk, an I/O error) the message's next attempt is moved to ``fallback`` (ns), which
    needs no free space, and the error is raised: the state it had stays, and is not tried again before then.
    """
    try:
        message.id = id
        try:
            if finished(message):
                unlink(paths.json(id))
                unlink(paths.eml(id))
                fsync_dir(paths.messages)
            else:
                write_json(paths, message, due_ns(message, now))
        except Exception:
            with contextlib.suppress(OSError):
                os.utime(paths.json(id), ns=(fallback, fallback))
            raise
    finally:
        os.close(claim.fd)


def postpone_files(paths: SpoolPaths, claim: Claim, id: str, due: int) -> None:
    """Move a claimed message's next attempt to ``due`` (ns) without changing its state; then unlock."""
    try:
        os.utime(paths.json(id), ns=(due, due))
    finally:
        os.close(claim.fd)


def make_due(paths: SpoolPaths, id: str, now_ns: int) -> bool:
    """Set ``id``'s envelope mtime to ``now_ns`` unless it is held; whether it was changed."""
    path = paths.json(id)
    try:
        if os.stat(path).st_mtime_ns >= HELD_NS:
            return False
        os.utime(path, ns=(now_ns, now_ns))
    except FileNotFoundError:
        return False
    return True


def trigger_mtime(paths: SpoolPaths) -> int | None:
    """The flush trigger's mtime (ns), or None when there is none."""
    try:
        return os.stat(paths.trigger).st_mtime_ns
    except OSError:
        return None


def touch_trigger(paths: SpoolPaths) -> None:
    """Change the flush trigger's mtime, so that every running store on this spool scans at once."""
    os.makedirs(paths.root, mode=0o700, exist_ok=True)
    with open(paths.trigger, "ab"):
        pass
    # Not a reactor's clock: only a change matters, and two flushes in one second must both show.
    now = time.time_ns()
    stamp = max(now, (trigger_mtime(paths) or 0) + 1)
    os.utime(paths.trigger, ns=(stamp, stamp))
