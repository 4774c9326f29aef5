"""esmtpkit's milter client against rspamd's proxy worker in milter mode (``milter = yes``), in front of the normal
worker of a private rspamd (`tests.rspamdaemon`, with a proxy worker on another loopback port added here).

rspamd's proxy answers option negotiation with more actions than it was offered (it adds recipient and body
changes): the filter holds it to the offer and goes on. GTUBE is refused with rspamd's reply; a plain message goes
on with the ``X-Spamd-Result`` field rspamd asks for; and the same through ``twistd esmtpkit --filter milter:...``.
"""

from __future__ import annotations

import io
import re
import socket
import struct
import time
from typing import Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address

from esmtpkit.core.address import Address
from esmtpkit.core.session import Session
from esmtpkit.filters import Action, HeldMessage, Verdict
from esmtpkit.filters import milter_codec as mc
from esmtpkit.filters.milter import from_spec

from ..daemons import free_port
from ..rspamdaemon import GTUBE, TIMEOUT, PrivateRspamd, rspamd_missing
from ..support import smtp_send
from .conftest import EsmtpkitProcess, missing_options

pytestmark = pytest.mark.skipif(rspamd_missing() is not None, reason=str(rspamd_missing()))

HAM = (b"From: Alice <alice@good.test>\r\n"
       b"To: Bob <bob@example.net>\r\n"
       b"Subject: lunch on Wednesday\r\n"
       b"Date: Sun, 6 Dec 2026 07:00:00 +0000\r\n"
       b"Message-ID: <lunch.2@good.test>\r\n"
       b"MIME-Version: 1.0\r\n"
       b"Content-Type: text/plain; charset=us-ascii\r\n"
       b"\r\n"
       b"Hello Bob,\r\n\r\nShall we meet for lunch on Wednesday at noon, at the usual place?\r\n\r\nAlice\r\n")
SPAM = HAM.replace(b"Shall we", GTUBE.encode() + b"\r\nShall we")


class MilterRspamd(PrivateRspamd):
    """A private rspamd with its proxy worker in milter mode on ``milter_port``, scanning with the normal worker."""

    def __init__(self) -> None:
        self.milter_port = free_port()
        super().__init__()

    def _configure(self) -> None:
        super()._configure()
        self._write("override.d", "worker-proxy.inc",
                    f'bind_socket = "127.0.0.1:{self.milter_port}";\nmilter = yes;\ntimeout = 120s;\n'
                    f'upstream "scan" {{\n  default = yes;\n  hosts = "127.0.0.1:{self.port}";\n}}\n'
                    'count = 1;\nmax_retries = 5;\ndiscard_on_reject = false;\nquarantine_on_reject = false;\n'
                    'reject_message = "Spam message rejected";\n')

    def start(self) -> "MilterRspamd":
        super().start()
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.milter_port), timeout=5).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"rspamd's proxy did not listen within {TIMEOUT} s:\n{self.log_text()}")
                time.sleep(0.1)


@pytest.fixture(scope="module")
def rspamd() -> Iterator[MilterRspamd]:
    daemon = MilterRspamd()
    try:
        yield daemon.start()
    finally:
        daemon.stop()
        daemon.remove()


async def through_proxy(daemon: MilterRspamd, content: bytes) -> tuple[Verdict, mc.Negotiated]:
    """One SMTP connection's stages through the milter filter to rspamd's proxy: each stage before the message
    must continue; the verdict at the end of the message, and what was negotiated."""
    session = Session(hostname="mx.test", peer=IPv4Address("TCP", "192.0.2.7", 40000), helo="client.good.test",
                      client_name="client.good.test", esmtp=True)
    session.envelope.id = "4Q7x2Lm9Tz"
    session.envelope.sender = Address("alice@good.test")
    session.envelope.recipients = [Address("bob@example.net")]
    head = content.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    message = HeldMessage(session, head, len(content), lambda: io.BytesIO(content))
    milter = from_spec(f"tcp:127.0.0.1:{daemon.milter_port}", {"name": "rspamd"}).start(session)
    try:
        for verdict in [await milter.connect(), await milter.helo("client.good.test"),
                        await milter.mail("alice@good.test", {}), await milter.rcpt("bob@example.net", {})]:
            assert verdict.action is Action.CONTINUE, verdict
        assert milter.negotiated is not None
        return await milter.message(message), milter.negotiated
    finally:
        milter.reset()
        milter.close()


def offered_answer(port: int) -> tuple[int, int, int]:
    """The version, actions and protocol flags rspamd's proxy answers esmtpkit's offer with (a blocking exchange)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as conn:
        conn.sendall(mc.optneg())
        data = b""
        while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
            more = conn.recv(4096)
            assert more, data
            data += more
    [(command, payload)] = mc.Decoder().feed(data)
    assert command == b"O", data
    version, actions, flags = struct.unpack_from(">III", payload)
    return version, actions, flags


def test_rspamd_answers_the_offer_with_more_actions_than_offered(rspamd: MilterRspamd) -> None:
    version, actions, _ = offered_answer(rspamd.milter_port)
    assert version == mc.VERSION
    assert actions & ~mc.OFFERED_ACTIONS, hex(actions)  # what made every connection fail before it was masked


@pytest_twisted.ensureDeferred
async def test_gtube_is_refused_with_rspamds_reply(rspamd: MilterRspamd) -> None:
    verdict, negotiated = await through_proxy(rspamd, SPAM)
    assert negotiated.actions & ~mc.OFFERED_ACTIONS == 0
    assert verdict.action is Action.REJECT, (verdict, rspamd.log_text()[-3000:])
    assert verdict.reply is not None, verdict
    assert (verdict.reply.code, verdict.reply.enhanced, verdict.reply.lines) == (554, "5.7.1", ("Gtube pattern",))


@pytest_twisted.ensureDeferred
async def test_a_plain_message_goes_on_with_rspamds_headers(rspamd: MilterRspamd) -> None:
    verdict, _ = await through_proxy(rspamd, HAM)
    assert verdict.action in (Action.CONTINUE, Action.ACCEPT), (verdict, rspamd.log_text()[-3000:])
    [result] = [e.value for e in verdict.edits if e.kind in ("add", "insert") and e.name == "X-Spamd-Result"]
    assert re.match(r"default: False \[-?\d+\.\d\d / 15\.00\];", result), result
    assert "ESMTPKIT_ENVELOPE" in result


def test_twistd_with_rspamds_milter_proxy(rspamd: MilterRspamd,
                                          start_esmtpkit: Callable[..., EsmtpkitProcess]) -> None:
    if missing_options("--filter"):
        pytest.skip("twistd esmtpkit --help does not list --filter")
    server = start_esmtpkit("--filter", f"milter:tcp:127.0.0.1:{rspamd.milter_port},name=rspamd,timeout=30")
    code, text = smtp_send(server.port, "alice@good.test", SPAM, ("bob@example.net",), helo="client.good.test")
    assert (code, text) == (554, b"5.7.1 Gtube pattern"), (code, text, server.log_text()[-3000:])
    code, text = smtp_send(server.port, "alice@good.test", HAM, ("bob@example.net",), helo="client.good.test")
    assert code == 250, (code, text, server.log_text()[-3000:])
    [stored] = server.wait_for(1)
    head = stored.split(b"\r\n\r\n", 1)[0]
    [result] = re.findall(rb"^X-Spamd-Result: (.*(?:\r\n[ \t].*)*)", head, re.MULTILINE)
    assert result.startswith(b"default: False ["), head
    assert stored.endswith(HAM.split(b"\r\n\r\n", 1)[1])
