"""SpamAssassin's spamd as a filter: a private spamd (`tests.spamdaemon`: the packaged rules, local tests only,
no network) on a loopback port, asked by `SpamdFilter` and by a ``twistd esmtpkit`` with docs/filters/spamd.md's
``--filter spamd:...`` lines in front of its Maildir.

- GTUBE scores as spam: ``X-Spam-Flag: YES`` and ``X-Spam-Status: Yes, ...`` (or a refusal at ``reject-score``);
  a normal message does not (``X-Spam-Status: No, ...``).
- A stopped spamd makes the check fail (the chain's failure outcome, 451 4.7.1 by default).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.error import ConnectError

from esmtpkit.core.session import Session
from esmtpkit.filters import Action, FilterChain
from esmtpkit.filters.spamd import from_spec

from ..docblocks import DOCS, filter_values
from ..filterfakes import held_message
from ..spamdaemon import GTUBE, PrivateSpamd, spamd_missing, start_spamd
from ..support import smtp_send
from .conftest import CLIENT_TIMEOUT, EsmtpkitProcess, missing_options

pytestmark = pytest.mark.skipif(spamd_missing() is not None, reason=spamd_missing() or "")
PAGE = DOCS / "filters" / "spamd.md"

HEAD = (b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: lunch tomorrow\r\n"
        b"Date: Sun, 06 Dec 2026 10:00:00 +0000\r\nMessage-ID: <spamd.1@example.org>\r\n")
HAM = HEAD + b"\r\nHello Bob,\r\n\r\nshall we have lunch tomorrow at noon, at the usual place?\r\n\r\nAlice\r\n"
SPAM = HEAD + b"\r\nThis is the GTUBE, the generic test for unsolicited bulk email:\r\n\r\n" + GTUBE + b"\r\n"


@pytest.fixture
def spamd() -> Iterator[PrivateSpamd]:
    yield from start_spamd()


async def check(target: str, content: bytes, **options: str) -> Any:
    return await from_spec(target, options, reactor=reactor).check(held_message(content))


def fields(verdict: Any) -> list[tuple[str, str, str]]:
    return [(e.kind, e.name, e.value) for e in verdict.edits]


@pytest_twisted.ensureDeferred
async def test_gtube_scores_as_spam(spamd: PrivateSpamd) -> None:
    verdict = await check(spamd.target, SPAM, user="bob")
    assert verdict.action is Action.CONTINUE
    assert verdict.details["spam"] is True and verdict.details["score"] >= 1000
    assert verdict.details["threshold"] == 5.0
    assert "GTUBE" in verdict.details["symbols"]
    edits = fields(verdict)
    assert edits[:3] == [("delete", "X-Spam-Flag", ""), ("delete", "X-Spam-Status", ""), ("add", "X-Spam-Flag", "YES")]
    assert edits[3][:2] == ("add", "X-Spam-Status")
    assert edits[3][2].startswith(f"Yes, score={verdict.details['score']:.1f} required=5.0 tests=")
    assert "GTUBE" in edits[3][2]


@pytest_twisted.ensureDeferred
async def test_gtube_is_refused_at_the_reject_score(spamd: PrivateSpamd) -> None:
    verdict = await check(spamd.target, SPAM, **{"reject-score": "15"})
    assert (verdict.action, verdict.reply.code, verdict.reply.enhanced) == (Action.REJECT, 550, "5.7.1")
    assert (await check(spamd.target, HAM, **{"reject-score": "15"})).action is Action.CONTINUE


@pytest_twisted.ensureDeferred
async def test_a_normal_message_is_not_spam(spamd: PrivateSpamd) -> None:
    verdict = await check(spamd.target, HAM)
    assert verdict.action is Action.CONTINUE
    assert verdict.details["spam"] is False and verdict.details["score"] < 5
    assert "GTUBE" not in verdict.details["symbols"]
    edits = fields(verdict)
    assert [e[:2] for e in edits] == [("delete", "X-Spam-Flag"), ("delete", "X-Spam-Status"),
                                      ("add", "X-Spam-Status")]
    assert edits[2][2].startswith("No, score=")


@pytest_twisted.ensureDeferred
async def test_a_stopped_spamd_fails_the_check(spamd: PrivateSpamd) -> None:
    spamd.stop()
    with pytest.raises(ConnectError):
        await check(spamd.target, HAM)
    chain = FilterChain([from_spec(spamd.target, {}, reactor=reactor)], reactor=reactor)
    verdict = await chain.start(Session(hostname="mx.test")).stage("message", held_message(HAM))
    assert (verdict.action, verdict.reply.code, verdict.reply.enhanced) == (Action.TEMPFAIL, 451, "4.7.1")


def send(port: int, content: bytes) -> tuple[int, bytes]:
    """One message from alice to bob: the reply to its end of data (or the refusal)."""
    return smtp_send(port, "alice@example.org", content, ("bob@example.org",), timeout=CLIENT_TIMEOUT)


@pytest.mark.skipif(bool(missing_options("--filter")), reason="twistd esmtpkit has no --filter yet")
def test_the_pages_command_lines(spamd: PrivateSpamd, start_esmtpkit: Callable[..., EsmtpkitProcess]) -> None:
    """docs/filters/spamd.md's ``twistd esmtpkit --filter`` lines, with this spamd's port for the page's: spam
    marked (a forged X-Spam-Flag removed), then refused at reject-score."""
    marking, refusing = (entry.replace("tcp:127.0.0.1:783", spamd.target) for entry in filter_values(PAGE))
    server = start_esmtpkit("--filter", marking)
    assert send(server.port, b"X-Spam-Flag: NO\r\n" + SPAM)[0] == 250
    assert send(server.port, HAM)[0] == 250
    spam, ham = server.wait_for(2)
    spam_head, ham_head = (m.split(b"\r\n\r\n", 1)[0] for m in (spam, ham))
    assert b"X-Spam-Flag: NO" not in spam_head
    assert b"\r\nX-Spam-Flag: YES\r\nX-Spam-Status: Yes, score=" in spam_head
    assert b"X-Spam-Flag" not in ham_head and b"\r\nX-Spam-Status: No, score=" in ham_head
    assert refusing.endswith(",reject-score=15,user=mail,timeout=30")
    server = start_esmtpkit("--filter", refusing)
    assert send(server.port, SPAM) == (550, b"5.7.1 Message refused as spam")
    assert send(server.port, HAM)[0] == 250
    assert server.wait_for(1)[0].startswith(HEAD)
