"""A private RabbitMQ node for tests: Debian's ``rabbitmq-server`` on free loopback ports, in a temporary directory.

Nothing is shared with a system broker: the node has its own name, cookie (``HOME``), data, log, config and
enabled-plugins files, and its own ``epmd`` on a private port; every listener (AMQP, Erlang distribution, epmd)
is bound to 127.0.0.1. `RabbitMQ.kill` crashes the node (SIGKILL) and `RabbitMQ.start` brings it back on the same
data, which is how the tests take the broker away in the middle of a run.
"""

from __future__ import annotations

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
from typing import Any

__all__ = ["RabbitMQ", "find_server", "free_port"]

#: Where Debian puts the scripts that run the node as the calling user (/usr/sbin/rabbitmq-server su's to rabbitmq).
_SCRIPTS = Path("/usr/lib/rabbitmq/bin")


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


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
