"""A private ClamAV ``clamd`` for tests: in the foreground, from a temporary folder holding its configuration,
socket, log and a signature database written here (one signature for the EICAR test file: no download, no
freshclam), listening on a UNIX socket and on a free 127.0.0.1 port. Never the system's clamd or its database."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Iterator

from .daemons import Daemon, free_port, private

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


class PrivateClamd(Daemon):
    """clamd running from ``base`` (a short path: a UNIX socket's name is limited to about 100 octets)."""

    name = "clamd"
    timeout = TIMEOUT

    def __init__(self, base: Path, stream_max: int = STREAM_MAX) -> None:
        self.base = base
        self.socket = base / "clamd.sock"
        self.port = free_port()
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
        self.launch([str(CLAMD), "-c", str(base / "clamd.conf")], base, base / "clamd.out")

    @property
    def unix_target(self) -> str:
        """Its UNIX socket as a client endpoint string."""
        return f"unix:{self.socket}"

    @property
    def tcp_target(self) -> str:
        """Its TCP port as a client endpoint string."""
        return f"tcp:127.0.0.1:{self.port}"

    def log_text(self) -> str:
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


def start_clamd(stream_max: int = STREAM_MAX) -> Iterator[PrivateClamd]:
    """A private clamd for a fixture: skipped without clamd; stopped and its folder removed afterwards."""
    yield from private("esmtpkit-clamd-", clamd_missing(), lambda base: PrivateClamd(base, stream_max))
