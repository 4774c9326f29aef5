"""The installed ``twistd esmtpkit``: run as a real process from a temporary directory, not from the checkout."""

from __future__ import annotations

import mailbox
import re
import smtplib
import subprocess
import time
from pathlib import Path

from .support import TWISTD_N, Server, _clean_env


def test_twistd_help_lists_plugin(tmp_path: Path) -> None:
    """`twistd --help` run outside the checkout lists esmtpkit (the plugin was installed)."""
    out = subprocess.run(TWISTD_N + ["--help"], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^\s+esmtpkit\s", out.stdout, re.M), out.stdout


def test_bad_handler_exits_2(tmp_path: Path) -> None:
    """A handler that cannot be imported is a usage error: one line naming it and a hint, on stderr; exit status 2."""
    out = subprocess.run(TWISTD_N + ["-n", "--pidfile=", "esmtpkit", "--handler", "nowhere.Nothing"], cwd=tmp_path,
                         env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stdout == ""
    error, hint = out.stderr.splitlines()
    assert error.startswith("twistd esmtpkit: --handler nowhere.Nothing: cannot import it: ")
    assert hint == "see twistd esmtpkit --help"


MESSAGES = [
    b"From: a@example.com\r\nTo: b@example.com\r\nSubject: one\r\n\r\nplain body\r\n",
    b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\n .space\r\nend\r\n",
    "Subject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    "Grüße aus Köln, ½ € ✓\r\n".encode("utf-8"),
]


def test_maildir_delivery_end_to_end(workdir: Path) -> None:
    """smtplib sends three messages; each lands in new/ byte-exact after the added trace headers."""
    maildir = workdir / "Maildir"
    server = Server(workdir, "--maildir", str(maildir))
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
            code, _ = client.ehlo("client.test")
            assert code == 250
            for i, message in enumerate(MESSAGES):
                refused = client.sendmail(f"sender{i}@example.com", ["rcpt@example.com"], message)
                assert refused == {}
    finally:
        server.stop()
    files = sorted((maildir / "new").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert len(files) == 3
    assert list((maildir / "tmp").iterdir()) == []
    bodies = sorted(f.read_bytes() for f in files)
    for message in MESSAGES:
        matching = [b for b in bodies if b.endswith(message)]
        assert len(matching) == 1, message
        trace = matching[0][: -len(message)]
        assert trace.startswith(b"Return-Path: <sender"), trace
        assert b"Received: from client.test" in trace
        assert b"by mx.test" in trace
    assert len(mailbox.Maildir(str(maildir), create=False)) == 3


def test_connection_cut_mid_data_leaves_nothing(workdir: Path) -> None:
    """A client that disappears in the middle of DATA leaves tmp/ and new/ empty."""
    import socket

    maildir = workdir / "Maildir"
    server = Server(workdir, "--maildir", str(maildir))
    try:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        sock.sendall(b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        for expected in (b"250", b"250", b"250", b"354"):
            assert reader.readline().startswith(expected)
        sock.sendall(b"Subject: cut\r\n\r\n" + b"x" * 100000)
        time.sleep(0.2)
        reader.close()  # the file object holds the socket open too
        sock.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and list((maildir / "tmp").iterdir()):
            time.sleep(0.05)
        # A second, complete message proves the server is still fine.
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
            client.sendmail("a@example.com", ["b@example.com"], b"Subject: ok\r\n\r\nfine\r\n")
    finally:
        server.stop()
    assert list((maildir / "tmp").iterdir()) == []
    delivered = list((maildir / "new").iterdir())
    assert len(delivered) == 1
    assert delivered[0].read_bytes().endswith(b"Subject: ok\r\n\r\nfine\r\n")
