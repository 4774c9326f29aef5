#!/usr/bin/env python3
"""Benchmark esmtpkit side by side with aiosmtpd, twisted.mail.smtp and Postfix's smtp-sink.

esmtpkit runs twice: ``esmtpkit`` as an operator runs it (its default event log, twistd's text log to a file) and
``esmtpkit-quiet``, the same with ``--log-events warn`` (the peers log nothing per message or connection).

Each server runs as its own process pinned to one core (``taskset -c 0``); the load generators (Postfix's
``smtp-source`` and the raw-socket clients below) run pinned to another (``taskset -c 1``). The figure that
matters is the server's CPU time per unit of work, read from /proc before and after each scenario: on a busy
machine wall time varies, CPU time per message much less. Every server is started afresh for every scenario and
run, warmed up with a few messages, and every reply count is checked, so a broken server cannot look fast.

    python3 benchmarks/run.py [--quick] [--only esmtpkit,esmtpkit-quiet,aiosmtpd,twisted,smtp-sink] [--runs N]

Everything happens on 127.0.0.1. The peers (aiosmtpd, Twisted for twisted.mail.smtp) are installed from PyPI
into a throwaway virtualenv, ``benchmarks/.venv-peers``, on first use.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import json
import os
import platform
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS_VENV = HERE / ".venv-peers"
PEER_PACKAGES = ("aiosmtpd==1.4.6", "twisted==26.10.0")
KIT, QUIET = "esmtpkit", "esmtpkit-quiet"
SERVERS = (KIT, QUIET, "aiosmtpd", "twisted", "smtp-sink", "floor")
DEFAULT_SERVERS = SERVERS[:5]
HOST = "127.0.0.1"
TICKS = os.sysconf("SC_CLK_TCK")
SENDER, RECIPIENT = "sender@example.com", "recipient@example.com"
MIB = 1024 * 1024


class BenchError(Exception):
    """A server misbehaved (wrong reply, missing reply, died) or a client step ran out of time."""


def stop_process(proc: subprocess.Popen[bytes], wait: float = 15) -> None:
    """SIGTERM, then SIGKILL after ``wait`` seconds: one process started here, stopped by its own pid."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(wait)


# ---- /proc sampling ----------------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds, from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14 and 15 of proc(5), counted from 1


def run_ns(pid: int) -> int:
    """Time on CPU of all the process's threads in nanoseconds, from /proc/PID/task/*/schedstat (0 if absent).

    A cross-check of `cpu_seconds` at a finer grain than clock ticks; the table uses `cpu_seconds`.
    """
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[0])
    return total


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB, from /proc/PID/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (writing 5 to clear_refs, Linux 4.0+); False if not permitted."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RSSPoller:
    """Sample VmRSS every 20 ms in a thread and keep the largest value (a fallback for VmHWM)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.peak = max(self.peak, memory_kib(self.pid)["VmRSS"])
            self._stop.wait(0.02)

    def __enter__(self) -> "RSSPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# ---- servers -----------------------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def esmtpkit_python() -> str:
    """The interpreter that runs esmtpkit: $ESMTPKIT_PYTHON, else /tmp/venv's, else this one."""
    if os.environ.get("ESMTPKIT_PYTHON"):
        return os.environ["ESMTPKIT_PYTHON"]
    if Path("/tmp/venv/bin/python").exists():
        return "/tmp/venv/bin/python"
    return sys.executable


def twistd_argv(python: str) -> list[str]:
    """How to start twistd with ``python``: the script beside it, else through the module."""
    script = Path(python).parent / "twistd"
    if script.exists():
        return [str(script)]
    return [python, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


def peers_python() -> str:
    """The peers' interpreter, creating benchmarks/.venv-peers and installing aiosmtpd and Twisted if needed."""
    python = PEERS_VENV / "bin" / "python"
    probe = [str(python), "-c", "import aiosmtpd, twisted.mail.smtp"]
    if python.exists() and subprocess.run(probe, capture_output=True, timeout=60).returncode == 0:
        return str(python)
    print(f"installing {', '.join(PEER_PACKAGES)} into {PEERS_VENV} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True, timeout=300)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PEER_PACKAGES], check=True, timeout=900)
    subprocess.run(probe, check=True, timeout=60)
    return str(python)


@dataclass
class ServerSpec:
    """How to start one server under test: ``argv(port, event_log)``; only twistd uses ``event_log`` (its
    ``--logfile``), the other servers log nothing beyond their stdout and stderr."""

    name: str
    argv: Callable[[int, Path], list[str]]
    env: dict[str, str] = field(default_factory=dict)


_HELP: dict[tuple[str, ...], str] = {}


def esmtpkit_options(argv: list[str], env: dict[str, str], quiet: bool) -> list[str]:
    """Options that lift esmtpkit's default limits (size, connections), if this version of the plugin has them;
    with ``quiet`` also ``--log-events warn`` (no line per connection or message, as the peers log nothing)."""
    wanted = [("--hostname", "localhost"), ("--max-message-size", "0"), ("--max-connections", "0"),
              ("--max-connections-per-client", "0"), ("--error-limit", "0")]
    if quiet:
        wanted.append(("--log-events", "warn"))
    key = (*argv, env.get("PYTHONPATH", ""))
    if key not in _HELP:
        result = subprocess.run(argv + ["esmtpkit", "--help"], capture_output=True, text=True, timeout=60,
                                env={**os.environ, **env}, cwd=tempfile.gettempdir())
        if result.returncode != 0:
            raise BenchError(f"twistd esmtpkit --help failed:\n{result.stdout}{result.stderr}")
        _HELP[key] = result.stdout
    options = []
    for name, value in wanted:
        if f"{name}=" in _HELP[key]:
            options += [name, value]
        else:
            print(f"note: this esmtpkit has no {name} option; its default applies", flush=True)
    return options


def esmtpkit_spec(name: str, root: Path, profile_dir: Path | None, extra: Sequence[str],
                  quiet: bool = False) -> ServerSpec:
    """``twistd esmtpkit`` with the Null handler, from the checkout at ``root`` (whatever is installed), logging
    as twistd does by default (text, to the ``--logfile``), and only warnings with ``quiet``."""
    python = esmtpkit_python()
    env = {"PYTHONPATH": str(root)}
    twistd = twistd_argv(python)
    options = esmtpkit_options(twistd, env, quiet)
    counter = iter(range(1, 10**6))

    def argv(port: int, event_log: Path) -> list[str]:
        prof = []
        if profile_dir is not None:
            prof = [f"--profile={profile_dir / f'{name}-{next(counter)}.prof'}", "--profiler=cprofile",
                    "--savestats"]
        return [*twistd, "-n", "--pidfile=", f"--logfile={event_log}", *prof, "esmtpkit",
                "--handler", "esmtpkit.handlers.null.Null", "--listen", f"tcp:{port}:interface={HOST}:backlog=1024",
                *options, *extra]

    return ServerSpec(name, argv, env)


def server_specs(names: list[str], profile_dir: Path | None, extra: Sequence[str] = (),
                 baseline: Path | None = None) -> dict[str, ServerSpec]:
    """The servers to compare, only those asked for."""
    specs = {}
    kits = [(KIT, ROOT, False), (QUIET, ROOT, True)]  # this checkout
    if baseline is not None:
        kits += [("baseline", baseline, False), ("baseline-quiet", baseline, True)]
    for name, root, quiet in kits:
        if name in names:
            specs[name] = esmtpkit_spec(name, root, profile_dir, extra, quiet)
    if {"aiosmtpd", "twisted", "floor"} & set(names):
        peers = peers_python()
        for name, script in (("aiosmtpd", "aiosmtpd_sink.py"), ("twisted", "twisted_sink.py"),
                             ("floor", "twisted_floor.py")):
            path = str(HERE / "servers" / script)
            specs[name] = ServerSpec(name, lambda p, _log, path=path: [peers, path, str(p)])
    if "smtp-sink" in names:
        sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        # -m: simultaneous connections it serves (default 256; the idle scenario holds 2000).
        specs["smtp-sink"] = ServerSpec("smtp-sink",
                                        lambda p, _log: [sink, *user, "-m", "4000", f"{HOST}:{p}", "1024"])
    return {name: specs[name] for name in names}


class Server:
    """One running server process, pinned to a core; stopped by its own pid only."""

    running: set["Server"] = set()

    def __init__(self, spec: ServerSpec, cpu: str, logdir: Path) -> None:
        self.spec = spec
        self.port = free_port()
        # stdout and stderr go to a file, never a pipe: nothing would drain a pipe while a scenario runs.
        self.log_path = logdir / f"{spec.name}-{self.port}.log"
        self.event_log = logdir / f"{spec.name}-{self.port}.twistd.log"  # twistd's --logfile, rotated at 1 MB
        argv = ["taskset", "-c", cpu, *spec.argv(self.port, self.event_log)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=logdir, env={**os.environ, **spec.env}, start_new_session=True)
        Server.running.add(self)
        try:
            self._wait_ready(deadline=time.monotonic() + 60)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid  # taskset execs the server, so this is the server's own pid

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.spec.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as s:
                    code, _ = Client(s).reply(time.monotonic() + 10)
                    if code != 220:
                        raise BenchError(f"{self.spec.name} greeted with {code}")
                    s.sendall(b"QUIT\r\n")
                    return
            except OSError:
                time.sleep(0.1)
        raise BenchError(f"{self.spec.name} did not start listening on port {self.port}; see {self.log_path}")

    def stop(self) -> None:
        Server.running.discard(self)
        stop_process(self.proc)

    def event_log_files(self) -> list[Path]:
        """twistd's log file and the files it rotated out (none for servers that do not write one)."""
        return sorted(self.event_log.parent.glob(self.event_log.name + "*"))

    @classmethod
    def stop_all(cls) -> None:
        for server in list(cls.running):
            server.stop()


# ---- clients -----------------------------------------------------------------------------------------------------

class Client:
    """Reads SMTP replies from a blocking socket, with a deadline on each."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def line(self, deadline: float) -> bytes:
        while b"\r\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError("timed out waiting for a reply")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise BenchError("timed out waiting for a reply") from None
            if not data:
                raise BenchError(f"connection closed by the server (pending: {self.buffer[:80]!r})")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def reply(self, deadline: float) -> tuple[int, list[bytes]]:
        """One whole (possibly multi-line) reply: its code and its lines."""
        lines = []
        for _ in range(1000):
            line = self.line(deadline)
            lines.append(line)
            if len(line) < 3 or not line[:3].isdigit():
                raise BenchError(f"not an SMTP reply: {line[:80]!r}")
            if len(line) == 3 or line[3:4] == b" ":
                return int(line[:3]), lines
        raise BenchError("reply with more than 1000 lines")

    def command(self, data: bytes, expect: int, deadline: float) -> None:
        self.sock.sendall(data)
        code, lines = self.reply(deadline)
        if code != expect:
            raise BenchError(f"{data[:40]!r} got {lines[-1][:80]!r}, wanted {expect}")


def message_1k() -> bytes:
    """A 1 KiB message (headers and body, CRLF lines), as the pipelined client sends it."""
    head = (b"From: <sender@example.com>\r\nTo: <recipient@example.com>\r\nSubject: benchmark\r\n"
            b"Message-ID: <bench@example.com>\r\n\r\n")
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"  # 64 bytes
    body = line * ((1024 - len(head)) // len(line))
    return head + body + b"x" * (1024 - len(head) - len(body) - 2) + b"\r\n"


def body_block() -> bytes:
    """64 KiB of 64-byte lines (62 characters and CRLF), none starting with a dot."""
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    return b"".join((alphabet[i % 64:] + alphabet[:i % 64])[:62] + b"\r\n" for i in range(1024))


def smtp_source(port: int, cpu: str, args: list[str], count: int, timeout: float) -> None:
    """Run Postfix's smtp-source and check that exactly ``count`` DATA transactions completed."""
    argv = ["taskset", "-c", cpu, shutil.which("smtp-source") or "/usr/sbin/smtp-source", "-c",
            "-f", SENDER, "-t", RECIPIENT, "-M", "localhost", *args, f"{HOST}:{port}"]
    try:
        result = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError(f"smtp-source took more than {timeout:.0f} s") from None
    if result.returncode != 0:
        raise BenchError(f"smtp-source exited {result.returncode}: {result.stderr.decode(errors='replace')[-300:]}")
    counters = result.stdout.replace(b"\r", b"\n").split()
    done = int(counters[-1]) if counters else 0
    if done != count:
        raise BenchError(f"smtp-source completed {done} messages, not {count}")


def big_message(port: int, size: int, timeout: float) -> None:
    """One message of ``size`` bytes of body (a multiple of 64 KiB), streamed in 64 KiB writes; expect 250."""
    block = body_block()
    deadline = time.monotonic() + timeout
    with socket.create_connection((HOST, port), timeout=30) as s:
        c = Client(s)
        if c.reply(deadline)[0] != 220:
            raise BenchError("no 220 greeting")
        c.command(b"EHLO bench.example\r\n", 250, deadline)
        c.command(f"MAIL FROM:<{SENDER}>\r\n".encode(), 250, deadline)
        c.command(f"RCPT TO:<{RECIPIENT}>\r\n".encode(), 250, deadline)
        c.command(b"DATA\r\n", 354, deadline)
        s.sendall(b"Subject: big\r\n\r\n")
        s.settimeout(max(1.0, deadline - time.monotonic()))
        for _ in range(size // len(block)):
            s.sendall(block)
            if time.monotonic() > deadline:
                raise BenchError("timed out sending the body")
        c.command(b".\r\n", 250, deadline)
        c.command(b"QUIT\r\n", 221, deadline)


@contextlib.contextmanager
def idle_connections(port: int, count: int, timeout: float) -> Iterator[None]:
    """Open ``count`` connections, read each 220 greeting, and keep them open while the block runs."""
    deadline = time.monotonic() + timeout
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection((HOST, port), timeout=30)
            socks.append(s)
            code, lines = Client(s).reply(deadline)
            if code != 220:
                raise BenchError(f"connection {len(socks)} greeted with {lines[-1][:80]!r}")
        yield
    finally:
        for s in socks:
            s.close()


def take_reply(buffer: bytes) -> tuple[int, bytes, bytes] | None:
    """The first whole (possibly multi-line) reply in ``buffer``: its code, its last line and what follows it;
    None while its last line has not arrived."""
    start = 0
    while True:
        end = buffer.find(b"\r\n", start)
        if end < 0:
            return None
        line = buffer[start:end]
        if len(line) < 3 or not line[:3].isdigit():
            raise BenchError(f"not an SMTP reply: {line[:80]!r}")
        if len(line) == 3 or line[3:4] == b" ":
            return int(line[:3]), line, buffer[end + 2:]
        start = end + 2


#: What the connect scenario sends after each reply, and the reply it expects next.
_CONNECT_STEPS = {220: (b"EHLO client.example\r\n", 250), 250: (b"QUIT\r\n", 221)}


def connect_sessions(port: int, count: int, parallel: int, timeout: float) -> None:
    """``count`` connections, ``parallel`` open at a time, each: read the 220 greeting, send EHLO and read its
    whole 250 reply, send QUIT and read 221, close. One non-blocking loop; every reply code is checked."""
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    started = done = 0
    try:
        while done < count:
            while started < count and started - done < parallel:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                err = s.connect_ex((HOST, port))
                if err not in (0, errno.EINPROGRESS):
                    s.close()
                    raise BenchError(f"connection {started + 1}: connect failed: {os.strerror(err)}")
                sel.register(s, selectors.EVENT_READ, [b"", 220])  # [unparsed input, code wanted next]
                started += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"timed out with {done} of {count} connections done")
            for key, _ in sel.select(min(left, 1.0)):
                s, state = key.fileobj, key.data
                try:
                    data = s.recv(65536)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except OSError as e:
                    raise BenchError(f"connection failed: {e}") from None
                if not data:
                    raise BenchError(f"connection closed by the server (wanted {state[1]}, pending: "
                                     f"{state[0][:80]!r})")
                state[0] += data
                while (parsed := take_reply(state[0])) is not None:
                    code, line, state[0] = parsed
                    if code != state[1]:
                        raise BenchError(f"connect: got {line[:80]!r}, wanted {state[1]}")
                    if code == 221:
                        sel.unregister(s)
                        s.close()  # type: ignore[union-attr]
                        done += 1
                        break
                    command, state[1] = _CONNECT_STEPS[code]
                    if s.send(command) != len(command):  # type: ignore[union-attr]
                        raise BenchError("a command did not fit in the socket buffer")
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()


def pipelined(port: int, count: int, timeout: float) -> None:
    """Write ``count`` whole transactions and QUIT without waiting, then check every reply."""
    deadline = time.monotonic() + timeout
    transaction = (f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode()
                   + message_1k() + b".\r\n")
    payload = transaction * count + b"QUIT\r\n"
    with socket.create_connection((HOST, port), timeout=30) as s:
        c = Client(s)
        if c.reply(deadline)[0] != 220:
            raise BenchError("no 220 greeting")
        c.command(b"EHLO bench.example\r\n", 250, deadline)
        failure: list[BaseException] = []

        def write() -> None:
            try:
                view = memoryview(payload)
                for i in range(0, len(view), 65536):
                    s.sendall(view[i:i + 65536])
            except BaseException as e:  # reported by the reader below
                failure.append(e)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        codes: dict[int, int] = {}
        for _ in range(4 * count + 1):
            code, _ = c.reply(deadline)
            codes[code] = codes.get(code, 0) + 1
            if code == 221 or code >= 400:
                break
        writer.join(max(0.1, deadline - time.monotonic()))
        if failure:
            raise BenchError(f"writing the pipelined commands failed: {failure[0]!r}")
        wanted = {250: 3 * count, 354: count, 221: 1}
        if codes != wanted:
            raise BenchError(f"pipelined replies {codes}, wanted {wanted}")


# ---- scenarios ---------------------------------------------------------------------------------------------------

@dataclass
class Scenario:
    """One workload: what it runs and how its figure is expressed.

    ``full`` and ``quick`` are (count, repeats): ``count`` as in the title, done ``repeats`` times one after the
    other within one measurement, so that even the fastest server uses enough clock ticks to be measured.
    """

    key: str
    title: str
    unit: str
    full: tuple[int, int]
    quick: tuple[int, int]

    def label(self, size: tuple[int, int]) -> str:
        n, repeats = size
        text = self.title.format(n=n, mib=n // MIB)
        return text + (f" (×{repeats})" if repeats > 1 else "")


SCENARIOS = [
    Scenario("persistent", "1 KiB messages, 20 persistent sessions, {n} messages", "µs/msg", (20000, 1), (4000, 1)),
    Scenario("per-connection", "1 KiB, one message per connection, {n} connections, 20 at a time", "µs/msg",
             (10000, 1), (2000, 1)),
    Scenario("connect", "connect + banner + EHLO + QUIT, {n} connections, 20 at a time", "µs/conn",
             (10000, 1), (2000, 1)),
    Scenario("one-session", "one session, {n} messages back to back", "µs/msg", (2000, 5), (2000, 2)),
    Scenario("big", "one {mib} MiB message", "ms/MiB", (100 * MIB, 5), (32 * MIB, 1)),
    Scenario("idle", "{n} idle connections", "KiB/conn", (2000, 1), (500, 1)),
    Scenario("pipelined", "pipelined, {n} messages in one session", "µs/msg", (1000, 10), (1000, 2)),
]


@dataclass
class Sample:
    """One measured run of one scenario on one server."""

    value: float  # in the scenario's unit
    cpu: float  # server CPU seconds (utime + stime)
    wall: float
    rss_growth_kib: int = 0
    sched_cpu: float = 0.0  # server CPU seconds from schedstat, the cross-check
    log_kib: float = 0.0  # size of twistd's log file(s) when the server stopped (warm-up and start-up included)


def warm_up(server: Server, cpu: str) -> None:
    """A few messages first, so lazy imports and first-use caches are not counted."""
    smtp_source(server.port, cpu, ["-s", "2", "-m", "20", "-d", "-l", "1024"], 20, timeout=60)


def run_scenario(scenario: Scenario, size: tuple[int, int], server: Server, cpu: str) -> Sample:
    """Run one scenario against a warmed-up server and turn the /proc deltas into its figure."""
    ns0 = run_ns(server.pid)
    sample = _measure(scenario, size, server, cpu)
    sample.sched_cpu = (run_ns(server.pid) - ns0) / 1e9
    return sample


def _measure(scenario: Scenario, size: tuple[int, int], server: Server, cpu: str) -> Sample:
    pid = server.pid
    n, repeats = size
    if scenario.key == "big":
        reset = reset_peak(pid)
        before = memory_kib(pid)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        with RSSPoller(pid) as poller:
            for _ in range(repeats):  # one message per session, one after the other: peak growth is per message
                big_message(server.port, n, timeout=600)
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
        after = memory_kib(pid)
        peak = max(poller.peak, after["VmHWM"] if reset else 0, after["VmRSS"])
        return Sample((cpu1 - cpu0) * 1000 / (n * repeats / MIB), cpu1 - cpu0, t1 - t0, peak - before["VmRSS"])
    if scenario.key == "idle":
        time.sleep(0.2)
        before = memory_kib(pid)["VmRSS"]
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        with idle_connections(server.port, n, timeout=300):
            time.sleep(1.0)  # let the server finish any work for the last connections
            after = memory_kib(pid)["VmRSS"]
            cpu1, t1 = cpu_seconds(pid), time.monotonic()
            if server.proc.poll() is not None:
                raise BenchError("server died holding idle connections")
        return Sample((after - before) / n, cpu1 - cpu0, t1 - t0, after - before)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    for _ in range(repeats):
        if scenario.key == "persistent":
            smtp_source(server.port, cpu, ["-s", "20", "-l", "1024", "-m", str(n), "-d"], n, timeout=600)
        elif scenario.key == "per-connection":
            smtp_source(server.port, cpu, ["-s", "20", "-l", "1024", "-m", str(n)], n, timeout=600)
        elif scenario.key == "one-session":
            smtp_source(server.port, cpu, ["-s", "1", "-l", "1024", "-m", str(n), "-d"], n, timeout=600)
        elif scenario.key == "pipelined":
            pipelined(server.port, n, timeout=600)
        elif scenario.key == "connect":
            connect_sessions(server.port, n, 20, timeout=600)
        else:
            raise ValueError(scenario.key)
    time.sleep(0.05)  # the server may still be closing the last connections
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    return Sample((cpu1 - cpu0) * 1e6 / (n * repeats), cpu1 - cpu0, t1 - t0)


# ---- reporting ---------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" without it)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def version(python: str, code: str) -> str:
    """What ``python -c code`` prints (a version line), or "?" if it prints nothing or cannot run."""
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


def machine(baseline: Path | None = None) -> dict[str, str]:
    """What the figures were measured on."""
    kit = esmtpkit_python()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": str(os.cpu_count()),
        "cpu model": cpu_model(),
        "kernel": platform.release(),
        "esmtpkit python": version(kit, "import sys; print(sys.version.split()[0])"),
        "esmtpkit twisted": version(kit, "import twisted; print(twisted.__version__)"),
        "esmtpkit commit": _commit(ROOT),
    }
    if baseline is not None:
        info["baseline commit"] = f"{_commit(baseline)} in {baseline}"
    peers = PEERS_VENV / "bin" / "python"
    if peers.exists():
        info["peers"] = version(str(peers), "import sys, aiosmtpd, twisted; print('Python', sys.version.split()[0],"
                                            "'aiosmtpd', aiosmtpd.__version__, 'Twisted', twisted.__version__)")
    post = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "postfix"], capture_output=True, text=True)
    info["postfix"] = post.stdout.strip() or "?"
    return info


def _commit(root: Path) -> str:
    """The commit of the checkout at ``root``, marked when its esmtpkit/ has changes not yet committed."""
    head = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "esmtpkit", "twisted"],
                           capture_output=True, text=True)
    commit = head.stdout.strip() or "?"
    return commit + (" with uncommitted changes in esmtpkit/" if dirty.stdout.strip() else "")


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def summary(samples: list[Sample]) -> tuple[float, float, float]:
    values = [s.value for s in samples]
    return statistics.median(values), min(values), max(values)


def cell(scenario: Scenario, samples: list[Sample] | None) -> str:
    if not samples:
        return "failed"
    med, _, _ = summary(samples)
    text = f"{fmt(med)} {scenario.unit}"
    if scenario.key == "big":
        growth = statistics.median(s.rss_growth_kib for s in samples) / 1024
        text += f", +{growth:.1f} MiB RSS"
    return text


#: Scenarios of 1 KiB messages, where the per-connection and per-message log lines weigh most.
SMALL = ("persistent", "per-connection", "one-session", "pipelined")
#: esmtpkit's CPU at most this many times twisted.mail.smtp's, per scenario.
VERSUS_TWISTED = {"persistent": 0.6, "per-connection": 0.6, "connect": 0.8, "one-session": 0.6, "pipelined": 0.6}
#: esmtpkit (default logging) at most this many times esmtpkit-quiet, for each scenario of SMALL.
LOGGING_COST = 1.15


def targets(results: dict[str, dict[str, list[Sample]]]) -> list[tuple[str, str, str]]:
    """esmtpkit's performance targets, for the default-logging ``esmtpkit`` of this run: (what, wanted, measured)."""
    rows = []
    kit = results.get(KIT, {})
    tw = results.get("twisted", {})
    quiet = results.get(QUIET, {})

    def med(samples: list[Sample] | None) -> float | None:
        return summary(samples)[0] if samples else None

    def verdict(ok: bool) -> str:
        return "met" if ok else "not met"

    for key in (s.key for s in SCENARIOS):
        limit = VERSUS_TWISTED.get(key)
        mine, theirs = med(kit.get(key)), med(tw.get(key))
        if limit is not None and mine is not None and theirs:
            ratio = mine / theirs
            rows.append((key, f"≤ {limit} × twisted.mail.smtp", f"{ratio:.2f} × ({verdict(ratio <= limit)})"))
    for key in SMALL:
        mine, theirs = med(kit.get(key)), med(quiet.get(key))
        if mine is not None and theirs:
            ratio = mine / theirs
            rows.append((f"logging cost, {key}", f"≤ {LOGGING_COST} × esmtpkit-quiet",
                         f"{ratio:.2f} × ({verdict(ratio <= LOGGING_COST)})"))
    big = kit.get("big")
    if big:
        ms = summary(big)[0]
        growth = statistics.median(s.rss_growth_kib for s in big) / 1024
        rows.append(("big", "≤ 0.5 ms/MiB, RSS growth < 1 MiB",
                     f"{fmt(ms)} ms/MiB, +{growth:.2f} MiB ({verdict(ms <= 0.5 and growth < 1)})"))
    idle = kit.get("idle")
    if idle:
        kib = summary(idle)[0]
        rows.append(("idle", "≤ 2 KiB per connection", f"{fmt(kib)} KiB ({verdict(kib <= 2)})"))
    return rows


def report(results: dict[str, dict[str, list[Sample]]], sizes: dict[str, tuple[int, int]], servers: list[str],
           runs: int) -> str:
    lines = []
    peers = [s for s in servers if s != KIT] if KIT in servers else []
    head = ["scenario", *servers, *(f"{KIT}/{p}" for p in peers)]
    lines.append(f"Server CPU per unit of work, median of {runs} run(s); ratios are esmtpkit's (default logging) over"
                 " each other server's: below 1, esmtpkit spends less.")
    lines.append("")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for scenario in SCENARIOS:
        if scenario.key not in sizes:
            continue
        row = [scenario.label(sizes[scenario.key])]
        row += [cell(scenario, results[s].get(scenario.key)) for s in servers]
        kit = results.get(KIT, {}).get(scenario.key)
        for p in peers:
            theirs = results[p].get(scenario.key)
            if kit and theirs and summary(theirs)[0] > 0:
                row.append(f"{summary(kit)[0] / summary(theirs)[0]:.2f}")
            else:
                row.append("–")
        lines.append("| " + " | ".join(row) + " |")
    goal = targets(results)
    if goal:
        lines += ["", "| esmtpkit target (default logging) | wanted | measured |", "|---|---|---|"]
        lines += [f"| {key} | {want} | {got} |" for key, want, got in goal]
    return "\n".join(lines)


# ---- driver ------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run and smaller counts (a smoke test)")
    parser.add_argument("--only", default=",".join(DEFAULT_SERVERS),
                        help=f"servers to run, comma-separated, from {','.join(SERVERS)} (default: all but floor;"
                             " with --baseline also baseline-quiet)")
    parser.add_argument("--runs", type=int, help="runs of each scenario (default 5, or 1 with --quick)")
    parser.add_argument("--scenarios", default=",".join(s.key for s in SCENARIOS),
                        help="scenarios to run, comma-separated: " + ",".join(s.key for s in SCENARIOS))
    parser.add_argument("--server-cpu", default="0", help="core for the servers (taskset -c), default 0")
    parser.add_argument("--client-cpu", default="1", help="core for the load generators, default 1")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="run esmtpkit (each configuration) under twistd's cProfile and save one .prof file"
                             " per server start in DIR")
    parser.add_argument("--esmtpkit-option", action="append", default=[], metavar="OPTION",
                        help="an extra twistd esmtpkit option for every esmtpkit configuration, e.g."
                             " --esmtpkit-option=--bare-newline=allow (repeatable)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every sample as JSON to FILE")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also measure the esmtpkit checkout in DIR (another commit, its compiled scanner built)"
                             " as the server 'baseline' (default logging), right after esmtpkit; add"
                             " baseline-quiet to --only for its --log-events warn twin")
    args = parser.parse_args(argv)
    args.servers = [s.strip() for s in args.only.split(",") if s.strip()]
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / "esmtpkit").is_dir():
            parser.error(f"--baseline: no esmtpkit package in {args.baseline}")
        if "baseline" not in args.servers:
            args.servers.insert(args.servers.index(KIT) + 1 if KIT in args.servers else 0, "baseline")
    allowed = set(SERVERS) | ({"baseline", "baseline-quiet"} if args.baseline is not None else set())
    unknown = set(args.servers) - allowed
    if unknown:
        parser.error(f"unknown server(s): {', '.join(sorted(unknown))}")
    if len(set(args.servers)) != len(args.servers):
        parser.error("--only names a server twice")
    keys = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if set(keys) - {s.key for s in SCENARIOS}:
        parser.error(f"unknown scenario(s): {', '.join(sorted(set(keys) - {s.key for s in SCENARIOS}))}")
    args.scenario_keys = keys
    if args.runs is None:
        args.runs = 1 if args.quick else 5
    if not 1 <= args.runs <= 50:
        parser.error("--runs must be between 1 and 50")
    return args


def interrupted(signum: int, frame: object) -> None:
    """A SIGTERM handler: stop as Ctrl-C does, so the servers started here are stopped on the way out."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def workspace(prefix: str, mode: int | None = None) -> Iterator[tuple[Path, list[bool]]]:
    """A temporary folder (made ``mode`` if given), removed at the end unless the caller marks it to keep
    (``keep[0] = True``)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if mode is not None:
        path.chmod(mode)
    keep = [False]
    try:
        yield path, keep
    finally:
        if keep[0]:
            print(f"logs kept in {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("taskset", "smtp-source"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is missing (taskset: util-linux; smtp-source, smtp-sink: Debian's postfix)", file=sys.stderr)
            return 2
    if args.profile is not None:
        args.profile = args.profile.resolve()
        args.profile.mkdir(parents=True, exist_ok=True)
    # The raw-socket clients run in this process: pin it to the client core (servers get theirs through taskset).
    with contextlib.suppress(OSError, ValueError):
        os.sched_setaffinity(0, {int(args.client_cpu)})
    signal.signal(signal.SIGTERM, interrupted)
    logdir = Path(tempfile.mkdtemp(prefix="esmtpkit-bench-"))
    keep_logs = True
    try:
        specs = server_specs(args.servers, args.profile, args.esmtpkit_option, args.baseline)
        info = machine(args.baseline)
        print("\n".join(f"{k}: {v}" for k, v in info.items()), flush=True)
        print(f"command: python3 benchmarks/run.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
        print(f"server logs: {logdir}\n", flush=True)
        scenarios = [s for s in SCENARIOS if s.key in args.scenario_keys]
        sizes = {s.key: (s.quick if args.quick else s.full) for s in scenarios}
        results: dict[str, dict[str, list[Sample]]] = {name: {} for name in args.servers}
        failed: dict[tuple[str, str], str] = {}
        for run in range(1, args.runs + 1):
            for scenario in scenarios:
                for name in args.servers:
                    if (name, scenario.key) in failed:
                        continue
                    server = Server(specs[name], args.server_cpu, logdir)
                    try:
                        warm_up(server, args.client_cpu)
                        sample = run_scenario(scenario, sizes[scenario.key], server, args.client_cpu)
                    except BenchError as e:
                        failed[name, scenario.key] = str(e)
                        results[name].pop(scenario.key, None)
                        print(f"run {run} {scenario.key:15} {name:14} FAILED: {e}", flush=True)
                        continue
                    finally:
                        server.stop()
                    logs = server.event_log_files()
                    sample.log_kib = sum(f.stat().st_size for f in logs) / 1024
                    for f in logs:  # kept only when the server failed: a full run writes hundreds of MB
                        f.unlink()
                    results[name].setdefault(scenario.key, []).append(sample)
                    extra = f"  RSS {sample.rss_growth_kib / 1024:+.1f} MiB" if scenario.key == "big" else ""
                    if logs:
                        extra += f"  log {sample.log_kib:7.0f} KiB"
                    print(f"run {run} {scenario.key:15} {name:14} {fmt(sample.value):>8} {scenario.unit:9}"
                          f"  cpu {sample.cpu:6.2f} s (schedstat {sample.sched_cpu:7.3f} s)  wall {sample.wall:6.2f} s{extra}", flush=True)
        print("\nPer server: median (min–max)")
        for name in args.servers:
            for scenario in scenarios:
                samples = results[name].get(scenario.key)
                if samples:
                    med, lo, hi = summary(samples)
                    print(f"  {name:14} {scenario.key:15} {fmt(med):>8} ({fmt(lo)}–{fmt(hi)}) {scenario.unit}")
                else:
                    print(f"  {name:14} {scenario.key:15} failed: {failed.get((name, scenario.key), '?')}")
        print()
        print(report(results, sizes, args.servers, args.runs))
        if args.json is not None:
            args.json.write_text(json.dumps({
                "machine": info, "argv": argv if argv is not None else sys.argv[1:], "sizes": sizes,
                "results": {name: {key: [vars(s) for s in samples] for key, samples in per.items()}
                            for name, per in results.items()},
                "failed": {f"{name}/{key}": why for (name, key), why in failed.items()},
            }, indent=1))
        keep_logs = bool(failed)
        return 1 if failed else 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping servers", file=sys.stderr)
        return 130
    finally:
        Server.stop_all()
        if not keep_logs:
            shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
