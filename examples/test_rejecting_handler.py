"""Tests for examples.rejecting_handler: in memory with Conversation, then over a real socket with smtplib."""

import mailbox
import smtplib

import pytest_twisted
from twisted.internet import threads

from esmtpkit import Policy
from esmtpkit.testing import Conversation, serve
from examples.rejecting_handler import Handler


def test_unknown_recipient_is_refused(tmp_path):
    talk = Conversation(Handler(str(tmp_path), recipients="alice@example.com"), Policy(hostname="mx.test"))
    assert talk.greeting.code == 220
    assert talk.send("EHLO client.test").code == 250
    assert talk.send("MAIL FROM:<carol@example.org>").code == 250
    refused = talk.send("RCPT TO:<mallory@example.com>")
    assert (refused.code, refused.enhanced, refused.text) == (550, "5.1.1", "<mallory@example.com>: no such user here")
    assert talk.send("RCPT TO:<Alice@Example.COM>").code == 250


def test_accepted_message_is_in_the_maildir(tmp_path):
    talk = Conversation(Handler(str(tmp_path), domain="example.com"), Policy(hostname="mx.test"))
    final = talk.message("carol@example.org", ["bob@example.com"], b"Subject: hi\r\n\r\nhello\r\n")
    assert final.code == 250
    (stored,) = mailbox.Maildir(str(tmp_path), create=False)
    assert stored["Subject"] == "hi"
    assert stored["Return-Path"] == "<carol@example.org>"


@pytest_twisted.ensureDeferred
async def test_smtplib_over_a_socket(tmp_path):
    server = await serve(lambda: Handler(str(tmp_path), recipients="alice@example.com"))

    def send():
        with smtplib.SMTP(*server.address) as client:
            return client.sendmail("carol@example.org", ["alice@example.com", "mallory@example.com"],
                                   b"Subject: hi\r\n\r\nhello\r\n")

    try:
        refused = await threads.deferToThread(send)
    finally:
        await server.stop()
    assert list(refused) == ["mallory@example.com"]
    assert refused["mallory@example.com"][0] == 550
    assert len(mailbox.Maildir(str(tmp_path), create=False)) == 1
