"""esmtpkit's milter client against a real milter: OpenDKIM (`tests.opendkimd`), a private instance on a loopback
port, signing (its DKIM-Signature, applied as the header change it asks for, verifies with esmtpkit's checks
against the private DNS server) and verifying (its Authentication-Results says pass, then fail once changed)."""

from __future__ import annotations

import io
import re

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address

from esmtpkit.core.session import Session
from esmtpkit.filters import Action, HeaderEdit
from esmtpkit.mailauth import MailAuth
from esmtpkit.mailauth.signing import Signer, parse_keys

from ..mailnet import PrivateDNS
from ..opendkimd import SELECTOR, SKIP, OpenDKIM, milter_daemon, through_milter

pytestmark = SKIP

MESSAGE = (b"From: Alice <alice@good.test>\r\n"
           b"To: bob@example.net\r\n"
           b"Subject: hello through a milter,\r\n"
           b"  folded\r\n"
           b"Date: Sun, 6 Dec 2026 07:00:00 +0000\r\n"
           b"Message-ID: <milter@good.test>\r\n"
           b"\r\n"
           b".a line with a leading dot\r\n"
           + b"Hello, Bob. " * 10000 + b"\r\n")  # more than one body chunk


@pytest.fixture
def dns(opendkim_zones: PrivateDNS) -> PrivateDNS:
    return opendkim_zones


def applied(edits: tuple[HeaderEdit, ...], content: bytes) -> bytes:
    """``content`` with the fields the milter added on top or at the end of the header section."""
    head, body = content.split(b"\r\n\r\n", 1)
    for edit in edits:
        line = edit.line[:-2]  # the field as the front writes it, folds and all
        if edit.kind == "insert" and edit.index == 0:
            head = line + b"\r\n" + head
        else:
            assert edit.kind == "add", edit
            head = head + b"\r\n" + line
    return head + b"\r\n\r\n" + body


@pytest_twisted.ensureDeferred
async def test_opendkim_signs_through_the_milter_and_the_signature_verifies(opendkim: OpenDKIM,
                                                                            dns: PrivateDNS) -> None:
    with milter_daemon(opendkim, "sign.conf") as port:
        verdict = await through_milter(port, MESSAGE)
    assert verdict.action in (Action.ACCEPT, Action.CONTINUE), verdict
    [edit] = [e for e in verdict.edits if e.name == "DKIM-Signature"]
    assert "d=good.test" in edit.value and f"s={SELECTOR}" in edit.value

    checks = MailAuth(dns_servers=dns.servers, authserv_id="mx.test", timeout=(5.0,))
    try:
        session = Session(hostname="mx.test", peer=IPv4Address("TCP", "127.0.0.5", 1000), helo="helo.good.test")
        for content, result in [(applied(verdict.edits, MESSAGE), "pass"),
                                (applied(verdict.edits, MESSAGE.replace(b"Hello, Bob.", b"Hello, Eve.", 1)),
                                 "fail")]:
            verdicts = await checks.check_sender(session, "alice@good.test")
            head = content.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
            found = await checks.check_message(session, verdicts, head, lambda c=content: io.BytesIO(c))
            [dkim] = found.dkim
            assert (dkim.result, dkim.domain, dkim.selector) == (result, "good.test", SELECTOR), dkim
    finally:
        checks.close()


@pytest_twisted.ensureDeferred
async def test_opendkim_verifies_through_the_milter(opendkim: OpenDKIM, dns: PrivateDNS) -> None:
    signed = Signer(parse_keys(f"good.test:{SELECTOR}:{opendkim.key}")).fields(MESSAGE) + MESSAGE
    with milter_daemon(opendkim, "verify.conf") as port:
        results = []
        for content in (signed, signed.replace(b"Hello, Bob.", b"Hello, Eve.", 1)):
            verdict = await through_milter(port, content)
            assert verdict.action in (Action.ACCEPT, Action.CONTINUE), verdict
            [edit] = [e for e in verdict.edits if e.name == "Authentication-Results"]
            assert edit.value.startswith("verifier.test;"), edit
            match = re.search(r"\bdkim=(\w+)", edit.value)
            assert match, edit
            results.append(match.group(1))
    assert results == ["pass", "fail"]
