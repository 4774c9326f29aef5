"""Real loopback sockets: many concurrent clients, and a graceful stop with a message in flight."""

from __future__ import annotations

import smtplib
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest_twisted
from twisted.application import strports
from twisted.internet import reactor, threads

from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.handlers.maildir import Maildir
from esmtpkit.server.policy import Policy
from esmtpkit.server.service import ESMTPService
from esmtpkit.testing import RecordingHandler, serve


@pytest_twisted.ensureDeferred
async def test_200_concurrent_clients_all_delivered_once() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        maildir = Path(tmp) / "md"
        factory = ESMTPFactory(lambda: Maildir(path=str(maildir)),
                               policy=Policy(hostname="mx.test", max_connections_per_client=300), clock=reactor)
        server = await serve(factory)
        try:
            def send(i: int) -> None:
                with smtplib.SMTP(*server.address, timeout=60) as client:
                    client.sendmail("a@example.org", ["b@example.org"], f"Subject: {i}\r\n\r\nbody {i}\r\n".encode())

            def run_all() -> None:
                with ThreadPoolExecutor(max_workers=50) as pool:
                    list(pool.map(send, range(200)))

            await threads.deferToThread(run_all)
        finally:
            await server.stop()
        files = list((maildir / "new").iterdir())
        subjects = sorted(int(f.read_bytes().split(b"Subject: ")[1].split(b"\r\n")[0]) for f in files)
        assert subjects == list(range(200))
        assert list((maildir / "tmp").iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_graceful_stop_lets_message_in_flight_finish() -> None:
    """stopService closes the listener at once, and the transaction in flight still completes with 250."""
    handlers: list[RecordingHandler] = []

    def make() -> RecordingHandler:
        handlers.append(RecordingHandler())
        return handlers[-1]

    factory = ESMTPFactory(make, policy=Policy(hostname="mx.test"), clock=reactor)
    service = ESMTPService(factory)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    strports.service(f"tcp:{port}:interface=127.0.0.1", factory).setServiceParent(service)
    service.startService()

    sock = await threads.deferToThread(socket.create_connection, ("127.0.0.1", port), 30)
    reader = sock.makefile("rb")

    def begin() -> list[bytes]:
        got = [reader.readline()]
        sock.sendall(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        got += [reader.readline() for _ in range(4 + 8)]
        sock.sendall(b"Subject: x\r\n\r\nfirst half\r\n")
        return got

    lines = await threads.deferToThread(begin)
    assert lines[-1].startswith(b"354")
    stopped = service.stopService()
    await threads.deferToThread(lambda: None)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), 5).close()
        except ConnectionRefusedError:
            return True
        return False

    assert await threads.deferToThread(refused)

    def finish() -> list[bytes]:
        sock.sendall(b"second half\r\n.\r\n")
        out = [reader.readline(), reader.readline(), reader.read()]
        reader.close()
        sock.close()
        return out

    final, bye, rest = await threads.deferToThread(finish)
    assert final.startswith(b"250 2.0.0")
    assert bye == b"421 4.3.2 Service shutting down, try again later\r\n"
    assert rest == b""
    await stopped
    assert handlers[0].messages[0]["body"] == b"first half\r\nsecond half\r\n"
