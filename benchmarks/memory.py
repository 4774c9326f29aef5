#!/usr/bin/env python3
"""Measure how much memory an esmtpkit server gains while a client sends very large things.

Starts ``twistd esmtpkit`` (the twistd beside this interpreter, this checkout on ``PYTHONPATH``) with the Null
handler and no message size limit on a free port of 127.0.0.1, then, on one connection each:

- ``message``: one 100 MiB message streamed in 64 KiB writes (RFC 5321 §4.5.3.1.7 sets no upper bound);
- ``long-line``: one 50 MiB command line without CRLF, then CRLF; one ``500 5.5.2`` is expected
  (RFC 5321 §4.5.3.1.4), and the connection must still answer NOOP with 250.

For each it prints the server's peak RSS growth (VmRSS polled every 20 ms and VmHWM, from /proc/PID/status)
over the RSS just before. It measures, it does not judge: the exit status is 1 only if the server misbehaved.

    /tmp/venv/bin/python benchmarks/memory.py [--message-mib 100] [--line-mib 50]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from run import HOST, MIB, BenchError, Client, RSSPoller, body_block, free_port, memory_kib, reset_peak

ROOT = Path(__file__).resolve().parent.parent
WRITE = 64 * 1024
TIMEOUT = 300.0


def start_server(port: int, log: Path) -> subprocess.Popen[bytes]:
    """Start twistd esmtpkit with the Null handler on 127.0.0.1:port; return once it greets."""
    twistd = Path(sys.executable).parent / "twistd"
    if not twistd.exists():
        raise BenchError(f"no twistd beside {sys.executable}")
    argv = [str(twistd), "-n", "--pidfile=", "esmtpkit", "--handler", "esmtpkit.handlers.null.Null",
            "--listen", f"tcp:{port}:interface={HOST}", "--max-message-size", "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=log.parent, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"twistd exited with {proc.returncode}; see {log}")
        try:
            with socket.create_connection((HOST, port), timeout=2) as s:
                c = Client(s)
                if c.reply(time.monotonic() + 10)[0] != 220:
                    raise BenchError("no 220 greeting")
                c.command(b"QUIT\r\n", 221, time.monotonic() + 10)
                return proc
        except OSError:
            time.sleep(0.1)
    stop_server(proc)
    raise BenchError(f"twistd did not start listening on port {port}; see {log}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server by its own pid: SIGTERM, then SIGKILL after 15 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


def greeted(port: int, deadline: float) -> tuple[socket.socket, Client]:
    """A connection that has read the greeting and said EHLO."""
    s = socket.create_connection((HOST, port), timeout=30)
    c = Client(s)
    if c.reply(deadline)[0] != 220:
        s.close()
        raise BenchError("no 220 greeting")
    c.command(b"EHLO memory.example\r\n", 250, deadline)
    return s, c


def send_message(port: int, size: int) -> None:
    """One message of ``size`` bytes of 64-byte lines in 64 KiB writes; expect 250 after the final dot."""
    deadline = time.monotonic() + TIMEOUT
    block = body_block()
    s, c = greeted(port, deadline)
    with s:
        c.command(b"MAIL FROM:<sender@example.com>\r\n", 250, deadline)
        c.command(b"RCPT TO:<recipient@example.com>\r\n", 250, deadline)
        c.command(b"DATA\r\n", 354, deadline)
        s.sendall(b"Subject: big\r\n\r\n")
        for _ in range(size // len(block)):
            s.sendall(block)
            if time.monotonic() > deadline:
                raise BenchError("timed out sending the message")
        c.command(b".\r\n", 250, deadline)
        c.command(b"QUIT\r\n", 221, deadline)


def send_long_line(port: int, size: int) -> None:
    """A command line of ``size`` bytes, then CRLF: exactly one 500 5.5.2, then NOOP must still get 250."""
    deadline = time.monotonic() + TIMEOUT
    chunk = b"X" * WRITE
    s, c = greeted(port, deadline)
    with s:
        for _ in range(size // WRITE):
            s.sendall(chunk)
            if time.monotonic() > deadline:
                raise BenchError("timed out sending the long line")
        s.sendall(b"\r\n")
        code, lines = c.reply(deadline)
        if code != 500 or not lines[-1].startswith(b"500 5.5.2"):
            raise BenchError(f"long line got {lines[-1][:80]!r}, wanted 500 5.5.2")
        c.command(b"NOOP\r\n", 250, deadline)  # a second reply to the long line would show up here
        c.command(b"QUIT\r\n", 221, deadline)


def peak_growth_kib(pid: int, work: object, *args: int) -> tuple[int, int]:
    """Run ``work(*args)`` and return (RSS before, peak RSS growth during it), in KiB."""
    time.sleep(0.2)
    reset = reset_peak(pid)
    before = memory_kib(pid)["VmRSS"]
    with RSSPoller(pid) as poller:
        work(*args)  # type: ignore[operator]
    after = memory_kib(pid)
    peak = max(poller.peak, after["VmRSS"], after["VmHWM"] if reset else 0)
    return before, peak - before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--message-mib", type=int, default=100, help="size of the message (default 100)")
    parser.add_argument("--line-mib", type=int, default=50, help="length of the command line (default 50)")
    args = parser.parse_args(argv)
    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"esmtpkit-memory-{port}.log"
    proc = start_server(port, log)
    try:
        print(f"server pid {proc.pid} on {HOST}:{port}, RSS {memory_kib(proc.pid)['VmRSS'] / 1024:.1f} MiB")
        cases = [("message", f"one {args.message_mib} MiB message in 64 KiB writes", send_message,
                  args.message_mib * MIB),
                 ("long-line", f"one {args.line_mib} MiB command line without CRLF", send_long_line,
                  args.line_mib * MIB)]
        for key, label, work, size in cases:
            t0 = time.monotonic()
            before, growth = peak_growth_kib(proc.pid, work, port, size)
            print(f"{key:10} {label}: RSS before {before / 1024:.1f} MiB, peak growth "
                  f"{growth / 1024:+.1f} MiB ({growth:+d} KiB), {time.monotonic() - t0:.1f} s", flush=True)
    except BenchError as e:
        print(f"failed: {e}", file=sys.stderr)
        return 1
    finally:
        stop_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
