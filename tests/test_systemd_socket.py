"""Socket activation without PID 1: ``systemd-socket-activate`` passes one listening socket, as systemd does.

Two ``twistd esmtpkit --listen systemd:…`` instances share it (what ``esmtpkit@1`` and ``esmtpkit@2`` do with
contrib/systemd/esmtpkit.socket), and a ``--workers 2`` supervisor shares it with its workers.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

from .support import TWISTD, _env, alive, greeting_pid, holds_socket, listening_inodes, wait_for

ACTIVATE = shutil.which("systemd-socket-activate")

needs_activate = pytest.mark.skipif(ACTIVATE is None or not Path("/proc/net/tcp").exists(),
                                    reason="needs systemd-socket-activate (Debian package systemd) and Linux /proc")

#: Starts each instance the way systemd starts a service: LISTEN_PID is the instance's own pid (sd_listen_fds(3)).
LAUNCHER = """\
for i in 1 2; do
    sh -c 'export LISTEN_PID=$$; exec "$@" > "instance-$$.log" 2>&1' instance "$@" &
done
wait
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Activated:
    """``systemd-socket-activate --fdname=smtp -l 127.0.0.1:PORT <command>``, in its own process group."""

    def __init__(self, cwd: Path, *command: str) -> None:
        self.port = free_port()
        self.process = subprocess.Popen([str(ACTIVATE), "--fdname=smtp", "-l", f"127.0.0.1:{self.port}", *command],
                                        cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)

    def first_greeting(self) -> int:
        """The first connection makes systemd-socket-activate start the command; its greeting names a pid."""
        return int(wait_for(lambda: _try_greeting(self.port), "the first greeting"))

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(30)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def _try_greeting(port: int) -> int | None:
    try:
        return greeting_pid(port)
    except OSError:
        return None


@pytest.fixture
def activated(tmp_path: Path) -> Iterator[list[Activated]]:
    started: list[Activated] = []
    yield started
    for one in started:
        one.stop()


def share(port: int) -> set[int]:
    """The pids that greeted 200 connections, 16 at a time."""
    with ThreadPoolExecutor(16) as pool:
        return set(pool.map(lambda _: greeting_pid(port), range(200)))


@needs_activate
def test_two_instances_share_the_socket(tmp_path: Path, activated: list[Activated]) -> None:
    """Two independent instances serve the one socket systemd-socket-activate made."""
    (tmp_path / "launch.sh").write_text(LAUNCHER)
    server = Activated(tmp_path, "/bin/sh", "launch.sh", TWISTD, "-n", "--pidfile=", "esmtpkit",
                       "--listen", "systemd:domain=INET:name=smtp", "--hostname", "mx.test",
                       "--handler", "tests.pid_handler.PidMaildir", "--maildir", str(tmp_path / "Maildir"))
    activated.append(server)
    server.first_greeting()

    def instances() -> list[int]:
        logs = {int(p.name[9:-4]): p.read_text() for p in tmp_path.glob("instance-*.log")}
        return [pid for pid, text in logs.items() if f"ESMTPFactory starting on {server.port}\n" in text]

    pids = set(wait_for(lambda: len(instances()) == 2 and instances(), "two instances serving"))
    assert share(server.port) == pids
    (inode,) = listening_inodes(server.port)
    assert all(holds_socket(pid, inode) for pid in pids)


@needs_activate
def test_workers_share_an_inherited_socket(tmp_path: Path, activated: list[Activated]) -> None:
    """``--workers 2 --listen systemd:…``: the supervisor hands the socket it inherited to both workers."""
    server = Activated(tmp_path, TWISTD, "-n", "--pidfile=", "--logfile", "twistd.log", "esmtpkit",
                       "--workers", "2", "--listen", "systemd:domain=INET:name=smtp", "--hostname", "mx.test",
                       "--handler", "tests.pid_handler.PidMaildir", "--maildir", str(tmp_path / "Maildir"))
    activated.append(server)
    server.first_greeting()
    log = tmp_path / "twistd.log"

    def listening() -> list[int]:
        return [int(pid) for pid in
                re.findall(rf"\[worker (\d+) [^]]*\] ESMTPFactory starting on {server.port}\n", log.read_text())]

    workers = set(wait_for(lambda: len(listening()) == 2 and listening(), "two workers serving"))
    assert server.process.pid not in workers
    assert share(server.port) == workers
    (inode,) = listening_inodes(server.port)
    assert all(holds_socket(pid, inode) for pid in workers | {server.process.pid})

    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == -signal.SIGTERM
    assert not any(alive(pid) for pid in workers)


CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "systemd"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file (continuation lines joined), as lists per key."""
    settings: dict[str, list[str]] = {}
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_units_agree() -> None:
    """The service asks for the socket by the name the socket unit gives it, without a pid file."""
    socket_unit = unit_settings(CONTRIB / "esmtpkit.socket")
    service = unit_settings(CONTRIB / "esmtpkit@.service")
    (name,) = socket_unit["FileDescriptorName"]
    assert socket_unit["Accept"] == ["no"]
    assert socket_unit["Service"] == ["esmtpkit@1.service"]
    assert service["Sockets"] == ["esmtpkit.socket"]
    (command,) = service["ExecStart"]
    words = command.split()
    assert words[words.index("--listen") + 1] == f"systemd:domain=INET6:name={name}"
    assert words.index("--pidfile=") < words.index("esmtpkit")
    assert "--workers" not in words


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian package systemd)")
def test_units_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` finds nothing to say about the units (twistd's path made to exist here)."""
    for unit in ("esmtpkit.socket", "esmtpkit@.service"):
        text = (CONTRIB / unit).read_text().replace("/usr/bin/twistd", TWISTD)
        (tmp_path / unit).write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", "./esmtpkit.socket", "esmtpkit@1.service"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, SYSTEMD_UNIT_PATH=f"{tmp_path}:"))
    complaints = [line for line in out.stderr.splitlines()
                  if "esmtpkit" in line or "Unknown" in line or "Invalid" in line]
    assert out.returncode == 0 and complaints == [], out.stderr
