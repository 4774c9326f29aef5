#!/usr/bin/env python3
"""Benchmark esmtpkit's outbound queue: throughput through the queue beside Postfix, and memory with a big queue.

1. ``throughput``: N messages of 1 KiB sent with Postfix's ``smtp-source`` (several sessions in parallel) to
   ``twistd esmtpkit --handler esmtpkit.handlers.Queue`` (spool in a temporary folder) relaying to Postfix's
   ``smtp-sink`` on 127.0.0.1, timed from the first message sent until the sink has counted all N; the same for a
   private Postfix instance (smtpd -> cleanup -> qmgr -> smtp) relaying to the same kind of sink. The server's CPU
   (all its processes, from /proc) per message and its peak memory are shown beside the rate.
2. ``rss``: a spool filled with 100,000 queued 1 KiB messages (written straight into the spool's layout), a server
   started on it relaying to a sink that answers 451 to every RCPT, and its RSS after startup and while it scans
   and works through the backlog, beside the same server on an empty spool. It prints; it asserts nothing.

    .venv/bin/python benchmarks/queue_throughput.py [--quick] [--messages N] [--sessions N] [--queued N]

Servers run pinned to one core (``taskset -c 0``), the load generator, the sinks and this driver to the other.
Everything is on 127.0.0.1 and in temporary folders, removed at the end with every process started here.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The checkout goes first so that its spool layout is the one written; this folder is there already (run.py).
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import pwd  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable, Iterator  # noqa: E402

from run import (HOST, RECIPIENT, SENDER, TICKS, BenchError, Client, Server, ServerSpec, esmtpkit_python,  # noqa: E402
                 fmt, free_port, interrupted, machine, memory_kib, message_1k, reset_peak, stop_process,
                 twistd_argv)

from esmtpkit.core.ids import new_id  # noqa: E402
from esmtpkit.core.outbound import Message, Recipient  # noqa: E402
from esmtpkit.queue.spool_files import SpoolPaths, encode  # noqa: E402

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
POSTFIX_MASTER_CF = Path("/etc/postfix/master.cf")
#: What the deferring sink answers to every RCPT.
DEFER_REPLY = "451 4.3.0 Try again later"
WARM_UP = 20


def tool(name: str) -> str:
    """The path of a Postfix program (they live in /usr/sbin, often not on a user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin") or f"/usr/sbin/{name}"


# ---- processes and their trees, from /proc --------------------------------------------------------------------

def proc_stats() -> dict[int, list[str]]:
    """Every process's /proc/PID/stat fields after the command name (field 3 of proc(5) is index 0)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                text = f.read()
            table[int(entry.name)] = text[text.rindex(b")") + 2:].decode().split()
    return table


def tree(root: int) -> dict[int, list[str]]:
    """``root`` and its descendants, with their stat fields (Postfix's master and the daemons it runs; esmtpkit
    is one process)."""
    table = proc_stats()
    children: dict[int, list[int]] = {}
    for pid, fields in table.items():
        children.setdefault(int(fields[1]), []).append(pid)
    found: dict[int, list[str]] = {}
    todo = [root] if root in table else []
    while todo:
        pid = todo.pop()
        found[pid] = table[pid]
        todo.extend(children.get(pid, ()))
    return found


def thread_seconds(pid: int) -> float:
    """CPU seconds of a process's live threads at nanosecond grain (``se.sum_exec_runtime``, in ms, of each
    /proc/PID/task/TID/sched); 0 where the kernel has no such file."""
    total = 0.0
    with contextlib.suppress(OSError):
        for task in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"{task.path}/sched", "rb") as f:
                    for line in f:
                        if line.startswith(b"se.sum_exec_runtime"):
                            total += float(line.split(b":")[1]) / 1000
                            break
    return total


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root``'s tree. Each live process counts its own time (its threads' run time, at least its
    utime + stime) plus cutime + cstime, what the children it reaped used: Postfix's daemons exit and are replaced
    as they reach max_use, and what they used lands in master's cutime, so the difference of two readings counts
    every process once. Clock ticks alone would not do: dozens of daemons each use less than one 10 ms tick."""
    total = 0.0
    for pid, f in tree(root).items():
        own = max(thread_seconds(pid), (int(f[11]) + int(f[12])) / TICKS)
        total += own + (int(f[13]) + int(f[14])) / TICKS
    return total


def pss_kib(pid: int) -> int:
    """Proportional set size (shared pages divided among their users), from /proc/PID/smaps_rollup; 0 if gone."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


class TreeSampler:
    """Every 0.1 s, the summed RSS and PSS of a process tree; keeps the peaks and the largest number of processes."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak_rss = self.peak_pss = self.most = 0
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        members = tree(self.root)
        self.seen.update(members)
        self.most = max(self.most, len(members))
        self.peak_rss = max(self.peak_rss, sum(int(f[21]) for f in members.values()) * PAGE_KIB)
        self.peak_pss = max(self.peak_pss, sum(pss_kib(pid) for pid in members))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.1)

    def __enter__(self) -> "TreeSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log, to show why something failed before its folder is removed."""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# ---- the sink ----------------------------------------------------------------------------------------------------

_COUNTERS = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")


class Sink:
    """Postfix's smtp-sink on a free 127.0.0.1 port, counting messages (``-c``) into a file; ``defer`` makes it
    answer 451 to every RCPT instead."""

    def __init__(self, workdir: Path, cpu: str, *, defer: bool = False) -> None:
        self.port = free_port()
        self.out = workdir / f"sink-{self.port}.out"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        rejects = ["-r", "RCPT", "-b", DEFER_REPLY] if defer else []
        argv = ["taskset", "-c", cpu, tool("smtp-sink"), *user, "-c", "-m", "1000", *rejects, f"{HOST}:{self.port}",
                "1024"]
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"smtp-sink exited with {self.proc.returncode}: {tail(self.out)}")
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as s:
                    Client(s).reply(time.monotonic() + 10)
                    s.sendall(b"QUIT\r\n")
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise BenchError("smtp-sink did not start listening") from None
                time.sleep(0.05)

    def counters(self) -> tuple[int, int]:
        """(sessions ended, messages received) so far."""
        with open(self.out, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 256))
            found = _COUNTERS.findall(f.read())
        if not found:
            return 0, 0
        sessions, _, messages = found[-1]
        return int(sessions), int(messages)

    def messages(self) -> int:
        return self.counters()[1]

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.messages() < count:
            if time.monotonic() > deadline:
                raise BenchError(f"the sink has {self.messages()} messages, not {count}, after {timeout:.0f} s")
            time.sleep(0.02)

    def stop(self) -> None:
        stop_process(self.proc)


# ---- the servers under test ----------------------------------------------------------------------------------

class Target:
    """A server under test: where it listens, the root of its processes, how much is left in its queue."""

    name = ""
    port = 0
    log: Path

    def root_pid(self) -> int:
        raise NotImplementedError

    def queued(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


def esmtpkit_argv(spool: Path, relay_port: int, extra: list[str]) -> Callable[[int], list[str]]:
    """How run.Server starts ``twistd esmtpkit`` with the Queue handler on ``spool``, relaying to the sink."""
    twistd = twistd_argv(esmtpkit_python())

    def argv(port: int) -> list[str]:
        return [*twistd, "-n", "--pidfile=", "esmtpkit", "--handler", "esmtpkit.handlers.Queue",
                "--handler-option", f"spool={spool}", "--handler-option", f"relayhost=[{HOST}]:{relay_port}",
                "--handler-option", "tls=none", "--handler-option", "hostname=localhost",
                "--listen", f"tcp:{port}:interface={HOST}:backlog=1024", "--hostname", "localhost",
                "--max-connections-per-client", "0", *extra]

    return argv


class EsmtpkitQueue(Target):
    """``twistd esmtpkit --handler esmtpkit.handlers.Queue`` on a spool folder, pinned to ``cpu``."""

    name = "esmtpkit"

    def __init__(self, workdir: Path, spool: Path, relay_port: int, cpu: str, extra: list[str]) -> None:
        self.spool = spool
        spec = ServerSpec("esmtpkit", esmtpkit_argv(spool, relay_port, extra), {"PYTHONPATH": str(ROOT)})
        self.server = Server(spec, cpu, workdir)
        self.port = self.server.port
        self.log = self.server.log_path

    def root_pid(self) -> int:
        return self.server.pid

    def queued(self) -> int:
        folder = SpoolPaths(str(self.spool)).messages
        with os.scandir(folder) as entries:
            return sum(1 for entry in entries if entry.name.endswith(".json"))

    def stop(self) -> None:
        self.server.stop()


def postfix_missing() -> str | None:
    """Why a private Postfix instance cannot run here (None when it can)."""
    if not (shutil.which("postfix", path="/usr/sbin:/usr/bin") and POSTFIX_MASTER_CF.exists()):
        return "Postfix is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root (its master runs daemons as user postfix)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no postfix user"
    return None


def private_master_cf(text: str, smtpd_port: int) -> str:
    """The system's master.cf with its ``inet`` services commented out, chroot off everywhere, a ``postlog``
    service if missing (Postfix >= 3.4), and one smtpd on 127.0.0.1:``smtpd_port``."""
    out: list[str] = []
    in_inet = False
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            out.append(line)
        elif line[:1] in (" ", "\t"):
            out.append("#" + line if in_inet else line)  # the -o lines of the service above
        else:
            in_inet = len(fields) >= 8 and fields[1] == "inet"
            if in_inet:
                out.append("#" + line)
            else:
                if len(fields) >= 8:
                    fields[4] = "n"
                out.append(" ".join(fields))
    if not any(line.split()[:2] == ["postlog", "unix-dgram"] for line in out if line.strip()):
        out.append("postlog unix-dgram n - n - 1 postlogd")
    out.append(f"{HOST}:{smtpd_port} inet n - n - - smtpd")
    return "\n".join(out) + "\n"


class PrivatePostfix(Target):
    """A Postfix instance in ``base`` (config, queue, log), its smtpd on a free 127.0.0.1 port, relaying everything
    to ``[127.0.0.1]:relay_port``; started pinned to ``cpu`` (its daemons inherit the affinity)."""

    name = "Postfix"

    def __init__(self, base: Path, relay_port: int, cpu: str) -> None:
        self.base = base
        self.etc = base / "etc"
        self.spool = base / "spool"
        self.log = base / "maillog"
        self.port = free_port()
        self.env = dict(os.environ, MAIL_CONFIG=str(self.etc))
        base.chmod(0o755)  # the postfix user must reach its queue
        self.etc.mkdir(mode=0o755)
        self.spool.mkdir(mode=0o755)
        (self.etc / "master.cf").write_text(private_master_cf(POSTFIX_MASTER_CF.read_text(), self.port))
        settings = {
            "compatibility_level": "3.6", "queue_directory": str(self.spool), "data_directory": str(base / "data"),
            "mail_owner": "postfix", "setgid_group": "postdrop", "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4", "myhostname": "localhost", "mydomain": "localdomain",
            "myorigin": "$myhostname", "mydestination": "", "mynetworks": "127.0.0.0/8", "local_recipient_maps": "",
            "alias_maps": "", "alias_database": "", "relayhost": f"[{HOST}]:{relay_port}",
            "smtp_tls_security_level": "none", "smtpd_tls_security_level": "none",
            "smtp_dns_support_level": "disabled", "maillog_file_prefixes": f"/var, /dev/stdout, {base}",
            "maillog_file": str(self.log), "biff": "no",
        }
        (self.etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        try:
            self._start(cpu)
        except BaseException:
            self.stop()
            raise

    def _start(self, cpu: str) -> None:
        self._run(tool("postfix"), "-c", str(self.etc), "check")
        self._run("taskset", "-c", cpu, tool("postfix"), "-c", str(self.etc), "start")
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as s:
                    if Client(s).reply(time.monotonic() + 10)[0] == 220:
                        s.sendall(b"QUIT\r\n")
                        break
            except (OSError, BenchError):
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"Postfix's smtpd does not listen on {self.port}: {tail(self.log)}")
            time.sleep(0.1)

    def _run(self, *argv: str) -> None:
        out = subprocess.run(list(argv), capture_output=True, env=self.env, timeout=60, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            text = (out.stdout + out.stderr).decode(errors="replace")
            raise BenchError(f"{' '.join(argv)} exited with {out.returncode}: {text[-500:]}")

    def root_pid(self) -> int:
        return int((self.spool / "pid" / "master.pid").read_text().split()[0])

    def queued(self) -> int:
        count = 0
        for folder in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, names in os.walk(self.spool / folder):
                count += len(names)
        return count

    def processes(self) -> list[int]:
        """Live processes whose environment has this instance's MAIL_CONFIG: its master and daemons."""
        marker = b"MAIL_CONFIG=" + os.fsencode(self.etc)
        found = []
        for pid, fields in proc_stats().items():
            with contextlib.suppress(OSError):
                if fields[0] not in ("Z", "X") and marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    found.append(pid)
        return found

    def stop(self) -> None:
        """``postfix stop``, then wait for its processes to go; SIGKILL (by pid) any left after 20 s."""
        if (self.spool / "pid" / "master.pid").exists():
            with contextlib.suppress(BenchError, subprocess.TimeoutExpired):
                self._run(tool("postfix"), "-c", str(self.etc), "stop")
        deadline = time.monotonic() + 20
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ---- part 1: throughput through the queue ----------------------------------------------------------------------

@dataclass
class Throughput:
    """One server's figures for N messages through its queue to the sink."""

    name: str
    messages: int
    accepted_s: float = 0.0  # until smtp-source had every 250
    delivered_s: float = 0.0  # until the sink had every message
    cpu_s: float = 0.0  # the server's processes, from /proc
    peak_rss_kib: int = 0  # summed over its processes
    peak_pss_kib: int = 0
    most_processes: int = 0
    processes_seen: int = 0
    left: int = 0  # still in its queue afterwards
    extra: int = 0  # the sink got this many more than sent (duplicates)
    error: str = ""


def source_argv(port: int, cpu: str, sessions: int, count: int) -> list[str]:
    """smtp-source sending ``count`` 1 KiB messages over ``sessions`` persistent sessions, counting (``-c``)."""
    return ["taskset", "-c", cpu, tool("smtp-source"), "-c", "-f", SENDER, "-t", RECIPIENT, "-M", "localhost",
            "-s", str(sessions), "-l", "1024", "-m", str(count), "-d", f"{HOST}:{port}"]


def start_source(port: int, cpu: str, sessions: int, count: int, out: Path) -> subprocess.Popen[bytes]:
    """Start smtp-source, its counter and errors going to the file ``out`` (a pipe could fill and stall it)."""
    with open(out, "wb") as f:
        return subprocess.Popen(source_argv(port, cpu, sessions, count), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def source_done(proc: subprocess.Popen[bytes], count: int, out: Path) -> None:
    """Check that smtp-source exited 0 having completed exactly ``count`` transactions."""
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        raise BenchError("smtp-source did not finish within 60 s of the sink having every message") from None
    text = out.read_bytes()
    if proc.returncode != 0:
        raise BenchError(f"smtp-source exited {proc.returncode}: {text.decode(errors='replace')[-300:]}")
    counters = text.replace(b"\r", b"\n").split()
    done = int(counters[-1]) if counters else 0
    if done != count:
        raise BenchError(f"smtp-source completed {done} messages, not {count}")


def throughput(target: Target, sink: Sink, count: int, sessions: int, cpu: str) -> Throughput:
    """Warm up with a few messages, then send ``count`` and time them until the sink has them all."""
    result = Throughput(target.name, count)
    base = sink.messages()
    out = sink.out.with_name("smtp-source.out")
    source_done(start_source(target.port, cpu, 2, WARM_UP, out), WARM_UP, out)
    sink.wait_for(base + WARM_UP, timeout=120)
    time.sleep(1.0)
    base = sink.messages()
    root = target.root_pid()
    timeout = max(300.0, count / 10)
    cpu0 = tree_cpu(root)
    with TreeSampler(root) as sampler:
        t0 = time.monotonic()
        proc = start_source(target.port, cpu, sessions, count, out)
        try:
            while sink.messages() < base + count:
                if proc.poll() is not None and not result.accepted_s:
                    result.accepted_s = time.monotonic() - t0
                    if proc.returncode != 0:
                        source_done(proc, count, out)  # raises with smtp-source's words
                if time.monotonic() - t0 > timeout:
                    raise BenchError(f"the sink has {sink.messages() - base} of {count} messages after "
                                     f"{timeout:.0f} s")
                time.sleep(0.01)
            result.delivered_s = time.monotonic() - t0
            source_done(proc, count, out)
        finally:
            stop_process(proc, wait=5)
        if not result.accepted_s:
            result.accepted_s = result.delivered_s
        time.sleep(0.5)  # the last messages' bookkeeping (removing the queue files) is part of the work
        result.cpu_s = tree_cpu(root) - cpu0
    result.peak_rss_kib, result.peak_pss_kib = sampler.peak_rss, sampler.peak_pss
    result.most_processes, result.processes_seen = sampler.most, len(sampler.seen)
    result.left = target.queued()
    result.extra = sink.messages() - base - count
    return result


def measure_once(name: str, make: Callable[[Path, int], Target], args: argparse.Namespace, work: Path) -> Throughput:
    """Start a sink and the server afresh in a folder of their own, measure, stop both."""
    folder = Path(tempfile.mkdtemp(prefix=f"{name.lower()}-", dir=work))
    sink = Sink(folder, args.client_cpu)
    target: Target | None = None
    try:
        target = make(folder, sink.port)
        return throughput(target, sink, args.messages, args.sessions, args.client_cpu)
    except BenchError as e:
        print(f"{name} failed: {e}\n{tail(target.log) if target is not None else ''}", file=sys.stderr)
        return Throughput(name, args.messages, error=str(e))
    finally:
        if target is not None:
            target.stop()
        sink.stop()
        shutil.rmtree(folder, ignore_errors=True)


def run_throughput(args: argparse.Namespace, work: Path) -> dict[str, list[Throughput]]:
    """Every run of esmtpkit and of Postfix (or why Postfix could not run), interleaved: run 1 of each server,
    then run 2, so that a slow spell of the shared machine hits both alike. A server that fails is not run again."""
    runners: list[tuple[str, Callable[[Path, int], Target]]] = [
        ("esmtpkit", lambda d, p: EsmtpkitQueue(d, d / "spool", p, args.server_cpu, args.esmtpkit_option))]
    why = None if args.no_postfix else postfix_missing()
    if args.no_postfix:
        print("Postfix: left out (--no-postfix)")
    elif why:
        print(f"Postfix: not measured: {why}")
    else:
        runners.append(("Postfix", lambda d, p: PrivatePostfix(d, p, args.server_cpu)))
    results: dict[str, list[Throughput]] = {name: [] for name, _ in runners}
    for run in range(1, args.runs + 1):
        for name, make in runners:
            if any(r.error for r in results[name]):
                continue
            r = measure_once(name, make, args, work)
            results[name].append(r)
            if not r.error:
                print(f"run {run} {name:9} {r.messages} messages: accepted in {r.accepted_s:.2f} s, delivered in "
                      f"{r.delivered_s:.2f} s, cpu {r.cpu_s:.2f} s ({r.cpu_s * 1000 / r.messages:.2f} ms/msg), "
                      f"peak RSS {r.peak_rss_kib / 1024:.1f} MiB, PSS {r.peak_pss_kib / 1024:.1f} MiB", flush=True)
    return results


#: The throughput table's rows: label, the figure from one run, how it is shown, whether a ratio means anything.
FIGURES: list[tuple[str, Callable[[Throughput], float], Callable[[float], str], bool]] = [
    ("messages delivered / s (first sent → sink has all)", lambda r: r.messages / r.delivered_s, fmt, True),
    ("messages accepted / s (smtp-source done)", lambda r: r.messages / r.accepted_s, fmt, True),
    ("server CPU per message, ms", lambda r: r.cpu_s * 1000 / r.messages, fmt, True),
    ("server CPU / wall time (cores busy)", lambda r: r.cpu_s / r.delivered_s, lambda v: f"{v:.2f}", False),
    ("peak RSS, MiB (sum over its processes)", lambda r: r.peak_rss_kib / 1024, lambda v: f"{v:.1f}", True),
    ("peak PSS, MiB (sum over its processes)", lambda r: r.peak_pss_kib / 1024, lambda v: f"{v:.1f}", True),
    ("processes at once (most)", lambda r: r.most_processes, lambda v: f"{v:.0f}", False),
    ("processes seen", lambda r: r.processes_seen, lambda v: f"{v:.0f}", False),
    ("left in the queue afterwards", lambda r: r.left, lambda v: f"{v:.0f}", False),
    ("duplicates at the sink", lambda r: r.extra, lambda v: f"{v:.0f}", False),
]


def throughput_table(results: dict[str, list[Throughput]], args: argparse.Namespace) -> str:
    """One column per server (median over its runs), one row per figure; then esmtpkit's median over Postfix's."""
    def median(name: str, value: Callable[[Throughput], float]) -> float | None:
        runs = results.get(name, [])
        if not runs or any(r.error for r in runs):
            return None
        return statistics.median(value(r) for r in runs)

    names = list(results)
    both = {"esmtpkit", "Postfix"} <= set(names)
    head = ["", *names] + (["esmtpkit/Postfix"] if both else [])
    runs = f"median of {args.runs} runs" if args.runs > 1 else "one run"
    lines = [f"Through the queue: {args.messages} messages of 1 KiB from {args.sessions} smtp-source sessions, "
             f"relayed to smtp-sink on 127.0.0.1 ({runs})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, value, show, ratio in FIGURES:
        values = {name: median(name, value) for name in names}
        cells = [show(v) if v is not None else "failed" for v in values.values()]
        if both:
            kit, fix = values["esmtpkit"], values["Postfix"]
            cells.append(f"{kit / fix:.2f}" if ratio and kit is not None and fix else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for name in names:
        for r in results[name]:
            if r.error:
                lines.append(f"\n{name} failed: {r.error}")
    return "\n".join(lines)


# ---- part 2: RSS with a big queue ------------------------------------------------------------------------------

def fill_spool(root: Path, count: int) -> float:
    """Write ``count`` queued 1 KiB messages (due now, one recipient each) as SpoolStore lays them out, without
    fsync; the seconds it took."""
    paths = SpoolPaths(str(root))
    paths.prepare()
    content = message_1k()
    now = time.time()
    template = Message(id="X", sender=SENDER, recipients=[Recipient(RECIPIENT)], size=len(content), arrived=now,
                       next_attempt=now, received_from=f"dns; localhost ({HOST})")
    t0 = time.monotonic()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for _ in range(count):
        template.id = new_id()
        for path, data in ((paths.eml(template.id), content), (paths.json(template.id), encode(template))):
            fd = os.open(path, flags, 0o600)  # content first, then the envelope, as a commit does
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
    return time.monotonic() - t0


def deferred_since(spool: Path, since_ns: int) -> int:
    """Envelopes rescheduled since ``since_ns``: an attempt moves a deferred message's mtime to its next attempt."""
    with os.scandir(SpoolPaths(str(spool)).messages) as entries:
        return sum(1 for e in entries if e.name.endswith(".json") and e.stat().st_mtime_ns > since_ns)


@dataclass
class Watch:
    """RSS over time of one server on one spool: (label, seconds since it answered, RSS KiB, deferred so far)."""

    queued: int
    fill_s: float = 0.0
    startup_s: float = 0.0
    points: list[tuple[str, float, int, int]] = field(default_factory=list)
    peak_kib: int = 0
    cpu_s: float = 0.0
    sink_sessions: int = 0
    error: str = ""


def watch_points(observe: float) -> list[float]:
    """When to read the RSS, in seconds after the server first answered."""
    return [p for p in (2.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0) if p < observe] + [observe]


def watch(args: argparse.Namespace, work: Path, queued: int) -> Watch:
    """Start the Queue server on a spool holding ``queued`` messages, relaying to a deferring sink, and read its
    RSS when it first answers and at `watch_points`."""
    result = Watch(queued)
    folder = Path(tempfile.mkdtemp(prefix=f"rss-{queued}-", dir=work))
    spool = folder / "spool"
    target: EsmtpkitQueue | None = None
    sink = Sink(folder, args.client_cpu, defer=True)
    try:
        if queued:
            print(f"writing {queued} messages into a spool ...", flush=True)
        result.fill_s = fill_spool(spool, queued)
        os.sync()  # start from a quiet disk
        since = time.time_ns()
        t0 = time.monotonic()
        target = EsmtpkitQueue(folder, spool, sink.port, args.server_cpu, args.esmtpkit_option)
        answered = time.monotonic()
        result.startup_s = answered - t0
        pid = target.root_pid()
        cpu0 = tree_cpu(pid)
        reset = reset_peak(pid)  # VmHWM from here: the peak while it works, not while it imported
        result.points.append(("answers (first scan under way)", 0.0, memory_kib(pid)["VmRSS"],
                              deferred_since(spool, since) if queued else 0))
        for at in watch_points(args.observe):
            time.sleep(max(0.0, answered + at - time.monotonic()))
            if target.server.proc.poll() is not None:
                raise BenchError(f"the server exited with {target.server.proc.returncode}")
            rss = memory_kib(pid)["VmRSS"]
            result.points.append((f"+{at:g} s", at, rss, deferred_since(spool, since) if queued else 0))
        result.cpu_s = tree_cpu(pid) - cpu0
        status = memory_kib(pid)
        result.peak_kib = max(status["VmHWM"] if reset else 0, *(p[2] for p in result.points))
        result.sink_sessions = sink.counters()[0]
    except BenchError as e:
        result.error = str(e)
        print(f"rss with {queued} queued failed: {e}\n{tail(target.log) if target is not None else ''}",
              file=sys.stderr)
    finally:
        if target is not None:
            target.stop()
        sink.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return result


def rss_table(full: Watch, empty: Watch) -> str:
    """RSS over time with the big queue beside the empty spool."""
    lines = [f"RSS of twistd esmtpkit --handler esmtpkit.handlers.Queue, relay answering \"{DEFER_REPLY}\" to "
             f"every RCPT: {full.queued} queued 1 KiB messages (written in {full.fill_s:.1f} s) vs an empty spool",
             "", f"| time after it first answers | RSS, {full.queued} queued (MiB) | attempted and deferred so far "
             "| RSS, empty spool (MiB) |", "|---|---|---|---|"]
    if full.error or empty.error:
        lines.append(f"| failed: {full.error or empty.error} | | | |")
        return "\n".join(lines)
    for (label, _, rss, done), (_, _, empty_rss, _) in zip(full.points, empty.points):
        lines.append(f"| {label} | {rss / 1024:.1f} | {done} | {empty_rss / 1024:.1f} |")
    window = full.points[-1][1]
    lines.append(f"| peak (VmHWM after it answered) | {full.peak_kib / 1024:.1f} | | {empty.peak_kib / 1024:.1f} |")
    lines.append(f"| startup until it answers (s) | {full.startup_s:.2f} | | {empty.startup_s:.2f} |")
    lines.append(f"| server CPU over the {window:g} s (s) | {full.cpu_s:.2f} | {full.sink_sessions} sessions at the "
                 f"sink | {empty.cpu_s:.2f} |")
    return "\n".join(lines)


# ---- driver ------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller counts, one run, a shorter watch: 1000 messages, 20000 queued, 15 s")
    parser.add_argument("--messages", type=int, help="messages sent through each queue (default 5000)")
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source sessions in parallel (default 20)")
    parser.add_argument("--queued", type=int, help="messages in the big spool (default 100000)")
    parser.add_argument("--runs", type=int, help="throughput runs of each server (default 3, 1 with --quick)")
    parser.add_argument("--observe", type=float, help="seconds the RSS is watched after startup (default 120)")
    parser.add_argument("--parts", default="throughput,rss", help="throughput, rss, or both (default)")
    parser.add_argument("--no-postfix", action="store_true", help="measure esmtpkit alone")
    parser.add_argument("--server-cpu", default="0", help="core for the servers (taskset -c), default 0")
    parser.add_argument("--client-cpu", default="1", help="core for smtp-source, the sinks and this driver")
    parser.add_argument("--esmtpkit-option", action="append", default=[], metavar="OPTION",
                        help="an extra twistd esmtpkit option, e.g. --esmtpkit-option=--log-events=warn")
    args = parser.parse_args(argv)
    args.messages = args.messages or (1000 if args.quick else 5000)
    args.queued = args.queued if args.queued is not None else (20000 if args.quick else 100000)
    args.observe = args.observe or (15.0 if args.quick else 120.0)
    args.runs = args.runs or (1 if args.quick else 3)
    args.part_names = {p.strip() for p in args.parts.split(",") if p.strip()}
    if args.part_names - {"throughput", "rss"}:
        parser.error(f"unknown part(s): {', '.join(sorted(args.part_names - {'throughput', 'rss'}))}")
    if min(args.messages, args.sessions, args.queued, args.runs) < 1 or not 0 < args.observe <= 3600:
        parser.error("--messages, --sessions, --queued and --runs take a count of at least 1, --observe 0 to 3600 s")
    return args


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages: on a shared machine, how busy the other work kept it."""
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    """A temporary folder the postfix user can traverse, removed at the end with everything in it."""
    work = Path(tempfile.mkdtemp(prefix="esmtpkit-queue-bench-"))
    work.chmod(0o755)
    try:
        yield work
    finally:
        Server.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("smtp-source", "smtp-sink"):
        if not Path(tool(name)).exists():
            print(f"{name} is missing (Debian: apt-get install postfix)", file=sys.stderr)
            return 2
    if shutil.which("taskset") is None:
        print("taskset is missing (util-linux)", file=sys.stderr)
        return 2
    with contextlib.suppress(OSError, ValueError):
        os.sched_setaffinity(0, {int(args.client_cpu)})
    signal.signal(signal.SIGTERM, interrupted)
    print("\n".join(f"{k}: {v}" for k, v in machine().items() if k != "peers"))
    print(f"load average before: {load_average()}")
    print(f"command: benchmarks/queue_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip() + "\n",
          flush=True)
    tables = []
    failed = False
    try:
        with workspace() as work:
            if "throughput" in args.part_names:
                results = run_throughput(args, work)
                failed |= any(r.error for runs in results.values() for r in runs)
                tables.append(throughput_table(results, args))
            if "rss" in args.part_names:
                full = watch(args, work, args.queued)
                empty = watch(args, work, 0)
                failed |= bool(full.error or empty.error)
                tables.append(rss_table(full, empty))
    except KeyboardInterrupt:
        print("\ninterrupted; everything started here was stopped", file=sys.stderr)
        return 130
    print(f"load average after: {load_average()}")
    print("\n" + "\n\n".join(tables))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
