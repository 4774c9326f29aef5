"""ClamAV's clamd as a filter: a private clamd (`tests.clamdaemon`: its own configuration and a one-signature
database written by the test, no download) on a UNIX socket and a loopback port, asked by `ClamdFilter` and by a
``twistd esmtpkit`` with docs/filters/clamd.md's ``--filter clamd:...`` lines in front of its Maildir.

- The EICAR test file is found (as the message's body and as a base64 attachment) and refused, naming the
  signature; a clean message goes on; one longer than clamd's StreamMaxLength gets the ``too-big`` outcome.
- A stopped clamd makes the check fail (the chain's failure outcome, 451 4.7.1 by default).
- Through twistd: refused with clamd's signature name, delivered with ``X-Virus-Scanned:``, quarantined apart,
  too long for clamd tempfailed, as the page's options say.
"""

from __future__ import annotations

import base64
import os
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.error import ConnectError

from esmtpkit.core.session import Session
from esmtpkit.filters import Action, FilterChain
from esmtpkit.filters.clamd import from_spec
from esmtpkit.handlers.maildir import QUARANTINE_FOLDER

from ..clamdaemon import EICAR, SIGNATURE, STREAM_MAX, PrivateClamd, clamd_missing, start_clamd
from ..docblocks import DOCS, filter_values
from ..filterfakes import held_message
from ..support import smtp_send, wait_for
from .conftest import CLIENT_TIMEOUT, EsmtpkitProcess, missing_options

pytestmark = pytest.mark.skipif(clamd_missing() is not None, reason=clamd_missing() or "")
PAGE = DOCS / "filters" / "clamd.md"

HEAD = (b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: the report\r\n"
        b"Date: Sun, 06 Dec 2026 10:00:00 +0000\r\nMessage-ID: <clamd@example.org>\r\n")
CLEAN = HEAD + b"\r\nHello Bob, the report is attached.\r\n"
INFECTED = HEAD + b"\r\n" + EICAR + b"\r\n"
ATTACHED = (HEAD + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
            b"--b1\r\nContent-Type: text/plain\r\n\r\nSee the file.\r\n"
            b"--b1\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"x.com\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(EICAR).replace(b"\n", b"\r\n")
            + b"--b1--\r\n")
#: Longer than clamd's StreamMaxLength, clean.
LONG = HEAD + b"\r\n" + b"All work and no play makes Jack a dull boy.\r\n" * (3 * STREAM_MAX // 45)


@pytest.fixture
def clamd() -> Iterator[PrivateClamd]:
    yield from start_clamd()


async def check(target: str, content: bytes, **options: str) -> Any:
    return await from_spec(target, options, reactor=reactor).check(held_message(content))


@pytest.mark.parametrize("where", ["unix_target", "tcp_target"])
@pytest_twisted.ensureDeferred
async def test_eicar_is_refused_naming_the_signature(clamd: PrivateClamd, where: str) -> None:
    for content in (INFECTED, ATTACHED):
        verdict = await check(getattr(clamd, where), content)
        assert verdict.action is Action.REJECT
        assert (verdict.reply.code, verdict.reply.enhanced) == (554, "5.7.1")
        assert verdict.reply.text == f"Virus found: {SIGNATURE}.UNOFFICIAL"
        assert verdict.details == {"signature": f"{SIGNATURE}.UNOFFICIAL"}


@pytest_twisted.ensureDeferred
async def test_eicar_discarded_or_quarantined_as_configured(clamd: PrivateClamd) -> None:
    discarded = await check(clamd.unix_target, INFECTED, action="discard")
    quarantined = await check(clamd.tcp_target, INFECTED, action="quarantine")
    assert (discarded.action, quarantined.action) == (Action.DISCARD, Action.QUARANTINE)
    assert quarantined.reason == f"virus found: {SIGNATURE}.UNOFFICIAL"


@pytest.mark.parametrize("where", ["unix_target", "tcp_target"])
@pytest_twisted.ensureDeferred
async def test_a_clean_message_goes_on(clamd: PrivateClamd, where: str) -> None:
    verdict = await check(getattr(clamd, where), CLEAN)
    assert (verdict.action, verdict.edits) == (Action.CONTINUE, ())
    marked = await check(getattr(clamd, where), CLEAN, header="yes")
    assert [(e.kind, e.name, e.value) for e in marked.edits] == [("add", "X-Virus-Scanned", "clamav")]


@pytest.mark.parametrize("where", ["unix_target", "tcp_target"])
@pytest_twisted.ensureDeferred
async def test_a_message_over_stream_max_length_gets_the_too_big_outcome(clamd: PrivateClamd, where: str) -> None:
    """clamd answers while the message is still being sent, and closes: the answer is read all the same."""
    target = getattr(clamd, where)
    accepted = await check(target, LONG)
    assert accepted.action is Action.CONTINUE
    assert accepted.details == {"too_big": True, "size": len(LONG)}
    tempfailed = await check(target, LONG, **{"too-big": "tempfail"})
    refused = await check(target, LONG, **{"too-big": "reject"})
    assert (tempfailed.action, tempfailed.reply.code) == (Action.TEMPFAIL, 451)
    assert (refused.action, refused.reply.code) == (Action.REJECT, 552)
    # The message just under the limit is scanned.
    assert (await check(target, INFECTED + b"x" * (STREAM_MAX - len(INFECTED) - 10))).action is Action.REJECT


@pytest_twisted.ensureDeferred
async def test_a_stopped_clamd_fails_the_check(clamd: PrivateClamd) -> None:
    clamd.stop()
    for target in (clamd.unix_target, clamd.tcp_target):
        with pytest.raises(ConnectError):
            await check(target, CLEAN)
        chain = FilterChain([from_spec(target, {}, reactor=reactor)], reactor=reactor)
        verdict = await chain.start(Session(hostname="mx.test")).stage("message", held_message(CLEAN))
        assert (verdict.action, verdict.reply.code, verdict.reply.enhanced) == (Action.TEMPFAIL, 451, "4.7.1")


def send(port: int, content: bytes) -> tuple[int, bytes]:
    """One message from alice to bob: the reply to its end of data (or the refusal)."""
    return smtp_send(port, "alice@example.org", content, ("bob@example.org",), timeout=CLIENT_TIMEOUT)


@pytest.mark.skipif(bool(missing_options("--filter")), reason="twistd esmtpkit has no --filter yet")
def test_the_pages_command_lines(clamd: PrivateClamd, start_esmtpkit: Callable[..., EsmtpkitProcess]) -> None:
    """docs/filters/clamd.md's ``twistd esmtpkit --filter`` lines, with this clamd's sockets for the page's."""
    plain, configured = filter_values(PAGE)
    assert plain == "clamd:unix:/run/clamav/clamd.ctl"
    server = start_esmtpkit("--filter", plain.replace("unix:/run/clamav/clamd.ctl", clamd.unix_target))
    assert send(server.port, INFECTED) == (554, f"5.7.1 Virus found: {SIGNATURE}.UNOFFICIAL".encode())
    assert send(server.port, ATTACHED)[0] == 554
    assert send(server.port, CLEAN)[0] == 250
    assert server.wait_for(1) == [CLEAN]

    assert configured.startswith("clamd:tcp:127.0.0.1:3310,")
    server = start_esmtpkit("--filter", configured.replace("tcp:127.0.0.1:3310", clamd.tcp_target))
    assert send(server.port, LONG) == (451, b"4.3.4 Message too big to scan, try again later")
    assert send(server.port, CLEAN)[0] == 250
    (stored,) = server.wait_for(1)
    head = stored.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    assert head.endswith(b"\r\nX-Virus-Scanned: clamav\r\n")
    assert send(server.port, INFECTED)[0] == 250  # quarantined: delivered apart, not to the inbox
    quarantine = server.maildir / QUARANTINE_FOLDER / "new"
    wait_for(lambda: quarantine.is_dir() and len(os.listdir(quarantine)) == 1, "the quarantined message")
    assert len(server.stored()) == 1
