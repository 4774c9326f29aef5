"""TLS as the monitor hears it over real loopback sockets: a completed STARTTLS handshake, and one that fails."""

from __future__ import annotations

import smtplib
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.handlers.base import MessageHandler
from esmtpkit.server.monitor import EventLog, Monitors
from esmtpkit.server.policy import Policy
from esmtpkit.testing import serve
from esmtpkit.server.tls import ServerTLS

from .certs import make_tls_files
from .support import Recorder


def _serve(tmp_path: Path, events: list[dict[str, Any]], recorder: Recorder) -> Any:
    files = make_tls_files(tmp_path)
    log = Logger(namespace="esmtpkit.events", observer=events.append)
    factory = ESMTPFactory(MessageHandler, policy=Policy(hostname="mx.test", tls_context=ServerTLS(files.cert,
                                                                                                   files.key)),
                           clock=reactor, monitor=Monitors([EventLog(log), recorder]))
    return files, serve(factory)


def _closed(recorder: Recorder) -> Deferred[None]:
    """Fires once the server has seen the connection close."""
    done: Deferred[None] = Deferred()

    def poll() -> None:
        if recorder.called("connection_closed"):
            done.callback(None)
        else:
            reactor.callLater(0.01, poll)

    poll()
    return done


@pytest_twisted.inlineCallbacks
def test_handshake_reported(tmp_path: Path) -> Any:
    events: list[dict[str, Any]] = []
    recorder = Recorder()
    files, listening = _serve(tmp_path, events, recorder)
    server = yield listening

    def client() -> None:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            smtp.starttls(context=ssl.create_default_context(cafile=str(files.ca)))
            smtp.ehlo("client.test")

    try:
        yield threads.deferToThread(client)
        yield _closed(recorder)
    finally:
        yield server.stop()
    [established] = [e for e in events if e["event"] == "tls.established"]
    assert established["tls_version"].startswith("TLSv1."), established
    assert established["tls_cipher"], established
    [closed] = [e for e in events if e["event"] == "connection.closed"]
    assert (closed["tls_version"], closed["reason"]) == (established["tls_version"], "QUIT")
    assert recorder.called("tls_failed") == []


@pytest_twisted.inlineCallbacks
def test_failed_handshake_reported(tmp_path: Path) -> Any:
    events: list[dict[str, Any]] = []
    recorder = Recorder()
    files, listening = _serve(tmp_path, events, recorder)
    server = yield listening

    def client() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(b"EHLO client.test\r\n")
            while not reader.readline().startswith(b"250 "):
                pass
            sock.sendall(b"STARTTLS\r\n")
            assert reader.readline().startswith(b"220 ")
            sock.sendall(b"this is not a TLS ClientHello\r\n" * 4)
            sock.recv(4096)  # the server's alert, or the end of the connection

    try:
        yield threads.deferToThread(client)
        yield _closed(recorder)
    finally:
        yield server.stop()
    [failed] = [e for e in events if e["event"] == "tls.failed"]
    assert failed["peer"] == "127.0.0.1" and failed["reason"], failed
    assert [e for e in events if e["event"] == "tls.established"] == []
