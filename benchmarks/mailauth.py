#!/usr/bin/env python3
"""What the mail-authentication checks (``--verify``: SPF, DKIM, DMARC, ARC) cost a real ``twistd esmtpkit``, and
whether its reactor goes on answering while checks wait on DNS.

Everything runs on 127.0.0.1. The benchmark makes a 2048-bit DKIM key, and starts an authoritative twisted.names
server in a process of its own (this script, ``_dns``) that serves ``bench.test``: an SPF record with an
``include:``, an SPF record for the HELO name, the DKIM key and a DMARC ``p=reject`` record. It can answer every
query after a delay, set between measurements. Each ``twistd esmtpkit`` (the Null handler, this checkout on
``PYTHONPATH``, ``--dns-server`` pointing at that server, its default event log written to a file) runs pinned to
one core with ``taskset``, the driver, the DNS server and the clients on another. Every message is DKIM-signed
by dkimpy for ``bench.test`` and sent from 127.0.0.1, which the SPF record allows, so every check passes; the
server's log is read afterwards to show the verdicts it gave.

1. **Throughput**: 8 senders (``--senders``), each on its own connection sending ``--messages`` messages in
   lock-step (MAIL, RCPT, DATA, content, then the next once the end of data is answered), against a server with
   no checks, ``--verify spf``, ``--verify dkim`` and ``--verify all``. Figures: messages per second (wall time)
   and the server's CPU per message (utime + stime from /proc, all threads), median over ``--runs``.
2. **The reactor while checks wait**: a separate process (this script, ``_probe``) sends NOOP on one more,
   otherwise idle connection every 10 ms and times each reply, while: no other client is connected (checks
   off); the senders run at full speed (checks off; all checks with DNS answering at once); and every DNS
   answer comes after ``--dns-delay`` (300 ms), so each message waits for its checks for seconds while the
   senders keep the server full of them. Figures: the NOOP round trip (median, p99, max), how many messages were
   waiting for their end-of-data reply while the NOOPs ran, and how many were accepted per second.

It prints markdown tables and asserts nothing about the figures; the exit status is 1 only if it could not
measure (a server or the DNS server did not start, a reply was wrong or missing).

    .venv/bin/python benchmarks/mailauth.py [--quick] [--runs 3] [--senders 8] [--messages 250]
                                            [--dns-delay 0.3] [--noops 500]

Every process it starts (the servers, the DNS server, the probes) is stopped by its own pid, also on errors and
Ctrl-C, and its temporary folder is removed unless something failed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from run import (HOST, BenchError, Client, Server, ServerSpec, cpu_model, cpu_seconds, esmtpkit_python, fmt, free_port,
                 interrupted, stop_process, twistd_argv, version, workspace)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOMAIN = "bench.test"
SELECTOR = "sel1"
HELO = "client.bench.test"
SERVER_NAME = "mx.bench.test"
SENDER, RECIPIENT = f"sender@{DOMAIN}", "postmaster@example.test"
#: Queries for names under this one are the DNS server's controls: they set its delay and read its counter.
CONTROL = "ctl.bench.invalid"
REPLY_TIMEOUT = 60.0
CONFIGS = (
    ("no checks", []),
    ("SPF only", ["--verify", "spf"]),
    ("DKIM only", ["--verify", "dkim"]),
    ("all checks", ["--verify", "all"]),
)
METHOD = re.compile(rb" (spf\.helo|spf\.mailfrom|dkim|arc|dmarc)=(\w+) domain=")


# ---- the DNS server (a process of its own) ----------------------------------------------------------------------

def zones(key_record: str) -> dict[str, dict[str, list[Any]]]:
    """The records of bench.test: TXT values are lists of strings (one DNS character-string each)."""
    chunks = [key_record[i:i + 250] for i in range(0, len(key_record), 250)]
    return {
        DOMAIN: {"TXT": [["v=spf1 ip4:192.0.2.0/24 include:_spf.bench.test -all"]], "A": ["192.0.2.1"]},
        f"_spf.{DOMAIN}": {"TXT": [["v=spf1 ip4:127.0.0.0/8 -all"]]},
        HELO: {"TXT": [["v=spf1 ip4:127.0.0.0/8 -all"]], "A": ["127.0.0.1"]},
        f"{SELECTOR}._domainkey.{DOMAIN}": {"TXT": [chunks]},
        f"_dmarc.{DOMAIN}": {"TXT": [["v=DMARC1; p=reject; rua=mailto:dmarc@bench.test"]]},
    }


def serve_dns(zones_file: str, port: int) -> int:
    """Answer for the zones in ``zones_file`` on 127.0.0.1:port (UDP and TCP) until SIGTERM.

    ``delayMS.ctl.bench.invalid`` (TXT) sets the delay of every later answer to MS milliseconds,
    ``count.ctl.bench.invalid`` reads it; both answer ``queries=N delay_ms=MS`` at once and are not counted.
    """
    from twisted.internet import reactor, task
    from twisted.internet.defer import succeed
    from twisted.names import dns, error
    from twisted.names.server import DNSServerFactory

    data = json.loads(Path(zones_file).read_text())
    state = {"delay": 0.0, "queries": 0}

    def rr(name: str, kind: int, payload: Any) -> dns.RRHeader:
        return dns.RRHeader(name.encode("ascii"), kind, dns.IN, 60, payload, auth=True)

    def answer(name: str, kind: int) -> Any:
        if name not in data:
            if any(other.endswith("." + name) for other in data):
                return [], [], []
            raise error.DNSNameError(name)
        records = data[name]
        if kind == dns.TXT:
            return [rr(name, kind, dns.Record_TXT(*(s.encode() for s in v), ttl=60))
                    for v in records.get("TXT", [])], [], []
        if kind == dns.A:
            return [rr(name, kind, dns.Record_A(a, ttl=60)) for a in records.get("A", [])], [], []
        return [], [], []

    class Zones:
        def query(self, query: dns.Query, timeout: Any = None) -> Any:
            name = str(query.name).rstrip(".").lower()
            if name.endswith("." + CONTROL):
                label = name.split(".", 1)[0]
                if label.startswith("delay") and label[5:].isdigit():
                    state["delay"] = int(label[5:]) / 1000
                text = f"queries={state['queries']} delay_ms={state['delay'] * 1000:.0f}".encode()
                return succeed(([rr(name, dns.TXT, dns.Record_TXT(text, ttl=0))], [], []))
            state["queries"] += 1
            if not state["delay"]:
                try:
                    return succeed(answer(name, query.type))
                except error.DNSNameError as e:
                    from twisted.internet.defer import fail
                    return fail(e)
            return task.deferLater(reactor, state["delay"], answer, name, query.type)

    factory = DNSServerFactory(authorities=[Zones()])
    factory.noisy = False
    reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface=HOST)
    reactor.listenTCP(port, factory, interface=HOST)
    reactor.run()
    return 0


class DNS:
    """The DNS server process, started from this script and stopped by its own pid."""

    def __init__(self, workdir: Path, records: dict[str, Any]) -> None:
        path = workdir / "zones.json"
        path.write_text(json.dumps(records))
        self.log = workdir / "dns.log"
        self.proc: subprocess.Popen[bytes] | None = None
        for _ in range(20):
            self.port = free_udp_tcp_port()
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_dns", str(path),
                                              str(self.port)], stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, cwd=workdir, start_new_session=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(OSError, BenchError):
                    self.control("count")
                    return
                time.sleep(0.1)
            self.stop()
        raise BenchError(f"the DNS server did not start; see {self.log}")

    def control(self, what: str) -> dict[str, int]:
        """Ask the control name ``what`` (``count`` or ``delayMS``); the server's counter and delay."""
        text = txt_query(self.port, f"{what}.{CONTROL}")
        return {k: int(v) for k, v in (pair.split("=") for pair in text.split())}

    def queries(self) -> int:
        return self.control("count")["queries"]

    def set_delay(self, seconds: float) -> None:
        self.control(f"delay{round(seconds * 1000)}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def free_udp_tcp_port() -> int:
    """A port of 127.0.0.1 free for both TCP and UDP right now."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind((HOST, port))
            except OSError:
                continue
            return port
    raise BenchError("no port free for both TCP and UDP on 127.0.0.1")


def txt_query(port: int, name: str, timeout: float = 2.0) -> str:
    """One TXT query over UDP to 127.0.0.1:port; the strings of the first answer, joined."""
    from twisted.names import dns

    query = dns.Message(id=random.randrange(1, 65535))
    query.queries = [dns.Query(name.encode("ascii"), dns.TXT, dns.IN)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(query.toStr(), (HOST, port))
        response = dns.Message()
        response.fromStr(s.recv(65536))
    if not response.answers:
        raise BenchError(f"no answer for {name}")
    return b"".join(response.answers[0].payload.data).decode()


# ---- messages ---------------------------------------------------------------------------------------------------

def make_key() -> tuple[bytes, str]:
    """A 2048-bit RSA key: its PEM for dkimpy, and its DKIM key record."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode()


def signed_messages(private: bytes, senders: int, each: int) -> list[list[bytes]]:
    """``each`` distinct DKIM-signed messages of about 1.5 KiB for every sender, dot-stuffed, without the final dot."""
    import dkim

    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"  # 64 bytes
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%a, %d %b %Y %H:%M:%S +0000").encode()
    batches = []
    for s in range(senders):
        batch = []
        for m in range(each):
            message = (b"From: Sender <" + SENDER.encode() + b">\r\nTo: <" + RECIPIENT.encode() + b">\r\n"
                       b"Subject: benchmark " + str(m).encode() + b"\r\nDate: " + date + b"\r\n"
                       b"Message-ID: <" + f"{s}.{m}.{random.getrandbits(32)}@{DOMAIN}".encode() + b">\r\n\r\n"
                       + line * 16)
            signature = dkim.sign(message, SELECTOR.encode(), DOMAIN.encode(), private,
                                  include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
            content = signature + message
            if content.startswith(b"."):
                content = b"." + content
            batch.append(content.replace(b"\r\n.", b"\r\n.."))
        batches.append(batch)
    return batches


# ---- clients ----------------------------------------------------------------------------------------------------

def session(port: int) -> tuple[socket.socket, Client]:
    """A connection that has read the greeting and said EHLO."""
    s = socket.create_connection((HOST, port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c = Client(s)
    code, lines = c.reply(time.monotonic() + REPLY_TIMEOUT)
    if code != 220:
        s.close()
        raise BenchError(f"greeted with {lines[-1][:80]!r}")
    c.command(f"EHLO {HELO}\r\n".encode(), 250, time.monotonic() + REPLY_TIMEOUT)
    return s, c


class Load:
    """Senders, each on its own connection sending its messages in lock-step: ``count`` each, or, with None,
    until `stop`. ``waiting`` is how many have sent a whole message and wait for its end-of-data reply."""

    def __init__(self, port: int, batches: list[list[bytes]], count: int | None) -> None:
        self.port = port
        self.batches = batches
        self.count = count
        self.waiting = 0
        self.accepted = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, args=(b,), daemon=True) for b in batches]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Let each sender finish the message it is on, QUIT, and wait for them all."""
        self._stop.set()
        self.join()

    def join(self) -> None:
        deadline = time.monotonic() + REPLY_TIMEOUT + 30
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            self.errors.append("a sender did not finish in time")
        if self.errors:
            raise BenchError(self.errors[0])

    def _send(self, batch: list[bytes]) -> None:
        try:
            s, c = session(self.port)
            with s:
                sent = 0
                while (sent < self.count) if self.count is not None else not self._stop.is_set():
                    if self.errors:
                        return
                    deadline = time.monotonic() + REPLY_TIMEOUT
                    c.command(f"MAIL FROM:<{SENDER}>\r\n".encode(), 250, deadline)
                    c.command(f"RCPT TO:<{RECIPIENT}>\r\n".encode(), 250, deadline)
                    c.command(b"DATA\r\n", 354, deadline)
                    s.sendall(batch[sent % len(batch)] + b".\r\n")
                    with self._lock:
                        self.waiting += 1
                    try:
                        code, lines = c.reply(deadline)
                    finally:
                        with self._lock:
                            self.waiting -= 1
                    if code != 250:
                        raise BenchError(f"end of data got {lines[-1][:80]!r}")
                    with self._lock:
                        self.accepted += 1
                    sent += 1
                c.command(b"QUIT\r\n", 221, time.monotonic() + REPLY_TIMEOUT)
        except (BenchError, OSError) as e:
            self.errors.append(f"sender: {e}")


def probe(port: int, count: int, interval: float, out: str) -> int:
    """The ``_probe`` process: ``count`` NOOPs on one connection, one every ``interval`` s; their round trips
    (seconds) go to ``out`` as JSON."""
    s, c = session(port)
    rtts = []
    with s:
        due = time.perf_counter()
        for _ in range(count):
            start = time.perf_counter()
            s.sendall(b"NOOP\r\n")
            code, lines = c.reply(time.monotonic() + REPLY_TIMEOUT)
            rtts.append(time.perf_counter() - start)
            if code != 250:
                raise BenchError(f"NOOP got {lines[-1][:80]!r}")
            due += interval
            time.sleep(max(0.0, due - time.perf_counter()))
        c.command(b"QUIT\r\n", 221, time.monotonic() + REPLY_TIMEOUT)
    Path(out).write_text(json.dumps(rtts))
    return 0


# ---- servers ----------------------------------------------------------------------------------------------------

def server_spec(name: str, options: Sequence[str], dns_port: int) -> ServerSpec:
    """``twistd esmtpkit`` with the Null handler and ``options``, its default event log going to a file; no limit
    on connections per client, errors or NOOPs (the probe sends hundreds of them on one connection)."""
    twistd = twistd_argv(esmtpkit_python())
    dns = ["--dns-server", f"{HOST}:{dns_port}"] if options else []

    def argv(port: int, event_log: Path) -> list[str]:
        return [*twistd, "-n", "--pidfile=", f"--logfile={event_log}", "esmtpkit",
                "--handler", "esmtpkit.handlers.null.Null", "--listen", f"tcp:{port}:interface={HOST}:backlog=1024",
                "--hostname", SERVER_NAME, "--max-connections-per-client", "0", "--junk-command-limit", "0",
                "--error-limit", "0", *options, *dns]

    return ServerSpec(name, argv, {"PYTHONPATH": str(ROOT)})


def verdicts(server: Server) -> str:
    """The verdicts the server logged (warm-up included), e.g. ``spf.mailfrom=pass×2024``; call after stopping it."""
    counts: Counter[tuple[str, str]] = Counter()
    for path in server.event_log_files():
        with open(path, "rb") as log:
            for line in log:
                found = METHOD.search(line)
                if found:
                    counts[found.group(1).decode(), found.group(2).decode()] += 1
    return " ".join(f"{m}={r}×{n}" for (m, r), n in sorted(counts.items())) or "none logged"


# ---- 1. throughput ----------------------------------------------------------------------------------------------

@dataclass
class Throughput:
    rate: float
    cpu_us: float
    queries: float
    wall: float
    verdicts: str = ""


def warm_up(port: int, batches: list[list[bytes]]) -> None:
    """Two messages from every sender at once: imports, the public suffix list and the worker threads are ready."""
    with Load(port, batches, 2) as load:
        load.join()


def throughput(spec: ServerSpec, batches: list[list[bytes]], each: int, dns: DNS, cpu: str,
               logdir: Path) -> Throughput:
    server = Server(spec, cpu, logdir)
    try:
        warm_up(server.port, batches)
        time.sleep(0.2)
        q0, c0, t0 = dns.queries(), cpu_seconds(server.pid), time.monotonic()
        with Load(server.port, batches, each) as load:
            load.join()
        t1 = time.monotonic()
        c1, q1 = cpu_seconds(server.pid), dns.queries()
    finally:
        server.stop()
    n = each * len(batches)
    return Throughput(n / (t1 - t0), (c1 - c0) * 1e6 / n, (q1 - q0) / n, t1 - t0, verdicts(server))


# ---- 2. the reactor while checks wait ---------------------------------------------------------------------------

@dataclass
class Probed:
    what: str
    rtts: list[float]
    waiting: list[int] = field(default_factory=list)
    accepted: int = 0
    queries: int = 0
    seconds: float = 0.0


def run_probe(port: int, args: argparse.Namespace, logdir: Path, load: Load | None, dns: DNS, what: str) -> Probed:
    """One ``_probe`` process against the server; meanwhile ``load.waiting`` is sampled every 5 ms."""
    out = logdir / f"probe-{time.monotonic_ns()}.json"
    q0, a0, t0 = dns.queries(), (load.accepted if load else 0), time.monotonic()
    with open(logdir / "probe.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_probe", str(port), str(args.noops),
                                 str(args.interval), str(out)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=logdir, start_new_session=True)
    waiting = []
    try:
        deadline = t0 + args.noops * args.interval + 120
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise BenchError("the NOOP probe did not finish in time")
            if load is not None:
                waiting.append(load.waiting)
                if load.errors:
                    raise BenchError(load.errors[0])
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(15)
    t1 = time.monotonic()
    if proc.returncode != 0 or not out.exists():
        raise BenchError(f"the NOOP probe failed; see {logdir / 'probe.log'}")
    return Probed(what, json.loads(out.read_text()), waiting, (load.accepted if load else 0) - a0,
                  dns.queries() - q0, t1 - t0)


def until_waiting(load: Load, wanted: int, give_up: float) -> None:
    """Wait until ``wanted`` messages wait for their checks at once (or ``give_up`` seconds have passed)."""
    deadline = time.monotonic() + give_up
    while load.waiting < wanted and time.monotonic() < deadline and not load.errors:
        time.sleep(0.01)


def latency(args: argparse.Namespace, batches: list[list[bytes]], dns: DNS, logdir: Path) -> list[Probed]:
    senders = len(batches)
    rows = []
    server = Server(server_spec("noop-off", [], dns.port), args.server_cpu, logdir)
    try:
        warm_up(server.port, batches)
        rows.append(run_probe(server.port, args, logdir, None, dns, "checks off, no other client"))
        with Load(server.port, batches, None) as load:
            until_waiting(load, 1, 10)
            rows.append(run_probe(server.port, args, logdir, load, dns,
                                  f"checks off, {senders} senders at full speed"))
    finally:
        server.stop()
    server = Server(server_spec("noop-all", ["--verify", "all"], dns.port), args.server_cpu, logdir)
    try:
        warm_up(server.port, batches)
        with Load(server.port, batches, None) as load:
            until_waiting(load, 1, 10)
            rows.append(run_probe(server.port, args, logdir, load, dns,
                                  f"all checks, DNS answers at once, {senders} senders at full speed"))
        dns.set_delay(args.dns_delay)
        try:
            with Load(server.port, batches, None) as load:
                until_waiting(load, max(1, senders // 2), 30)
                rows.append(run_probe(server.port, args, logdir, load, dns,
                                      f"all checks, every DNS answer after {args.dns_delay * 1000:.0f} ms, "
                                      f"{senders} senders"))
        finally:
            dns.set_delay(0)
    finally:
        server.stop()
    rows[-1].what += f" ({verdicts(server)})"
    return rows


# ---- reporting --------------------------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    """The machine and the software measured."""
    code = ("import sys, twisted; from importlib.metadata import version as v; "
            "print('Python', sys.version.split()[0] + ', Twisted', twisted.__version__ + ', dkimpy', v('dkimpy')"
            " + ', pyspf', v('pyspf') + ', dmarc', v('dmarc') + ', publicsuffix2', v('publicsuffix2'))")
    software = version(esmtpkit_python(), code)
    head = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "esmtpkit"],
                           capture_output=True, text=True)
    source = (f"checkout {head.stdout.strip()}" if head.returncode == 0 and head.stdout.strip()
              else f"source tree {ROOT} (not a git checkout)")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": str(os.cpu_count()),
        "cpu model": cpu_model(),
        "kernel": platform.release(),
        "esmtpkit": f"{software}; {source}" + (" with changes in esmtpkit/" if dirty.stdout.strip() else ""),
    }


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def throughput_table(results: dict[str, list[Throughput]], senders: int, each: int) -> str:
    base = statistics.median(t.cpu_us for t in results[CONFIGS[0][0]])
    rows = [f"| checks ({senders} senders × {each} messages) | messages/s | server CPU per message | "
            f"× no checks | DNS queries per message |", "|---|---|---|---|---|"]
    for name, _ in CONFIGS:
        samples = results[name]
        rate = statistics.median(t.rate for t in samples)
        cpu = statistics.median(t.cpu_us for t in samples)
        spread = "" if len(samples) < 2 else (f" ({fmt(min(t.rate for t in samples))}–"
                                              f"{fmt(max(t.rate for t in samples))})")
        rows.append(f"| {name} | {fmt(rate)}{spread} | {fmt(cpu)} µs | {cpu / base:.2f} | "
                    f"{statistics.median(t.queries for t in samples):.1f} |")
    return "\n".join(rows)


def latency_table(rows: list[Probed]) -> str:
    out = ["| while | NOOPs | median | p99 | max | messages waiting for their end-of-data reply (median, min–max) "
           "| messages accepted/s | DNS queries/s |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ms = [r * 1000 for r in row.rtts]
        waiting = (f"{statistics.median(row.waiting):.0f} ({min(row.waiting)}–{max(row.waiting)})"
                   if row.waiting else "—")
        out.append(f"| {row.what} | {len(ms)} | {statistics.median(ms):.3f} ms | {percentile(ms, 99):.3f} ms | "
                   f"{max(ms):.3f} ms | {waiting} | {row.accepted / row.seconds:.1f} | "
                   f"{row.queries / row.seconds:.1f} |")
    return "\n".join(out)


# ---- the run ----------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, one run (well under 30 s)")
    parser.add_argument("--runs", type=int, help="throughput runs of every configuration (default 3, 1 with --quick)")
    parser.add_argument("--senders", type=int, default=8, help="concurrent sending connections (default 8)")
    parser.add_argument("--messages", type=int, help="messages per sender and run (default 250, 20 with --quick)")
    parser.add_argument("--dns-delay", type=float, default=0.3, help="seconds every DNS answer waits in part 2 "
                        "(default 0.3)")
    parser.add_argument("--noops", type=int, help="NOOPs per measurement (default 500, 150 with --quick)")
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between NOOPs (default 0.01)")
    parser.add_argument("--server-cpu", default="0", help="core for the servers (taskset -c; default 0)")
    parser.add_argument("--client-cpu", default="1", help="core for this driver, its clients and the DNS server "
                        "(default 1)")
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.messages = args.messages or (20 if args.quick else 250)
    args.noops = args.noops or (150 if args.quick else 500)
    if not 1 <= args.senders <= 200 or not 1 <= args.runs <= 20 or not 1 <= args.messages <= 100000:
        parser.error("--senders 1..200, --runs 1..20, --messages 1..100000")
    if not 10 <= args.noops <= 100000 or not 0 <= args.interval <= 1 or not 0 <= args.dns_delay <= 0.9:
        parser.error("--noops 10..100000, --interval 0..1, --dns-delay 0..0.9 (below the first DNS timeout, 1 s)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_dns"]:
        return serve_dns(argv[1], int(argv[2]))
    if argv[:1] == ["_probe"]:
        return probe(int(argv[1]), int(argv[2]), float(argv[3]), argv[4])
    args = parse_args(argv)
    for tool in ("taskset",):
        if shutil.which(tool) is None:
            print(f"{tool} is missing (util-linux)", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, interrupted)
    with contextlib.suppress(OSError, ValueError):
        os.sched_setaffinity(0, {int(args.client_cpu)})  # the DNS server and the probes inherit it
    started = time.monotonic()
    dns: DNS | None = None
    with workspace("esmtpkit-mailauth-") as (logdir, keep):
        try:
            print("\n".join(f"{k}: {v}" for k, v in versions().items()))
            print(f"command: benchmarks/mailauth.py {' '.join(argv)}".rstrip(), flush=True)
            private, record = make_key()
            dns = DNS(logdir, zones(record))
            batches = signed_messages(private, args.senders, min(args.messages, 50))
            print(f"DNS server pid {dns.proc.pid if dns.proc else '?'} on {HOST}:{dns.port}; "
                  f"{args.senders} × {len(batches[0])} distinct signed messages of {len(batches[0][0])} bytes\n",
                  flush=True)

            results: dict[str, list[Throughput]] = {name: [] for name, _ in CONFIGS}
            for run in range(1, args.runs + 1):
                for name, options in CONFIGS:
                    spec = server_spec(name.replace(" ", "-").lower(), options, dns.port)
                    sample = throughput(spec, batches, args.messages, dns, args.server_cpu, logdir)
                    results[name].append(sample)
                    print(f"run {run} {name:11} {fmt(sample.rate):>6} msg/s  cpu {fmt(sample.cpu_us):>6} µs/msg  "
                          f"dns {sample.queries:.1f}/msg  wall {sample.wall:5.1f} s  verdicts: {sample.verdicts}",
                          flush=True)

            print("\nNOOP round trips on an idle connection ...", flush=True)
            probed = latency(args, batches, dns, logdir)
            for row in probed:
                print(f"  {row.what}: median {statistics.median(row.rtts) * 1000:.3f} ms, "
                      f"p99 {percentile(row.rtts, 99) * 1000:.3f} ms", flush=True)

            print("\n1. Throughput (median of the runs; min–max in brackets)\n")
            print(throughput_table(results, args.senders, args.messages))
            print(f"\n2. NOOP round trip on one more connection, one NOOP every {args.interval * 1000:.0f} ms\n")
            print(latency_table(probed))
            print(f"\n({time.monotonic() - started:.0f} s in all)")
            return 0
        except BenchError as e:
            keep[0] = True
            print(f"failed: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            keep[0] = True
            print("\ninterrupted; stopping servers", file=sys.stderr)
            return 130
        finally:
            Server.stop_all()
            if dns is not None:
                dns.stop()


if __name__ == "__main__":
    sys.exit(main())
