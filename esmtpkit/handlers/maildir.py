"""`Maildir`: deliver each message into a Maildir, safely: tmp/, fsync, rename into new/, fsync new/, then 250.

The delivery protocol is the one the Maildir format defines (cr.yp.to/proto/maildir.html): a file is written under
a unique name in ``tmp/`` and only a complete, synced file is renamed into ``new/``, so a reader never sees half a
message. The content streams to disk chunk by chunk (``content_mode = ContentMode.RAW``): memory use stays flat whatever the size.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import time
from typing import Any, BinaryIO

from twisted.logger import Logger

from esmtpkit.core.content import ContentMode
from esmtpkit.core.reply import Reply, SMTPReply
from esmtpkit.core.trace import received_header, return_path_header
from esmtpkit.handlers.base import MessageHandler

__all__ = ["Maildir", "unique_name", "clean_tmp", "TMP_MAX_AGE", "QUARANTINE_FOLDER"]

#: The Maildir++ folder (under the Maildir) that takes the messages a filter quarantined.
QUARANTINE_FOLDER = ".Quarantine"

#: What a client gets when the message could not be stored: try again later (RFC 3463 4.3.0).
STORE_FAILED = Reply(451, ("Requested action aborted: error in local storage, try again later",), "4.3.0")

_deliveries = itertools.count(1)
#: A file in tmp/ neither read nor written for this long is a delivery that will never finish (the Maildir
#: convention: 36 hours, as qmail's maildir(5) and Python's ``mailbox.Maildir.clean`` have it).
TMP_MAX_AGE = 36 * 3600
#: Maildir paths whose folders this process has made or found; `Maildir.data` still re-makes any that vanished.
_prepared: set[str] = set()


def _escaped_hostname() -> str:
    """This host's name with ``/`` and ``:`` escaped as the Maildir format asks (they are special in file names)."""
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "localhost"


def unique_name(now: float | None = None, message_id: str = "") -> str:
    """A new Maildir file name: ``<seconds>.M<microseconds>P<pid>Q<delivery>I<message id>.<hostname>``.

    The message id (``session.envelope.id``) makes the file easy to find from the log or the 250 reply; without
    one, ``R<random>`` takes its place.
    """
    now = time.time() if now is None else now
    seconds = int(now)
    micro = int((now - seconds) * 1_000_000)
    unique = f"I{message_id}" if message_id else f"R{secrets.token_hex(4)}"
    return f"{seconds}.M{micro}P{os.getpid()}Q{next(_deliveries)}{unique}.{_escaped_hostname()}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Maildir(MessageHandler):
    """Deliver every message to the Maildir at ``path`` (created, mode 0700, if missing).

    The stored file is ``Return-Path:`` and ``Received:`` trace fields followed by exactly the bytes the client
    sent (dot-unstuffed). A 250 after the final dot means the file is in ``new/`` and synced to disk; any error
    answers 451 4.3.0 and leaves nothing behind in ``tmp/`` or ``new/``. The first handler made for a folder in a
    process removes what killed deliveries left in its ``tmp/`` (`clean_tmp`).
    """

    content_mode = ContentMode.RAW
    log = Logger()

    #: A message a filter quarantined goes into the ``.Quarantine`` folder (`esmtpkit.handlers.filtering`).
    quarantines = True

    def __init__(self, path: str = "Maildir") -> None:
        self.path = os.path.abspath(os.path.expanduser(str(path)))
        self._file: BinaryIO | None = None
        self._name = ""
        if self.path not in _prepared:  # one handler per connection: make the folders once, not at every accept
            try:
                self._prepare()
            except OSError as e:
                self.log.warn("Maildir {path} is not usable yet: {error}", path=self.path, error=e)
            else:
                _prepared.add(self.path)
                clean_tmp(os.path.join(self.path, "tmp"), time.time())

    def _prepare(self) -> None:
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(self.path, sub), mode=0o700, exist_ok=True)

    @property
    def tmp_path(self) -> str:
        """The file being written for the current message ('' outside DATA)."""
        return os.path.join(self.path, "tmp", self._name) if self._name else ""

    def data(self) -> Any:
        """Open a new file in tmp/ and write the trace fields; 451 4.3.0 when the Maildir cannot take it."""
        self._discard()
        session = self.session
        name = unique_name(message_id=session.envelope.id if session is not None else "")
        try:
            self._prepare()
            fd = os.open(os.path.join(self.path, "tmp", name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._name = name
            self._file = os.fdopen(fd, "wb")
            if session is not None:
                trace_id = session.envelope.id or name.split(".")[1]
                self._file.write(return_path_header(session.envelope.sender or ""))
                self._file.write(received_header(session, id=trace_id))
        except OSError as e:
            self._failed("open", e)
            return STORE_FAILED
        return super().data()

    def body(self, chunk: bytes) -> None:
        """Append a chunk to the file in tmp/ (a plain synchronous write)."""
        if self._file is None:
            raise SMTPReply(STORE_FAILED)
        try:
            self._file.write(chunk)
        except OSError as e:
            self._failed("write", e)
            raise SMTPReply(STORE_FAILED) from None

    def eom(self) -> Any:
        """Flush and fsync the file, rename it into new/ (the ``.Quarantine`` folder's, for a message a filter
        quarantined), fsync new/; only then answer 250."""
        file, name = self._file, self._name
        if file is None:
            return STORE_FAILED
        tmp = self.tmp_path
        folder = self.path
        renamed = False
        try:
            if self.session is not None and self.session.envelope.quarantine:
                folder = self._quarantine_folder()
            final = os.path.join(folder, "new", name)
            file.flush()
            os.fsync(file.fileno())
            file.close()
            os.rename(tmp, final)
            renamed = True
            _fsync_dir(os.path.dirname(final))
        except OSError as e:
            if renamed:
                _unlink(final)
            self._failed("deliver", e)
            return STORE_FAILED
        self._file, self._name = None, ""
        queue_id = self.session.envelope.id if self.session is not None else ""
        return Reply(250, (f"Ok: queued as {queue_id or name}",), "2.0.0")

    def _quarantine_folder(self) -> str:
        """The Maildir++ folder ``.Quarantine`` of this Maildir, made if missing: where a message a filter
        quarantined (``envelope.quarantine``) is delivered, apart from the inbox."""
        folder = os.path.join(self.path, QUARANTINE_FOLDER)
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(folder, sub), mode=0o700, exist_ok=True)
        marker = os.path.join(folder, "maildirfolder")
        if not os.path.exists(marker):
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o600))
        return folder

    def abort(self, reason: str) -> None:
        """Close and remove the unfinished file: nothing partial stays in tmp/ and nothing reaches new/."""
        self._discard()

    def _failed(self, step: str, error: OSError) -> None:
        self.log.error("Maildir {path}: {step} failed: {error}", path=self.path, step=step, error=error)
        self._discard()

    def _discard(self) -> None:
        file, tmp = self._file, self.tmp_path
        self._file, self._name = None, ""
        if file is not None:
            try:
                file.close()
            except OSError:
                pass
        if tmp:
            _unlink(tmp)


def clean_tmp(folder: str, now: float, max_age: float = TMP_MAX_AGE) -> int:
    """Remove the regular files in ``folder`` (a Maildir's tmp/) not read or written for ``max_age`` seconds before
    ``now``: what a delivery killed half-way left behind. Logs and returns how many went; errors are only logged.
    """
    removed = 0
    try:
        entries = os.scandir(folder)
    except OSError as e:
        Maildir.log.warn("cannot look for old files in {folder}: {error}", folder=folder, error=e)
        return 0
    with entries:
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                info = entry.stat(follow_symlinks=False)
                if now - max(info.st_mtime, info.st_atime) <= max_age:
                    continue
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                continue  # gone meanwhile (another process cleaning the same folder)
            except OSError as e:
                Maildir.log.error("cannot remove {path}: {error}", path=entry.path, error=e)
    if removed:
        Maildir.log.info("Maildir {folder}: removed {count} file(s) left unfinished for over {hours:g} hours",
                         folder=folder, count=removed, hours=max_age / 3600)
    return removed


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        Maildir.log.error("cannot remove {path}: {error}", path=path, error=e)
