"""A private ClamAV ``clamd`` for tests: in the foreground, from a temporary folder holding its configuration,
socket, log and a signature database written here (one signature for the EICAR test file: no download, no
freshclam), listening on a UNIX socket and on a free 127.0.0.1 port. Never the system's clamd or its database."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from .support import terminate

CLAMD = shutil.which("clamd", path="/usr/sbin:/usr/bin:/sbin:/bin")
#: The EICAR anti-virus test file (https://www.eicar.org): harmless, and found by every scanner.
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
#: The signature's name in the database written here; clamd reports it with ``.UNOFFICIAL`` after it.
SIGNATURE = "Eicar-Test-Signature"
#: clamd's StreamMaxLength here: a longer stream is refused (``INSTREAM size limit exceeded``).
STREAM_MAX = 100 * 1024
#: A bound on clamd's start and stop, not an expectation.
TIMEOUT = 120.0


def clamd_missing() -> str | None:
    """Why a private clamd cannot run here (None when it can)."""
    if CLAMD is None:
        return "ClamAV's clamd is not installed (apt-get install clamav-daemon)"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateClamd:
    """clamd running from ``base`` (a short path: a UNIX socket's name is limited to about 100 octets)."""

    def __init__(self, base: Path, stream_max: int = STREAM_MAX) -> None:
        self.base = base
        self.socket = base / "clamd.sock"
        self.port = _free_port()
        self.log = base / "clamd.log"
        database = base / "db"
        database.mkdir()
        # An extended (.ndb) signature: the EICAR string anywhere in any file, the message and its parts alike.
        (database / "test.ndb").write_text(f"{SIGNATURE}:0:*:{EICAR.hex()}\n")
        (base / "clamd.conf").write_text(
            "Foreground yes\n"
            f"LocalSocket {self.socket}\n"
            f"TCPSocket {self.port}\n"
            "TCPAddr 127.0.0.1\n"
            f"DatabaseDirectory {database}\n"
            f"LogFile {self.log}\n"
            f"PidFile {base / 'clamd.pid'}\n"
            f"StreamMaxLength {stream_max}\n"
            f"TemporaryDirectory {base}\n")
        self._output = open(base / "clamd.out", "wb")
        self.process = subprocess.Popen([str(CLAMD), "-c", str(base / "clamd.conf")], cwd=base,
                                        stdout=self._output, stderr=subprocess.STDOUT)
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise

    @property
    def unix_target(self) -> str:
        """Its UNIX socket as a client endpoint string."""
        return f"unix:{self.socket}"

    @property
    def tcp_target(self) -> str:
        """Its TCP port as a client endpoint string."""
        return f"tcp:127.0.0.1:{self.port}"

    def text(self) -> str:
        """Its log and anything it printed, so far."""
        return "\n".join(p.read_text(errors="replace") for p in (self.log, self.base / "clamd.out") if p.exists())

    def ping(self) -> bool:
        """Whether clamd answers PING on both its sockets."""
        for family, address in ((socket.AF_UNIX, str(self.socket)), (socket.AF_INET, ("127.0.0.1", self.port))):
            try:
                with socket.socket(family) as probe:
                    probe.settimeout(TIMEOUT)
                    probe.connect(address)
                    probe.sendall(b"zPING\0")
                    if probe.recv(64) != b"PONG\0":
                        return False
            except OSError:
                return False
        return True

    def _wait(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not self.ping():
            if self.process.poll() is not None:
                raise AssertionError(f"clamd exited with {self.process.returncode}:\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"clamd did not answer PING within {TIMEOUT} s:\n{self.text()}")
            time.sleep(0.1)

    def stop(self) -> int:
        """Stop clamd (SIGTERM, SIGKILL after a bound); its exit status."""
        status = terminate(self.process, TIMEOUT)
        self._output.close()
        return status


def start_clamd(stream_max: int = STREAM_MAX) -> Iterator[PrivateClamd]:
    """A private clamd for a fixture: skipped without clamd; stopped and its folder removed afterwards."""
    missing = clamd_missing()
    if missing:
        pytest.skip(missing)
    base = Path(tempfile.mkdtemp(prefix="esmtpkit-clamd-"))
    try:
        clamd = PrivateClamd(base, stream_max)
        try:
            yield clamd
        finally:
            clamd.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
