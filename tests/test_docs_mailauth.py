"""docs/mail-authentication.md, run: its ``twistd esmtpkit --verify all`` command and its Python example, each
against a private name server on 127.0.0.1 serving the test zones (tests/authzone.py) in place of the page's
``127.0.0.1:5353``, and what they print and store is what the page shows."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads

from esmtpkit.testing import serve

from .authzone import AuthWorld, auth_zones, dkim_sign
from .docblocks import DOCS, Block, blocks
from .mailnet import PrivateDNS
from .support import Twistd, smtp_send

PAGE = DOCS / "mail-authentication.md"
BLOCKS = blocks(PAGE)
GOOD = (b"From: Alice <alice@good.test>\r\nTo: bob@example.org\r\nSubject: hello\r\n"
        b"Date: Sun, 06 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@good.test>\r\n\r\nHello Bob.\r\n")
BANK = (b"From: Bank <alerts@bank.test>\r\nTo: bob@example.org\r\nSubject: verify your account\r\n"
        b"Date: Sun, 06 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@bank.test>\r\n\r\nClick here.\r\n")


def the_block(predicate: str, language: str) -> Block:
    (block,) = [b for b in BLOCKS if predicate in b.text and b.language == language]
    return block


@pytest.fixture
def auth_world() -> AuthWorld:
    """The test world (this module's, for the ``auth_dns`` fixture) with bank.test, whose SPF never passes here."""
    found = auth_zones()
    found.zones["bank.test"] = {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]}
    found.zones["_dmarc.bank.test"] = {"TXT": ["v=DMARC1; p=none"]}
    return found


def send(port: int, sender: str, content: bytes) -> tuple[int, bytes]:
    """One message from 127.0.0.1 with HELO helo.good.test; the reply to its end of data (or the refusal)."""
    return smtp_send(port, sender, content, ("bob@example.org",), timeout=30)


def results(field: str) -> list[str]:
    """``method=result`` of each result of an Authentication-Results field, in order."""
    value = re.sub(r"\r?\n[ \t]+", " ", field).split(";", 1)[1]
    return [part.split()[0] for part in value.split(";") if part.strip()]


def shown_field() -> str:
    """The Authentication-Results field the page shows in its stored message."""
    text = the_block("Authentication-Results: mx.example.org;", "text").text
    return text[text.index("Authentication-Results:"):text.index("\nDKIM-Signature:")]


@pytest_twisted.ensureDeferred
async def test_the_command_stores_what_the_page_shows(tmp_path: Path, auth_dns: PrivateDNS,
                                                      auth_world: AuthWorld) -> None:
    [command] = [line for line in the_block("--verify all", "sh").text.splitlines() if line.strip()]
    words = shlex.split(command.replace("127.0.0.1:5353", f"127.0.0.1:{auth_dns.port}"))
    assert words[:4] == ["twistd", "-n", "--pidfile=", "esmtpkit"]
    server = Twistd(tmp_path, *words[4:])
    try:
        signed = dkim_sign(GOOD, "good.test", auth_world.keys["good.test"])
        code, text = await threads.deferToThread(send, server.port, "alice@good.test", signed)
        assert code == 250, text
    finally:
        server.stop()
    [stored] = list((tmp_path / "Maildir" / "new").iterdir())
    text = stored.read_text()
    head = text.split("\n\n", 1)[0]
    names = [line.split(":", 1)[0] for line in head.splitlines() if line[:1] not in " \t"]
    assert names[:4] == ["Return-Path", "Received", "Authentication-Results", "DKIM-Signature"], text
    assert "by mx.example.org\n\twith ESMTP id " in head, head
    field = text[text.index("Authentication-Results:"):text.index("\nDKIM-Signature:")]
    assert field.startswith("Authentication-Results: mx.example.org;\n\t"), field
    assert results(field) == results(shown_field())
    assert "header.from=good.test" in field and "smtp.mailfrom=alice@good.test" in field


def test_the_page_shows_every_check_passing() -> None:
    assert results(shown_field()) == ["spf=pass", "spf=pass", "dkim=pass", "dmarc=pass", "arc=none"]


@pytest_twisted.ensureDeferred
async def test_the_python_example_refuses_the_bank_and_keeps_the_rest(auth_dns: PrivateDNS,
                                                                      auth_world: AuthWorld) -> None:
    source = the_block("class StrictAboutTheBank", "python").text
    assert '("127.0.0.1", 5353)' in source
    names: dict[str, Any] = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source.replace("5353", str(auth_dns.port)), str(PAGE), "exec"), names)
    assert printed.getvalue() == "('spf', 'dkim', 'dmarc', 'arc')\n"
    checks, store = names["checks"], names["store"]
    server = await serve(names["factory"])
    try:
        code, text = await threads.deferToThread(send, server.port, "alerts@bank.test", BANK)
        assert (code, text) == (550, b"5.7.26 Mail from bank.test must pass DMARC")
        assert len(store.messages) == 0
        signed = dkim_sign(GOOD, "good.test", auth_world.keys["good.test"])
        code, text = await threads.deferToThread(send, server.port, "alice@good.test", signed)
        assert code == 250, text
    finally:
        await server.stop()
        checks.close()
    [message] = store.messages
    assert message.data.startswith(b"Authentication-Results: mx.example.org;\r\n\t")
    assert b"dmarc=pass" in message.data.split(b"\r\n\r\n", 1)[0]
