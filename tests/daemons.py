"""Private daemons for the tests (clamd, spamd, rspamd, opendkim): a free port on 127.0.0.1, a process started in
the foreground and waited for until it answers, stopped by its own pid, and a temporary folder for a fixture."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pytest

from .support import terminate

D = TypeVar("D", bound="Daemon")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(ready: Callable[[], bool], process: subprocess.Popen[bytes], name: str, what: str, timeout: float,
               log_text: Callable[[], str]) -> None:
    """Poll ``ready`` until it is true; fail showing ``log_text()`` if ``process`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise AssertionError(f"{name} exited with {process.returncode}:\n{log_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} did not {what} within {timeout} s:\n{log_text()}")
        time.sleep(0.1)


class Daemon:
    """A daemon a test runs in the foreground: `launch` starts it and waits for `ping`; `stop` ends it."""

    name = "daemon"
    #: What `ping` waits for, as the failure message says it.
    ready = "answer PING"
    #: A bound on the start and the stop, not an expectation.
    timeout = 120.0
    process: subprocess.Popen[bytes] | None = None

    def ping(self) -> bool:
        """Whether the daemon answers yet."""
        raise NotImplementedError

    def log_text(self) -> str:
        """What the daemon logged and printed so far."""
        raise NotImplementedError

    def launch(self, argv: list[str], cwd: Path, output: Path) -> None:
        """Start ``argv`` in ``cwd``, its output in ``output``, and wait for `ping` (stopping it if that fails)."""
        with open(output, "wb") as out:
            self.process = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        try:
            wait_until(self.ping, self.process, self.name, self.ready, self.timeout, self.log_text)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> int | None:
        """Stop it (SIGTERM, then SIGKILL after `timeout`); its exit status, None if it never started."""
        return None if self.process is None else terminate(self.process, self.timeout)


def private(prefix: str, missing: str | None, make: Callable[[Path], D]) -> Iterator[D]:
    """A daemon for a fixture, made by ``make`` in a new temporary folder: skipped when ``missing`` says why it
    cannot run here; stopped and its folder removed afterwards."""
    if missing:
        pytest.skip(missing)
    base = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        daemon = make(base)
        try:
            yield daemon
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
