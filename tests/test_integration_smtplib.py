"""Integration: Python's smtplib against a real esmtpkit server on a loopback port (pytest-twisted).

The client runs in a thread (``deferToThread``) while the reactor serves; the server's RecordingHandler must hold
every message byte for byte.
"""

from __future__ import annotations

import smtplib
from typing import Any, Callable

import pytest_twisted
from twisted.internet import threads

from esmtpkit.core.reply import SMTPReply
from esmtpkit.testing import LoopbackServer, RecordingHandler, serve

FIRST = (b"From: alice@example.org\r\nTo: bob@example.net, carol@example.net\r\nSubject: first\r\n"
         b"\r\nHello Bob and Carol.\r\n")
SECOND = (b"From: alice@example.org\r\nSubject: dots and\r\n  a folded header\r\n"
          b"\r\n.leading dot\r\n..two dots\r\n.\r\n...\r\nend")
RECIPIENTS = ["bob@example.net", "carol@example.net", "dave@example.org"]


async def start(make: Callable[[], RecordingHandler] = RecordingHandler) -> tuple[LoopbackServer, list[Any]]:
    """Serve on 127.0.0.1 with one RecordingHandler per connection, kept in the list returned."""
    handlers: list[Any] = []

    def handler_factory() -> RecordingHandler:
        handlers.append(make())
        return handlers[-1]

    server = await serve(handler_factory)
    return server, handlers


@pytest_twisted.ensureDeferred
async def test_ehlo_several_recipients_two_messages() -> None:
    server, handlers = await start()

    def client() -> dict[str, Any]:
        with smtplib.SMTP(*server.address, local_hostname="client.test", timeout=30) as smtp:
            seen: dict[str, Any] = {"ehlo": smtp.ehlo(), "features": dict(smtp.esmtp_features)}
            seen["first"] = smtp.sendmail("alice@example.org", RECIPIENTS, FIRST)
            seen["second"] = smtp.sendmail("<>", ["bob@example.net"], SECOND)
            seen["noop"] = smtp.noop()
        return seen

    try:
        seen = await threads.deferToThread(client)
    finally:
        await server.stop()

    assert seen["ehlo"] == (250, b"localhost client.test, pleased to meet you\nHELP\nPIPELINING\nSIZE 33554432\n"
                                 b"8BITMIME\nSMTPUTF8\nENHANCEDSTATUSCODES\nCHUNKING\nBINARYMIME")
    assert seen["features"] == {"help": "", "pipelining": "", "size": "33554432", "8bitmime": "", "smtputf8": "",
                                "enhancedstatuscodes": "", "chunking": "", "binarymime": ""}
    assert (seen["first"], seen["second"]) == ({}, {})
    assert seen["noop"] == (250, b"2.0.0 OK")
    [handler] = handlers
    assert handler.messages == [
        {"sender": "alice@example.org", "recipients": RECIPIENTS,
         "headers": [("From", "alice@example.org"), ("To", "bob@example.net, carol@example.net"),
                     ("Subject", "first")],
         "body": b"Hello Bob and Carol.\r\n"},
        {"sender": "", "recipients": ["bob@example.net"],
         "headers": [("From", "alice@example.org"), ("Subject", "dots and  a folded header")],
         "body": b".leading dot\r\n..two dots\r\n.\r\n...\r\nend\r\n"},
    ]
    mail_calls = [call.args for call in handler.calls if call.verb == "mail"]
    assert mail_calls == [("alice@example.org", {"SIZE": len(FIRST)}), ("", {"SIZE": len(SECOND)})]
    assert handler.verbs[-1] == "quit"
    assert "abort" not in handler.verbs
    assert handler.session.helo == "client.test"
    assert handler.session.peer_ip == "127.0.0.1"


@pytest_twisted.ensureDeferred
async def test_helo_only() -> None:
    """A client that says HELO: no extensions, no parameters, no enhanced codes, and the message arrives."""
    server, handlers = await start()

    def client() -> tuple[Any, ...]:
        with smtplib.SMTP(*server.address, timeout=30) as smtp:
            helo = smtp.helo("client.test")
            refused = smtp.sendmail("alice@example.org", ["bob@example.net", "Postmaster"], FIRST)
            return helo, refused, smtp.does_esmtp, smtp.noop()

    try:
        helo, refused, esmtp, noop = await threads.deferToThread(client)
    finally:
        await server.stop()

    assert helo == (250, b"localhost OK")
    assert (refused, esmtp, noop) == ({}, False, (250, b"OK"))
    [handler] = handlers
    assert [call.args for call in handler.calls if call.verb == "mail"] == [("alice@example.org", {})]
    assert handler.messages[0]["recipients"] == ["bob@example.net", "Postmaster"]
    assert handler.messages[0]["body"] == b"Hello Bob and Carol.\r\n"


@pytest_twisted.ensureDeferred
async def test_refusals_and_errors_seen_by_client() -> None:
    """A refused recipient, a handler that crashes (451, session goes on), and a big message refused at MAIL."""

    def rcpt(recipient: Any, params: Any) -> Any:
        if recipient.local_part == "nobody":
            raise SMTPReply(550, "5.1.1 No such user")
        if recipient.local_part == "crash":
            raise RuntimeError("handler bug")
        return (250, "ok")

    server, handlers = await start(lambda: RecordingHandler({"rcpt": rcpt}))

    def client() -> tuple[Any, ...]:
        with smtplib.SMTP(*server.address, local_hostname="client.test", timeout=30) as smtp:
            refused = smtp.sendmail("a@example.org", ["nobody@example.org", "crash@example.org", "ok@example.org"],
                                    b"Subject: x\r\n\r\nbody\r\n")
            big = smtp.mail("a@example.org", ["SIZE=999999999999"])
            return refused, big, smtp.noop()

    try:
        refused, big, noop = await threads.deferToThread(client)
    finally:
        await server.stop()

    assert refused == {"nobody@example.org": (550, b"5.1.1 No such user"),
                       "crash@example.org": (451, b"4.3.0 Requested action aborted: local error in processing")}
    assert big == (552, b"5.3.4 Message size exceeds fixed maximum message size")
    assert noop == (250, b"2.0.0 OK")
    [handler] = handlers
    assert [m["recipients"] for m in handler.messages] == [["ok@example.org"]]
