"""Postfix as a real relaying MTA in front of ``twistd esmtpkit``: a private instance, nothing system-wide touched.

The instance lives in a temporary directory: its own main.cf and master.cf (every ``inet`` listener off, no
chroot), queue, data directory and log file; ``relayhost = [127.0.0.1]:<our port>``. Mail goes in with
``sendmail -C``, the queue is flushed with ``postqueue -c``, and the message must reach our Maildir with its
envelope and content intact. The system Postfix is never started; the instance's processes must all be gone
when the test ends.
"""

from __future__ import annotations

import re
from email import policy
from email.parser import BytesParser
from typing import Callable

import pytest

from .conftest import POSTFIX_TIMEOUT, EsmtpkitProcess, PrivatePostfix, postfix_missing

pytestmark = pytest.mark.skipif(postfix_missing() is not None, reason=postfix_missing() or "")

@pytest.fixture
def postfix(esmtpkit_process: EsmtpkitProcess, start_postfix: Callable[..., PrivatePostfix]) -> PrivatePostfix:
    """A private Postfix instance relaying everything to ``esmtpkit_process``; stopped and removed afterwards."""
    return start_postfix(esmtpkit_process.port)


PLAIN = (b"From: Sender <sender@example.org>\nTo: rcpt@example.org\nSubject: relayed by Postfix\n"
         b"Date: Mon, 23 Nov 2026 10:00:00 +0000\nMessage-ID: <plain@example.org>\n"
         b"\n.leading dot\n..two\n.\nlast line\n")
EIGHT_BIT = ("From: Jörg <joerg@example.org>\nTo: a@example.net, b@example.net\nSubject: 8bit\n"
             "Date: Mon, 23 Nov 2026 10:00:01 +0000\nMessage-ID: <eightbit@example.org>\nMIME-Version: 1.0\n"
             "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n"
             "\nGrüße aus Köln, ½ € ✓\n" + "Zeile\n" * 2000).encode("utf-8")

#: The trace field Postfix puts in front of a locally submitted message.
POSTFIX_RECEIVED = re.compile(rb"Received: by test\.local \(Postfix, from userid \d+\)\r\n"
                              rb"\tid [0-9A-Za-z]+; [^\r\n]+\r\n")


def test_postfix_relays_to_esmtpkit(esmtpkit_process, postfix: PrivatePostfix) -> None:
    """Two messages through Postfix's smtp client: envelope, headers and body arrive intact, 8-bit included."""
    postfix.submit("sender@example.org", ["rcpt@example.org"], PLAIN)
    postfix.submit("joerg@example.org", ["a@example.net", "b@example.net"], EIGHT_BIT)
    postfix.flush()
    deliveries = esmtpkit_process.deliveries(2, timeout=POSTFIX_TIMEOUT)
    by_id = {}
    for delivery in deliveries:
        parsed = BytesParser(policy=policy.default).parsebytes(delivery.content)
        by_id[parsed["Message-ID"]] = delivery
    assert sorted(by_id) == ["<eightbit@example.org>", "<plain@example.org>"]

    # Postfix uses SMTPUTF8 for the message with UTF-8 headers: the trace says UTF8SMTP then (RFC 6531 §3.7.3).
    for message_id, sender, source, for_clause, keyword in [
        ("<plain@example.org>", "sender@example.org", PLAIN, " for <rcpt@example.org>; ", "ESMTP"),
        ("<eightbit@example.org>", "joerg@example.org", EIGHT_BIT, None, "UTF8SMTP"),
    ]:
        delivery = by_id[message_id]
        assert delivery.return_path == sender
        assert re.match(rf"from test\.local \(127\.0\.0\.1 \[127\.0\.0\.1\]\) by mx\.test with {keyword} id \S+",
                        delivery.received), delivery.received
        if for_clause:
            assert for_clause in delivery.received, delivery.received
        else:
            assert " for <" not in delivery.received, delivery.received
        theirs = POSTFIX_RECEIVED.match(delivery.content)
        assert theirs, delivery.content[:300]
        assert delivery.content[theirs.end():] == source.replace(b"\n", b"\r\n")

    # Postfix logged our 250 reply for each recipient, naming the message id that the Maildir file name carries.
    log = postfix.wait_log(r"status=sent", 3)
    for delivery in deliveries:
        message_id = delivery.name.split(".")[1].split("I", 1)[1]
        assert f"status=sent (250 2.0.0 Ok: queued as {message_id})" in log, log
    assert log.count("status=sent") == 3, log
    assert not re.search(r"postfix/smtp\[\d+\]: (?:warning|error|fatal|panic):", log), log
