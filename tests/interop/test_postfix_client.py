"""esmtpkit's client sending to a real Postfix smtpd: a private instance on a 127.0.0.1 port, delivering into a
Maildir of its own with virtual(8).

What Postfix received is read from what it delivered (``X-Original-To:``, ``Delivered-To:``, ``Return-Path:`` and
its ``Received:`` field in front of our content), from the delivery status notification it sends for
``NOTIFY=SUCCESS`` (ENVID, ORCPT, RET), and from its log, whose ``disconnect from`` line counts the commands the
client gave (``mail=1 rcpt=2 data=1``). The client's writes are recorded to show that MAIL, the RCPTs and DATA went
in one (PIPELINING).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

from esmtpkit.client.options import ClientOptions
from esmtpkit.client.session import Attempt, send
from esmtpkit.core.outbound import Message, Recipient

from .conftest import PrivatePostfix, free_port, postfix_missing

pytestmark = pytest.mark.skipif(postfix_missing() is not None, reason=postfix_missing() or "")

HOST = "localhost[127.0.0.1]"
#: The line smtpd logs when our client's session has ended (the fixture's check that it listens gives no EHLO).
SESSION_LOGGED = r"disconnect from localhost\[127\.0\.0\.1\] ehlo="
DOMAINS = ("example.net", "example.org")
CONTENT = ("From: Jörg <joerg@example.org>\r\nTo: b@example.net\r\nSubject: from esmtpkit\r\n"
           "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <client@example.org>\r\nMIME-Version: 1.0\r\n"
           "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
           "\r\n.leading dot\r\nGrüße aus Köln\r\n.\r\nlast line\r\n").encode("utf-8")


class _Recording(ProtocolWrapper):
    """Passes everything through, noting each write the client makes."""

    def write(self, data: bytes) -> None:
        self.factory.writes.append(data)
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))


class _RecordingFactory(WrappingFactory):
    protocol = _Recording

    def __init__(self, wrapped: Any, writes: list[bytes]) -> None:
        super().__init__(wrapped)
        self.writes = writes


@implementer(IStreamClientEndpoint)
class RecordingEndpoint:
    """A TCP endpoint to 127.0.0.1 whose connections note the client's writes in ``writes``."""

    def __init__(self, reactor: Any, port: int) -> None:
        self.endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        self.writes: list[bytes] = []

    def connect(self, factory: Any) -> "Deferred[Any]":
        return self.endpoint.connect(_RecordingFactory(factory, self.writes)).addCallback(
            lambda wrapper: wrapper.wrappedProtocol)


def reactor_() -> Any:
    from twisted.internet import reactor

    return reactor


def deliver(postfix: PrivatePostfix, message: Message, content: bytes, **options: Any) -> "Deferred[Attempt]":
    """Send ``message`` to the instance's smtpd; the endpoint is kept as ``postfix.endpoint`` for its writes."""
    options.setdefault("helo", "client.test")
    options.setdefault("tls", "opportunistic")
    reactor = reactor_()
    endpoint = RecordingEndpoint(reactor, postfix.smtpd_port or 0)
    postfix.endpoint = endpoint  # type: ignore[attr-defined]
    return send(reactor, endpoint, message, lambda: io.BytesIO(content), ClientOptions(**options), host=HOST)


def header(raw: bytes, name: str) -> list[str]:
    """The values of a header field in a delivered file (LF line ends, as virtual(8) writes them)."""
    head = raw.split(b"\n\n", 1)[0].decode("utf-8")
    return [m.strip() for m in re.findall(rf"(?im)^{name}:[ \t]*(.*(?:\n[ \t].*)*)", head)]


def body_after_trace(raw: bytes) -> bytes:
    """A delivered file without the fields Postfix put in front: Return-Path, X-Original-To, Delivered-To and its
    one Received field."""
    match = re.match(rb"Return-Path: [^\n]*\nX-Original-To: [^\n]*\nDelivered-To: [^\n]*\nReceived: [^\n]*\n"
                     rb"(?:[ \t][^\n]*\n)*", raw)
    assert match, raw[:500]
    return raw[match.end():]


def disconnect_counts(log: str) -> list[str]:
    """What smtpd's ``disconnect from`` lines say about each session that gave a command (``ehlo=1 mail=1 ...
    commands=6``); the fixture's check that smtpd listens gave none."""
    found = re.findall(r"disconnect from localhost\[127\.0\.0\.1\] (.*)", log)
    return [counts for counts in found if counts != "commands=0/0"]


@pytest_twisted.inlineCallbacks
def test_postfix_takes_a_pipelined_message_with_dsn(start_postfix: Callable[..., PrivatePostfix]) -> Any:
    """8BITMIME, SIZE and the DSN parameters, pipelined: Postfix delivers to both recipients, tells the sender
    of the delivery it was asked about (with our ENVID and ORCPT, headers only), and saw MAIL, 2 RCPT and DATA."""
    postfix = start_postfix(smtpd_port=free_port(), virtual_domains=DOMAINS)
    message = Message("Q1", "sender@example.org", [
        Recipient("b@example.net", notify=("SUCCESS",), orcpt="rfc822;orig-b@example.net"),
        Recipient("c@example.net", notify=("NEVER",)),
    ], size=len(CONTENT), body="8BITMIME", ret="HDRS", envid="esmtpkit Q1")
    attempt = yield deliver(postfix, message, CONTENT)
    assert not attempt.session_failed
    assert {(o.code, o.enhanced, o.remote) for o in attempt.outcomes.values()} == {(250, "2.0.0", HOST)}, attempt
    assert attempt.outcomes[0].text.startswith("Ok: queued as ")

    envelope = (f"MAIL FROM:<sender@example.org> SIZE={len(CONTENT)} BODY=8BITMIME RET=HDRS ENVID=esmtpkit+20Q1\r\n"
                f"RCPT TO:<b@example.net> NOTIFY=SUCCESS ORCPT=rfc822;orig-b@example.net\r\n"
                f"RCPT TO:<c@example.net> NOTIFY=NEVER\r\nDATA\r\n").encode()
    assert envelope in postfix.endpoint.writes  # type: ignore[attr-defined]

    files = postfix.delivered(3)
    by_recipient = {header(raw, "Delivered-To")[0]: raw for raw in files}
    assert sorted(by_recipient) == ["b@example.net", "c@example.net", "sender@example.org"]
    for address in ("b@example.net", "c@example.net"):
        raw = by_recipient[address]
        assert header(raw, "Return-Path") == ["<sender@example.org>"]
        assert header(raw, "X-Original-To") == [address]
        [received] = header(raw, "Received")
        assert re.match(r"from client\.test \(localhost \[127\.0\.0\.1\]\)\s+by test\.local \(Postfix\) with ESMTP",
                        received), received
        assert body_after_trace(raw) == CONTENT.replace(b"\r\n", b"\n")

    notice = by_recipient["sender@example.org"].decode("utf-8")
    assert header(by_recipient["sender@example.org"], "Return-Path") == ["<>"]
    assert "Original-Envelope-Id: esmtpkit Q1" in notice, notice
    assert "Original-Recipient: rfc822;orig-b@example.net" in notice, notice
    assert re.search(r"Final-Recipient: rfc822; ?b@example\.net\nOriginal-Recipient: .*\nAction: delivered",
                     notice), notice
    assert "text/rfc822-headers" in notice and "Grüße" not in notice  # RET=HDRS: the headers only

    postfix.wait_log(SESSION_LOGGED)
    log = postfix.wait_log(r"from=<sender@example\.org>, size=\d+, nrcpt=2 \(queue active\)")
    assert disconnect_counts(log) == ["ehlo=1 mail=1 rcpt=2 data=1 quit=1 commands=6"], log
    assert "improper command pipelining" not in log and "warning" not in log, log


@pytest_twisted.inlineCallbacks
def test_postfix_takes_smtputf8_in_bdat_chunks(start_postfix: Callable[..., PrivatePostfix]) -> Any:
    """SMTPUTF8 paths, and content over several BDAT chunks (Postfix offers CHUNKING)."""
    postfix = start_postfix(smtpd_port=free_port(), virtual_domains=DOMAINS)
    content = CONTENT + b"0123456789 abcdefghijklmnopqrstuvwxyz\r\n" * 5000
    message = Message("Q2", "jörg@example.org", [Recipient("ü@example.net")], size=len(content), smtputf8=True,
                      body="8BITMIME")
    attempt = yield deliver(postfix, message, content, chunking=True)
    assert {o.code for o in attempt.outcomes.values()} == {250}, attempt
    [raw] = postfix.delivered(1)
    assert header(raw, "Return-Path") == ["<jörg@example.org>"]
    assert header(raw, "X-Original-To") == ["ü@example.net"]
    assert "with UTF8SMTP" in header(raw, "Received")[0]  # Postfix writes UTF8SMTP (RFC 6531 §3.7.3)
    assert body_after_trace(raw) == content.replace(b"\r\n", b"\n")
    sent = b"".join(postfix.endpoint.writes)  # type: ignore[attr-defined]
    assert "MAIL FROM:<jörg@example.org> SIZE=".encode() in sent and b" SMTPUTF8\r\n" in sent
    assert len(content) == 195291  # three chunks: 65536, 65536 and 64219 octets
    assert sent.count(b"BDAT ") == 3 and b"BDAT 64219 LAST\r\n" in sent
    log = postfix.wait_log(SESSION_LOGGED)
    assert disconnect_counts(log) == ["ehlo=1 mail=1 rcpt=1 bdat=3 quit=1 commands=7"], log


@pytest_twisted.inlineCallbacks
def test_postfix_size_limit_refused_before_sending(start_postfix: Callable[..., PrivatePostfix]) -> Any:
    """Postfix offers ``SIZE 1000``: a bigger message fails (5.3.4) without MAIL ever being sent."""
    postfix = start_postfix(smtpd_port=free_port(), virtual_domains=DOMAINS,
                            settings={"message_size_limit": "1000"})
    message = Message("Q3", "sender@example.org", [Recipient("b@example.net")], size=1001)
    attempt = yield deliver(postfix, message, b"x" * 1001)
    [outcome] = attempt.outcomes.values()
    assert (outcome.code, outcome.enhanced) == (552, "5.3.4") and not attempt.session_failed
    log = postfix.wait_log(SESSION_LOGGED)
    assert disconnect_counts(log) == ["ehlo=1 quit=1 commands=2"], log


@pytest_twisted.inlineCallbacks
def test_postfix_starttls_verified(start_postfix: Callable[..., PrivatePostfix], tmp_path: Path) -> Any:
    """STARTTLS required and the certificate checked against the test CA; Postfix says ESMTPS."""
    from ..certs import make_tls_files

    files = make_tls_files(tmp_path / "tls")
    for path in (files.cert, files.key, files.ca):
        path.chmod(0o644)
    tmp_path.chmod(0o755)
    (tmp_path / "tls").chmod(0o755)
    postfix = start_postfix(smtpd_port=free_port(), virtual_domains=DOMAINS, settings={
        "smtpd_tls_security_level": "may",
        "smtpd_tls_chain_files": f"{files.key}, {files.cert}",
    })
    message = Message("Q4", "sender@example.org", [Recipient("b@example.net")], size=len(CONTENT))
    attempt = yield deliver(postfix, message, CONTENT, tls="required", verify=True, ca_file=str(files.ca))
    assert {o.code for o in attempt.outcomes.values()} == {250}, attempt
    [raw] = postfix.delivered(1)
    assert "with ESMTPS" in header(raw, "Received")[0]
    log = postfix.wait_log(SESSION_LOGGED)
    assert disconnect_counts(log) == ["ehlo=2 starttls=1 mail=1 rcpt=1 data=1 quit=1 commands=7"], log


def _smtplib_utf8(port: int, sender: str, recipients: list[str], content: bytes) -> dict[str, Any]:
    """Send with SMTPUTF8 and BODY=8BITMIME through smtplib (run in a thread)."""
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=60) as client:
        return client.sendmail(sender, recipients, content, mail_options=["SMTPUTF8", "BODY=8BITMIME"])


@pytest_twisted.inlineCallbacks
def test_relay_handler_passes_smtputf8_to_postfix(start_postfix: Callable[..., PrivatePostfix]) -> Any:
    """The Relay handler in front of Postfix: a message with SMTPUTF8 and non-ASCII paths is accepted, goes on with
    SMTPUTF8, BODY=8BITMIME and SIZE, and Postfix delivers it, our Received field and the content intact."""
    from twisted.internet import threads

    from esmtpkit.handlers.relay import Relay
    from esmtpkit.server.policy import Policy
    from esmtpkit.testing import serve

    postfix = start_postfix(smtpd_port=free_port(), virtual_domains=DOMAINS)
    reactor = reactor_()
    endpoint = RecordingEndpoint(reactor, postfix.smtpd_port or 0)
    relay = yield serve(lambda: Relay(endpoint=endpoint, timeout=60), reactor=reactor,
                        policy=Policy(hostname="relay.test"))
    try:
        refused = yield threads.deferToThread(_smtplib_utf8, relay.port, "jörg@example.org", ["ü@example.net"],
                                              CONTENT)
    finally:
        yield relay.stop()
    assert refused == {}
    sent = b"".join(endpoint.writes)
    mail = re.search(rb"MAIL FROM:<j\xc3\xb6rg@example\.org> SIZE=(\d+) BODY=8BITMIME SMTPUTF8\r\n", sent)
    assert mail and int(mail.group(1)) > len(CONTENT), sent[:300]
    assert "RCPT TO:<ü@example.net>\r\nDATA\r\n".encode() in sent

    [raw] = postfix.delivered(1)
    assert header(raw, "Return-Path") == ["<jörg@example.org>"]
    assert header(raw, "X-Original-To") == ["ü@example.net"]
    received = header(raw, "Received")
    assert len(received) == 2 and "with UTF8SMTP" in received[0], received
    assert re.match(r"from relay\.test \(localhost \[127\.0\.0\.1\]\)", received[0]), received
    assert re.match(r"from client\.test \(.*\)\s+by relay\.test", received[1]), received
    assert body_after_trace(raw).endswith(CONTENT.replace(b"\r\n", b"\n"))
    log = postfix.wait_log(SESSION_LOGGED)
    assert disconnect_counts(log) == ["ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5"], log
