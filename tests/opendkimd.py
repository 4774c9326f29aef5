"""OpenDKIM for tests, offline: a key made by ``opendkim-genkey`` for good.test (selector ``sel``), published by
a private DNS server on 127.0.0.1 (`tests.mailnet.PrivateDNS`), and OpenDKIM run from a temporary directory.

OpenDKIM runs in its test mode (``opendkim -x CONF -t FILE``: the milter's own code fed one message from a file,
printing the fields it would add; a short-lived process) or as a milter in the foreground on a loopback port
(`milter_daemon`), stopped when the test ends, and driven by esmtpkit's milter client (`through_milter`). It
resolves through libunbound, configured (``ResolverConfiguration``) to forward every query to the private DNS
server, with the ``test.`` zone that Unbound answers NXDOMAIN by itself (RFC 6761) opened up.
"""

from __future__ import annotations

import io
import re
import shutil
import socket
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.address import IPv4Address

from esmtpkit.core.address import parse_path
from esmtpkit.core.session import Session
from esmtpkit.filters import Action, HeldMessage, Verdict
from esmtpkit.filters.milter import from_spec

from .authzone import auth_zones
from .daemons import free_port, wait_until
from .mailnet import PrivateDNS
from .support import terminate

__all__ = ["TOOLS", "FOUND", "MISSING", "SKIP", "TIMEOUT", "SELECTOR", "Ran", "OpenDKIM", "opendkim_dns",
           "milter_daemon", "through_milter"]

TOOLS = ("opendkim", "opendkim-genkey", "opendkim-testmsg")
FOUND = {name: shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin") for name in TOOLS}
MISSING = [name for name, path in FOUND.items() if path is None]
#: Marks a test module that needs OpenDKIM: skipped, saying what to install, without it.
SKIP = pytest.mark.skipif(bool(MISSING), reason=f"OpenDKIM is not installed (no {', '.join(MISSING)}; "
                                                "apt-get install opendkim opendkim-tools)")

#: A bound on one OpenDKIM run, not an expectation.
TIMEOUT = 60
SELECTOR = "sel"


@dataclass
class Ran:
    """One OpenDKIM run: the fields it would add (name, value unfolded as printed) and what it said."""

    fields: list[tuple[str, str]]
    output: str

    def field(self, name: str) -> str:
        found = [value for n, value in self.fields if n.lower() == name.lower()]
        assert len(found) == 1, self.output
        return found[0]

    def dkim(self) -> str:
        """The dkim= result of its Authentication-Results field."""
        match = re.search(r"\bdkim=(\w+)", self.field("Authentication-Results"))
        assert match, self.output
        return match.group(1)


class OpenDKIM:
    """OpenDKIM's configuration for one test, in ``folder``: a key for good.test made by opendkim-genkey, a
    verifying and a signing configuration (``verify.conf``, ``sign.conf``), both resolving through the private
    DNS server on ``dns_port`` (`configure`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(mode=0o700)
        (folder / "tmp").mkdir(mode=0o700)
        subprocess.run([str(FOUND["opendkim-genkey"]), "-D", str(folder), "-d", "good.test", "-s", SELECTOR],
                       cwd=folder, check=True, capture_output=True, timeout=TIMEOUT)
        self.key = folder / f"{SELECTOR}.private"
        #: The key record as opendkim-genkey wrote it for the zone file (its quoted strings, joined).
        self.record = "".join(re.findall(r'"([^"]*)"', (folder / f"{SELECTOR}.txt").read_text()))
        self.runs = 0

    def configure(self, dns_port: int) -> None:
        (self.folder / "unbound.conf").write_text(
            "server:\n"
            "    do-not-query-localhost: no\n"
            '    local-zone: "test." nodefault\n'
            "    use-syslog: no\n"
            "forward-zone:\n"
            '    name: "."\n'
            f"    forward-addr: 127.0.0.1@{dns_port}\n")
        common = (f"Syslog no\nTemporaryDirectory {self.folder / 'tmp'}\n"
                  f"ResolverConfiguration {self.folder / 'unbound.conf'}\n")
        (self.folder / "verify.conf").write_text(
            common + "Mode v\nAuthservID verifier.test\nAlwaysAddARHeader yes\n")
        (self.folder / "sign.conf").write_text(
            common + f"Mode s\nDomain good.test\nSelector {SELECTOR}\nKeyFile {self.key}\nRequireSafeKeys false\n"
            "SignatureAlgorithm rsa-sha256\nCanonicalization relaxed/simple\nOversignHeaders From\n")

    def _run(self, config: str, message: bytes) -> Ran:
        """``opendkim -t`` on ``message`` (blocking: call it in a thread, the reactor serves the DNS)."""
        self.runs += 1
        path = self.folder / f"message{self.runs}.eml"
        path.write_bytes(message)
        done = subprocess.run([str(FOUND["opendkim"]), "-x", str(self.folder / config), "-vvv", "-t", str(path)],
                              cwd=self.folder, capture_output=True, text=True, timeout=TIMEOUT)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        fields = re.findall(r"^### (?:INS|ADD)HEADER: (?:idx=\d+ )?hname='([^']+)' hvalue='([^']*)'", done.stdout,
                            re.MULTILINE)
        return Ran(fields, output)

    async def verify(self, message: bytes) -> Ran:
        return await threads.deferToThread(self._run, "verify.conf", message)  # type: ignore[no-any-return]

    async def sign(self, message: bytes) -> bytes:
        """``message`` with OpenDKIM's DKIM-Signature on top."""
        ran = await threads.deferToThread(self._run, "sign.conf", message)
        value = ran.field("DKIM-Signature").replace("\n", "\r\n")
        return f"DKIM-Signature: {value}\r\n".encode() + message


@contextmanager
def opendkim_dns(opendkim: OpenDKIM) -> Iterator[PrivateDNS]:
    """The test world's zones (`tests.authzone`) plus ``opendkim``'s key for good.test, served on loopback while
    the block runs; ``opendkim`` is configured to resolve through it. Use it from a fixture run by pytest-twisted."""
    zones = auth_zones().zones
    record = opendkim.record
    zones[f"{SELECTOR}._domainkey.good.test"] = {"TXT": [[record[i:i + 250] for i in range(0, len(record), 250)]]}
    server = PrivateDNS(zones).start()
    opendkim.configure(server.port)
    try:
        yield server
    finally:
        pytest_twisted.blockon(server.stop())


@contextmanager
def milter_daemon(opendkim: OpenDKIM, config: str = "verify.conf") -> Iterator[int]:
    """A private ``opendkim`` milter in the foreground on a loopback port, with ``config`` (``verify.conf`` or
    ``sign.conf``; call `OpenDKIM.configure` first); its port. Stopped (SIGTERM, then SIGKILL) at the end, which
    fails the test if it did not exit cleanly."""
    port = free_port()
    stem = Path(config).stem
    conf = opendkim.folder / f"milter-{stem}.conf"
    conf.write_text((opendkim.folder / config).read_text() + f"Socket inet:{port}@127.0.0.1\n")
    path = opendkim.folder / f"milter-{stem}.log"
    log = path.open("wb")
    process = subprocess.Popen([str(FOUND["opendkim"]), "-f", "-x", str(conf)], cwd=opendkim.folder,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _listening(port), process, "opendkim", "listen", TIMEOUT, path.read_text)
        yield port
    finally:
        status = terminate(process, TIMEOUT)
        log.close()
    assert status == 0, path.read_text()


def _listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1 at ``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


async def through_milter(port: int, content: bytes) -> Verdict:
    """One SMTP connection's stages through esmtpkit's milter client to the milter on ``port``, for ``content``
    from alice@good.test to bob@example.net by a client on 127.0.0.1 (internal to OpenDKIM, which signs for it):
    each stage must continue; the verdict at the end of the message."""
    session = Session(hostname="mx.test", peer=IPv4Address("TCP", "127.0.0.1", 40000), helo="client.test",
                      esmtp=True)
    session.envelope.id = "MILTER1"
    session.envelope.sender = parse_path("<alice@good.test>")
    session.envelope.recipients.append(parse_path("<bob@example.net>"))
    head = content.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    message = HeldMessage(session, head, len(content), lambda: io.BytesIO(content))
    milter = from_spec(f"tcp:127.0.0.1:{port}", {"name": "opendkim"}).start(session)
    try:
        for verdict in [await milter.connect(), await milter.helo("client.test"),
                        await milter.mail(message.sender, {"BODY": "8BITMIME"}),
                        await milter.rcpt("bob@example.net", {})]:
            assert verdict.action is Action.CONTINUE, verdict
        return await milter.message(message)
    finally:
        milter.reset()
        milter.close()
