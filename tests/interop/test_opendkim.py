"""DKIM between esmtpkit and OpenDKIM, both ways, offline: keys made by ``opendkim-genkey`` and published by a
private DNS server on 127.0.0.1 (`tests.mailnet.PrivateDNS`).

OpenDKIM, set up by `tests.opendkimd`, runs from a temporary directory, in its test mode (``opendkim -x CONF -t
FILE``: the milter's own code, fed one message from a file, printing the fields it would add; a short-lived
process) and as a milter in the foreground on a loopback port, driven by esmtpkit's milter client
(`esmtpkit.filters.milter`) and stopped when the test ends. It resolves through libunbound, configured
(``ResolverConfiguration``) to forward every query to the private DNS server, with the ``test.`` zone that Unbound
answers NXDOMAIN by itself (RFC 6761) opened up.

- esmtpkit signs (a Relay with ``dkim_sign`` and the key opendkim-genkey made) and OpenDKIM verifies: pass, and
  fail once the body changes or a field it signed is added; the same through the milter.
- OpenDKIM signs (rsa-sha256) and esmtpkit's `MailAuth` verifies: pass, DMARC-aligned; fail once changed.
- ``opendkim-testmsg`` signs with rsa-sha1 only; the key from opendkim-genkey allows sha256 only (``h=sha256``),
  so that signature must not pass (RFC 6376 §3.6.1, RFC 8301 §3.1).
"""

from __future__ import annotations

import io
import re
import subprocess
from typing import Iterator

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.address import IPv4Address

from esmtpkit.core.session import Session
from esmtpkit.filters import Action
from esmtpkit.mailauth import MailAuth
from esmtpkit.mailauth.signing import Signer, parse_keys
from esmtpkit.mailauth.verdicts import AuthVerdicts

from ..authzone import AUTHSERV
from ..mailnet import PrivateDNS
from ..opendkimd import FOUND, SELECTOR, SKIP, TIMEOUT, OpenDKIM, milter_daemon, through_milter
from ..support import relay_to_sink, smtp_send

pytestmark = SKIP

MESSAGE = (b"From: Alice <alice@good.test>\r\n"
           b"To: bob@example.net\r\n"
           b"Subject: hello from esmtpkit\r\n"
           b"Date: Sun, 6 Dec 2026 07:00:00 +0000\r\n"
           b"Message-ID: <interop@good.test>\r\n"
           b"\r\n"
           b".a line with a leading dot\r\n"
           b"Hello, Bob.\r\n")


@pytest.fixture
def dns(opendkim_zones: PrivateDNS) -> PrivateDNS:
    return opendkim_zones


async def esmtpkit_checks(dns: PrivateDNS, content: bytes) -> AuthVerdicts:
    """What a receiving esmtpkit finds: SPF for alice@good.test from 127.0.0.5, then DKIM and DMARC."""
    checks = MailAuth(dns_servers=dns.servers, authserv_id=AUTHSERV, timeout=(5.0,))
    try:
        session = Session(hostname=AUTHSERV, peer=IPv4Address("TCP", "127.0.0.5", 1000), helo="helo.good.test")
        verdicts = await checks.check_sender(session, "alice@good.test")
        head = content.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
        return await checks.check_message(session, verdicts, head, lambda: io.BytesIO(content))
    finally:
        checks.close()


@pytest_twisted.ensureDeferred
async def test_opendkim_verifies_what_the_relay_signs(opendkim: OpenDKIM, dns: PrivateDNS) -> None:
    async with relay_to_sink(dkim_sign=f"good.test:{SELECTOR}:{opendkim.key}") as relay:
        code, text = await threads.deferToThread(smtp_send, relay.port, "alice@good.test", MESSAGE,
                                                 ("bob@example.net",), "client.test", TIMEOUT)
        assert code == 250, text
        relayed = (await relay.store.next_message()).data
    assert relayed.startswith(b"DKIM-Signature:") and relayed.endswith(b"\r\n" + MESSAGE)

    passed = await opendkim.verify(relayed)
    assert passed.dkim() == "pass", passed.output
    assert "header.d=good.test" in passed.field("Authentication-Results")
    assert f"s={SELECTOR}, d=good.test, 2048-bit key) succeeded" in passed.output

    changed = await opendkim.verify(relayed.replace(b"Hello, Bob.", b"Hello, Eve."))
    assert changed.dkim() == "fail", changed.output
    added = await opendkim.verify(b"Subject: pay now\r\n" + relayed)
    assert added.dkim() == "fail", added.output


@pytest_twisted.ensureDeferred
async def test_esmtpkit_verifies_what_opendkim_signs(opendkim: OpenDKIM, dns: PrivateDNS) -> None:
    signed = await opendkim.sign(MESSAGE)
    assert b"a=rsa-sha256" in signed and b"d=good.test" in signed

    verdicts = await esmtpkit_checks(dns, signed)
    [dkim] = verdicts.dkim
    assert (dkim.result, dkim.domain, dkim.selector, dkim.algorithm) == ("pass", "good.test", SELECTOR,
                                                                         "rsa-sha256"), dkim
    assert verdicts.dmarc is not None and verdicts.dmarc.dkim_aligned

    changed = await esmtpkit_checks(dns, signed.replace(b"Hello, Bob.", b"Hello, Eve."))
    [dkim] = changed.dkim
    assert dkim.result == "fail", dkim
    again = await opendkim.verify(signed)
    assert again.dkim() == "pass", again.output  # the reference: OpenDKIM agrees on its own signature


@pytest_twisted.ensureDeferred
async def test_an_rsa_sha1_signature_does_not_pass_with_a_sha256_only_key(opendkim: OpenDKIM,
                                                                            dns: PrivateDNS) -> None:
    assert "h=sha256" in opendkim.record
    done = await threads.deferToThread(
        subprocess.run, [str(FOUND["opendkim-testmsg"]), "-C", "-d", "good.test", "-s", SELECTOR, "-k",
                         str(opendkim.key), "-t", str(opendkim.folder / "tmp")],
        input=MESSAGE, capture_output=True, timeout=TIMEOUT, cwd=opendkim.folder)
    assert done.returncode == 0, done.stderr
    signed = done.stdout
    assert b"a=rsa-sha1;" in signed
    [dkim] = (await esmtpkit_checks(dns, signed)).dkim
    assert dkim.result != "pass", dkim


# ---- OpenDKIM as a milter ------------------------------------------------------------------------------------------

@pytest.fixture
def milter(opendkim: OpenDKIM, dns: PrivateDNS) -> Iterator[int]:
    """A private ``opendkim`` milter in the foreground on a loopback port, verifying; its port. Stopped (SIGTERM,
    then SIGKILL) when the test ends."""
    with milter_daemon(opendkim) as port:
        yield port


@pytest_twisted.ensureDeferred
async def test_the_opendkim_milter_verifies_what_esmtpkit_signs(opendkim: OpenDKIM, dns: PrivateDNS,
                                                                  milter: int) -> None:
    """The message as a Postfix with OpenDKIM as its milter would hand it over: dkim=pass, and fail once changed."""
    key = parse_keys(f"good.test:{SELECTOR}:{opendkim.key}")
    signer = Signer(key)
    signed = signer.fields(MESSAGE) + MESSAGE

    async def checked(message: bytes) -> str:
        verdict = await through_milter(milter, message)
        assert verdict.action in (Action.CONTINUE, Action.ACCEPT), verdict
        [results] = [edit.value for edit in verdict.edits if edit.name == "Authentication-Results"]
        assert results.startswith("verifier.test;"), results
        match = re.search(r"\bdkim=(\w+)", results)
        assert match, results
        return match.group(1)

    assert await checked(signed) == "pass"
    assert await checked(signed.replace(b"Hello, Bob.", b"Hello, Eve.")) == "fail"
