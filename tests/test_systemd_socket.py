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

from .test_workers import TWISTD, _env, alive, greeting_pid, holds_socket, listening_inodes, wait_for

ACTIVATE = shutil.which("systemd-socket-activate")

pytestmark = [
    pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate is not installed (Debian package systemd)"),
    pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc to see listening sockets"),
]

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
