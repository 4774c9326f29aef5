"""Real TLS on 127.0.0.1 with certificates made in the test: smtplib's starttls() and login(), the STARTTLS
injection case on a real socket, implicit TLS (RFC 8314) with smtplib.SMTP_SSL, and the same through a real
``twistd esmtpkit`` process (``--tls-cert``, ``--auth``, an ``ssl:`` listener without a key, ``kill -HUP``).
"""

from __future__ import annotations

import re
import signal
import smtplib
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import threads

from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.core.trace import received_header
from esmtpkit.server.policy import Policy
from esmtpkit.server.sasl import portal_from_strings
from esmtpkit.testing import RecordingHandler, serve
from esmtpkit.server.tls import ServerTLS

from .certs import CertFiles, make_tls_files, serve_implicit_tls
from .support import Server

MESSAGE = b"Subject: over TLS\r\n\r\nsecret body\r\n"


def _factory(handlers: list[RecordingHandler], **policy: Any) -> ESMTPFactory:
    def make() -> RecordingHandler:
        handlers.append(RecordingHandler())
        return handlers[-1]

    from twisted.internet import reactor

    return ESMTPFactory(make, policy=Policy(hostname="mx.test", **policy), clock=reactor)


def _context(files: CertFiles) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(files.ca))


@pytest_twisted.inlineCallbacks
def test_starttls_and_login(tmp_path: Path) -> Any:
    """smtplib: EHLO offers STARTTLS and no AUTH; after starttls() AUTH is offered and login() works."""
    files = make_tls_files(tmp_path)
    handlers: list[RecordingHandler] = []
    server = yield serve(_factory(handlers, tls_context=ServerTLS(files.cert, files.key),
                                  portal=portal_from_strings(["memory:alice:secret"])))

    def client() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            seen["before"] = dict(smtp.esmtp_features)
            seen["starttls"] = smtp.starttls(context=_context(files))
            seen["cipher"] = smtp.sock.cipher()
            smtp.ehlo("client.test")
            seen["after"] = dict(smtp.esmtp_features)
            seen["login"] = smtp.login("alice", "secret")
            seen["refused"] = smtp.sendmail("a@example.org", ["b@example.org"], MESSAGE)
        return seen

    try:
        seen = yield threads.deferToThread(client)
    finally:
        yield server.stop()
    assert "starttls" in seen["before"] and "auth" not in seen["before"]
    assert seen["starttls"] == (220, b"2.0.0 Ready to start TLS")
    assert "starttls" not in seen["after"] and seen["after"]["auth"].split() == ["PLAIN", "LOGIN", "CRAM-MD5"]
    assert seen["login"] == (235, b"2.7.0 Authentication successful")
    assert seen["refused"] == {}
    [handler] = handlers
    session = handler.session
    assert session is not None
    assert (session.tls, session.authenticated, session.with_protocol) == (True, "alice", "ESMTPSA")
    cipher, version, bits = seen["cipher"]
    assert session.tls_info == {"version": version, "cipher": cipher, "bits": str(bits)}
    assert handler.messages[0]["body"] == b"secret body\r\n"
    header = received_header(session, id="X", timestamp=0).decode()
    assert f"with ESMTPSA (using {version} with cipher {cipher})" in header.replace("\r\n\t", " ")


@pytest_twisted.inlineCallbacks
def test_injected_plaintext_is_not_run(tmp_path: Path) -> Any:
    """STARTTLS and NOOP in one packet on a real socket: after the handshake the first reply is EHLO's."""
    files = make_tls_files(tmp_path)
    handlers: list[RecordingHandler] = []
    server = yield serve(_factory(handlers, tls_context=ServerTLS(files.cert, files.key)))

    def client() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
            reader = raw.makefile("rb")
            lines = [reader.readline()]
            raw.sendall(b"EHLO client.test\r\n")
            while not lines[-1].startswith(b"250 "):
                lines.append(reader.readline())
            raw.sendall(b"STARTTLS\r\nNOOP\r\n")
            lines.append(reader.readline())
            with _context(files).wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"EHLO client.test\r\nQUIT\r\n")
                tls_reader = tls.makefile("rb")
                lines.append(b"--")
                while True:
                    line = tls_reader.readline()
                    if not line:
                        break
                    lines.append(line)
            reader.close()
        return lines

    try:
        lines = yield threads.deferToThread(client)
    finally:
        yield server.stop()
    after = lines[lines.index(b"--") + 1:]
    assert lines[lines.index(b"--") - 1] == b"220 2.0.0 Ready to start TLS\r\n"
    assert after[0] == b"250-mx.test client.test, pleased to meet you\r\n"
    assert after[-1] == b"221 2.0.0 Closing connection\r\n"
    assert not any(line.startswith(b"250 OK") or line.startswith(b"250 2.0.0 OK") for line in after)
    assert handlers[0].verbs == ["connect", "ehlo", "ehlo", "quit"]


@pytest_twisted.inlineCallbacks
def test_implicit_tls_with_smtp_ssl(tmp_path: Path) -> Any:
    """Implicit TLS (RFC 8314): TLS from the first byte, no STARTTLS, AUTH offered."""
    files = make_tls_files(tmp_path)
    handlers: list[RecordingHandler] = []
    server = yield serve_implicit_tls(_factory(handlers, portal=portal_from_strings(["memory:alice:secret"]),
                                               require_tls=True), files.cert, files.key)

    def client() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with smtplib.SMTP_SSL("127.0.0.1", server.port, timeout=30, context=_context(files)) as smtp:
            seen["ehlo"] = smtp.ehlo("client.test")[0]
            seen["features"] = dict(smtp.esmtp_features)
            seen["login"] = smtp.login("alice", "secret")[0]
            seen["refused"] = smtp.sendmail("a@example.org", ["b@example.org"], MESSAGE)
            seen["version"] = smtp.sock.version()
        return seen

    try:
        seen = yield threads.deferToThread(client)
    finally:
        yield server.stop()
    assert (seen["ehlo"], seen["login"], seen["refused"]) == (250, 235, {})
    assert "starttls" not in seen["features"] and seen["features"]["auth"].split() == ["PLAIN", "LOGIN", "CRAM-MD5"]
    session = handlers[0].session
    assert session is not None and session.tls and session.tls_info["version"] == seen["version"]
    assert handlers[0].messages[0]["body"] == b"secret body\r\n"


def _ports(server: Server, count: int) -> list[int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ports = [int(p) for p in re.findall(r"starting on (\d+)", server.log.read_text())]
        if len(ports) >= count:
            return ports
        time.sleep(0.05)
    raise AssertionError("twistd did not start every listener")


def test_twistd_tls_auth_and_reload(workdir: Path) -> None:
    """``twistd esmtpkit --tls-cert … --auth memory:…`` with an ``ssl:`` listener: STARTTLS + login on the TCP
    port, SMTP_SSL on the other; after new files and ``kill -HUP`` a new connection gets the new certificate.
    """
    files = make_tls_files(workdir / "tls")
    server = Server(workdir, "--handler", "esmtpkit.handlers.null.Null", "--tls-cert", str(files.cert),
                    "--tls-key", str(files.key), "--auth", "memory:alice:secret", "--require-auth",
                    "--listen", "ssl:0:interface=127.0.0.1")
    try:
        plain, implicit = _ports(server, 2)
        with smtplib.SMTP("127.0.0.1", plain, timeout=30) as smtp:
            smtp.starttls(context=_context(files))
            assert smtp.login("alice", "secret")[0] == 235
            assert smtp.sendmail("a@example.org", ["b@example.org"], MESSAGE) == {}
        with smtplib.SMTP_SSL("127.0.0.1", implicit, timeout=30, context=_context(files)) as smtp:
            assert smtp.ehlo("client.test")[0] == 250
            assert smtp.mail("a@example.org") == (530, b"5.7.0 Authentication required")
            assert smtp.sock.getpeercert(binary_form=True) == files.der
        renewed = make_tls_files(workdir / "tls", files.authority)
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "TLS certificate reloaded" not in server.log.read_text():
            assert time.monotonic() < deadline, server.log.read_text()
            time.sleep(0.05)
        with smtplib.SMTP_SSL("127.0.0.1", implicit, timeout=30, context=_context(files)) as smtp:
            assert smtp.sock.getpeercert(binary_form=True) == renewed.der
        with smtplib.SMTP("127.0.0.1", plain, timeout=30) as smtp:
            smtp.starttls(context=_context(files))
            assert smtp.sock.getpeercert(binary_form=True) == renewed.der
    finally:
        server.stop()
