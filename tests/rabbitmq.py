"""RabbitMQ for tests: a scripted broker link for unit tests, and a private node for integration tests.

`ScriptedLink` and `ScriptedOpener` stand in for pika behind `esmtpkit.queue.broker.Broker` (the AMQP handler's
publisher and the queue's store): the test confirms, refuses or drops by hand. `RabbitMQ` is Debian's
``rabbitmq-server`` on free loopback ports, in a temporary directory; `private_node` is the body of a module-scoped
fixture running one. Nothing is shared with a system broker: the node has its own name, cookie (``HOME``), data,
log, config and enabled-plugins files, and its own ``epmd`` on a private port; every listener (AMQP, Erlang
distribution, epmd) is bound to 127.0.0.1. `RabbitMQ.kill` crashes the node (SIGKILL) and `RabbitMQ.start` brings
it back on the same data, which is how the tests take the broker away in the middle of a run.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError

from esmtpkit.queue.broker import Delivery, NotQueued

__all__ = ["RabbitMQ", "ScriptedLink", "ScriptedOpener", "NO_PIKA", "find_server", "free_port", "private_node"]

#: Why the tests that need pika itself are skipped (None: they run).
NO_PIKA = None if importlib.util.find_spec("pika") else "pika is not installed (pip install 'esmtpkit[amqp]')"

#: Where Debian puts the scripts that run the node as the calling user (/usr/sbin/rabbitmq-server su's to rabbitmq).
_SCRIPTS = Path("/usr/lib/rabbitmq/bin")


# ---- a scripted broker link ---------------------------------------------------------------------------------


class ScriptedLink:
    """Stands in for the pika link: records what it is asked; the test confirms, refuses or drops by hand."""

    def __init__(self) -> None:
        self.lost: Deferred[str] = Deferred()
        self.declared: list[tuple[str, dict[str, Any], bool]] = []
        self.published: list[dict[str, Any]] = []
        self.consumers: list[dict[str, Any]] = []
        self.cancelled: list[str] = []
        self.acked: list[int] = []
        self.nacked: list[tuple[int, bool]] = []
        #: Ready messages per queue, as a passive declaration reports them.
        self.ready: dict[str, int] = {}
        #: What ``basic.get`` hands out, per queue.
        self.waiting: dict[str, list[Delivery]] = {}
        self.closed = False
        self.aborted = False
        #: What `close` returns: set an unfired Deferred for a broker that does not answer the close.
        self.closing: Deferred[Any] = succeed(None)

    def declare(self, queue: str, arguments: Any, passive: bool = False) -> "Deferred[int]":
        self.declared.append((queue, dict(arguments), passive))
        return succeed(self.ready.get(queue, 0))

    def publish(self, queue: str, body: bytes, properties: Any) -> "Deferred[Any]":
        confirm: Deferred[Any] = Deferred()
        self.published.append(dict(queue=queue, body=body, properties=dict(properties), confirm=confirm))
        return confirm

    def consume(self, queue: str, prefetch: int, deliver: Callable[[Delivery], None]) -> "Deferred[str]":
        tag = f"ctag{len(self.consumers) + 1}"
        self.consumers.append(dict(queue=queue, prefetch=prefetch, deliver=deliver, tag=tag))
        return succeed(tag)

    def cancel(self, tag: str) -> "Deferred[Any]":
        self.cancelled.append(tag)
        return succeed(None)

    def get(self, queue: str) -> "Deferred[Delivery | None]":
        items = self.waiting.get(queue, [])
        return succeed(items.pop(0) if items else None)

    def ack(self, tag: int) -> None:
        self.acked.append(tag)

    def nack(self, tag: int, requeue: bool) -> None:
        self.nacked.append((tag, requeue))

    def close(self) -> "Deferred[Any]":
        self.closed = True
        return self.closing

    def abort(self) -> None:
        self.aborted = True
        if not self.closing.called:
            self.closing.callback(None)

    def deliver(self, tag: int, body: bytes) -> None:
        """The broker hands out a message to the latest consumer (even one being cancelled: it may be in flight)."""
        self.consumers[-1]["deliver"](Delivery(tag, body))

    def drop(self, reason: str = "connection lost") -> None:
        """The broker went away: confirms still awaited fail, then the link reports itself lost (pika's order)."""
        for item in self.published:
            if not item["confirm"].called:
                item["confirm"].errback(NotQueued("connection to the broker lost before confirming", reason))
        self.lost.callback(reason)


class ScriptedOpener:
    """Each connection attempt is a Deferred the test fires with a `ScriptedLink`, or fails; counts cancellations."""

    def __init__(self) -> None:
        self.attempts: list[Deferred[Any]] = []
        self.cancelled = 0

    def __call__(self) -> "Deferred[Any]":
        def cancel(_: Deferred[Any]) -> None:
            self.cancelled += 1

        attempt: Deferred[Any] = Deferred(cancel)
        self.attempts.append(attempt)
        return attempt

    def succeed(self) -> ScriptedLink:
        link = ScriptedLink()
        self.attempts[-1].callback(link)
        return link

    def refuse(self) -> None:
        self.attempts[-1].errback(ConnectionRefusedError("nobody listening"))


# ---- a private node -----------------------------------------------------------------------------------------


def find_server() -> Path | None:
    """The ``rabbitmq-server`` start script, or None when RabbitMQ (or epmd) is not installed."""
    script = _SCRIPTS / "rabbitmq-server"
    if not script.exists() or shutil.which("epmd") is None:
        return None
    return script


def free_port() -> int:
    """A TCP port nobody listens on at 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RabbitMQ:
    """One private node; `start` boots it and waits until it speaks AMQP, `stop` removes every trace of it."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="esmtpkit-rabbitmq-")))
    node: str = field(default_factory=lambda: f"esmtpkit-test-{secrets.token_hex(4)}@localhost")
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    epmd_port: int = field(default_factory=free_port)
    #: With a certificate (tests/certs.py), the node also speaks AMQP over TLS on ``tls_port``.
    tls: Any = None
    tls_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    epmd: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The AMQP URL of the node (the default guest user may log in over loopback)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def tls_url(self) -> str:
        """The ``amqps://`` URL of the TLS listener (the certificate names localhost)."""
        return f"amqps://guest:guest@localhost:{self.tls_port}/%2F"

    @property
    def env(self) -> dict[str, str]:
        """The environment for the start script and rabbitmqctl: every path and port points at this node."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        loopback_dist = "-kernel inet_dist_use_interface {127,0,0,1}"
        env.update(
            HOME=str(self.root / "home"),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.root / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.root / "log"),
            RABBITMQ_CONFIG_FILE=str(self.root / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.root / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(self.root / "rabbitmq-env.conf"),
            RABBITMQ_PID_FILE=str(self.root / "rabbitmq.pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=loopback_dist,
            RABBITMQ_CTL_ERL_ARGS=loopback_dist,
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_EPMD_PORT=str(self.epmd_port),
        )
        return env

    def _prepare(self) -> None:
        home = self.root / "home"
        if home.exists():
            return
        for sub in ("home", "mnesia", "log"):
            (self.root / sub).mkdir(mode=0o700)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        config = (
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
            "disk_free_limit.absolute = 1MB\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )
        if self.tls is not None:
            config += (
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
                f"ssl_options.cacertfile = {self.tls.ca}\n"
                f"ssl_options.certfile = {self.tls.cert}\n"
                f"ssl_options.keyfile = {self.tls.key}\n"
                "ssl_options.verify = verify_none\n"
                "ssl_options.fail_if_no_peer_cert = false\n"
            )
        (self.root / "rabbitmq.conf").write_text(config)
        (self.root / "advanced.config").write_text("[].\n")
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq-env.conf").write_text("")

    def start(self, timeout: float = 60.0) -> None:
        """Boot the node (on the data left by an earlier run, if any) and wait until it accepts AMQP."""
        script = find_server()
        if script is None:
            raise RuntimeError("rabbitmq-server is not installed")
        self._prepare()
        env = self.env
        if self.epmd is None or self.epmd.poll() is not None:
            self.epmd = subprocess.Popen(["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"], env=env,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
        with open(self.root / "log" / "console.txt", "ab") as console:
            self.process = subprocess.Popen([str(script)], env=env, cwd=self.root, stdin=subprocess.DEVNULL,
                                            stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited with {self.process.returncode}:\n{self.log_tail()}")
            if self._speaks_amqp():
                return
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"rabbitmq-server did not start within {timeout:g} s:\n{self.log_tail()}")

    def _speaks_amqp(self) -> bool:
        """True once the node answers the AMQP 0-9-1 protocol header with a method frame (connection.start)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(b"AMQP\x00\x00\x09\x01")
                return s.recv(1) == b"\x01"
        except OSError:
            return False

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the node's logs, for failure messages."""
        text = []
        for path in sorted((self.root / "log").glob("*")):
            if path.is_file():
                text.append(f"--- {path.name}")
                text.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(text)

    def kill(self) -> None:
        """Crash the node (SIGKILL to its process group): no clean shutdown, like a power cut for the process."""
        process, self.process = self.process, None
        if process is None:
            return
        _signal_group(process, signal.SIGKILL)
        process.wait(timeout=30)

    def terminate(self, timeout: float = 30.0) -> None:
        """Stop the node cleanly (SIGTERM), killing it if it takes longer than ``timeout``."""
        process, self.process = self.process, None
        if process is None:
            return
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait(timeout=30)

    def stop(self) -> None:
        """Stop the node and its epmd, and remove the temporary directory."""
        try:
            self.terminate()
        finally:
            epmd, self.epmd = self.epmd, None
            if epmd is not None:
                epmd.terminate()
                epmd.wait(timeout=10)
            shutil.rmtree(self.root, ignore_errors=True)

    # ---- looking inside ---------------------------------------------------------------------------------------

    def connection(self) -> Any:
        """A pika BlockingConnection to the node (blocking: call it from a thread while the reactor runs)."""
        import pika

        return pika.BlockingConnection(pika.URLParameters(self.url))

    def drain(self, queue: str, settle: float = 1.0, timeout: float = 60.0) -> list[tuple[Any, bytes]]:
        """Take every message off ``queue`` (acknowledging each): a list of ``(properties, body)``.

        Stops once the queue stayed empty for ``settle`` seconds: a quorum queue that is still recovering after a
        restart may report fewer messages than it holds for a moment.
        """
        taken: list[tuple[Any, bytes]] = []
        connection = self.connection()
        try:
            channel = connection.channel()
            quiet_since = time.monotonic()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                method, properties, body = channel.basic_get(queue)
                if method is None:
                    if time.monotonic() - quiet_since >= settle:
                        break
                    time.sleep(0.05)
                    continue
                channel.basic_ack(method.delivery_tag)
                taken.append((properties, body))
                quiet_since = time.monotonic()
        finally:
            connection.close()
        return taken

    def delete_queue(self, queue: str) -> None:
        """Delete ``queue`` (so the next publish to it is returned unroutable)."""
        connection = self.connection()
        try:
            connection.channel().queue_delete(queue)
        finally:
            connection.close()

    def listening(self) -> list[tuple[str, int]]:
        """``(address, port)`` of every TCP socket the node and its epmd listen on, read from /proc."""
        groups = {p.pid for p in (self.process, self.epmd) if p is not None}
        inodes = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getpgid(int(entry.name)) not in groups:
                    continue
                for fd in (entry / "fd").iterdir():
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
            except OSError:
                continue
        found = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    address, port = fields[1].split(":")
                    raw = bytes.fromhex(address)
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
                    found.append((str(ipaddress.ip_address(raw)), int(port, 16)))
        return found


def private_node(tls: bool = False) -> Iterator[RabbitMQ]:
    """Run one node for a module's tests (``yield from`` it in a fixture), with a TLS listener if ``tls``; skip
    them when Debian's ``rabbitmq-server`` or pika is not installed."""
    if find_server() is None:
        pytest.skip("Debian's rabbitmq-server is not installed (apt-get install rabbitmq-server)")
    if NO_PIKA:
        pytest.skip(NO_PIKA)
    node = RabbitMQ()
    try:
        if tls:
            from .certs import make_tls_files

            node.tls = make_tls_files(node.root / "tls")
        node.start()
        yield node
    finally:
        node.stop()


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
