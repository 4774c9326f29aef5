"""Python's smtplib against a real ``twistd esmtpkit``: each message must land in the Maildir byte for byte.

Covers the HELO and EHLO paths, several recipients (one refused), several messages on one connection, a
UTF-8 body through ``send_message`` (and SMTPUTF8 addresses), dot-stuffing, a large message, STARTTLS + AUTH.
"""

from __future__ import annotations

import re
import smtplib
import ssl
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

TIMEOUT = 60

MESSAGE = (b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hello\r\n"
           b"\r\nHello Bob.\r\n")


def connect(server) -> smtplib.SMTP:
    """An smtplib client for ``server`` that greets as client.test."""
    return smtplib.SMTP(*server.address, local_hostname="client.test", timeout=TIMEOUT)


def received_pattern(protocol: str, recipient: str | None) -> str:
    """The Received: field we expect for a message from smtplib (RFC 5321 §4.4), unfolded."""
    clause = rf" for <{re.escape(recipient)}>" if recipient else ""
    return (rf"from client\.test \(127\.0\.0\.1 \[127\.0\.0\.1\]\) by mx\.test with {protocol} id \S+{clause}; "
            r"\w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}")


def test_helo_path(esmtpkit_process) -> None:
    """HELO (no ESMTP): the message is stored as sent, the trace says ``with SMTP``."""
    with connect(esmtpkit_process) as client:
        assert client.helo()[0] == 250
        assert client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE) == {}
        assert not client.does_esmtp
    [delivery] = esmtpkit_process.deliveries(1)
    assert delivery.content == MESSAGE
    assert delivery.return_path == "alice@example.org"
    assert re.fullmatch(received_pattern("SMTP", "bob@example.net"), delivery.received), delivery.received


def test_ehlo_several_recipients(esmtpkit_process) -> None:
    """EHLO and four RCPTs, one of them refused: one stored copy, no ``for`` clause naming a recipient."""
    recipients = ["bob@example.net", "carol@example.net", "not-an-address", "dave@example.org"]
    with connect(esmtpkit_process) as client:
        code, _ = client.ehlo()
        assert code == 250 and client.does_esmtp
        refused = client.sendmail("alice@example.org", recipients, MESSAGE)
    assert list(refused) == ["not-an-address"]
    assert refused["not-an-address"][0] == 501
    [delivery] = esmtpkit_process.deliveries(1)
    assert delivery.content == MESSAGE
    assert re.fullmatch(received_pattern("ESMTP", None), delivery.received), delivery.received


def test_several_messages_one_connection(esmtpkit_process) -> None:
    """Five transactions (one with the null sender) with RSET and NOOP between them, all on one connection."""
    messages = [
        (f"sender{i}@example.org" if i != 2 else "<>",
         f"Subject: message {i}\r\nX-Number: {i}\r\n\r\n".encode() + b"line\r\n" * (i * 300 + 1))
        for i in range(5)
    ]
    with connect(esmtpkit_process) as client:
        client.ehlo()
        for sender, message in messages:
            assert client.sendmail(sender, ["bob@example.net"], message) == {}
            assert client.rset()[0] == 250
            assert client.noop()[0] == 250
    deliveries = esmtpkit_process.deliveries(len(messages))
    assert [d.content for d in deliveries] == [m for _, m in messages]
    assert [d.return_path for d in deliveries] == ["sender0@example.org", "sender1@example.org", "",
                                                   "sender3@example.org", "sender4@example.org"]


def _utf8_message(sender: str, recipient: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Jörg Müller <{sender}>"
    msg["To"] = recipient
    msg["Subject"] = "Grüße aus Köln ✓"
    msg.set_content("Grüße aus Köln, ½ € ✓\n.eine Zeile mit Punkt\n\nЗдравствуйте 你好\n",
                    cte="8bit")
    return msg


def test_send_message_utf8_body(esmtpkit_process) -> None:
    """send_message with an 8-bit UTF-8 body: stored bytes are what smtplib's generator put on the wire."""
    msg = _utf8_message("joerg@example.org", "bob@example.net")
    expected = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    assert "Grüße aus Köln, ½ € ✓".encode() in expected
    with connect(esmtpkit_process) as client:
        assert client.send_message(msg) == {}
    [delivery] = esmtpkit_process.deliveries(1)
    assert delivery.content == expected
    assert delivery.return_path == "joerg@example.org"
    parsed = BytesParser(policy=policy.default).parsebytes(delivery.content)
    assert parsed["Subject"] == "Grüße aus Köln ✓"
    assert parsed.get_content().replace("\r\n", "\n") == msg.get_content()


def test_send_message_smtputf8(esmtpkit_process) -> None:
    """Non-ASCII addresses: smtplib uses SMTPUTF8 and BODY=8BITMIME; headers and envelope stay UTF-8 (RFC 6531)."""
    msg = _utf8_message("jörg@example.org", "ünïcode@example.net")
    expected = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n", utf8=True))
    assert "From: Jörg Müller <jörg@example.org>\r\n".encode() in expected
    with connect(esmtpkit_process) as client:
        client.ehlo()
        assert client.has_extn("smtputf8")
        assert client.send_message(msg) == {}
    [delivery] = esmtpkit_process.deliveries(1)
    assert delivery.content == expected
    assert delivery.return_path == "jörg@example.org"
    assert " for <ünïcode@example.net>; " in delivery.received


DOTTED = [
    # A lone dot, two dots, three dots, a dot before text and before a space; no CRLF at the very end.
    b"Subject: dots\r\n\r\n.leading\r\n..two\r\n.\r\n...\r\n. space\r\nend",
    # The very first byte of the content is a dot (stuffed at the start of DATA, not after a CRLF).
    b".first line starts with a dot\r\nsecond\r\n",
    # Nothing but a dot line.
    b".\r\n",
]


def test_lines_starting_with_dot(esmtpkit_process) -> None:
    """smtplib dot-stuffs; the server undoes it exactly (RFC 5321 §4.5.2), wherever the dot is."""
    with connect(esmtpkit_process) as client:
        for message in DOTTED:
            assert client.sendmail("alice@example.org", ["bob@example.net"], message) == {}
    # smtplib ends a message without a final CRLF with one (RFC 5321 §4.1.1.4).
    assert esmtpkit_process.wait_for(len(DOTTED)) == [DOTTED[0] + b"\r\n", DOTTED[1], DOTTED[2]]


def test_large_message(esmtpkit_process) -> None:
    """Four megabytes of 998-character lines arrive intact (the handler streams them to disk)."""
    lines = [(b"%06d" % i) + bytes([65 + i % 26]) * 992 + b"\r\n" for i in range(4 * 1024 * 1024 // 1000)]
    message = b"Subject: big\r\n\r\n" + b"".join(lines)
    with connect(esmtpkit_process) as client:
        assert client.sendmail("alice@example.org", ["bob@example.net"], message) == {}
    assert esmtpkit_process.wait_for(1) == [message]


def _tls_client(secured) -> smtplib.SMTP:
    """Connect, STARTTLS trusting only the test CA, and EHLO again (RFC 3207 §4.2)."""
    client = connect(secured.server)
    client.ehlo()
    assert client.has_extn("starttls"), client.ehlo_resp
    client.starttls(context=ssl.create_default_context(cafile=str(secured.ca)))
    client.ehlo()
    return client


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_starttls_auth(secured_server, mechanism: str) -> None:
    """STARTTLS, then AUTH with each mechanism; the trace says ESMTPSA and names the TLS version."""
    with _tls_client(secured_server) as client:
        offered = (client.esmtp_features.get("auth") or "").upper().split()
        if mechanism not in offered:
            if mechanism == "CRAM-MD5":
                pytest.skip(f"the server does not offer CRAM-MD5 (offers {offered})")
            pytest.fail(f"AUTH {mechanism} not offered after STARTTLS: {offered}")
        client.user, client.password = secured_server.user, secured_server.password
        authenticator = {"PLAIN": client.auth_plain, "LOGIN": client.auth_login, "CRAM-MD5": client.auth_cram_md5}
        code, _ = client.auth(mechanism, authenticator[mechanism])
        assert code == 235
        assert client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE) == {}
    [delivery] = secured_server.server.deliveries(1)
    assert delivery.content == MESSAGE
    assert re.search(r" with ESMTPSA\b", delivery.received), delivery.received
    assert re.search(r"TLSv1\.[23]", delivery.received), delivery.received


def test_auth_wrong_password(secured_server) -> None:
    """A wrong password gets 535 (RFC 4954 §6), the connection stays usable, and nothing is stored."""
    with _tls_client(secured_server) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.login(secured_server.user, "wrong password")
        assert failed.value.smtp_code == 535
        assert client.noop()[0] == 250
    assert secured_server.server.stored() == []
