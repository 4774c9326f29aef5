"""Control characters and forged trace text from a client, against a real ``twistd esmtpkit``: refused in
addresses, escaped in the text and JSON logs, and unable to shape the stored ``Return-Path:``/``Received:``."""

from __future__ import annotations

import base64
import json
import re
import socket
from typing import Callable

from esmtpkit.core.escape import UNSAFE

from .conftest import CLIENT_TIMEOUT, EsmtpkitProcess

#: Clear the screen, form feed, and the separators ``str.splitlines`` breaks on.
ESC = "\x1b[2J\x0c\x1c\x1d\x1e"
#: A legal quoted local part that reads like the end of a Received: field, a date and our own comment.
FORGED = '"x; Tue, 1 Jan 2030 00:00:00 +0000 (authenticated as root)"@evil.test'


class Client:
    """One lock-step SMTP connection from ``source`` that sends any bytes and reads each whole reply."""

    def __init__(self, address: tuple[str, int], source: str) -> None:
        self.sock = socket.create_connection(address, timeout=CLIENT_TIMEOUT, source_address=(source, 0))
        self.file = self.sock.makefile("rb")
        self.read()

    def read(self) -> str:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise AssertionError(f"connection closed after {lines}")
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    def send(self, line: str | bytes) -> str:
        self.sock.sendall((line.encode("utf-8") if isinstance(line, str) else line) + b"\r\n")
        return self.read()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def hostile_session(server: EsmtpkitProcess) -> None:
    """A session that puts control characters everywhere a client can, and delivers one message."""
    client = Client(server.address, "127.0.0.5")
    try:
        assert client.send(f"EHLO evil{ESC}.example").startswith("250")
        plain = base64.b64encode(f"\0al{ESC}ice\u2028\0wrong".encode()).decode()
        assert client.send(f"AUTH PLAIN {plain}").startswith("535")
        assert client.send(f"MAIL FROM:<x{ESC}@example.com>").startswith("501 5.1.7 ")
        assert client.send(f"MAIL FROM:<{FORGED}> SMTPUTF8").startswith("250")
        for path in (f"x{ESC}@example.com", "y\u2028Received: forged@example.com", '"a\u0085"@example.com',
                     "moc.elpmaxe@\u202ex"):
            reply = client.send(f"RCPT TO:<{path}>")
            assert re.fullmatch(r"501 5\.1\.3 Bad address syntax: character U\+[0-9A-F]{4} not allowed in an address",
                                reply), reply
        assert client.send(f"RCPT TO:<{FORGED}>").startswith("250")
        assert client.send(f"{ESC}\u2028 unknown").startswith("500")
        assert client.send("DATA").startswith("354")
        assert client.send(b"Subject: hostile\r\n\r\nbody\r\n.").startswith("250")
        assert client.send("QUIT").startswith("221")
    finally:
        client.close()


def check_stored(server: EsmtpkitProcess) -> None:
    """The sender is exact and one angle-addr; ``for`` is left out; the only ``;`` is the one before the date."""
    [delivery] = server.deliveries(1)
    assert delivery.return_path == FORGED
    assert delivery.trace.startswith(f"Return-Path: <{FORGED}>\r\n".encode())
    assert " for " not in delivery.received and "authenticated as root" not in delivery.received
    assert delivery.received.count(";") == 1, delivery.received
    assert re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", delivery.trace) is None


def test_text_log(start_esmtpkit: Callable[..., EsmtpkitProcess]) -> None:
    """twistd's text log: every line as written, no control byte but the newline, the hostile text visible."""
    server = start_esmtpkit("--auth", "memory:alice:secret", "--auth-over-plaintext")
    hostile_session(server)
    check_stored(server)
    server.stop()
    raw = server.log.read_bytes()
    assert re.search(rb"[\x00-\x09\x0b-\x1f\x7f]", raw) is None
    text = raw.decode("utf-8")
    assert [line for line in text.split("\n") if UNSAFE.search(line)] == []
    assert len(text.splitlines()) == text.count("\n")  # no other character a reader would take for a line end
    assert "AUTH PLAIN failed for al\\x1b[2J\\x0c\\x1c\\x1d\\x1eice\\u2028: 535" in text
    assert "MAIL answered 501 5.1.7 Bad address syntax: character U+001B not allowed in an address" in text


def test_json_log(start_esmtpkit: Callable[..., EsmtpkitProcess]) -> None:
    """``--log-format json``: decoded, no value holds a control character; the escaped text is there."""
    server = start_esmtpkit("--auth", "memory:alice:secret", "--auth-over-plaintext", "--log-format", "json")
    hostile_session(server)
    check_stored(server)
    server.stop()
    events = [json.loads(line) for line in server.log.read_text("utf-8").splitlines() if line.strip()]

    def strings(value: object) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, dict):
            return [s for k, v in value.items() for s in [k, *strings(v)]]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return []

    assert [s for event in events for s in strings(event) if UNSAFE.search(s)] == []
    [failed] = [e for e in events if e.get("event") == "auth.failed"]
    assert failed["user"] == "al\\x1b[2J\\x0c\\x1c\\x1d\\x1eice\\u2028"
    [accepted] = [e for e in events if e.get("event") == "message.accepted"]
    assert accepted["sender"] == FORGED
