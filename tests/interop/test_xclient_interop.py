"""XCLIENT and XFORWARD with real programs in front of a real ``twistd esmtpkit`` on loopback: swaks' ``--xclient``
options, nginx's mail proxy (``xclient on``) and Postfix's smtp client (``smtp_send_xforward_command = yes``).

The server trusts 127.0.0.1 only (``--trusted-network 127.0.0.1/32``), so a client that connects from another
loopback address (127.0.0.7) is a stranger to it: whatever the Received: field shows of 127.0.0.7 came through
XCLIENT or XFORWARD. Each test is skipped, saying why, when its program is missing.
"""

from __future__ import annotations

import shutil
import smtplib
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from ..support import RawClient, terminate
from .conftest import (CLIENT_TIMEOUT, POSTFIX_TIMEOUT, EsmtpkitProcess, PrivatePostfix, free_port,
                       postfix_missing)

SWAKS = shutil.which("swaks")
NGINX = shutil.which("nginx", path="/usr/sbin:/usr/bin:/sbin:/bin")
#: Debian's libnginx-mod-mail.
MAIL_MODULE = Path("/usr/lib/nginx/modules/ngx_mail_module.so")

#: The server trusts this host's main loopback address only.
TRUSTED = ("--trusted-network", "127.0.0.1/32")
#: The address the "real" clients connect from: on loopback, but not trusted.
CLIENT_IP = "127.0.0.7"

needs_swaks = pytest.mark.skipif(SWAKS is None, reason="swaks is not installed (apt-get install swaks)")


def swaks(server: EsmtpkitProcess, *options: str) -> list[str]:
    """A swaks command line for ``server`` that greets as client.test and reads no configuration file."""
    return [SWAKS or "swaks", "--server", "127.0.0.1", "--port", str(server.port), "--ehlo", "client.test",
            "--from", "alice@example.org", "--to", "bob@example.org", *options]


# ---- swaks ---------------------------------------------------------------------------------------------------------

@needs_swaks
def test_swaks_xclient(start_esmtpkit: Callable[..., EsmtpkitProcess], run_client: Callable[..., Any]) -> None:
    """swaks sends XCLIENT ADDR and NAME, gets the new 220 greeting, greets again and sends a message: the
    Received: field names the client XCLIENT gave; a second message gives an IPv6 address and a login."""
    server = start_esmtpkit("--extension", "XCLIENT", *TRUSTED)
    ran = run_client(swaks(server, "--xclient-addr", "192.0.2.7", "--xclient-name", "mail.example.org",
                           "--xclient-port", "4242"))
    assert " -> XCLIENT ADDR=192.0.2.7 NAME=mail.example.org PORT=4242\n<-  220 mx.test ESMTP" in ran.stdout, \
        ran.stdout
    assert ran.stdout.count(" -> EHLO client.test") == 2, ran.stdout
    run_client(swaks(server, "--xclient-addr", "IPV6:2001:db8::7", "--xclient-login", "jane",
                     "--xclient-helo", "helo.example.org", "--xclient-proto", "ESMTP"))
    first, second = server.deliveries(2)
    assert first.received.startswith("from client.test (mail.example.org [192.0.2.7]) by mx.test with ESMTP id "), \
        first.received
    assert second.received.startswith("from client.test (2001:db8::7 [IPv6:2001:db8::7]) by mx.test with ESMTPA "
                                      "(authenticated as jane) id "), second.received


@needs_swaks
def test_swaks_second_xclient_from_the_new_address_is_refused(start_esmtpkit: Callable[..., EsmtpkitProcess],
                                                              run_client: Callable[..., Any]) -> None:
    """Trust is judged again after XCLIENT: once the client is 192.0.2.7, its next XCLIENT gets 550 5.7.0 (as
    an XCLIENT from a client behind a transparent proxy would)."""
    server = start_esmtpkit("--extension", "XCLIENT", *TRUSTED)
    ran = run_client(swaks(server, "--xclient-addr", "192.0.2.7", "--xclient-delim", "--xclient-name",
                           "mail.example.org"), check=False)
    assert ran.returncode != 0
    assert " -> XCLIENT ADDR=192.0.2.7\n<-  220 " in ran.stdout, ran.stdout
    assert " -> XCLIENT NAME=mail.example.org\n<** 550 Insufficient authorization" in ran.stdout, ran.stdout
    assert server.stored() == []


def test_untrusted_clients_are_refused(start_esmtpkit: Callable[..., EsmtpkitProcess],
                                       run_client: Callable[..., Any]) -> None:
    """A server trusting another network offers neither keyword to a loopback client (swaks will not send
    XCLIENT), and answers both verbs 550 5.7.0."""
    server = start_esmtpkit("--extension", "XCLIENT", "--extension", "XFORWARD", "--trusted-network", "10.0.0.0/8")
    client = RawClient(server.address, timeout=CLIENT_TIMEOUT)
    try:
        [ehlo] = client.send(b"EHLO client.test\r\n")
        assert b"XCLIENT" not in ehlo and b"XFORWARD" not in ehlo, ehlo
        assert client.send(b"XCLIENT ADDR=192.0.2.7\r\n") == [b"550 5.7.0 Insufficient authorization\r\n"]
        assert client.send(b"XFORWARD ADDR=192.0.2.7\r\n") == [b"550 5.7.0 Insufficient authorization\r\n"]
        assert client.send(b"MAIL FROM:<alice@example.org>\r\n")[0].startswith(b"250 ")  # the session goes on
    finally:
        client.close()
    if SWAKS is not None:
        ran = run_client(swaks(server, "--xclient-addr", "192.0.2.7"), check=False)
        assert ran.returncode != 0 and "*** Host did not advertise XCLIENT" in ran.output, ran.output
        assert " -> XCLIENT" not in ran.stdout, ran.stdout
    assert server.stored() == []


# ---- nginx's mail proxy -----------------------------------------------------------------------------------------

def nginx_missing() -> str | None:
    """Why a private nginx mail proxy cannot run here (None when it can)."""
    if NGINX is None:
        return "nginx is not installed (apt-get install nginx libnginx-mod-mail)"
    if not MAIL_MODULE.exists():
        return f"nginx's mail module is not installed ({MAIL_MODULE}: apt-get install libnginx-mod-mail)"
    return None


class AuthServer:
    """nginx's ``auth_http`` service, on a free 127.0.0.1 port in a thread: every request is recorded (its
    headers) and sent on to 127.0.0.1:``backend``."""

    def __init__(self, backend: int) -> None:
        self.requests: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append({name.lower(): value for name, value in self.headers.items()})
                self.send_response(200)
                for name, value in (("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"),
                                    ("Auth-Port", str(backend)), ("Content-Length", "0")):
                    self.send_header(name, value)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="auth_http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(CLIENT_TIMEOUT)


class PrivateNginx:
    """A foreground nginx (no master process) proxying SMTP on 127.0.0.1:``port`` with ``xclient on``; its
    configuration, pid file and logs live in ``prefix`` (the system's nginx is never touched)."""

    def __init__(self, prefix: Path, auth_port: int) -> None:
        prefix.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.port = free_port()
        self.error_log = prefix / "error.log"
        conf = prefix / "nginx.conf"
        conf.write_text(f"""\
load_module {MAIL_MODULE};
daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log {self.error_log} info;
events {{ worker_connections 64; }}
mail {{
    server_name proxy.test;
    auth_http 127.0.0.1:{auth_port}/auth;
    xclient on;
    smtp_auth none;
    server {{
        listen 127.0.0.1:{self.port};
        protocol smtp;
    }}
}}
""")
        self._output = open(prefix / "nginx.out", "wb")
        self.process = subprocess.Popen([NGINX or "nginx", "-p", str(prefix), "-c", str(conf),
                                         "-e", str(self.error_log)],
                                        stdout=self._output, stderr=subprocess.STDOUT)
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def log_text(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in (self.error_log, self.prefix / "nginx.out")
                         if path.exists())

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while True:
            try:
                RawClient(("127.0.0.1", self.port), timeout=CLIENT_TIMEOUT).close()
                return
            except OSError:
                if self.process.poll() is not None:
                    raise AssertionError(f"nginx exited with {self.process.returncode}:\n{self.log_text()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"nginx does not listen on {self.port}:\n{self.log_text()}")
                time.sleep(0.05)

    def stop(self) -> None:
        terminate(self.process, CLIENT_TIMEOUT)
        self._output.close()


@pytest.fixture
def nginx_proxy(start_esmtpkit: Callable[..., EsmtpkitProcess], tmp_path: Path) -> Iterator[Any]:
    """``twistd esmtpkit`` offering XCLIENT to 127.0.0.1, the auth service pointing at it, and nginx in front."""
    missing = nginx_missing()
    if missing:
        pytest.skip(missing)
    server = start_esmtpkit("--extension", "XCLIENT", *TRUSTED)
    auth = AuthServer(server.port)
    try:
        proxy = PrivateNginx(tmp_path / "nginx", auth.port)
        try:
            yield server, auth, proxy
        finally:
            proxy.stop()
    finally:
        auth.stop()


def test_nginx_mail_proxy(nginx_proxy: Any) -> None:
    """A client on 127.0.0.7 sends a message through nginx: nginx tells esmtpkit who the client is with XCLIENT,
    replays the client's EHLO, MAIL and RCPT, and the Received: field names 127.0.0.7, not nginx's 127.0.0.1."""
    server, auth, proxy = nginx_proxy
    message = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: through nginx\r\n\r\nHello.\r\n"
    with smtplib.SMTP("127.0.0.1", proxy.port, local_hostname="client.example.org",
                      source_address=(CLIENT_IP, 0), timeout=CLIENT_TIMEOUT) as client:
        refused = client.sendmail("alice@example.org", ["bob@example.org"], message)
    assert refused == {}
    [delivery] = server.deliveries(1)
    assert delivery.content == message
    assert delivery.received.startswith(f"from client.example.org ({CLIENT_IP} [{CLIENT_IP}]) by mx.test with "
                                        "ESMTP id "), delivery.received
    [request] = auth.requests
    assert (request["client-ip"], request["auth-protocol"], request["auth-smtp-helo"]) == \
        (CLIENT_IP, "smtp", "client.example.org")
    assert "[error]" not in proxy.log_text() and "[crit]" not in proxy.log_text(), proxy.log_text()


# ---- Postfix's XFORWARD ---------------------------------------------------------------------------------------------

@needs_swaks
@pytest.mark.skipif(postfix_missing() is not None, reason=postfix_missing() or "")
def test_postfix_sends_xforward(start_esmtpkit: Callable[..., EsmtpkitProcess],
                                start_postfix: Callable[..., PrivatePostfix], run_client: Callable[..., Any]) -> None:
    """swaks (from 127.0.0.7) -> Postfix's smtpd -> Postfix's smtp client -> esmtpkit: Postfix forwards the
    original client with XFORWARD, and esmtpkit's Received: field names it instead of Postfix."""
    server = start_esmtpkit("--extension", "XFORWARD", *TRUSTED)
    postfix = start_postfix(server.port, smtpd_port=free_port(),
                            settings={"smtp_send_xforward_command": "yes", "mynetworks": "127.0.0.0/8"})
    ran = run_client([SWAKS or "swaks", "--server", "127.0.0.1", "--port", str(postfix.smtpd_port),
                      "--local-interface", CLIENT_IP, "--ehlo", "original.example.org", "--from",
                      "alice@example.org", "--to", "bob@example.net"])
    assert "<-  250 2.0.0 Ok: queued as" in ran.stdout, ran.stdout
    postfix.flush()
    [delivery] = server.deliveries(1, timeout=POSTFIX_TIMEOUT)
    # Postfix knows no name for 127.0.0.7 (NAME=[UNAVAILABLE]); its own EHLO name would be test.local.
    assert delivery.received.startswith(f"from original.example.org ({CLIENT_IP} [{CLIENT_IP}]) by mx.test with "
                                        "ESMTP id "), delivery.received
    log = postfix.wait_log(r"status=sent")
    assert "status=sent (250 2.0.0 Ok: queued as" in log, log
