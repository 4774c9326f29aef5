"""``kill -HUP`` of a real ``twistd esmtpkit``: new sessions get the renewed certificate and password file, sessions
already open finish with what they started with. One process, then a supervisor with two workers.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import ssl
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from .certs import CertFiles, make_tls_files
from .support import Server, Supervised, needs_proc, wait_for

OLD, NEW = "old-Pa55word", "new-Pa55word"
MESSAGE = b"Subject: begun before the reload\r\n\r\nstill delivered\r\n"

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="needs SIGHUP")


@pytest.fixture
def stop_later() -> Iterator[Callable[[Any], Any]]:
    """Stops every server a test registers, whatever happens in the test."""
    servers: list[Any] = []
    yield lambda server: servers.append(server) or server
    for server in servers:
        server.stop()


def _client(port: int, files: CertFiles) -> tuple[smtplib.SMTP, bytes]:
    """An SMTP session after EHLO, STARTTLS (trusting the test authority) and EHLO again; and the server's
    certificate (DER) as the handshake gave it.
    """
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    client.ehlo("client.test")
    code, _ = client.starttls(context=ssl.create_default_context(cafile=str(files.ca)))
    assert code == 220
    client.ehlo("client.test")
    certificate = client.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    assert certificate
    return client, certificate


def _plain_refused(client: smtplib.SMTP, user: str, password: str) -> int:
    """AUTH PLAIN with ``password``; the reply code of the refusal (raises AssertionError if it succeeds)."""
    client.user, client.password = user, password
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        client.auth("PLAIN", client.auth_plain)
    return refused.value.smtp_code


def _log_has(server: Any, *texts: str) -> bool:
    if server.process.poll() is not None:
        raise AssertionError(f"twistd exited: {server.log.read_text()}")
    log = server.log.read_text()
    return all(text in log for text in texts)


def test_sighup_rotates_certificate_and_passwords(tmp_path: Path, stop_later: Callable[[Any], Any]) -> None:
    """Session A (TLS, AUTH, MAIL FROM) stays open across the reload and delivers; session B after it sees the new
    certificate, and only the new password works.
    """
    files = make_tls_files(tmp_path / "tls", common_name="before")
    passwd = tmp_path / "passwd"
    passwd.write_text(f"alice:{OLD}\n")
    maildir = tmp_path / "Maildir"
    server = stop_later(Server(tmp_path, "--tls-cert", str(files.cert), "--tls-key", str(files.key),
                               "--auth", f"file:{passwd}", "--maildir", str(maildir)))

    a, a_certificate = _client(server.port, files)
    assert a_certificate == files.der
    assert a.login("alice", OLD)[0] == 235
    assert a.mail("sender@example.com")[0] == 250

    renewed = make_tls_files(tmp_path / "tls", files.authority, common_name="after")
    assert (renewed.cert, renewed.key) == (files.cert, files.key) and renewed.der != files.der
    passwd.write_text(f"alice:{NEW}\n")

    # Until the signal the files in memory stay in use: the password file is not re-read on every AUTH.
    early, early_certificate = _client(server.port, files)
    assert early_certificate == files.der
    assert early.login("alice", OLD)[0] == 235
    early.quit()

    os.kill(server.process.pid, signal.SIGHUP)
    wait_for(lambda: _log_has(server, f"TLS certificate reloaded from {files.cert}",
                              "AUTH password file reloaded: 1 users"), "the reload events in the log")

    b, b_certificate = _client(server.port, files)
    assert b_certificate == renewed.der
    assert _plain_refused(b, "alice", OLD) == 535
    assert b.login("alice", NEW)[0] == 235
    b.quit()

    assert a.rcpt("rcpt@example.com")[0] == 250
    assert a.data(MESSAGE)[0] == 250
    assert a.sock.getpeercert(binary_form=True) == files.der  # type: ignore[union-attr]
    a.quit()

    [delivered] = list((maildir / "new").iterdir())
    assert delivered.read_bytes().endswith(MESSAGE)
    log = server.log.read_text()
    assert OLD not in log and NEW not in log
    assert server.process.poll() is None


def test_unusable_files_keep_what_is_in_use(tmp_path: Path, stop_later: Callable[[Any], Any]) -> None:
    """A half-written password file and a broken key are logged on SIGHUP; the server goes on as before."""
    files = make_tls_files(tmp_path / "tls")
    passwd = tmp_path / "passwd"
    passwd.write_text(f"alice:{OLD}\n")
    server = stop_later(Server(tmp_path, "--tls-cert", str(files.cert), "--tls-key", str(files.key),
                               "--auth", f"file:{passwd}", "--maildir", str(tmp_path / "Maildir")))
    passwd.write_text(f"alice:{NEW}\nbob")
    files.key.write_bytes(b"-----BEGIN PRIVATE KEY-----\ntruncated")

    os.kill(server.process.pid, signal.SIGHUP)
    wait_for(lambda: _log_has(server, "TLS certificate not reloaded: ",
                              f"AUTH password file not reloaded: {passwd}, line 2: not user:password"),
             "the reload errors in the log")

    client, certificate = _client(server.port, files)
    assert certificate == files.der
    assert _plain_refused(client, "alice", NEW) == 535
    assert client.login("alice", OLD)[0] == 235
    client.quit()
    assert server.process.poll() is None


@needs_proc
def test_sighup_reaches_every_worker(tmp_path: Path, stop_later: Callable[[Any], Any]) -> None:
    """``--workers 2``: SIGHUP to the supervisor makes each worker re-read the password file and the certificate."""
    files = make_tls_files(tmp_path / "tls")
    passwd = tmp_path / "passwd"
    passwd.write_text(f"alice:{OLD}\n")
    server = stop_later(Supervised(tmp_path, 2, "--tls-cert", str(files.cert), "--tls-key", str(files.key),
                                   "--auth", f"file:{passwd}"))
    workers = set(server.started())
    passwd.write_text(f"alice:{NEW}\n")
    renewed = make_tls_files(tmp_path / "tls", files.authority, common_name="renewed")

    os.kill(server.process.pid, signal.SIGHUP)
    for event in ("AUTH password file reloaded: 1 users", f"TLS certificate reloaded from {files.cert}"):
        pattern = rf"\[worker (\d+) [^]]*\] {re.escape(event)}\n"
        wait_for(lambda: len(re.findall(pattern, server.text())) == 2, f"both workers logging {event!r}")
        assert {int(pid) for pid in re.findall(pattern, server.text())} == workers

    def session(_: int) -> tuple[bytes, int, int]:
        client, certificate = _client(server.port, files)
        refused = _plain_refused(client, "alice", OLD)
        accepted = client.login("alice", NEW)[0]
        client.quit()
        return certificate, refused, accepted

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(session, range(8))) == {(renewed.der, 535, 235)}
    assert set(server.started()) == workers
