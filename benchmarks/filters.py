#!/usr/bin/env python3
"""What esmtpkit's filters (``twistd esmtpkit --filter``, docs/filters.md) cost a real server, beside Postfix
running the same OpenDKIM milter.

Everything runs on 127.0.0.1, from one temporary folder. The daemons are private instances, started once from
their own folders with the test suite's helpers (tests/opendkimd.py, tests/clamdaemon.py, tests/spamdaemon.py,
tests/rspamdaemon.py): OpenDKIM as a signing milter (``Mode s``, a key made by opendkim-genkey for good.test),
clamd with a one-signature database, spamd without network tests, rspamd with its networked modules off. The
configurations, each a fresh server for every run:

- ``esmtpkit``: ``twistd esmtpkit --handler esmtpkit.handlers.null.Null`` (its default event log to a file);
- ``+ in-process CONTINUE``: the same with an in-process `MessageFilter` that answers CONTINUE
  (benchmarks/servers/continue_filter.py: the front's own cost: holding the message, replaying it);
- ``+ milter (OpenDKIM)``, ``+ clamd``, ``+ spamd``, ``+ rspamd``: ``--filter KIND:TARGET`` against the daemon;
- ``Postfix`` and ``Postfix + milter (OpenDKIM)``: a private Postfix (benchmarks/queue_throughput.py's), its
  smtpd on a loopback port, every message delivered to the ``discard`` transport, with ``smtpd_milters`` pointing
  at the same OpenDKIM.

Load: Postfix's ``smtp-source``, ``--sessions`` (8) persistent sessions sending ``--messages`` messages of 4 KiB
(from ``sender@good.test``, so OpenDKIM signs them), after 20 to warm up. Figures, median over ``--runs``:
messages per second, the server's CPU per message (all its processes, from /proc; for Postfix after its queue is
empty), the daemon's CPU per message, and the end-of-data reply time (p50, p99) of one client sending alone,
lock-step, after the load. The servers run pinned to core 0, the daemons, smtp-source and this driver to core 1.

    .venv/bin/python benchmarks/filters.py [--quick] [--runs N] [--messages N] [--sessions N] [--only a,b]

It prints markdown tables and asserts nothing about the figures; the exit status is 1 if a configuration could not
be measured, 2 if a tool is missing. Every process it starts is stopped by its own pid (Postfix with
``postfix stop``), also on errors and Ctrl-C; the folder is removed unless something failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from queue_throughput import PrivatePostfix, postfix_missing, tool, tree_cpu  # puts the checkout on sys.path
from run import (HOST, BenchError, Client, Server, ServerSpec, cpu_model, esmtpkit_python, fmt, interrupted,
                 stop_process, twistd_argv, version, workspace)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SENDER, RECIPIENT = "sender@good.test", "recipient@example.com"
WARM_UP = 20
MESSAGE_SIZE = 4096
#: A configuration whose daemon is slow gets this share of ``--messages`` (spamd: a Perl process per scan).
SLOW = {"spamd": 0.03, "rspamd": 0.5}
#: The daemon each configuration needs started (by its STARTERS entry).
NEEDS = {"milter": "milter", "milter-unix": "milter", "postfix-milter": "milter", "clamd": "clamd",
         "spamd": "spamd", "rspamd": "rspamd"}
NAMES = ("esmtpkit", "continue", "continue-read", "milter", "milter-unix", "clamd", "spamd", "rspamd", "postfix",
         "postfix-milter")
LABELS = {
    "esmtpkit": "esmtpkit, no filter",
    "continue": "esmtpkit + in-process CONTINUE",
    "continue-read": "esmtpkit + in-process CONTINUE, reads the message",
    "milter": "esmtpkit + milter (OpenDKIM, signing), TCP",
    "milter-unix": "esmtpkit + milter (OpenDKIM, signing), UNIX socket",
    "clamd": "esmtpkit + clamd",
    "spamd": "esmtpkit + spamd",
    "rspamd": "esmtpkit + rspamd",
    "postfix": "Postfix, no milter",
    "postfix-milter": "Postfix + milter (OpenDKIM, signing), TCP",
}
#: A filter's verdict on a message in the event log: ``filter NAME message=ACTION elapsed=...``.
VERDICT = re.compile(rb"\] filter (\S+) (message=\w+) ")


def message() -> bytes:
    """A plain-text message of MESSAGE_SIZE octets from good.test, CRLF lines, no line starting with a dot."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%a, %d %b %Y %H:%M:%S +0000")
    head = (f"From: Sender <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: filters benchmark\r\nDate: {date}\r\n"
            "Message-ID: <filters-benchmark@good.test>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"  # 64 octets
    body = line * ((MESSAGE_SIZE - len(head)) // len(line))
    return head + body + b"x" * (MESSAGE_SIZE - len(head) - len(body) - 2) + b"\r\n"


# ---- the daemons (private, started once) -----------------------------------------------------------------------

@dataclass
class Daemon:
    """A private filter daemon: its ``--filter`` entry, the root of its processes, and how to stop it."""

    kind: str
    entry: str
    root: int
    stop: Callable[[], Any]
    port: int = 0


def start_opendkim(work: Path, stack: contextlib.ExitStack) -> list[Daemon]:
    """OpenDKIM signing for good.test (tests/opendkimd.py's configuration and milter) on a loopback port, and a
    second one with the same key on a UNIX socket; no name server needed."""
    from tests import opendkimd

    if opendkimd.MISSING:
        raise BenchError(f"OpenDKIM is missing ({', '.join(opendkimd.MISSING)})")
    opendkim = opendkimd.OpenDKIM(work / "opendkim")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        opendkim.configure(s.getsockname()[1])
    # Signing asks no name server: no ResolverConfiguration, whose parser (libunbound's, flex) is not safe to run
    # in several of OpenDKIM's threads at once (it aborts under concurrent connections).
    text = "".join(line for line in (opendkim.folder / "sign.conf").read_text().splitlines(keepends=True)
                   if not line.startswith("ResolverConfiguration"))
    (opendkim.folder / "bench-sign.conf").write_text(text)
    port = stack.enter_context(opendkimd.milter_daemon(opendkim, "bench-sign.conf"))
    tcp = Daemon("milter", f"milter:tcp:{HOST}:{port}",
                 process_with(str(opendkim.folder / "milter-bench-sign.conf")), lambda: None, port)
    path = opendkim.folder / "milter.sock"
    conf = opendkim.folder / "bench-sign-unix.conf"
    conf.write_text(text + f"Socket local:{path}\n")
    with open(opendkim.folder / "milter-unix.log", "wb") as log:
        proc = subprocess.Popen([tool("opendkim"), "-f", "-x", str(conf)], cwd=opendkim.folder, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    stack.callback(stop_process, proc)
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(path))
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"opendkim did not listen on {path}")
        time.sleep(0.05)
    return [tcp, Daemon("milter-unix", f"milter:unix:{path}", proc.pid, lambda: None)]


def process_with(argument: str) -> int:
    """The pid of the process started here whose command line has ``argument`` (milter_daemon keeps its own)."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.fsencode(argument) in Path(entry.path, "cmdline").read_bytes().split(b"\0"):
                    return int(entry.name)
    raise BenchError(f"no process with {argument} on its command line")


def start_clamd(work: Path, stack: contextlib.ExitStack) -> list[Daemon]:
    from tests.clamdaemon import PrivateClamd, clamd_missing

    if clamd_missing():
        raise BenchError(str(clamd_missing()))
    base = work / "clamd"
    base.mkdir()
    clamd = PrivateClamd(base, stream_max=1024 * 1024)
    stack.callback(clamd.stop)
    return [Daemon("clamd", f"clamd:{clamd.tcp_target}", clamd.process.pid, clamd.stop, clamd.port)]


def start_spamd(work: Path, stack: contextlib.ExitStack) -> list[Daemon]:
    from tests.spamdaemon import PrivateSpamd, spamd_missing

    if spamd_missing():
        raise BenchError(str(spamd_missing()))
    base = work / "spamd"
    base.mkdir()
    spamd = PrivateSpamd(base)
    stack.callback(spamd.stop)
    return [Daemon("spamd", f"spamd:{spamd.target}", spamd.process.pid, spamd.stop, spamd.port)]


def start_rspamd(work: Path, stack: contextlib.ExitStack) -> list[Daemon]:
    from tests.rspamdaemon import PrivateRspamd, rspamd_missing

    if rspamd_missing():
        raise BenchError(str(rspamd_missing()))
    rspamd = PrivateRspamd()
    stack.callback(rspamd.remove)
    stack.callback(rspamd.stop)
    rspamd.start()
    assert rspamd.process is not None
    return [Daemon("rspamd", f"rspamd:{rspamd.url}", rspamd.process.pid, rspamd.stop, rspamd.port)]


STARTERS: dict[str, Callable[[Path, contextlib.ExitStack], list[Daemon]]] = {
    "milter": start_opendkim, "clamd": start_clamd, "spamd": start_spamd, "rspamd": start_rspamd}


# ---- the servers -----------------------------------------------------------------------------------------------

class Target:
    """A server under test: its port, the root of its processes, and how to stop it."""

    port: int
    log: Path

    def root_pid(self) -> int:
        raise NotImplementedError

    def settle(self) -> None:
        """Wait until the server has finished with every message it accepted."""

    def stop(self) -> None:
        raise NotImplementedError


class Esmtpkit(Target):
    """``twistd esmtpkit`` (or benchmarks/servers/continue_filter.py) with the Null handler and ``extra``."""

    def __init__(self, name: str, extra: list[str], cpu: str, work: Path, script: bool = False) -> None:
        python = esmtpkit_python()
        start = [python, str(HERE / "servers" / "continue_filter.py")] if script else twistd_argv(python)

        def argv(port: int, event_log: Path) -> list[str]:
            return [*start, "-n", "--pidfile=", f"--logfile={event_log}", "esmtpkit",
                    "--handler", "esmtpkit.handlers.null.Null",
                    "--listen", f"tcp:{port}:interface={HOST}:backlog=1024", "--hostname", "localhost",
                    "--max-connections-per-client", "0", "--error-limit", "0", *extra]

        self.server = Server(ServerSpec(name, argv, {"PYTHONPATH": str(ROOT)}), cpu, work)
        self.port = self.server.port
        self.log = self.server.log_path

    def root_pid(self) -> int:
        return self.server.pid

    def stop(self) -> None:
        self.server.stop()

    def verdicts(self) -> str:
        """What the filters answered at the end of data, from the event log (warm-up included); after `stop`."""
        counts: Counter[str] = Counter()
        for path in self.server.event_log_files():
            with open(path, "rb") as log:
                for line in log:
                    found = VERDICT.search(line)
                    if found:
                        counts[b" ".join(found.groups()).decode()] += 1
        return ", ".join(f"{what}×{n}" for what, n in sorted(counts.items()))


class MilterPostfix(PrivatePostfix):
    """queue_throughput's private Postfix, every message to the ``discard`` transport, and with ``milter``
    (``inet:127.0.0.1:PORT``) as its smtpd_milters."""

    def __init__(self, base: Path, cpu: str, milter: str | None) -> None:
        self.milter = milter
        base.mkdir()
        super().__init__(base, 9, cpu)  # the relay host is never used: everything is discarded

    def _start(self, cpu: str) -> None:
        extra = {"default_transport": "discard", "relay_transport": "discard", "relayhost": "",
                 "smtpd_client_connection_count_limit": "0", "smtpd_client_message_rate_limit": "0"}
        if self.milter:
            extra.update(smtpd_milters=self.milter, milter_default_action="tempfail", milter_protocol="6")
        lines = [line for line in (self.etc / "main.cf").read_text().splitlines()
                 if line.split(" = ", 1)[0] not in extra]
        (self.etc / "main.cf").write_text("".join(f"{line}\n" for line in lines)
                                          + "".join(f"{k} = {v}\n" for k, v in extra.items()))
        super()._start(cpu)

    def settle(self) -> None:
        deadline = time.monotonic() + 120
        while self.queued():
            if time.monotonic() > deadline:
                raise BenchError(f"Postfix still has {self.queued()} messages queued after 120 s")
            time.sleep(0.05)
        time.sleep(0.5)  # the last queue files' removal is part of the work


# ---- load and latency ------------------------------------------------------------------------------------------

def smtp_source(port: int, cpu: str, sessions: int, count: int, file: Path, out: Path, timeout: float) -> float:
    """smtp-source sending ``file`` ``count`` times over ``sessions`` sessions; the wall time, once it has
    completed exactly ``count`` transactions."""
    argv = ["taskset", "-c", cpu, tool("smtp-source"), "-c", "-f", SENDER, "-t", RECIPIENT, "-M", "localhost",
            "-s", str(sessions), "-m", str(count), "-F", str(file), "-d", f"{HOST}:{port}"]
    t0 = time.monotonic()
    with open(out, "wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"smtp-source took more than {timeout:.0f} s") from None
    finally:
        stop_process(proc, wait=5)
    wall = time.monotonic() - t0
    text = out.read_bytes()
    counters = text.replace(b"\r", b"\n").split()
    done = int(counters[-1]) if counters and counters[-1].isdigit() else 0
    if proc.returncode != 0 or done != count:
        raise BenchError(f"smtp-source exited {proc.returncode} having completed {done} of {count}: "
                         f"{text.decode(errors='replace')[-300:]}")
    return wall


def end_of_data_times(port: int, content: bytes, count: int) -> list[float]:
    """One client alone, lock-step: ``count`` messages; the seconds from sending the final dot to the 250."""
    times = []
    with socket.create_connection((HOST, port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = Client(s)
        deadline = time.monotonic() + 300
        if c.reply(deadline)[0] != 220:
            raise BenchError("no 220 greeting")
        c.command(b"EHLO client.good.test\r\n", 250, deadline)
        for _ in range(count):
            c.command(f"MAIL FROM:<{SENDER}>\r\n".encode(), 250, deadline)
            c.command(f"RCPT TO:<{RECIPIENT}>\r\n".encode(), 250, deadline)
            c.command(b"DATA\r\n", 354, deadline)
            s.sendall(content)
            t0 = time.perf_counter()
            c.command(b".\r\n", 250, deadline)
            times.append(time.perf_counter() - t0)
        c.command(b"QUIT\r\n", 221, deadline)
    return times


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * p // 100) - 1)] if ordered else float("nan")


@dataclass
class Sample:
    count: int
    rate: float
    server_us: float
    daemon_us: float | None
    p50_ms: float
    p99_ms: float
    verdicts: str = ""


def measure(target: Target, daemon: Daemon | None, args: argparse.Namespace, count: int, latency: int,
            work: Path) -> Sample:
    """Warm up, load with smtp-source, then time the end of data of one client alone."""
    content = message()
    file = work / "message.eml"
    file.write_bytes(content.replace(b"\r\n", b"\n"))  # smtp-source -F ends each line with CRLF itself
    out = work / "smtp-source.out"
    smtp_source(target.port, args.client_cpu, 2, WARM_UP, file, out, 300)
    target.settle()
    time.sleep(0.2)
    root = target.root_pid()
    c0, d0 = tree_cpu(root), tree_cpu(daemon.root) if daemon else 0.0
    wall = smtp_source(target.port, args.client_cpu, args.sessions, count, file, out, max(600.0, count / 5))
    target.settle()
    c1, d1 = tree_cpu(root), tree_cpu(daemon.root) if daemon else 0.0
    times = end_of_data_times(target.port, content, latency)
    ms = [t * 1000 for t in times]
    return Sample(count, count / wall, (c1 - c0) * 1e6 / count, (d1 - d0) * 1e6 / count if daemon else None,
                  percentile(ms, 50), percentile(ms, 99))


def run_one(name: str, daemons: dict[str, Daemon], args: argparse.Namespace, work: Path) -> Sample:
    """A fresh server for configuration ``name``, measured and stopped."""
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    folder.chmod(0o755)  # Postfix's daemons (user postfix) must reach their queue in it
    count = max(WARM_UP, round(args.messages * SLOW.get(name, 1.0)))
    daemon = daemons.get("milter") if name == "postfix-milter" else daemons.get(name)
    latency = min(args.latency, max(WARM_UP, round(args.latency * SLOW.get(name, 1.0) * 10)))
    target: Target
    if name in ("postfix", "postfix-milter"):
        milter = f"inet:{HOST}:{daemons['milter'].port}" if name == "postfix-milter" else None
        target = MilterPostfix(folder / "postfix", args.server_cpu, milter)
    elif name in ("continue", "continue-read"):
        spec = "continue:in-process" + (",read=yes" if name == "continue-read" else "")
        target = Esmtpkit(name, ["--filter", spec], args.server_cpu, folder, script=True)
    else:
        extra = ["--filter", daemons[name].entry] if name in daemons else []
        target = Esmtpkit(name, extra, args.server_cpu, folder)
    try:
        sample = measure(target, daemon, args, count, latency, folder)
    finally:
        target.stop()
    if isinstance(target, Esmtpkit):
        sample.verdicts = target.verdicts()
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return sample


# ---- reporting -------------------------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    """The machine and the software measured."""
    python = esmtpkit_python()
    head = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "esmtpkit"],
                           capture_output=True, text=True)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": str(os.cpu_count()),
        "cpu model": cpu_model(),
        "kernel": platform.release(),
        "esmtpkit": version(python, "import sys, twisted; print('Python', sys.version.split()[0] + ', Twisted', "
                                    "twisted.__version__)")
        + f"; checkout {head.stdout.strip() or '?'}" + (" with changes in esmtpkit/" if dirty.stdout.strip() else ""),
    }
    packages = {"postfix": "postfix", "opendkim": "opendkim", "clamd": "clamav-daemon", "spamd": "spamd",
                "rspamd": "rspamd"}
    found = []
    for label, package in packages.items():
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
        if out.stdout.strip():
            found.append(f"{label} {out.stdout.strip()}")
    info["daemons (Debian packages)"] = ", ".join(found) or "?"
    return info


def table(results: dict[str, list[Sample]], args: argparse.Namespace) -> str:
    rows = [f"| configuration ({args.sessions} sessions, 4 KiB messages) | messages | messages/s | "
            "server CPU per message | × no filter | daemon CPU per message | end of data p50 | p99 |",
            "|---|---|---|---|---|---|---|---|"]
    base = {"esmtpkit": None, "postfix": None}
    for name in ("esmtpkit", "postfix"):
        if results.get(name):
            base[name] = statistics.median(s.server_us for s in results[name])
    for name, samples in results.items():
        if not samples:
            rows.append(f"| {LABELS[name]} | failed | | | | | | |")
            continue
        rate = statistics.median(s.rate for s in samples)
        cpu = statistics.median(s.server_us for s in samples)
        reference = base["postfix" if name.startswith("postfix") else "esmtpkit"]
        times = "" if reference is None else f"{cpu / reference:.2f}"
        daemon = [s.daemon_us for s in samples if s.daemon_us is not None]
        rates = [s.rate for s in samples]
        spread = "" if len(samples) < 2 else f" ({fmt(min(rates))}–{fmt(max(rates))})"
        rows.append(f"| {LABELS[name]} | {samples[0].count} | {fmt(rate)}{spread} | {fmt(cpu)} µs | {times} | "
                    f"{fmt(statistics.median(daemon)) + ' µs' if daemon else '—'} | "
                    f"{statistics.median(s.p50_ms for s in samples):.2f} ms | "
                    f"{statistics.median(s.p99_ms for s in samples):.2f} ms |")
    return "\n".join(rows)


# ---- the run ---------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, one run (about a minute)")
    parser.add_argument("--runs", type=int, help="runs of every configuration (default 3, 1 with --quick)")
    parser.add_argument("--messages", type=int, help="messages per run (default 2000, 500 with --quick; spamd "
                        "gets 3 %%, rspamd half)")
    parser.add_argument("--sessions", type=int, default=8, help="smtp-source sessions in parallel (default 8)")
    parser.add_argument("--latency", type=int, help="messages of the lone client timed at the end of data "
                        "(default 200, 50 with --quick; spamd 30 %%)")
    parser.add_argument("--only", help=f"comma-separated configurations, of: {', '.join(NAMES)}")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) at the end")
    parser.add_argument("--server-cpu", default="0", help="core for the servers (taskset -c; default 0)")
    parser.add_argument("--client-cpu", default="1", help="core for the daemons, smtp-source and this driver "
                        "(default 1)")
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.messages = args.messages or (500 if args.quick else 2000)
    args.latency = args.latency or (50 if args.quick else 200)
    args.names = [n.strip() for n in args.only.split(",")] if args.only else list(NAMES)
    unknown = set(args.names) - set(NAMES)
    if unknown:
        parser.error(f"unknown configuration {sorted(unknown)[0]!r}; one of {', '.join(NAMES)}")
    if not 1 <= args.sessions <= 100 or not 1 <= args.runs <= 20 or not 20 <= args.messages <= 10**6:
        parser.error("--sessions 1..100, --runs 1..20, --messages 20..1000000")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    for name in ("taskset", "smtp-source"):
        if not os.path.exists(tool(name)) and shutil.which(name) is None:
            print(f"{name} is missing (util-linux, postfix)", file=sys.stderr)
            return 2
    postfix_why = postfix_missing()
    if postfix_why and any(n.startswith("postfix") for n in args.names):
        print(f"note: no Postfix rows: {postfix_why}", flush=True)
        args.names = [n for n in args.names if not n.startswith("postfix")]
    signal.signal(signal.SIGTERM, interrupted)
    with contextlib.suppress(OSError, ValueError):
        os.sched_setaffinity(0, {int(args.client_cpu)})  # the daemons started from here inherit it
    started = time.monotonic()
    failed = False
    # 0o755: Postfix's daemons (user postfix) must reach their queue below the folder.
    with workspace("esmtpkit-filters-", 0o755) as (work, keep), contextlib.ExitStack() as stack:
        stack.callback(Server.stop_all)
        keep[0] = args.keep
        try:
            print("\n".join(f"{k}: {v}" for k, v in versions().items()))
            print(f"command: benchmarks/filters.py {' '.join(argv)}".rstrip(), flush=True)
            daemons: dict[str, Daemon] = {}
            wanted = {NEEDS[n] for n in args.names if n in NEEDS}
            for kind in STARTERS:
                if kind in wanted:
                    t0 = time.monotonic()
                    try:
                        launched = STARTERS[kind](work, stack)
                    except (BenchError, AssertionError, OSError) as e:
                        failed = True
                        print(f"{kind}: could not start: {str(e)[:500]}", file=sys.stderr)
                        continue
                    for daemon in launched:
                        daemons[daemon.kind] = daemon
                        print(f"{daemon.kind} started in {time.monotonic() - t0:.1f} s: pid {daemon.root}, "
                              f"{daemon.entry}", flush=True)
            names = [n for n in args.names if n not in NEEDS or NEEDS[n] in daemons]
            results: dict[str, list[Sample]] = {name: [] for name in names}
            for run in range(1, args.runs + 1):
                for name in names:
                    try:
                        sample = run_one(name, daemons, args, work)
                    except (BenchError, OSError) as e:
                        failed = keep[0] = True
                        print(f"run {run} {name}: failed: {e}", file=sys.stderr, flush=True)
                        continue
                    results[name].append(sample)
                    daemon = "" if sample.daemon_us is None else f"  daemon {fmt(sample.daemon_us):>6} µs/msg"
                    print(f"run {run} {name:14} {fmt(sample.rate):>6} msg/s  server {fmt(sample.server_us):>6} "
                          f"µs/msg{daemon}  end of data p50 {sample.p50_ms:.2f} ms p99 {sample.p99_ms:.2f} ms"
                          + (f"  verdicts: {sample.verdicts}" if sample.verdicts else ""), flush=True)
            print(f"\nFilters (median of {args.runs} run{'s' if args.runs > 1 else ''}; messages/s min–max in "
                  "brackets)\n")
            print(table(results, args))
            print(f"\n({time.monotonic() - started:.0f} s in all)")
            return 1 if failed else 0
        except BenchError as e:
            keep[0] = True
            print(f"failed: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            keep[0] = True
            print("\ninterrupted; stopping servers and daemons", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
