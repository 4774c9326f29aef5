"""Postfix's load generator ``smtp-source`` against a real ``twistd esmtpkit``: every message sent is stored once.

smtp-source speaks HELO (no ESMTP), one transaction per connection unless ``-d``, several sessions in parallel
with ``-s``; it exits non-zero on any reply it did not expect, so exit 0 means every message got its 250.
"""

from __future__ import annotations

import re
import shutil
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest

SMTP_SOURCE = shutil.which("smtp-source", path="/usr/sbin:/usr/bin:/sbin:/bin")

pytestmark = pytest.mark.skipif(SMTP_SOURCE is None,
                                reason="smtp-source is not installed (it comes with apt-get install postfix)")


def smtp_source(server, *options: str) -> list[str]:
    """An smtp-source command line for ``server`` that greets as client.test."""
    return [SMTP_SOURCE or "smtp-source", "-M", "client.test", *options, f"127.0.0.1:{server.port}"]


def test_parallel_sessions(esmtpkit_process, run_client) -> None:
    """Five sessions in parallel, 50 messages of 1000 payload bytes: 50 stored, each whole and distinct."""
    run_client(smtp_source(esmtpkit_process, "-s", "5", "-m", "50", "-l", "1000",
                           "-f", "sender@example.org", "-t", "rcpt@example.org"))
    deliveries = esmtpkit_process.deliveries(50)
    message_ids = set()
    bodies = set()
    for delivery in deliveries:
        assert delivery.return_path == "sender@example.org"
        assert re.match(r"from client\.test \(127\.0\.0\.1 \[127\.0\.0\.1\]\) by mx\.test with SMTP id \S+ "
                        r"for <rcpt@example\.org>; ", delivery.received), delivery.received
        parsed = BytesParser(policy=policy.default).parsebytes(delivery.content)
        assert (str(parsed["From"]), str(parsed["To"])) == ("sender@example.org", "rcpt@example.org")
        message_ids.add(parsed["Message-Id"])
        bodies.add(delivery.content.partition(b"\r\n\r\n")[2])
    assert len(message_ids) == 50
    [body] = bodies  # the same payload in every message: nothing lost or mixed between sessions
    assert len(body) >= 1000
    assert re.fullmatch(rb"(?:\d*X*\r\n)+", body), body[:200]


def test_several_messages_per_connection(esmtpkit_process, run_client) -> None:
    """``-d``: two connections each carry ten transactions of three recipients; 20 stored, no ``for`` clause."""
    ran = run_client(smtp_source(esmtpkit_process, "-d", "-c", "-s", "2", "-m", "20", "-r", "3", "-l", "5000"))
    assert ran.stdout.split()[-1:] == ["20"], ran.stdout  # -c counts every completed DATA, CR between counts
    deliveries = esmtpkit_process.deliveries(20)
    assert all(" for <" not in d.received for d in deliveries)
    assert len({d.content.partition(b"\r\n\r\n")[2] for d in deliveries}) == 1


def test_preformatted_file(esmtpkit_process, run_client, tmp_path: Path) -> None:
    """``-F``: smtp-source sends the file's lines with CRLF, dot-stuffed; each copy is stored exactly."""
    source = tmp_path / "message.txt"
    source.write_bytes(b"Subject: preformatted\nX-Test: yes\n\n.leading dot\n..two\n.\nend\n")
    run_client(smtp_source(esmtpkit_process, "-F", str(source), "-m", "3"))
    # smtp-source puts an empty line between the file and the final "." (checked against a recording peer).
    expected = source.read_bytes().replace(b"\n", b"\r\n") + b"\r\n"
    assert esmtpkit_process.wait_for(3) == [expected] * 3
