"""swaks against a real ``twistd esmtpkit``: its default message, --data from a file, --pipeline, --attach,
a --body with dot lines, and STARTTLS/AUTH; the Maildir is compared byte for byte where swaks' output is ours.
"""

from __future__ import annotations

import re
import shutil
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest

SWAKS = shutil.which("swaks")

pytestmark = pytest.mark.skipif(SWAKS is None, reason="swaks is not installed (apt-get install swaks)")


def swaks(server, *options: str) -> list[str]:
    """A swaks command line for ``server`` that greets as client.test and reads no configuration file."""
    return [SWAKS or "swaks", "--server", "127.0.0.1", "--port", str(server.port), "--ehlo", "client.test",
            "--from", "alice@example.org", *options]


def test_default_message(esmtpkit_process, run_client) -> None:
    """swaks' own test message: its headers and body are stored with CRLF line ends, the trace says ESMTP."""
    run_client(swaks(esmtpkit_process, "--to", "bob@example.net"))
    [delivery] = esmtpkit_process.deliveries(1)
    content = delivery.content
    assert b"\n" not in content.replace(b"\r\n", b""), content
    parsed = BytesParser(policy=policy.default).parsebytes(content)
    assert (parsed["From"], parsed["To"]) == ("alice@example.org", "bob@example.net")
    assert parsed["Subject"].startswith("test ") and parsed["Message-Id"] and parsed["Date"]
    assert parsed["X-Mailer"].startswith("swaks ")
    assert parsed.get_payload().strip() == "This is a test mailing"
    assert delivery.return_path == "alice@example.org"
    assert re.match(r"from client\.test \(127\.0\.0\.1 \[127\.0\.0\.1\]\) by mx\.test with ESMTP id \S+ "
                    r"for <bob@example\.net>; ", delivery.received), delivery.received


# LF line ends and no final newline: swaks turns every LF into CRLF, dot-stuffs, and ends with CRLF "." CRLF.
DATA = (b"From: Alice <alice@example.org>\nTo: bob@example.net\nSubject: from a file\n"
        b"Message-ID: <data-file@example.org>\n\n.a leading dot\n..two dots\n.\nmiddle\n\n \nlast line")


def test_data_from_file(esmtpkit_process, run_client, tmp_path: Path) -> None:
    """``--data @file``: the whole message is ours, so the stored bytes are known exactly."""
    source = tmp_path / "message.txt"
    source.write_bytes(DATA)
    run_client(swaks(esmtpkit_process, "--to", "bob@example.net", "--data", f"@{source}"))
    assert esmtpkit_process.wait_for(1) == [DATA.replace(b"\n", b"\r\n") + b"\r\n"]


def test_pipeline(esmtpkit_process, run_client, tmp_path: Path) -> None:
    """``--pipeline`` with three recipients: MAIL, RCPTs and DATA go out in one batch (RFC 2920) and all succeed."""
    source = tmp_path / "message.txt"
    source.write_bytes(DATA)
    ran = run_client(swaks(esmtpkit_process, "--to", "bob@example.net,carol@example.net,dave@example.org",
                           "--pipeline", "--data", f"@{source}"))
    batch = (" -> MAIL FROM:<alice@example.org>\n -> RCPT TO:<bob@example.net>\n -> RCPT TO:<carol@example.net>\n"
             " -> RCPT TO:<dave@example.org>\n -> DATA\n<-  250 ")
    assert batch in ran.stdout, ran.stdout
    [delivery] = esmtpkit_process.deliveries(1)
    assert delivery.content == DATA.replace(b"\n", b"\r\n") + b"\r\n"
    assert " for <" not in delivery.received


def test_attach_binary_file(esmtpkit_process, run_client, tmp_path: Path) -> None:
    """``--attach``: the base64 MIME part decodes to the file, every byte value and CR/LF/dot included."""
    blob = bytes(range(256)) * 8 + b"\r\n.\r\n\n.\r\x00" + bytes(range(255, -1, -1)) * 4
    attachment = tmp_path / "blob.bin"
    attachment.write_bytes(blob)
    run_client(swaks(esmtpkit_process, "--to", "bob@example.net", "--body", "see the attachment",
                     "--attach", f"@{attachment}"))
    [content] = esmtpkit_process.wait_for(1)
    parsed = BytesParser(policy=policy.default).parsebytes(content)
    assert parsed.get_content_type() == "multipart/mixed"
    parts = {part.get_filename(): part for part in parsed.iter_attachments()}
    assert list(parts) == ["blob.bin"]
    assert parts["blob.bin"]["Content-Transfer-Encoding"].lower() == "base64"
    assert parts["blob.bin"].get_payload(decode=True) == blob
    [text] = [p for p in parsed.walk() if p.get_content_type() == "text/plain"]
    assert text.get_content().strip() == "see the attachment"


def test_body_with_dot_lines(esmtpkit_process, run_client) -> None:
    """A ``--body`` whose lines start with dots (one is a lone dot) comes back unstuffed, line for line."""
    body_lines = [".one", "..two", ".", "...", ". space", "last"]
    run_client(swaks(esmtpkit_process, "--to", "bob@example.net", "--body", "\n".join(body_lines)))
    [content] = esmtpkit_process.wait_for(1)
    headers, sep, body = content.partition(b"\r\n\r\n")
    assert sep, content
    expected = "".join(line + "\r\n" for line in body_lines).encode()
    # swaks ends its template with empty lines after the body; nothing else may follow.
    assert body.startswith(expected), body
    assert body[len(expected):].strip(b"\r\n") == b"", body


def test_tls(secured_server, run_client) -> None:
    """``--tls`` with the certificate checked against the test CA: the trace says ESMTPS and names TLS 1.2/1.3."""
    server = secured_server.server
    ran = run_client(swaks(server, "--to", "bob@example.net", "--tls", "--tls-verify",
                           "--tls-ca-path", str(secured_server.ca)))
    assert "=== TLS started with cipher" in ran.stdout, ran.stdout
    [delivery] = server.deliveries(1)
    assert re.search(r" with ESMTPS\b", delivery.received), delivery.received
    assert re.search(r"TLSv1\.[23]", delivery.received), delivery.received
    assert BytesParser(policy=policy.default).parsebytes(delivery.content).get_payload().strip() == \
        "This is a test mailing"


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_tls_auth(secured_server, run_client, mechanism: str) -> None:
    """``--tls --auth PLAIN|LOGIN``: authentication succeeds (235) and the trace says ESMTPSA."""
    server = secured_server.server
    ran = run_client(swaks(server, "--to", "bob@example.net", "--tls", "--tls-verify",
                           "--tls-ca-path", str(secured_server.ca), "--auth", mechanism,
                           "--auth-user", secured_server.user, "--auth-password", secured_server.password))
    assert re.search(r"(?m)^<~  235 ", ran.stdout), ran.stdout
    [delivery] = server.deliveries(1)
    assert re.search(r" with ESMTPSA\b", delivery.received), delivery.received


def test_auth_wrong_password(secured_server, run_client) -> None:
    """A wrong password: swaks fails with the server's 535 and nothing is stored."""
    server = secured_server.server
    ran = run_client(swaks(server, "--to", "bob@example.net", "--tls", "--tls-verify",
                           "--tls-ca-path", str(secured_server.ca), "--auth", "PLAIN",
                           "--auth-user", secured_server.user, "--auth-password", "wrong"), check=False)
    assert ran.returncode != 0
    assert re.search(r"(?m)^<~\* 535 ", ran.stdout), ran.stdout
    assert server.stored() == []
