"""Clients that never read their replies, against a real ``twistd esmtpkit``: memory stays bounded, and the
junk-command limit closes a pipelined flood (different 127.0.0.x source addresses stand for different clients)."""

from __future__ import annotations

import select
import smtplib
import socket
import time
from typing import Callable

from .conftest import CLIENT_TIMEOUT, EsmtpkitProcess

MiB = 1024 * 1024


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid`` in KiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc status")


def non_reading_client(address: tuple[str, int], source: str) -> socket.socket:
    """A connection from ``source`` with a small receive buffer, as a client that reads nothing keeps it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((source, 0))
    sock.connect(address)
    sock.setblocking(False)
    return sock


def pipeline(sock: socket.socket, line: bytes, total: int, stall: float = 2.0) -> tuple[int, str]:
    """Send ``line`` repeatedly, up to ``total`` bytes, never reading; stop when the server takes nothing more
    for ``stall`` seconds or closes. Returns the bytes sent and how it ended (sent, stalled or closed)."""
    block = line * (65536 // len(line))
    sent = 0
    deadline = time.monotonic() + CLIENT_TIMEOUT
    while sent < total and time.monotonic() < deadline:
        try:
            sent += sock.send(block)
            continue
        except BlockingIOError:
            pass
        except OSError:
            return sent, "closed"
        _, writable, _ = select.select([], [sock], [], stall)
        if not writable:
            return sent, "stalled"
    return sent, "sent"


def warm_up(server: EsmtpkitProcess) -> None:
    with smtplib.SMTP(*server.address, timeout=CLIENT_TIMEOUT) as client:
        client.ehlo("warm.test")
        client.noop()


def test_clients_that_never_read_cost_bounded_memory(start_esmtpkit: Callable[..., EsmtpkitProcess]) -> None:
    """With the junk-command limit off, only backpressure protects the server: three clients pipelining 4 MB of
    ``EHLO x`` each (every line asks for a 250-byte reply) and reading nothing. Unbounded, the replies would
    take hundreds of MiB; the server must stop reading instead."""
    server = start_esmtpkit("--junk-command-limit", "0", "--error-limit", "0")
    warm_up(server)
    before = rss_kib(server.process.pid)
    clients = [non_reading_client(server.address, f"127.0.0.{2 + i}") for i in range(3)]
    try:
        outcomes = [pipeline(sock, b"EHLO x\r\n", 4 * MiB) for sock in clients]
        grown = max(rss_kib(server.process.pid) for _ in range(5) if time.sleep(0.1) is None) - before
        assert all(how == "stalled" for _, how in outcomes), outcomes
        assert grown < 24 * 1024, f"server RSS grew by {grown} KiB for {outcomes}"
        warm_up(server)  # the server still serves others
    finally:
        for sock in clients:
            sock.close()


def test_pipelined_flood_is_closed(start_esmtpkit: Callable[..., EsmtpkitProcess]) -> None:
    """With the defaults, a flood of NOOP or EHLO that is never read ends with the server closing the connection."""
    server = start_esmtpkit()
    for source, line in (("127.0.0.2", b"NOOP\r\n"), ("127.0.0.3", b"EHLO x\r\n")):
        sock = non_reading_client(server.address, source)
        try:
            sent, how = pipeline(sock, line, 64 * MiB, stall=CLIENT_TIMEOUT)
            assert how == "closed", (line, sent, how)
        finally:
            sock.close()
    warm_up(server)
