"""``--reuse-port``: option checks, the endpoint it builds, and two real ``twistd esmtpkit`` processes on one port."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from twisted.internet.testing import MemoryReactor
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.cli import tap
from esmtpkit.ops._reuseport import reuse_port_endpoint

from .support import TWISTD, _env, greeting_pid, needs_proc, terminate, wait_for


def parse(*args: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(["--handler", "esmtpkit.handlers.base.MessageHandler", *args])
    return options


class OptionTests(SynchronousTestCase):
    """What --reuse-port accepts and refuses."""

    def test_off_by_default(self) -> None:
        self.assertFalse(parse()["reuse-port"])

    def test_tcp_accepted(self) -> None:
        options = parse("--reuse-port", "--listen", "tcp:2525:interface=127.0.0.1", "--listen", "tcp6:2526")
        self.assertTrue(options["reuse-port"])

    def test_other_listeners_refused(self) -> None:
        for description in ("unix:/tmp/smtp.sock", "ssl:465", "systemd:domain=INET:name=smtp", "haproxy:tcp:25"):
            with self.assertRaises(usage.UsageError) as caught:
                parse("--reuse-port", "--listen", description)
            self.assertIn("--reuse-port applies to tcp: and tcp6: listeners", str(caught.exception))

    def test_bad_tcp_refused(self) -> None:
        for description in ("tcp:smtp", "tcp:25:interface=127.0.0.1:nosuch=1", "tcp:25:backlog=many"):
            with self.assertRaises(usage.UsageError) as caught:
                parse("--reuse-port", "--listen", description)
            self.assertIn("with --reuse-port, give tcp:PORT", str(caught.exception))

    def test_workers_refused(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            parse("--reuse-port", "--workers", "2", "--listen", "tcp:2525")
        self.assertIn("--reuse-port and --workers are alternatives", str(caught.exception))


class EndpointTests(SynchronousTestCase):
    """The endpoint listens on a Twisted Binding that asks for SO_REUSEPORT, with the right family."""

    def listened(self, description: str) -> tuple[Any, ...]:
        reactor = MemoryReactor()
        self.successResultOf(reuse_port_endpoint(reactor, description).listen(object()))  # type: ignore[arg-type]
        (port, _factory, backlog, interface), = reactor.tcpServers
        return port._port, port._address, port._reuseAddress, port._reusePort, backlog, interface

    def test_tcp(self) -> None:
        self.assertEqual(self.listened("tcp:2525:interface=127.0.0.1:backlog=7"),
                         (2525, "127.0.0.1", True, True, 7, "127.0.0.1"))

    def test_tcp6_default_interface(self) -> None:
        self.assertEqual(self.listened("tcp6:2525"), (2525, "::", True, True, 50, "::"))

    def test_service_built(self) -> None:
        options = parse("--reuse-port", "--listen", "tcp:2525:interface=127.0.0.1")
        reactor = MemoryReactor()
        service = tap.makeService(options, reactor=reactor)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        (port, _factory, _backlog, interface), = reactor.tcpServers
        self.assertEqual((port._port, port._reusePort, interface), (2525, True, "127.0.0.1"))


# ---- two real processes on 127.0.0.1 ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Twistd:
    """A single-process ``twistd -n esmtpkit`` greeting with its pid, logging to a file."""

    def __init__(self, cwd: Path, name: str, port: int, *args: str) -> None:
        self.log = cwd / f"{name}.log"
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "--logfile", str(self.log), "esmtpkit",
             "--handler", "tests.pid_handler.PidMaildir", "--maildir", str(cwd / name), "--hostname", "mx.test",
             "--listen", f"tcp:{port}:interface=127.0.0.1", *args],
            cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def listening(self, port: int) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"twistd exited: {self.text()}")
        return f"ESMTPFactory starting on {port}\n" in self.text()

    def stop(self) -> None:
        terminate(self.process, 30)


@pytest.fixture
def twistd(tmp_path: Path) -> Any:
    started: list[Twistd] = []

    def start(name: str, port: int, *args: str) -> Twistd:
        started.append(Twistd(tmp_path, name, port, *args))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@needs_proc
def test_two_processes_share_a_port(twistd: Any) -> None:
    """Two processes with --reuse-port bind one port and both answer; a third without it cannot bind."""
    port = free_port()
    first, second = twistd("a", port, "--reuse-port"), twistd("b", port, "--reuse-port")
    for server in (first, second):
        wait_for(lambda: server.listening(port), "a process listening")
    pids = {greeting_pid(port) for _ in range(50)}
    assert pids == {first.process.pid, second.process.pid}

    third = twistd("c", port)
    assert third.process.wait(30) == 1
    output = third.text() + third.process.stdout.read().decode()  # type: ignore[union-attr]
    assert f"cannot listen on 127.0.0.1:{port} (--listen): address already in use" in output
    assert "Traceback" not in output
