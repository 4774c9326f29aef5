"""The rspamd filter against the real rspamd: a private instance on a loopback port (`tests.rspamdaemon`), with
the Debian package's configuration, its network checks off and its DNS going nowhere.

- GTUBE is rejected, with rspamd's own reply text; a plain message goes on, with the ``X-Spamd-Result`` field
  rspamd's milter headers module asks for (the ``milter`` block, as header edits).
- What the request headers say (client address, HELO, host name, sender, recipients, queue id, user) is what
  rspamd saw: a rule in the test configuration echoes it into its options, which that field shows.
- rspamd's DNS queries reach the test's silent name server on 127.0.0.1, nowhere else.
- A stopped rspamd: the check raises, and a `FilterChain` makes that 451 4.7.1.
- ``twistd esmtpkit --filter rspamd:URL``: GTUBE gets 550 5.7.1 over SMTP and nothing is stored; a plain message
  is stored with the ``X-Spamd-Result`` field rspamd asked for, and without the one the client forged.
"""

from __future__ import annotations

import io
import re
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectError

from esmtpkit.core.address import Address
from esmtpkit.core.session import Session
from esmtpkit.filters import FILTER_FAILED, Action, FilterChain, HeaderEdit, HeldMessage
from esmtpkit.filters.rspamd import RspamdFilter

from ..rspamdaemon import GTUBE, PrivateRspamd, rspamd_missing
from ..support import smtp_send
from .conftest import EsmtpkitProcess, missing_options

pytestmark = pytest.mark.skipif(rspamd_missing() is not None, reason=str(rspamd_missing()))

HAM = (b"From: Alice <alice@good.test>\r\n"
       b"To: Bob <bob@example.net>\r\n"
       b"Subject: lunch on Tuesday\r\n"
       b"Date: Sun, 6 Dec 2026 07:00:00 +0000\r\n"
       b"Message-ID: <lunch.1@good.test>\r\n"
       b"MIME-Version: 1.0\r\n"
       b"Content-Type: text/plain; charset=us-ascii\r\n"
       b"\r\n"
       b"Hello Bob,\r\n\r\nShall we meet for lunch on Tuesday at noon, at the usual place?\r\n\r\nAlice\r\n")
SPAM = HAM.replace(b"Shall we", GTUBE.encode() + b"\r\nShall we")


@pytest.fixture(scope="module")
def rspamd() -> Iterator[PrivateRspamd]:
    daemon = PrivateRspamd()
    try:
        yield daemon.start()
    finally:
        daemon.stop()
        daemon.remove()


def message(content: bytes, **changes: Any) -> HeldMessage:
    session = Session(hostname="mx.test", peer=IPv4Address("TCP", "192.0.2.7", 40000), helo="client.good.test",
                      client_name="client.good.test")
    session.envelope.id = "4Q7x2Lm9Tz"
    session.envelope.sender = Address("alice@good.test")
    session.envelope.recipients = [Address("bob@example.net"), Address("carol@example.net")]
    for name, value in changes.items():
        setattr(session, name, value)
    head = content.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    return HeldMessage(session, head, len(content), lambda: io.BytesIO(content))


def added(edits: tuple[HeaderEdit, ...], name: str) -> str:
    [value] = [e.value for e in edits if e.kind in ("add", "insert") and e.name == name]
    return value


@pytest_twisted.ensureDeferred
async def test_gtube_is_rejected(rspamd: PrivateRspamd) -> None:
    verdict = await RspamdFilter(rspamd.url).check(message(SPAM))
    assert verdict.action is Action.REJECT, (verdict, rspamd.log_text()[-3000:])
    assert (verdict.reply.code, verdict.reply.enhanced, verdict.reply.lines) == (550, "5.7.1", ("Gtube pattern",))
    assert "GTUBE" in verdict.details["symbols"]
    assert verdict.details["score"] >= verdict.details["required_score"]


@pytest_twisted.ensureDeferred
async def test_a_plain_message_goes_on_with_rspamds_header_edits(rspamd: PrivateRspamd) -> None:
    verdict = await RspamdFilter(rspamd.url).check(message(HAM))
    assert verdict.action is Action.CONTINUE, (verdict, rspamd.log_text()[-3000:])
    assert verdict.details["action"] == "no action"
    assert verdict.details["score"] < 4
    result = added(verdict.edits, "X-Spamd-Result")
    assert re.match(r"default: False \[-?\d+\.\d\d / 15\.00\];", result), result
    assert HeaderEdit("delete", "X-Spamd-Result") in verdict.edits  # any forged one goes first


@pytest_twisted.ensureDeferred
async def test_the_request_headers_reach_rspamd(rspamd: PrivateRspamd) -> None:
    verdict = await RspamdFilter(rspamd.url, pass_all=True).check(message(HAM, authenticated="alice"))
    assert "ESMTPKIT_ENVELOPE" in verdict.details["symbols"]
    echoed = re.search(r"ESMTPKIT_ENVELOPE\([^)]*\)\[([^]]*)\]", added(verdict.edits, "X-Spamd-Result"))
    assert echoed, verdict.edits
    said = echoed.group(1).split(",")
    assert sorted(said) == sorted(["ip=192.0.2.7", "helo=client.good.test", "hostname=client.good.test",
                                   "user=alice", "qid=4Q7x2Lm9Tz", "from=alice@good.test",
                                   "rcpt=bob@example.net", "rcpt=carol@example.net"]), said
    assert "qid: <4Q7x2Lm9Tz>, ip: 192.0.2.7, user: alice, from: <alice@good.test>" in rspamd.log_text()


@pytest_twisted.ensureDeferred
async def test_rspamds_dns_goes_to_the_tests_silent_server(rspamd: PrivateRspamd) -> None:
    rspamd.dns_queries()
    nameless = message(HAM, client_name=None)
    verdict = await RspamdFilter(rspamd.url).check(nameless)
    assert verdict.action is Action.CONTINUE
    assert "7.2.0.192.in-addr.arpa" in rspamd.dns_queries()  # no Hostname: rspamd looks the address up itself


@pytest_twisted.ensureDeferred
async def test_a_stopped_rspamd_fails_the_check_and_the_chain_tempfails() -> None:
    daemon = PrivateRspamd()
    try:
        daemon.start()
        checker = RspamdFilter(daemon.url)
        assert (await checker.check(message(SPAM))).action is Action.REJECT
    finally:
        daemon.stop()
        daemon.remove()
    with pytest.raises(ConnectError):
        await checker.check(message(SPAM))
    held = message(SPAM)
    verdict = await FilterChain([checker]).start(held.session).stage("message", held)
    assert (verdict.action, verdict.reply) == (Action.TEMPFAIL, FILTER_FAILED)


def test_twistd_with_an_rspamd_filter(rspamd: PrivateRspamd,
                                      start_esmtpkit: Callable[..., EsmtpkitProcess]) -> None:
    if missing_options("--filter"):
        pytest.skip("twistd esmtpkit --help does not list --filter")
    server = start_esmtpkit("--filter", f"rspamd:{rspamd.url},timeout=30")
    code, text = smtp_send(server.port, "alice@good.test", SPAM, ("bob@example.net",), helo="client.good.test")
    assert (code, text) == (550, b"5.7.1 Gtube pattern"), rspamd.log_text()[-3000:]
    forged = b"X-Spamd-Result: default: False [-100.00 / 15.00]\r\n" + HAM
    code, text = smtp_send(server.port, "alice@good.test", forged, ("bob@example.net",), helo="client.good.test")
    assert code == 250, (code, text)
    [stored] = server.wait_for(1)
    head = stored.split(b"\r\n\r\n", 1)[0]
    [result] = re.findall(rb"^X-Spamd-Result: (.*(?:\r\n[ \t].*)*)", head, re.MULTILINE)
    assert result.startswith(b"default: False ["), head
    assert b"-100.00" not in result and b"ESMTPKIT_ENVELOPE" in result, head
    assert stored.endswith(HAM.split(b"\r\n\r\n", 1)[1])
