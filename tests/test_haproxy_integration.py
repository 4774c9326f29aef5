"""Integration: a real HAProxy (Debian's ``haproxy``, run in the foreground on loopback) in front of esmtpkit.

smtplib connects from 127.0.0.2 to HAProxy, which opens its own connection from 127.0.0.1 to esmtpkit and sends
a PROXY header (v2 with ``send-proxy-v2``, v1 with ``send-proxy``). The handler's ``connect`` and the trace
header must name 127.0.0.2 and the client's own port; HAProxy's health checks (``check-send-proxy``, a tcp-check
expecting 220 and sending QUIT) must pass: v2 checks send LOCAL (the socket's addresses are kept), v1 checks
name the check's own socket. The shipped contrib/haproxy/haproxy.cfg is run as is (on loopback addresses), and
implicit TLS (port 465 style) works with the PROXY wrapper outside the TLS layer.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater

from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.core.trace import received_header
from esmtpkit.server.policy import Policy
from esmtpkit.server.proxy import ProxyProtocolFactory
from esmtpkit.core.session import Session
from esmtpkit.testing import RecordingHandler

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)
CLIENT_IP = "127.0.0.2"
CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "haproxy" / "haproxy.cfg"
MESSAGE = b"From: alice@example.org\r\nSubject: through HAProxy\r\n\r\nHello.\r\n..a leading dot\r\n"

pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (Debian package haproxy)")

CONFIG = """\
global
    log stderr format raw local0 info

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout check 5s

frontend smtp_in
    bind 127.0.0.1:{front}
    default_backend esmtpkit

backend esmtpkit
    option tcp-check
    tcp-check expect rstring ^220
    tcp-check send QUIT\\r\\n
    tcp-check expect rstring ^221|\\n221
    server s1 127.0.0.1:{back} {send_proxy} check check-send-proxy inter 1s{tls}
"""


class PeerAtConnect(RecordingHandler):
    """A RecordingHandler that also keeps session.peer and session.host as they were when connect() ran."""

    def connect(self, session: Session) -> Any:
        self.peer_at_connect = session.peer
        self.host_at_connect = session.host
        transport = session.transport
        while not hasattr(transport, "header"):  # under implicit TLS the TLS layer sits on top of the wrapper
            transport = transport.transport
        self.proxy_header = transport.header
        return super().connect(session)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _can_bind_client_ip() -> bool:
    with socket.socket() as s:
        try:
            s.bind((CLIENT_IP, 0))
        except OSError:
            return False
    return True


async def _until(condition: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], log: Path,
                 seconds: float = 30.0) -> None:
    """Wait (polling the reactor's clock) until ``condition()`` holds; fail with HAProxy's log if it never does."""
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"haproxy exited with {proc.returncode} while waiting for {what}:\n{log.read_text()}")
        await deferLater(reactor, 0.05, lambda: None)
    pytest.fail(f"no {what} within {seconds} s; haproxy log:\n{log.read_text()}")


def _contrib_config(front: int, back: int, send_proxy: str) -> str:
    """contrib/haproxy/haproxy.cfg on loopback: log to stderr, bind ``front``, both servers at ``back``."""
    text = CONTRIB.read_text()
    for old, new in (("log /dev/log local0", "log stderr format raw local0 info"), ("bind :25", f"bind 127.0.0.1:{front}"),
                     ("10.0.0.11:2525", f"127.0.0.1:{back}"), ("10.0.0.12:2525", f"127.0.0.1:{back}"),
                     ("inter 5s", "inter 1s")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def _tls_factory(wrapped: ESMTPFactory, directory: Path) -> Any:
    """Implicit TLS (as on port 465) under the PROXY wrapper: the header comes in clear, before the handshake."""
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from esmtpkit.server.tls import ServerTLS
    from tests.certs import make_tls_files

    files = make_tls_files(directory)
    return TLSMemoryBIOFactory(ServerTLS(files.cert, files.key), False, wrapped)


async def _run(make_config: Callable[[int, int, str], str], send_proxy: str, version: int,
               tls: bool = False) -> None:
    if not _can_bind_client_ip():
        pytest.skip(f"cannot bind a client socket to {CLIENT_IP}")
    handlers: list[PeerAtConnect] = []

    def make() -> PeerAtConnect:
        handlers.append(PeerAtConnect())
        return handlers[-1]

    esmtp = ESMTPFactory(make, policy=Policy(hostname="mx.test"), clock=reactor)
    workdir = Path(tempfile.mkdtemp(prefix="esmtpkit-haproxy-"))
    inner = _tls_factory(esmtp, workdir) if tls else esmtp
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(ProxyProtocolFactory(inner))
    back = port.getHost().port
    front = _free_port()
    proc: subprocess.Popen[bytes] | None = None
    try:
        config = workdir / "haproxy.cfg"
        config.write_text(make_config(front, back, send_proxy))
        log = workdir / "haproxy.log"
        check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        with log.open("wb") as out:
            proc = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT)
        await _until(lambda: any(h.verbs == ["connect", "quit"] for h in handlers), "health check", proc, log)

        def client() -> dict[str, Any]:
            kwargs: dict[str, Any] = dict(local_hostname="client.test", timeout=30, source_address=(CLIENT_IP, 0))
            if tls:
                import ssl

                context = ssl.create_default_context()
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # a throw-away certificate
                connection: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", front, context=context, **kwargs)
            else:
                connection = smtplib.SMTP("127.0.0.1", front, **kwargs)
            with connection as smtp:
                seen: dict[str, Any] = {"port": smtp.sock.getsockname()[1], "ehlo": smtp.ehlo()[0],
                                        "tls": getattr(smtp.sock, "version", lambda: None)()}
                seen["refused"] = smtp.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)
            return seen

        seen = await threads.deferToThread(client)
        await _until(lambda: any("mail" in h.verbs and "quit" in h.verbs for h in handlers), "QUIT", proc, log)
    finally:
        if proc is not None:
            proc.terminate()
            await threads.deferToThread(proc.wait, 10)
        await port.stopListening()
        shutil.rmtree(workdir, ignore_errors=True)

    assert (seen["ehlo"], seen["refused"]) == (250, {})
    assert (seen["tls"] is not None) == tls
    [mail] = [h for h in handlers if "mail" in h.verbs]
    assert mail.peer_at_connect.host == CLIENT_IP
    assert mail.peer_at_connect.port == seen["port"]
    assert (mail.host_at_connect.host, mail.host_at_connect.port) == ("127.0.0.1", front)
    assert mail.verbs[:3] == ["connect", "ehlo", "mail"]
    assert [m["body"] for m in mail.messages] == [MESSAGE.split(b"\r\n\r\n", 1)[1]]
    trace = received_header(mail.session, id="1", timestamp=0)
    assert f"[{CLIENT_IP}]".encode() in trace
    checks = [h for h in handlers if h.verbs == ["connect", "quit"]]
    assert checks, "no health check reached the handler"
    for h in checks:
        assert h.proxy_header.version == version
        assert h.peer_at_connect.host == "127.0.0.1"
        if version == 2:
            assert h.proxy_header.source is None  # LOCAL: the socket's own addresses are kept
        else:
            assert h.proxy_header.source == h.peer_at_connect  # HAProxy 2.6 names the check's own socket
    assert mail.proxy_header.version == version


def _test_config(front: int, back: int, send_proxy: str) -> str:
    return CONFIG.format(front=front, back=back, send_proxy=send_proxy, tls="")


def _tls_config(front: int, back: int, send_proxy: str) -> str:
    """The health check speaks TLS too (check-ssl); HAProxy still sends its PROXY header first, in clear."""
    return CONFIG.format(front=front, back=back, send_proxy=send_proxy, tls=" check-ssl verify none")


@pytest_twisted.ensureDeferred
async def test_send_proxy_v2() -> None:
    await _run(_test_config, "send-proxy-v2", 2)


@pytest_twisted.ensureDeferred
async def test_send_proxy_v1() -> None:
    await _run(_test_config, "send-proxy", 1)


@pytest_twisted.ensureDeferred
async def test_contrib_example() -> None:
    """The shipped example (leastconn, send-proxy-v2, check-send-proxy, the 220/QUIT/221 tcp-check) works as is."""
    await _run(_contrib_config, "send-proxy-v2", 2)


@pytest_twisted.ensureDeferred
async def test_implicit_tls() -> None:
    """Port 465 style: HAProxy passes TLS through untouched; esmtpkit reads the header, then does TLS itself."""
    await _run(_tls_config, "send-proxy-v2", 2, tls=True)
