"""``twistd esmtpkit --workers N``: the supervisor's parts against fakes, then real processes on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, eventAsJSON, formatEvent
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.cli import tap
from esmtpkit.ops import workers
from esmtpkit.ops.workers import (KILL_GRACE, MAX_RESTART_DELAY, STABLE_AFTER, Supervisor, WorkerProtocol, bind,
                              shareable, split_description, supervise, worker_arguments)

from .support import Supervised, alive, greeting_pid, holds_socket, listening_inodes, needs_proc, read_reply, wait_for


# ---- unit tests: no processes, a fake reactor --------------------------------------------------------------------

class FakeProcess:
    """The transport of a process that was never started: records signals."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class ProcessReactor(MemoryReactorClock):
    """A MemoryReactorClock whose spawnProcess records the call and connects the protocol to a FakeProcess."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []
        self.fail_spawn = False

    def spawnProcess(self, processProtocol: Any, executable: str, args: list[str], env: Any = None,
                     path: Any = None, uid: Any = None, gid: Any = None, usePTY: bool = False,
                     childFDs: Any = None) -> FakeProcess:
        if self.fail_spawn:
            raise OSError(11, "Resource temporarily unavailable")
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append(dict(protocol=processProtocol, executable=executable, args=args, env=env,
                                 childFDs=childFDs, process=process))
        processProtocol.makeConnection(process)
        return process


def terminated(signal_number: int | None = None, status: int | None = None) -> Failure:
    return Failure(ProcessTerminated(exitCode=status, signal=signal_number))


class DescriptionTests(SynchronousTestCase):
    """Endpoint strings, read the way Twisted reads them."""

    def test_split(self) -> None:
        """Positional arguments, keywords, and backslash-escaped colons (IPv6 addresses)."""
        self.assertEqual(split_description("tcp:2525:interface=127.0.0.1"),
                         (["tcp", "2525"], {"interface": "127.0.0.1"}))
        self.assertEqual(split_description(r"tcp6:25:interface=\:\:1:backlog=5"),
                         (["tcp6", "25"], {"interface": "::1", "backlog": "5"}))

    def test_shareable(self) -> None:
        """tcp, tcp6 and systemd (also under haproxy:) can be shared; ssl: is refused with a clear error."""
        self.assertEqual([shareable(d) for d in ("tcp:25", "tcp6:25", "systemd:domain=INET:index=0",
                                                 "haproxy:tcp:25")], ["tcp", "tcp6", "systemd", "tcp"])
        with self.assertRaises(usage.UsageError) as raised:
            shareable("ssl:465:privateKey=k.pem")
        self.assertEqual(str(raised.exception),
                         "--workers can share tcp:, tcp6: and systemd: listeners, not 'ssl:465:privateKey=k.pem'")

    def test_bad_arguments(self) -> None:
        """A port that is not a number, or an unknown keyword, is a usage error naming the endpoint."""
        for description in ("tcp:smtp", "tcp:25:colour=blue"):
            with self.assertRaises(usage.UsageError) as raised:
                bind(description)
            self.assertEqual(str(raised.exception), f"--listen {description!r}: not a valid tcp: endpoint")

    def test_bind_tcp(self) -> None:
        """A listening, non-blocking IPv4 socket on the interface asked for; workers name it INET."""
        shared = bind("tcp:0:interface=127.0.0.1:backlog=7")
        try:
            self.assertEqual(shared.sock.family, socket.AF_INET)
            self.assertFalse(shared.sock.getblocking())
            self.assertEqual(shared.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN), 1)
            self.assertEqual(shared.worker_listen(2), "systemd:domain=INET:name=esmtpkit-listen-2")
            self.assertRegex(shared.address(), r"^127\.0\.0\.1:\d+$")
        finally:
            shared.close()
        self.assertEqual(shared.sock.fileno(), -1)

    def test_bind_haproxy(self) -> None:
        """haproxy: stays around the worker's systemd: endpoint."""
        shared = bind("haproxy:tcp:0:interface=127.0.0.1")
        try:
            self.assertEqual(shared.worker_listen(0), "haproxy:systemd:domain=INET:name=esmtpkit-listen-0")
        finally:
            shared.close()

    def test_unix_refused(self) -> None:
        """unix: cannot be shared: an adopted unix port would chmod the path to 0666 and unlink it when it stops."""
        with self.assertRaises(usage.UsageError) as raised:
            bind("unix:/run/esmtpkit/smtp.sock:mode=600")
        self.assertIn("--workers cannot share unix: listeners", str(raised.exception))

    def test_bind_in_use(self) -> None:
        """A port already taken: CannotListenError, as Twisted's own listeners raise."""
        from twisted.internet.error import CannotListenError

        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        try:
            with self.assertRaises(CannotListenError):
                bind(f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1")
        finally:
            taken.close()


class WorkerArgumentsTests(SynchronousTestCase):
    """Workers get the supervisor's arguments, without --workers and --listen in any spelling."""

    def test_removed(self) -> None:
        options = tap.Options()
        with tempfile.TemporaryDirectory() as tmp:
            options.parseOptions(["--workers", "2", "--handler", "esmtpkit.handlers.maildir.Maildir",
                                  "--listen", "tcp:0:interface=127.0.0.1", "--listen=tcp6:0:interface=\\:\\:1",
                                  "--work=3", "--max-recipients", "5", f"--handler-option=path={tmp}",
                                  "--hostname=mx.test"])
        self.assertEqual(options["workers"], 3)
        self.assertEqual(worker_arguments(options),
                         ["--handler", "esmtpkit.handlers.maildir.Maildir", "--max-recipients", "5",
                          "--handler-option", f"path={tmp}", "--hostname", "mx.test"])

    def test_supervise_refuses_ssl(self) -> None:
        """ssl: listeners cannot be shared yet: a usage error while parsing the options, before anything is bound."""
        options = tap.Options()
        with self.assertRaises(usage.UsageError):
            options.parseOptions(["--workers", "2", "--handler", "esmtpkit.handlers.base.MessageHandler",
                                  "--listen", "ssl:465:privateKey=k.pem"])

    def test_supervise(self) -> None:
        """The kill deadline is the workers' own shutdown timeout plus a grace period."""
        options = tap.Options()
        options.parseOptions(["--workers", "3", "--handler", "esmtpkit.handlers.base.MessageHandler",
                              "--shutdown-timeout", "4", "--listen", "tcp:0:interface=127.0.0.1"])
        service = supervise(options, reactor=ProcessReactor())
        assert isinstance(service, Supervisor)
        self.assertEqual((service.count, service.stop_timeout), (3, 4 + KILL_GRACE))


class SupervisorTests(SynchronousTestCase):
    """Starting, restarting and stopping workers, with a fake reactor and a Clock."""

    def setUp(self) -> None:
        self.reactor = ProcessReactor()
        self.events: list[dict[str, Any]] = []
        self.supervisor = Supervisor(["tcp:0:interface=127.0.0.1"], 2, ["--handler", "h.H"], self.reactor,
                                     stop_timeout=40, python="/py", publish=self.events.append)
        self.supervisor.startService()
        self.addCleanup(self._cleanup)

    def _cleanup(self) -> None:
        if self.supervisor.running:
            self.stop_all()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def stop_all(self) -> None:
        d = self.supervisor.stopService()
        for worker in list(self.supervisor.workers.values()):
            worker.processEnded(terminated(signal.SIGTERM))
        self.successResultOf(d)

    def run_reactor(self) -> None:
        self.reactor.run()

    def test_spawn(self) -> None:
        """Once the reactor runs: N workers, the socket on fd 3, described as systemd would, no --workers."""
        self.assertEqual(self.reactor.spawned, [])
        self.run_reactor()
        self.assertEqual(len(self.reactor.spawned), 2)
        call = self.reactor.spawned[0]
        fd = self.supervisor.sockets.sockets[0].sock.fileno()
        self.assertEqual(call["executable"], "/py")
        self.assertEqual(call["args"], ["/py", "-m", "esmtpkit.ops._worker", "-n", "--pidfile=",
                                        "--logger=esmtpkit.ops._worker.log_observer", "esmtpkit", "--handler", "h.H",
                                        "--listen", "systemd:domain=INET:name=esmtpkit-listen-0"])
        self.assertEqual(call["childFDs"], {0: "w", 1: "r", 2: "r", 3: fd})
        self.assertEqual((call["env"]["LISTEN_FDS"], call["env"]["LISTEN_FDNAMES"]), ("1", "esmtpkit-listen-0"))
        self.assertNotIn("LISTEN_PID", call["env"])
        self.assertEqual(sorted(self.supervisor.workers), [0, 1])

    def test_restart_backoff(self) -> None:
        """A worker that keeps dying is restarted after 1, 2, 4 … s, never more than 60 s."""
        self.run_reactor()
        delays = []
        for _ in range(9):
            self.supervisor.workers[0].processEnded(terminated(signal.SIGKILL))
            self.assertNotIn(0, self.supervisor.workers)
            (call,) = self.reactor.getDelayedCalls()
            delays.append(call.getTime() - self.reactor.seconds())
            self.reactor.advance(delays[-1])
            self.assertIn(0, self.supervisor.workers)
        self.assertEqual(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60])
        self.assertEqual(MAX_RESTART_DELAY, 60)
        self.assertEqual(len(self.reactor.spawned), 2 + 9)

    def test_backoff_resets(self) -> None:
        """A worker that stayed up STABLE_AFTER seconds is restarted after 1 s again."""
        self.run_reactor()
        for _ in range(3):
            self.supervisor.workers[1].processEnded(terminated(status=1))
            self.reactor.advance(self.reactor.getDelayedCalls()[0].getTime() - self.reactor.seconds())
        self.reactor.advance(STABLE_AFTER)
        self.supervisor.workers[1].processEnded(Failure(ProcessDone(0)))
        (call,) = self.reactor.getDelayedCalls()
        self.assertEqual(call.getTime() - self.reactor.seconds(), 1)
        self.reactor.advance(1)

    def test_spawn_failure_retried(self) -> None:
        """If a worker cannot be started, it is tried again after the back-off."""
        self.reactor.fail_spawn = True
        self.run_reactor()
        self.assertEqual(self.supervisor.workers, {})
        self.assertEqual(sorted(c.getTime() for c in self.reactor.getDelayedCalls()), [1, 1])
        self.reactor.fail_spawn = False
        self.reactor.advance(1)
        self.assertEqual(sorted(self.supervisor.workers), [0, 1])

    def test_stop(self) -> None:
        """Stopping: SIGTERM to each worker, the parent's socket closed, done when the last worker has exited."""
        self.run_reactor()
        sock = self.supervisor.sockets.sockets[0].sock
        processes = [call["process"] for call in self.reactor.spawned]
        d = self.supervisor.stopService()
        self.assertEqual([p.signals for p in processes], [["TERM"], ["TERM"]])
        self.assertEqual(sock.fileno(), -1)
        self.assertNoResult(d)
        self.supervisor.workers[0].processEnded(terminated(signal.SIGTERM))
        self.assertNoResult(d)
        self.supervisor.workers[1].processEnded(terminated(signal.SIGTERM))
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_stop_kills_at_deadline(self) -> None:
        """A worker still running stop_timeout seconds after SIGTERM gets SIGKILL; the others are left alone."""
        self.run_reactor()
        first, second = (call["process"] for call in self.reactor.spawned)
        d = self.supervisor.stopService()
        self.supervisor.workers[0].processEnded(terminated(signal.SIGTERM))
        self.reactor.advance(39.9)
        self.assertEqual(second.signals, ["TERM"])
        self.reactor.advance(0.1)
        self.assertEqual((first.signals, second.signals), (["TERM"], ["TERM", "KILL"]))
        self.assertNoResult(d)
        self.supervisor.workers[1].processEnded(terminated(signal.SIGKILL))
        self.successResultOf(d)

    def test_stop_cancels_restart(self) -> None:
        """A worker waiting to be restarted is not started once the supervisor stops."""
        self.run_reactor()
        self.supervisor.workers[0].processEnded(terminated(signal.SIGKILL))
        d = self.supervisor.stopService()
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)  # the deadline for worker 1
        self.supervisor.workers[1].processEnded(terminated(signal.SIGTERM))
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_stop_before_running(self) -> None:
        """Stopped before the reactor ran: no worker is ever started, the socket is closed."""
        self.successResultOf(self.supervisor.stopService())
        self.run_reactor()
        self.assertEqual(self.reactor.spawned, [])


class HangupTests(SynchronousTestCase):
    """SIGHUP to the supervisor: passed on to every worker when they have TLS files to reload, never fatal."""

    def start(self, reload_tls: bool) -> tuple[Supervisor, ProcessReactor]:
        reactor = ProcessReactor()
        supervisor = Supervisor(["tcp:0:interface=127.0.0.1"], 2, [], reactor, stop_timeout=40, python="/py",
                                publish=lambda event: None, reload_tls=reload_tls)
        before = signal.getsignal(signal.SIGHUP)
        supervisor.startService()
        reactor.run()

        def stop() -> None:
            d = supervisor.stopService()
            for worker in list(supervisor.workers.values()):
                worker.processEnded(terminated(signal.SIGTERM))
            self.successResultOf(d)
            self.assertEqual(signal.getsignal(signal.SIGHUP), before)
            self.assertEqual(reactor.getDelayedCalls(), [])

        self.addCleanup(stop)
        return supervisor, reactor

    def test_handler_installed(self) -> None:
        supervisor, _ = self.start(reload_tls=True)
        self.assertEqual(signal.getsignal(signal.SIGHUP), supervisor._on_hangup)

    def test_forwarded(self) -> None:
        supervisor, reactor = self.start(reload_tls=True)
        supervisor.hangup()
        self.assertEqual([call["process"].signals for call in reactor.spawned], [["HUP"], ["HUP"]])

    def test_ignored_without_tls(self) -> None:
        supervisor, reactor = self.start(reload_tls=False)
        supervisor.hangup()
        self.assertEqual([call["process"].signals for call in reactor.spawned], [[], []])


class LogForwardingTests(SynchronousTestCase):
    """Worker output becomes log events in the supervisor, tagged with the worker's pid."""

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.ends: list[Failure] = []
        self.worker = WorkerProtocol(0, lambda worker, reason: self.ends.append(reason), self.events.append)
        self.worker.makeConnection(FakeProcess(4242))  # type: ignore[arg-type]

    def test_json_event(self) -> None:
        """A JSON record keeps its format, level and time; the system names the worker."""
        record = eventAsJSON({"log_format": "hello {who}", "who": "world", "log_level": LogLevel.warn,
                              "log_namespace": "esmtpkit.server.factory", "log_time": 12.5})
        data = b"\x1e" + record.encode() + b"\n"
        self.worker.childDataReceived(1, data[:10])
        self.assertEqual(self.events, [])
        self.worker.childDataReceived(1, data[10:])
        (event,) = self.events
        self.assertEqual((formatEvent(event), event["log_level"], event["log_time"], event["worker_pid"]),
                         ("hello world", LogLevel.warn, 12.5, 4242))
        self.assertEqual(event["log_system"], "worker 4242 esmtpkit.server.factory#warn")

    def test_json_event_with_system(self) -> None:
        record = eventAsJSON({"log_format": "x", "log_system": "ESMTPProtocol,0,127.0.0.1"})
        self.worker.childDataReceived(1, b"\x1e" + record.encode() + b"\n")
        self.assertEqual(self.events[0]["log_system"], "worker 4242 ESMTPProtocol,0,127.0.0.1")

    def test_text_lines(self) -> None:
        """Lines that are not JSON records: stdout at info, stderr at warn; a partial last line is kept."""
        self.worker.childDataReceived(2, b"Traceback (most recent call last):\r\n  File")
        self.worker.childDataReceived(1, b"\x1enot json\n")
        self.worker.processEnded(terminated(status=1))
        self.assertEqual([(formatEvent(e), e["log_level"]) for e in self.events],
                         [("Traceback (most recent call last):", LogLevel.warn),
                          ("\x1enot json", LogLevel.info),
                          ("  File", LogLevel.warn)])
        self.assertEqual(len(self.ends), 1)

    def test_long_line(self) -> None:
        """A line longer than MAX_LINE is passed on in pieces, not held in memory."""
        self.worker.childDataReceived(1, b"x" * (workers.MAX_LINE * 2 + 5))
        self.assertEqual([len(formatEvent(e)) for e in self.events], [workers.MAX_LINE] * 2)
        self.worker.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(len(formatEvent(self.events[-1])), 5)


# ---- real processes on 127.0.0.1 ----------------------------------------------------------------------------------

@pytest.fixture
def supervised(tmp_path: Path) -> Any:
    servers: list[Supervised] = []

    def start(count: int = 2, *args: str) -> Supervised:
        servers.append(Supervised(tmp_path, count, *args))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@needs_proc
def test_two_workers_share_one_socket(supervised: Callable[..., Supervised]) -> None:
    """200 connections, 16 at a time: both workers serve, never the supervisor, from one listening socket."""
    server = supervised(2)
    with ThreadPoolExecutor(16) as pool:
        pids = list(pool.map(lambda _: greeting_pid(server.port), range(200)))
    served = set(pids)
    assert served == set(server.started()), (served, server.started())
    assert len(served) == 2
    assert server.process.pid not in served
    (inode,) = listening_inodes(server.port)
    assert all(holds_socket(pid, inode) for pid in [server.process.pid, *served])
    assert sorted(server.listening()) == sorted(served)
    assert "\x1e" not in server.text() and '"log_format"' not in server.text()


@needs_proc
def test_killed_worker_is_replaced(supervised: Callable[..., Supervised]) -> None:
    """SIGKILL of one worker: connections keep succeeding, and a new worker serves within a few seconds."""
    server = supervised(2)
    victim, survivor = server.started()
    os.kill(victim, signal.SIGKILL)
    seen: list[int] = []

    def replaced() -> bool:
        seen.append(greeting_pid(server.port))
        return len(server.started()) == 3 and seen[-1] == server.started()[2]

    wait_for(replaced, "a new worker serving", timeout=20)
    new = server.started()[2]
    assert new not in (victim, survivor)
    assert victim not in seen
    assert set(seen) <= {survivor, new}
    assert re.search(rf"worker 0 \(pid {victim}\) ended by SIGKILL", server.text())
    assert "restarting worker 0 in 1 s" in server.text()
    (inode,) = listening_inodes(server.port)
    assert holds_socket(new, inode)


@needs_proc
def test_sigterm_lets_transactions_finish(supervised: Callable[..., Supervised]) -> None:
    """SIGTERM to the supervisor mid-DATA: the message still gets 250 and is in the Maildir; all processes exit."""
    server = supervised(2, "--shutdown-timeout", "5")
    busy = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    pid = int(re.fullmatch(rb"220 mx\.test pid=(\d+)\r\n", read_reply(busy)).group(1))  # type: ignore[union-attr]
    for command, code in ((b"EHLO client.test", b"250"), (b"MAIL FROM:<a@client.test>", b"250"),
                          (b"RCPT TO:<b@mx.test>", b"250"), (b"DATA", b"354")):
        busy.sendall(command + b"\r\n")
        assert read_reply(busy).startswith(code)
    busy.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    idle_pid = int(re.fullmatch(rb"220 mx\.test pid=(\d+)\r\n", read_reply(idle)).group(1))  # type: ignore[union-attr]

    server.process.send_signal(signal.SIGTERM)
    wait_for(lambda: re.search(rf"\[worker {pid} [^]]*\] Received SIGTERM", server.text()), "the worker to stop")
    assert read_reply(idle) == b"421 Service shutting down, try again later\r\n"  # no EHLO: no enhanced code
    assert idle_pid in server.started()
    busy.sendall(b"second half\r\n.\r\n")
    replies = b""
    while chunk := busy.recv(4096):  # to the end: the worker closes once the transaction is done
        replies += chunk
    assert re.fullmatch(rb"250 2\.0\.0 Ok: queued as \S+\r\n421 4\.3\.2 Service shutting down, try again later\r\n",
                        replies), replies
    busy.close()
    idle.close()

    assert server.process.wait(5 + KILL_GRACE + 10) == -signal.SIGTERM
    assert not any(alive(p) for p in server.started())
    (message,) = (server.maildir / "new").iterdir()
    assert message.read_bytes().endswith(b"\r\nSubject: in flight\r\n\r\nfirst half\r\nsecond half\r\n")
    assert "SIGKILL" not in server.text()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5)


@needs_proc
def test_orphaned_workers_stop(supervised: Callable[..., Supervised]) -> None:
    """If the supervisor is killed outright, its workers see their stdin close and stop instead of holding the port."""
    server = supervised(2)
    pids = server.started()
    server.process.kill()
    server.process.wait(30)
    wait_for(lambda: not any(alive(pid) for pid in pids), "the workers to exit", timeout=30)
    assert listening_inodes(server.port) == []


@needs_proc
def test_sighup_reaches_every_worker(supervised: Callable[..., Supervised], tmp_path: Path) -> None:
    """kill -HUP of the supervisor: it stays up, each worker reloads its certificate, no worker is replaced."""
    from .certs import make_tls_files

    files = make_tls_files(tmp_path / "tls")
    server = supervised(2, "--tls-cert", str(files.cert), "--tls-key", str(files.key))
    workers = server.started()
    os.kill(server.process.pid, signal.SIGHUP)
    wait_for(lambda: len(re.findall(r"\[worker (\d+) [^]]*\] TLS certificate reloaded from", server.text())) == 2,
             "both workers reloading")
    reloaded = {int(pid) for pid in re.findall(r"\[worker (\d+) [^]]*\] TLS certificate reloaded", server.text())}
    assert reloaded == set(workers)
    assert "SIGHUP: passing it on to 2 worker(s)" in server.text()
    assert server.process.poll() is None
    assert server.started() == workers
    assert {greeting_pid(server.port) for _ in range(20)} <= set(workers)
    assert all(alive(pid) for pid in workers)
