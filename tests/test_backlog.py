"""Connection bursts: the listen backlog every listener gets, the Maildir handler's cheap start per connection, and
a burst of connections from distinct loopback addresses against a real ``twistd esmtpkit``."""

from __future__ import annotations

import os
import re
import selectors
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.ops import backlog
from esmtpkit.cli import tap
from esmtpkit.ops.backlog import listen_backlog, requested_backlog, sized_listeners, with_backlog
from esmtpkit.handlers import maildir
from esmtpkit.ops.workers import supervise

from .certs import make_tls_files
from .support import TWISTD, ScratchPaths, _env, needs_proc, terminate, wait_for


def parse(*args: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(["--handler", "esmtpkit.handlers.base.MessageHandler", "--hostname", "mx.test", *args])
    return options


class BacklogTests(ScratchPaths, SynchronousTestCase):
    """Which backlog a listener string gets, and that the strings still parse as Twisted endpoints."""

    def test_sized_for_max_connections(self) -> None:
        self.assertEqual(listen_backlog(1000, cap=4096), 1000)
        self.assertEqual(listen_backlog(3000, cap=128), 3000)  # what was asked; the kernel caps it (and we warn)
        self.assertEqual(listen_backlog(10, cap=4096), backlog.TWISTED_BACKLOG)

    def test_no_connection_limit(self) -> None:
        """--max-connections 0: as many as the kernel allows."""
        self.assertEqual(listen_backlog(0, cap=4096), 4096)
        self.assertEqual(listen_backlog(0, cap=None), socket.SOMAXCONN)

    def test_added(self) -> None:
        for description, expected in [
                ("tcp:2525", "tcp:2525:backlog=300"),
                ("tcp:25:interface=127.0.0.1", "tcp:25:interface=127.0.0.1:backlog=300"),
                (r"tcp6:25:interface=\:\:1", r"tcp6:25:interface=\:\:1:backlog=300"),
                ("ssl:465", "ssl:465:backlog=300"),
                ("unix:/run/smtp.sock:mode=660", "unix:/run/smtp.sock:mode=660:backlog=300"),
                ("haproxy:tcp:25", "haproxy:tcp:25:backlog=300")]:
            self.assertEqual(with_backlog(description, 300), expected)

    def test_given_backlog_kept(self) -> None:
        for description in ("tcp:25:backlog=7", "tcp:25:127.0.0.1:7", "tcp6:25:7", "unix:/s.sock:660:7",
                            "ssl:465:k.pem:c.pem:TLSv1_2_METHOD:127.0.0.1:7", r"tcp6:25:interface=\:\:1:backlog=7",
                            "haproxy:tcp:25:backlog=7"):
            self.assertEqual(with_backlog(description, 300), description)
            self.assertEqual(requested_backlog(description), "7", description)

    def test_other_endpoints_unchanged(self) -> None:
        for description in ("systemd:domain=INET:name=smtp", "haproxy:systemd:domain=INET:index=0", "onion:25"):
            self.assertEqual(with_backlog(description, 300), description)
            self.assertIsNone(requested_backlog(description))

    def test_twisted_listens_with_it(self) -> None:
        """Twisted's own parsers take the strings as rewritten, and listen with that backlog."""
        reactor = MemoryReactor()
        for description in ("tcp:2525:interface=127.0.0.1", "tcp:2526:backlog=7", r"tcp6:2527:interface=\:\:1"):
            serverFromString(reactor, with_backlog(description, 300)).listen(object())  # type: ignore[arg-type]
        serverFromString(reactor, with_backlog("unix:/tmp/x.sock", 300)).listen(object())  # type: ignore[arg-type]
        self.assertEqual([(port, queue) for port, _, queue, _ in reactor.tcpServers],
                         [(2525, 300), (2526, 7), (2527, 300)])
        self.assertEqual([queue for _, _, queue, _, _ in reactor.unixServers], [300])

    def test_warns_above_kernel_cap(self) -> None:
        """listen() silently truncates a backlog to net.core.somaxconn: say so once at start, per listener."""
        with capturedLogs() as events:
            sized = sized_listeners(["tcp:25", "tcp:587:backlog=64", "systemd:domain=INET:name=smtp"], 1000, cap=128)
        self.assertEqual(sized, ["tcp:25:backlog=1000", "tcp:587:backlog=64", "systemd:domain=INET:name=smtp"])
        warnings = [e for e in events if e.get("log_namespace") == "esmtpkit.ops.backlog"]
        self.assertEqual([(e["description"], e["asked"], e["cap"]) for e in warnings],
                         [("tcp:25:backlog=1000", 1000, 128)])

    def test_quiet_within_cap(self) -> None:
        with capturedLogs() as events:
            sized_listeners(["tcp:25", "tcp:26:backlog=many"], 1000, cap=4096)
        self.assertEqual([e for e in events if e.get("log_namespace") == "esmtpkit.ops.backlog"], [])

    def test_somaxconn(self) -> None:
        path = Path(self.mktemp())
        path.write_text("4096\n")
        self.assertEqual(backlog.somaxconn(str(path)), 4096)
        self.assertIsNone(backlog.somaxconn(str(path) + ".missing"))


class ServiceTests(ScratchPaths, SynchronousTestCase):
    """``twistd esmtpkit`` listens with the backlog: every kind of listener it builds."""

    def listen(self, *args: str) -> MemoryReactor:
        reactor = MemoryReactor()
        service = tap.makeService(parse(*args), reactor=reactor)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        return reactor

    def backlogs(self, reactor: MemoryReactor) -> list[tuple[int, int]]:
        return [(port if isinstance(port, int) else port._port, queue) for port, _, queue, _ in reactor.tcpServers]

    def test_default_listener(self) -> None:
        self.assertEqual(self.backlogs(self.listen()), [(2525, 1000)])

    def test_follows_max_connections(self) -> None:
        self.assertEqual(self.backlogs(self.listen("--max-connections", "200", "--listen", "tcp:25")), [(25, 200)])

    def test_given_backlog_kept(self) -> None:
        reactor = self.listen("--listen", "tcp:25:backlog=7", "--listen", "tcp:26")
        self.assertEqual(self.backlogs(reactor), [(25, 7), (26, 1000)])

    def test_tls_listener(self) -> None:
        """``ssl:`` without a key of its own: the TCP port under the --tls-cert TLS gets it too."""
        files = make_tls_files(Path(self.mktemp()))
        reactor = self.listen("--tls-cert", str(files.cert), "--tls-key", str(files.key), "--listen", "ssl:465")
        self.assertEqual(self.backlogs(reactor), [(465, 1000)])

    def test_reuse_port(self) -> None:
        reactor = self.listen("--reuse-port", "--listen", "tcp:25", "--listen", "tcp6:26:backlog=9")
        self.assertEqual(self.backlogs(reactor), [(25, 1000), (26, 9)])

    def test_unix(self) -> None:
        path = os.path.join(self.mktemp(), "smtp.sock")
        reactor = self.listen("--listen", f"unix:{path}")
        self.assertEqual([queue for _, _, queue, _, _ in reactor.unixServers], [1000])

    def test_workers_share_sized_sockets(self) -> None:
        """--workers: the supervisor binds the shared sockets with it (the workers inherit them, listening)."""
        service: Any = supervise(parse("--workers", "2", "--max-connections", "300", "--listen", "tcp:0",
                                       "--listen", "tcp:0:backlog=8"), reactor=MemoryReactor())
        self.assertEqual(service.sockets.descriptions, ["tcp:0:backlog=300", "tcp:0:backlog=8"])


class MaildirStartTests(ScratchPaths, SynchronousTestCase):
    """A Maildir handler is made per connection, between accept and greeting: it makes the folders once per path."""

    def test_folders_made_once(self) -> None:
        root = os.path.abspath(self.mktemp())
        maildir.Maildir(path=root)
        self.assertEqual(sorted(os.listdir(root)), ["cur", "new", "tmp"])
        os.rmdir(os.path.join(root, "cur"))
        maildir.Maildir(path=root)  # the next connection's handler: no filesystem work
        self.assertEqual(sorted(os.listdir(root)), ["new", "tmp"])

    def test_unusable_path_retried(self) -> None:
        """A path that could not be prepared is tried again by the next connection's handler."""
        root = os.path.abspath(self.mktemp())
        with open(root, "w") as f:
            f.write("a file where the Maildir should be")
        with capturedLogs():
            maildir.Maildir(path=root)
        os.unlink(root)
        maildir.Maildir(path=root)
        self.assertEqual(sorted(os.listdir(root)), ["cur", "new", "tmp"])


# ---- a real twistd esmtpkit ----------------------------------------------------------------------------------------

#: Simultaneous connections in the burst: six times Twisted's old default backlog of 50.
BURST = 300
#: Seconds after which a connection still waiting for its greeting counts as hung (a hang detector, not a timing).
HANG = 60.0


def source_address(index: int) -> str:
    """A distinct loopback address for client ``index`` (127.0.1.1, 127.0.1.2, ...): a different client each."""
    return f"127.0.{1 + index // 250}.{1 + index % 250}"


def burst(port: int, count: int, give_up: float) -> dict[str, bytes]:
    """Connect ``count`` clients at once, each from its own loopback address, and read each one's first reply line.

    Returns the line each source address got (b"" if the server closed first); those still waiting after
    ``give_up`` seconds are missing from the result.
    """
    selector = selectors.DefaultSelector()
    pending: dict[socket.socket, tuple[str, bytes]] = {}
    got: dict[str, bytes] = {}
    try:
        for index in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.bind((source_address(index), 0))
            pending[sock] = (source_address(index), b"")
            sock.connect_ex(("127.0.0.1", port))
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + give_up
        while pending and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                sock = key.fileobj  # type: ignore[assignment]
                address, seen = pending[sock]
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                seen += data
                if data and b"\r\n" not in seen:
                    pending[sock] = (address, seen)
                    continue
                got[address] = seen.partition(b"\r\n")[0]
                selector.unregister(sock)
                del pending[sock]
                sock.close()
    finally:
        for sock in pending:
            sock.close()
        selector.close()
    return got


class Twistd:
    """``twistd -n esmtpkit`` with its default handler (Maildir) and logging, on two loopback listeners."""

    def __init__(self, cwd: Path, *listen: str) -> None:
        self.log = cwd / "twistd.log"
        arguments = [arg for description in listen for arg in ("--listen", description)]
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "--logfile", str(self.log), "esmtpkit", "--maildir", str(cwd / "Maildir"),
             "--hostname", "mx.test", *arguments],
            cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.ports = wait_for(lambda: self._ports(len(listen)), "twistd to listen")

    def _ports(self, count: int) -> list[int] | None:
        if self.process.poll() is not None:
            raise AssertionError(f"twistd exited: {self.text()}")
        found = [int(port) for port in re.findall(r"ESMTPFactory starting on (\d+)", self.text())]
        return found if len(found) >= count else None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        terminate(self.process, 60)


@pytest.fixture
def twistd(tmp_path: Path) -> Any:
    server = Twistd(tmp_path, "tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1:backlog=7")
    yield server
    server.stop()


@needs_proc
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read a listening socket's backlog")
def test_listening_sockets_backlog(twistd: Twistd) -> None:
    """The kernel reports each listening socket's backlog as its Send-Q: the default, and the one asked for."""
    def queue(port: int) -> int:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True,
                             timeout=30).stdout.split()
        return int(out[2])

    default, given = twistd.ports
    cap = backlog.somaxconn() or 1000
    assert (queue(default), queue(given)) == (min(1000, cap), 7)


@needs_proc
@pytest.mark.skipif((backlog.somaxconn() or 0) < BURST, reason="net.core.somaxconn caps every backlog below the burst")
def test_burst_from_distinct_addresses_all_greeted(twistd: Twistd) -> None:
    """300 clients at 300 addresses connecting at once against the default configuration: every one is greeted
    (with Twisted's backlog of 50, dozens were left connected and never greeted)."""
    got = burst(twistd.ports[0], BURST, HANG)
    missing = BURST - len(got)
    assert missing == 0, f"{missing} of {BURST} connections were never answered"
    assert {line[:4] for line in got.values()} == {b"220 "}, set(got.values())
    assert "Traceback" not in twistd.text()
