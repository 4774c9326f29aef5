"""Password guessing against a real ``twistd esmtpkit`` on loopback: the failures of one client address, over
several connections, start its cool-off; another address (127.0.0.3 beside 127.0.0.2) is not concerned."""

from __future__ import annotations

import base64
import smtplib
from pathlib import Path

from .support import Twistd

#: A bound for each exchange, so a hang fails the test; the delays held here are a fraction of a second.
TIMEOUT = 60


def auth_plain(source: str, port: int, user: str, password: str) -> tuple[int, bytes]:
    """One connection from ``source``: EHLO, one AUTH PLAIN, QUIT; the AUTH reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT, source_address=(source, 0)) as client:
        client.ehlo("client.test")
        return client.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode())


def test_failures_counted_per_client_address_across_connections(tmp_path: Path) -> None:
    server = Twistd(tmp_path, "--handler", "esmtpkit.handlers.null.Null", "--hostname", "mx.test",
                    "--auth", "memory:alice:secret", "--auth-over-plaintext", "--auth-failure-limit", "3",
                    "--auth-delay-after", "1", "--auth-failure-delay", "0.05")
    try:
        for guess in ("one", "two", "three"):  # the second and third are answered late: held, not refused
            assert auth_plain("127.0.0.2", server.port, "alice", guess)[0] == 535
        # A new connection from 127.0.0.2 is refused before its password is judged, even the right one.
        assert auth_plain("127.0.0.2", server.port, "alice", "secret") == \
            (454, b"4.7.0 Too many failed authentications, try again later")
        # 127.0.0.3 has its own count: its wrong guess is judged, its right password accepted.
        assert auth_plain("127.0.0.3", server.port, "alice", "guess")[0] == 535
        assert auth_plain("127.0.0.3", server.port, "alice", "secret")[0] == 235
        log = server.log_text()
        assert log.count("AUTH failure limit of this address reached") == 1
        assert "from 127.0.0.2: AUTH failure limit of this address reached (user alice): AUTH refused for 300.0s" \
            in log
    finally:
        server.stop()
