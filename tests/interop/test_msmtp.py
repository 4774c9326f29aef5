"""msmtp against a real ``twistd esmtpkit``, configured by a file in the test's temporary directory.

msmtp turns LF into CRLF, dot-stuffs, drops Bcc: lines (``-t``) and adds From:/Date:/Message-ID: only when the
message lacks them, so a complete message is stored exactly as written, minus its Bcc: line.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

MSMTP = shutil.which("msmtp")

pytestmark = pytest.mark.skipif(MSMTP is None, reason="msmtp is not installed (apt-get install msmtp)")


def configure(server, tmp_path: Path) -> Path:
    """An msmtp configuration for ``server``: plain SMTP, no AUTH, no TLS, EHLO client.test, a log file."""
    config = tmp_path / "msmtprc"
    config.write_text(
        "defaults\n"
        f"logfile {tmp_path / 'msmtp.log'}\n"
        "account esmtpkit\n"
        "host 127.0.0.1\n"
        f"port {server.port}\n"
        "auth off\n"
        "tls off\n"
        "domain client.test\n"
        "from config@example.org\n"
        "account default : esmtpkit\n")
    config.chmod(0o600)
    return config


HEADERS = (b"From: Author <author@example.org>\nTo: bob@example.net\nCc: carol@example.net\n"
           b"Bcc: hidden@example.org\nSubject: msmtp\nDate: Mon, 23 Nov 2026 10:00:00 +0000\n"
           b"Message-ID: <msmtp-1@example.org>\n")
BODY = b"\n.leading dot\n..two\n.\nlast line\n"


def test_recipients_from_headers(esmtpkit_process, run_client, tmp_path: Path) -> None:
    """``-t --read-envelope-from``: envelope from the headers, Bcc: removed, everything else stored exactly."""
    config = configure(esmtpkit_process, tmp_path)
    run_client([MSMTP or "msmtp", "-C", str(config), "--read-envelope-from", "-t"], input=HEADERS + BODY)
    [delivery] = esmtpkit_process.deliveries(1)
    expected = (HEADERS.replace(b"Bcc: hidden@example.org\n", b"") + BODY).replace(b"\n", b"\r\n")
    assert delivery.content == expected
    assert delivery.return_path == "author@example.org"
    assert re.match(r"from client\.test \(127\.0\.0\.1 \[127\.0\.0\.1\]\) by mx\.test with ESMTP id \S+; ",
                    delivery.received), delivery.received
    log = (tmp_path / "msmtp.log").read_text()
    assert "recipients=bob@example.net,carol@example.net,hidden@example.org" in log, log
    assert "smtpstatus=250" in log, log


def test_explicit_recipient(esmtpkit_process, run_client, tmp_path: Path) -> None:
    """``-f`` and a recipient on the command line; msmtp adds the headers the message lacks, in front."""
    config = configure(esmtpkit_process, tmp_path)
    message = b"Subject: bare\n" + BODY
    run_client([MSMTP or "msmtp", "-C", str(config), "-f", "envelope@example.org", "bob@example.net"],
               input=message)
    [delivery] = esmtpkit_process.deliveries(1)
    assert delivery.return_path == "envelope@example.org"
    assert " for <bob@example.net>; " in delivery.received
    assert delivery.content.endswith(message.replace(b"\n", b"\r\n"))
    added = delivery.content[:-len(message.replace(b"\n", b"\r\n"))]
    assert re.fullmatch(rb"From: envelope@example\.org\r\nDate: [^\r\n]+\r\nMessage-ID: <[^\r\n]+>\r\n", added), added
