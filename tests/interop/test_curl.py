"""curl's smtp:// upload against a real ``twistd esmtpkit``: files stored byte for byte, bare LF refused.

curl sends the file as it is, dot-stuffed, ending it with CRLF when it does not already; ``--crlf`` turns LF
into CRLF first. A file with bare LF line ends, sent without ``--crlf``, must be refused after the final dot
(550 5.5.2, the default ``--bare-newline reject``) and nothing may be stored.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

CURL = shutil.which("curl")

pytestmark = pytest.mark.skipif(CURL is None, reason="curl is not installed (apt-get install curl)")


def upload(server, source: Path, *options: str, recipients: tuple[str, ...] = ("bob@example.net",)) -> list[str]:
    """A curl command uploading ``source``; the URL path is the EHLO name (client.test)."""
    argv = [CURL or "curl", "-q", "--silent", "--show-error", "--verbose",
            f"smtp://127.0.0.1:{server.port}/client.test", "--mail-from", "alice@example.org"]
    for recipient in recipients:
        argv += ["--mail-rcpt", recipient]
    return argv + ["--upload-file", str(source), *options]


CRLF_MESSAGE = (b"From: alice@example.org\r\nTo: bob@example.net, carol@example.net\r\nSubject: curl\r\n\r\n"
                b".leading dot\r\n..two\r\n.\r\nlast line\r\n")


def test_upload_crlf_file(esmtpkit_process, run_client, tmp_path: Path) -> None:
    """A CRLF file with dot lines, two recipients: stored exactly; EHLO name from the URL; no ``for`` clause."""
    source = tmp_path / "message.eml"
    source.write_bytes(CRLF_MESSAGE)
    run_client(upload(esmtpkit_process, source, recipients=("bob@example.net", "carol@example.net")))
    [delivery] = esmtpkit_process.deliveries(1)
    assert delivery.content == CRLF_MESSAGE
    assert delivery.return_path == "alice@example.org"
    assert re.match(r"from client\.test \(127\.0\.0\.1 \[127\.0\.0\.1\]\) by mx\.test with ESMTP id \S+; ",
                    delivery.received), delivery.received


def test_upload_without_final_newline(esmtpkit_process, run_client, tmp_path: Path) -> None:
    """curl ends a file that lacks a final CRLF with one; nothing else changes."""
    source = tmp_path / "message.eml"
    source.write_bytes(b"Subject: no final newline\r\n\r\nlast line, no CRLF")
    run_client(upload(esmtpkit_process, source))
    assert esmtpkit_process.wait_for(1) == [source.read_bytes() + b"\r\n"]


def test_upload_lf_file_with_crlf_option(esmtpkit_process, run_client, tmp_path: Path) -> None:
    """``--crlf``: an LF file (with dot lines) is stored with CRLF line ends and nothing else changed."""
    source = tmp_path / "message.eml"
    source.write_bytes(CRLF_MESSAGE.replace(b"\r\n", b"\n"))
    run_client(upload(esmtpkit_process, source, "--crlf"))
    assert esmtpkit_process.wait_for(1) == [CRLF_MESSAGE]


def test_upload_lf_file_is_refused(esmtpkit_process, run_client, tmp_path: Path) -> None:
    """Bare LF without ``--crlf``: "\\n.\\n" does not end the data; the message is refused whole; the server goes on."""
    source = tmp_path / "message.eml"
    source.write_bytes(CRLF_MESSAGE.replace(b"\r\n", b"\n"))
    ran = run_client(upload(esmtpkit_process, source), check=False)
    assert ran.returncode != 0
    assert re.search(r"(?m)^< 550 5\.5\.2 ", ran.stderr), ran.stderr
    assert esmtpkit_process.stored() == []
    # The same file with --crlf on a new connection goes through.
    run_client(upload(esmtpkit_process, source, "--crlf"))
    assert esmtpkit_process.wait_for(1) == [CRLF_MESSAGE]
