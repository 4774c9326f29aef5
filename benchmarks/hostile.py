#!/usr/bin/env python3
"""Load a real ``twistd esmtpkit`` the way hostile clients do, and print what it cost the server.

Each part starts its own ``twistd -n esmtpkit`` (the default Maildir handler and text log, in a temporary folder;
this checkout on ``PYTHONPATH``) on a free port of 127.0.0.1, and every client connects from loopback addresses:

- ``nonreading``: 1 and 50 connections (from 127.0.0.10, .11, ...) that set a small receive buffer, then pipeline
  8 MiB of ``NOOP`` (and, separately, of ``EHLO x``) and never read a reply. Each case waits until every
  connection has sent everything, stalled (the server stopped reading it) or been closed by the server, or until
  it gives up; it reports the server's peak RSS growth (VmRSS polled, and VmHWM) and when the server closed them.
- ``burst``: 1000 connections at once, each from its own address (127.0.1.1 ... 127.0.4.250): how many were
  answered (220 or 421) and how long the last answer took.
- ``auth``: 10 connections at a time from one address (127.0.0.2) against ``--auth memory:...
  --auth-over-plaintext``, each sending ``AUTH PLAIN`` with a wrong password as fast as the server answers and
  reconnecting whenever it is closed, for 60 s (``--auth-seconds``): wrong guesses answered (535) per minute after
  the first few.

It prints one markdown table with each figure beside its target. It measures, it does not judge: the exit status
is 1 only if the benchmark itself could not run (the server did not start, a part found nothing to measure).

    python3 benchmarks/hostile.py [--quick] [--only nonreading,burst,auth] [--auth-seconds 600]
                                  [--esmtpkit-option=--log-events=warn ...]

Every loop is bounded in count and time, the servers are stopped by their own pid, and the temporary folders
are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import errno
import os
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from run import (HOST, MIB, BenchError, RSSPoller, cpu_seconds, esmtpkit_python, free_port, interrupted,
                 memory_kib, reset_peak, stop_process, twistd_argv)

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("nonreading", "burst", "auth")
USER, PASSWORD = "bench", "Corr3ct-h0rse-battery"

#: Targets, as docs/security.md states them.
RSS_TARGET_MIB = 16
BURST_TARGET_S = 5.0
GUESSES_TARGET = 30
#: Answers to wrong guesses left out of the rate: a throttle may let the first few through at full speed.
FIRST_FEW = 5

#: Linux tcp_info.tcpi_state values (include/net/tcp_states.h).
_ESTABLISHED = 1


class Part:
    """Sizes of one run: full, or --quick."""

    def __init__(self, quick: bool, auth_seconds: float | None = None) -> None:
        self.payload = 8 * MIB
        self.nonreading_give_up = 30.0 if quick else 90.0
        self.stall = 3.0
        self.burst = 1000
        self.burst_rounds = 1 if quick else 3
        self.burst_give_up = 30.0
        self.auth_seconds = auth_seconds or (15.0 if quick else 60.0)
        self.auth_parallel = 10


@dataclass
class Row:
    """One line of the result table."""

    what: str
    figure: str
    target: str = "—"
    met: str = "—"


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)

    def add(self, what: str, figure: str, target: str = "—", met: bool | None = None) -> None:
        self.rows.append(Row(what, figure, target, "—" if met is None else ("yes" if met else "**no**")))
        print(f"  {what}: {figure}", flush=True)


# ---- the server --------------------------------------------------------------------------------------------------

class Server:
    """``twistd -n esmtpkit`` in its own temporary folder on a free port of 127.0.0.1; stopped by its own pid."""

    def __init__(self, workdir: Path, options: Sequence[str]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.log = workdir / "twistd.log"
        argv = [*twistd_argv(esmtpkit_python()), "-n", "--pidfile=", "--logfile", str(self.log), "esmtpkit",
                "--listen", f"tcp:{self.port}:interface={HOST}", "--maildir", str(workdir / "Maildir"),
                "--hostname", "bench.test", *options]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with open(workdir / "twistd.out", "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=workdir, env=env, start_new_session=True)
        try:
            self._wait_ready(time.monotonic() + 60)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"twistd exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=5) as s:
                    s.settimeout(10)
                    if not s.recv(512).startswith(b"220"):
                        raise BenchError("no 220 greeting")
                    s.sendall(b"QUIT\r\n")
                    return
            except OSError:
                time.sleep(0.1)
        raise BenchError(f"twistd did not start listening on port {self.port}:\n{self.tail()}")

    def tail(self) -> str:
        text = "".join(p.read_text(errors="replace") for p in (self.log, self.workdir / "twistd.out") if p.exists())
        return "\n".join(text.splitlines()[-20:])

    def rss_mib(self) -> float:
        return memory_kib(self.pid)["VmRSS"] / 1024

    def stop(self) -> None:
        stop_process(self.proc)


def server(options: Sequence[str]) -> tuple[Server, tempfile.TemporaryDirectory[str]]:
    folder = tempfile.TemporaryDirectory(prefix="esmtpkit-hostile-")
    try:
        return Server(Path(folder.name), options), folder
    except BaseException:
        folder.cleanup()
        raise


def raise_fd_limit(wanted: int) -> None:
    """Raise this process's RLIMIT_NOFILE soft limit to ``wanted`` (servers started later inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        raise BenchError(f"needs {wanted} open files, the hard limit is {hard} (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def source(index: int, base: int = 1) -> str:
    """A distinct loopback address for client ``index``: 127.0.<base>.1 ... 127.0.<base>.250, 127.0.<base+1>.1 ..."""
    return f"127.0.{base + index // 250}.{1 + index % 250}"


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of ``sock`` (tcp_info.tcpi_state): 1 established, 8 close-wait (peer closed), ..."""
    try:
        return struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]
    except OSError:
        return 0


# ---- 1: clients that never read -------------------------------------------------------------------------------------

@dataclass
class Writer:
    """One non-reading connection: how much of the payload the server took, and how it ended."""

    sock: socket.socket
    sent: int = 0
    last_progress: float = 0.0
    ended: str = ""  # "", "sent", "stalled", "closed"
    ended_at: float = 0.0


def non_reading(srv: Server, clients: int, command: bytes, part: Part) -> dict[str, float | int]:
    """``clients`` connections pipeline ``part.payload`` bytes of ``command`` with a small receive buffer and never
    read; returns how much they wrote (into the kernel's buffers or the server), how the connections ended, and
    the server's peak RSS growth."""
    payload = memoryview(command * (part.payload // len(command)))
    time.sleep(0.3)
    reset = reset_peak(srv.pid)
    before_rss = memory_kib(srv.pid)["VmRSS"]
    before_cpu = cpu_seconds(srv.pid)
    writers: list[Writer] = []
    selector = selectors.DefaultSelector()
    start = time.monotonic()
    try:
        with RSSPoller(srv.pid) as poller:
            for index in range(clients):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window offered
                sock.bind((f"127.0.0.{10 + index}", 0))
                sock.settimeout(10)
                sock.connect((HOST, srv.port))
                sock.setblocking(False)
                writers.append(Writer(sock, last_progress=time.monotonic()))
                selector.register(sock, selectors.EVENT_WRITE, writers[-1])
            start = time.monotonic()
            deadline = start + part.nonreading_give_up
            next_check = 0.0
            while selector.get_map() and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=0.1):
                    writer: Writer = key.data
                    try:
                        count = writer.sock.send(payload[writer.sent:writer.sent + 65536])
                    except BlockingIOError:
                        continue
                    except OSError:
                        _end(selector, writer, "closed", start)
                        continue
                    writer.sent += count
                    writer.last_progress = time.monotonic()
                    if writer.sent >= len(payload):
                        _end(selector, writer, "sent", start)
                now = time.monotonic()
                if now >= next_check:
                    next_check = now + 0.2
                    for writer in list(w for w in writers if not w.ended):
                        if tcp_state(writer.sock) != _ESTABLISHED:
                            _end(selector, writer, "closed", start)
                        elif now - writer.last_progress > part.stall:
                            _end(selector, writer, "stalled", start)
            elapsed = time.monotonic() - start
            # Those that sent everything or stalled: did the server close them since?
            for writer in writers:
                if writer.ended in ("sent", "stalled") and tcp_state(writer.sock) != _ESTABLISHED:
                    writer.ended, writer.ended_at = "closed", elapsed
            after = memory_kib(srv.pid)
            peak = max(poller.peak, after["VmRSS"], after["VmHWM"] if reset else 0)
            cpu = cpu_seconds(srv.pid) - before_cpu
    finally:
        selector.close()
        for writer in writers:
            writer.sock.close()
    closed = [w for w in writers if w.ended == "closed"]
    return {
        "growth_mib": (peak - before_rss) / 1024,
        "written_mib": sum(w.sent for w in writers) / MIB,
        "closed": len(closed),
        "last_close_s": max((w.ended_at for w in closed), default=0.0),
        "stalled": sum(w.ended == "stalled" for w in writers),
        "sent_all": sum(w.ended == "sent" for w in writers),
        "still_sending": sum(not w.ended for w in writers),
        "seconds": elapsed,
        "cpu_s": cpu,
    }


def _end(selector: selectors.BaseSelector, writer: Writer, how: str, start: float) -> None:
    writer.ended, writer.ended_at = how, time.monotonic() - start
    try:
        selector.unregister(writer.sock)
    except KeyError:
        pass


def run_non_reading(part: Part, options: Sequence[str], results: Results) -> None:
    for command, name in ((b"NOOP\r\n", "NOOP"), (b"EHLO x\r\n", "EHLO x")):
        for clients in (1, 50):
            srv, folder = server(options)
            try:
                r = non_reading(srv, clients, command, part)
            finally:
                srv.stop()
                folder.cleanup()
            ends = []
            if r["closed"]:
                ends.append(f"{r['closed']} closed by the server (last after {r['last_close_s']:.1f} s)")
            if r["stalled"]:
                ends.append(f"{r['stalled']} stalled: the server stopped reading")
            if r["sent_all"]:
                ends.append(f"{r['sent_all']} sent everything")
            if r["still_sending"]:
                ends.append(f"{r['still_sending']} still being read at the {part.nonreading_give_up:.0f} s give-up")
            figure = (f"+{r['growth_mib']:.1f} MiB RSS; {r['written_mib']:.1f} MiB written; {'; '.join(ends)}; "
                      f"server CPU {r['cpu_s']:.1f} s")
            what = f"{clients} non-reading connection{'s' if clients > 1 else ''}, 8 MiB of `{name}` each"
            if clients == 50:
                results.add(what, figure, f"RSS growth < {RSS_TARGET_MIB} MiB", r["growth_mib"] < RSS_TARGET_MIB)
            else:
                results.add(what, figure)


# ---- 2: a burst of connections -------------------------------------------------------------------------------------

def burst(port: int, count: int, give_up: float) -> tuple[dict[str, int], float, float]:
    """``count`` connections at once, each from its own loopback address; each reads its first reply line.

    Returns (how many got which answer, seconds until the last answer, seconds the connecting took).
    """
    selector = selectors.DefaultSelector()
    pending: dict[socket.socket, bytes] = {}
    answers: dict[str, int] = {}
    last = 0.0
    start = time.monotonic()
    try:
        for index in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.bind((source(index), 0))
            pending[sock] = b""
            error = sock.connect_ex((HOST, port))
            if error not in (0, errno.EINPROGRESS):
                answers["connect failed"] = answers.get("connect failed", 0) + 1
                del pending[sock]
                sock.close()
                continue
            selector.register(sock, selectors.EVENT_READ)
        connecting = time.monotonic() - start
        deadline = start + give_up
        while pending and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.2):
                sock = key.fileobj  # type: ignore[assignment]
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                seen = pending[sock] + data
                if data and b"\r\n" not in seen:
                    pending[sock] = seen
                    continue
                code = seen[:3].decode("ascii", "replace") if seen else "closed unanswered"
                answers[code] = answers.get(code, 0) + 1
                last = time.monotonic() - start
                selector.unregister(sock)
                del pending[sock]
                sock.close()
        if pending:
            answers["never answered"] = len(pending)
    finally:
        for sock in pending:
            sock.close()
        selector.close()
    return answers, last, connecting


def run_burst(part: Part, options: Sequence[str], results: Results) -> None:
    raise_fd_limit(part.burst + 512)
    srv, folder = server(options)
    try:
        for round_ in range(1, part.burst_rounds + 1):
            before = cpu_seconds(srv.pid)
            answers, last, connecting = burst(srv.port, part.burst, part.burst_give_up)
            time.sleep(2)  # the server closes this round's connections (counted in its CPU) before the next
            per_connection = (cpu_seconds(srv.pid) - before) / part.burst * 1e6
            answered = answers.get("220", 0) + answers.get("421", 0)
            detail = ", ".join(f"{n} {code}" for code, n in sorted(answers.items()))
            figure = (f"{answered} of {part.burst} answered ({detail}); last answer after {last:.2f} s "
                      f"(connecting took {connecting:.2f} s); server CPU {per_connection:.0f} µs a connection")
            met = answered == part.burst and last <= BURST_TARGET_S
            results.add(f"burst of {part.burst} connections from {part.burst} addresses, round {round_}", figure,
                        f"all answered within {BURST_TARGET_S:g} s", met)
    finally:
        srv.stop()
        folder.cleanup()


# ---- 3: password guessing ------------------------------------------------------------------------------------------

@dataclass
class Guessing:
    answered: list[float] = field(default_factory=list)  # when each 535 came, seconds from the start
    throttled: int = 0  # 454 4.7.0 and the like: the guess was not checked
    closed: int = 0  # 421 or the connection closed
    connections: int = 0
    other: dict[str, int] = field(default_factory=dict)


async def _reply(reader: asyncio.StreamReader, deadline: float) -> bytes:
    """The last line of one (possibly multi-line) reply; b"" when the connection closed."""
    loop = asyncio.get_running_loop()
    for _ in range(100):
        line = await asyncio.wait_for(reader.readline(), max(0.01, deadline - loop.time()))
        if len(line) < 4 or line[3:4] != b"-":
            return line
    return b"???"


async def _guesser(port: int, address: str, seconds: float, found: Guessing, start: float) -> None:
    """Connect, EHLO, then wrong AUTH PLAIN after wrong AUTH PLAIN; reconnect when closed; stop at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = start + seconds
    wrong = 0
    for _ in range(100_000):  # connections; the deadline ends it long before
        if loop.time() >= deadline:
            return
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(HOST, port, local_addr=(address, 0)), max(0.01, deadline - loop.time()))
            found.connections += 1
            greeting = await _reply(reader, deadline)
            if not greeting.startswith(b"220"):
                found.closed += 1
                continue
            writer.write(b"EHLO guesser.test\r\n")
            if not (await _reply(reader, deadline)).startswith(b"250"):
                found.closed += 1
                continue
            for _ in range(10_000):
                wrong += 1
                token = base64.b64encode(f"\0{USER}\0wrong-{wrong}".encode()).decode()
                writer.write(f"AUTH PLAIN {token}\r\n".encode())
                line = await _reply(reader, deadline)
                code = line[:3].decode("ascii", "replace")
                if code == "535":
                    found.answered.append(loop.time() - start)
                elif code == "454":
                    found.throttled += 1
                elif code == "421" or not line:
                    found.closed += 1
                    break
                else:
                    found.other[code] = found.other.get(code, 0) + 1
        except (asyncio.TimeoutError, OSError):
            if loop.time() < deadline:
                found.closed += 1
        finally:
            if writer is not None:
                writer.close()


async def guess(port: int, parallel: int, seconds: float) -> Guessing:
    found = Guessing()
    start = asyncio.get_running_loop().time()
    await asyncio.gather(*(_guesser(port, "127.0.0.2", seconds, found, start) for _ in range(parallel)))
    return found


def run_auth(part: Part, options: Sequence[str], results: Results) -> None:
    auth = ["--auth", f"memory:{USER}:{PASSWORD}", "--auth-over-plaintext"]
    srv, folder = server([*auth, *options])
    try:
        found = asyncio.run(guess(srv.port, part.auth_parallel, part.auth_seconds))
    finally:
        srv.stop()
        folder.cleanup()
    if not found.answered:
        raise BenchError(f"no wrong guess was answered with 535 (throttled {found.throttled}, other {found.other})")
    counted = found.answered[FIRST_FEW:]
    since = found.answered[min(FIRST_FEW, len(found.answered)) - 1]
    per_minute = len(counted) / max(part.auth_seconds - since, 1e-9) * 60
    overall = len(found.answered) / part.auth_seconds * 60
    figure = (f"{per_minute:,.1f} a minute after the first {FIRST_FEW} ({len(found.answered)} answered 535 in "
              f"{part.auth_seconds:g} s, {overall:,.1f} a minute in all; {found.throttled} refused unchecked; "
              f"{found.connections} connections, {found.closed} closed by the server)")
    if found.other:
        figure += f"; other replies {found.other}"
    results.add(f"wrong AUTH guesses from one address, {part.auth_parallel} connections at a time", figure,
                f"≤ {GUESSES_TARGET} a minute", per_minute <= GUESSES_TARGET)


# ---- the run -----------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter waits: 30 s give-up, one burst, 15 s of AUTH")
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts to run, comma-separated: {','.join(PARTS)}")
    parser.add_argument("--auth-seconds", type=float, metavar="SECONDS",
                        help="how long the auth part guesses (default 60, or 15 with --quick; at most 3600)")
    parser.add_argument("--esmtpkit-option", action="append", default=[], metavar="OPTION",
                        help="an extra twistd esmtpkit option, e.g. --esmtpkit-option=--log-events=warn (repeatable)")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if not args.parts or set(args.parts) - set(PARTS):
        parser.error(f"--only takes some of {','.join(PARTS)}")
    if args.auth_seconds is not None and not 1 <= args.auth_seconds <= 3600:
        parser.error("--auth-seconds must be between 1 and 3600")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path("/proc/self/status").exists():
        print("needs Linux (/proc)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, interrupted)
    part = Part(args.quick, args.auth_seconds)
    results = Results()
    runners = {"nonreading": run_non_reading, "burst": run_burst, "auth": run_auth}
    status = 0
    print(f"esmtpkit python: {esmtpkit_python()}; somaxconn: {_read('/proc/sys/net/core/somaxconn')}; "
          f"cpus: {os.cpu_count()}", flush=True)
    for name in args.parts:
        print(f"{name} ...", flush=True)
        try:
            runners[name](part, args.esmtpkit_option, results)
        except BenchError as e:
            print(f"{name} failed: {e}", file=sys.stderr, flush=True)
            results.add(name, f"failed: {str(e).splitlines()[0]}")
            status = 1
    print()
    print("| measurement | figure | target | met |")
    print("|---|---|---|---|")
    for row in results.rows:
        print(f"| {row.what} | {row.figure} | {row.target} | {row.met} |")
    return status


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
