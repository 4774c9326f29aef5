"""`Front` (a handler that holds each message, then passes it on or refuses it) and `MailAuthFront` (the mail-
authentication checks as a front): in memory with a fixed decision or controlled checks, then over loopback with
the real checks against a private name server (`tests.authzone`'s world)."""

from __future__ import annotations

import os
import re
import smtplib
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import authres
import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.names import dns, error as dns_error
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpkit.core.content import ContentMode, dot_stuff
from esmtpkit.core.reply import Reply
from esmtpkit.handlers.collecting import Collecting, MessageStore
from esmtpkit.handlers.front import Decision, Front
from esmtpkit.handlers.mailauth import MailAuthFront, claims_to_be, mail_auth_front
from esmtpkit.mailauth import MailAuth
from esmtpkit.mailauth.lookups import Lookups
from esmtpkit.mailauth.verdicts import AuthVerdicts, SpfVerdict
from esmtpkit.server.interfaces import ILMTPHandler
from esmtpkit.server.policy import Policy
from esmtpkit.testing import Call, Conversation, RecordingHandler, serve

from .authzone import AUTHSERV, MESSAGE, AuthWorld, dkim_sign, mail_auths
from .mailnet import PrivateDNS
from .support import Recorder, calls, smtp_client, smtp_send

ADDED = b"X-Added: by the front\r\n"

#: A message with folded fields, a field the front removes (folded too), dot-led lines and a long body line.
CONTENT = (b"From: Alice <alice@example.org>\r\n"
           b"X-Remove-Me: first line\r\n"
           b"\tand its continuation\r\n"
           b"Subject: a folded\r\n"
           b" subject\r\n"
           b"x-remove-me: again\r\n"
           b"To: bob@example.net\r\n"
           b"\r\n"
           b"Body line 1\r\n"
           b".leading dot\r\n"
           b"..\r\n"
           b"\r\n"
           + b"y" * 50 + b"\r\n"
           b"X-Remove-Me: not a header, in the body\r\n"
           b"last line\r\n")
#: `CONTENT` as the handler behind must get it: the added field on top, the X-Remove-Me fields gone.
PASSED = (ADDED
          + b"From: Alice <alice@example.org>\r\n"
          b"Subject: a folded\r\n"
          b" subject\r\n"
          b"To: bob@example.net\r\n"
          + CONTENT.split(b"\r\n\r\n", 1)[1].join([b"\r\n", b""]))
HEADERS = [("X-Added", "by the front"), ("From", "Alice <alice@example.org>"), ("Subject", "a folded subject"),
           ("To", "bob@example.net")]
BODY = CONTENT.split(b"\r\n\r\n", 1)[1]


def removing(name: bytes, value: bytes) -> bool:
    return name.lower() == b"x-remove-me"


class Fixed(Front):
    """A front whose decision is given: a `Decision`, a Deferred of one, or an exception to raise. It records
    what it saw of the held message when it decided."""

    def __init__(self, behind: Any, decision: Any = None) -> None:
        super().__init__(behind)
        self.decision = decision if decision is not None else Decision(add=[ADDED], remove=removing)
        self.seen: list[tuple[bytes, bytes]] = []
        self.temp_files: list[list[str]] = []

    def decide(self) -> Any:
        with self.open_held() as held:
            self.seen.append((self.head, held.read()))
        self.temp_files.append(held_files())
        if isinstance(self.decision, BaseException):
            raise self.decision
        return self.decision


def behind(mode: Any, size: int | None = None, seed: bool = False) -> RecordingHandler:
    """A recording handler asking for ``mode`` (a `ContentMode`, set as ``content_mode`` or, with ``seed``, as
    the seed's ``chunk_mode``) in chunks of ``size``."""
    handler = RecordingHandler()
    if seed:
        handler.chunk_mode = {ContentMode.PARSED: None, ContentMode.LINES: False, ContentMode.RAW: True}[mode]
    else:
        handler.content_mode = mode
    handler.chunk_size = size
    return handler


def talk(front: Any, **policy: Any) -> Conversation:
    return Conversation(front, Policy(hostname=AUTHSERV, **policy))


def send(conversation: Conversation, content: bytes, recipients: tuple[str, ...] = ("bob@example.net",)) -> Reply:
    return conversation.message("alice@example.org", list(recipients), content)


def chunks(handler: RecordingHandler) -> list[bytes]:
    return [call.args[0] for call in handler.calls if call.verb == "body"]


def headers(handler: RecordingHandler) -> list[tuple[str, str]]:
    return [call.args for call in handler.calls if call.verb == "header"]  # type: ignore[misc]


@pytest.fixture
def temp_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Where `tempfile` puts the fronts' held messages during the test (so they can be seen, and missed)."""
    folder = tmp_path / "held"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def held_files() -> list[str]:
    """The held-message files in `tempfile`'s folder now."""
    return sorted(name for name in os.listdir(tempfile.gettempdir()) if name.startswith("esmtpkit-held-"))


# ---- replay in the handler's content mode -------------------------------------------------------------------------

MODES = [ContentMode.PARSED, ContentMode.LINES, ContentMode.RAW]


@pytest.mark.parametrize("seed", [False, True], ids=["content_mode", "chunk_mode"])
@pytest.mark.parametrize("size", [None, 7, 4096])
@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
def test_replayed_in_the_mode_and_chunk_size_asked_for(mode: ContentMode, size: int | None, seed: bool) -> None:
    handler = behind(mode, size, seed)
    front = Fixed(handler)
    reply = send(talk(front), CONTENT)
    assert (reply.code, reply.enhanced) == (250, "2.0.0")
    assert front.seen == [(CONTENT.split(b"\r\n\r\n")[0] + b"\r\n", CONTENT)]
    verbs = handler.verbs
    assert verbs[-1] == "eom" and "abort" not in verbs
    pieces = chunks(handler)
    assert all(pieces) and all(len(piece) <= (size or 65536) for piece in pieces)
    if mode is ContentMode.RAW:
        assert "header" not in verbs and "eoh" not in verbs
        assert b"".join(pieces) == PASSED
        return
    assert headers(handler) == HEADERS
    assert verbs.count("eoh") == 1
    assert verbs.index("eoh") > max(i for i, verb in enumerate(verbs) if verb == "header")
    assert verbs.index("eoh") < verbs.index("body")
    assert b"".join(pieces) == BODY
    if mode is ContentMode.LINES:
        # one call per line; a line longer than chunk_size comes in chunk_size pieces
        assert all(piece.endswith(b"\r\n") or len(piece) == size for piece in pieces), pieces
        assert b"\r\n" not in b"".join(piece[:-2] for piece in pieces)
        assert len(pieces) >= BODY.count(b"\r\n")


@pytest.mark.parametrize("content", [
    CONTENT,
    b"",
    b"Subject: header only\r\n",
    b"\r\nbody only\r\n",
    b"X-First: 1\r\nThis line is not a header\r\nX-Second: 2\r\n\r\nbody\r\n",
    b"Subject: " + b"long " * 150 + b"\r\n folded\r\n\r\n" + (b"w" * 68 + b"\r\n") * 1000,
], ids=["fields", "empty", "header-only", "body-only", "not-a-field", "long"])
@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
def test_unchanged_without_a_decision_to_change(mode: ContentMode, content: bytes) -> None:
    """The default decision passes the message on as the handler would have had it without the front."""
    direct = behind(mode, 5000)
    send(talk(direct), content)
    handler = behind(mode, 5000)
    reply = send(talk(Front(handler)), content)
    assert reply.code == 250
    assert calls(handler) == calls(direct)


@pytest.mark.xfail(strict=True, reason="Front replays in 65536-octet chunks to a handler whose chunk_size is None, "
                   "not in the policy's chunk_size (the front cannot see the policy)")
def test_policy_chunk_size_for_a_handler_without_its_own() -> None:
    direct = behind(ContentMode.RAW)
    send(talk(direct, chunk_size=16), CONTENT)
    handler = behind(ContentMode.RAW)
    send(talk(Front(handler), chunk_size=16), CONTENT)
    assert max(map(len, chunks(direct))) <= 16
    assert max(map(len, chunks(handler))) <= 16


def test_dot_stuffing_is_undone_once() -> None:
    """What the front holds is the content, dot-unstuffed once, as the client meant it."""
    handler = behind(ContentMode.RAW)
    front = Fixed(handler, Decision())
    content = b"Subject: dots\r\n\r\n.\r\n..\r\n.x\r\n"
    talk(front).write(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n" + dot_stuff(content))
    assert front.seen[0][1] == content
    assert b"".join(chunks(handler)) == content


def test_header_only_message_loses_the_removed_fields() -> None:
    """A message that is all header section (no empty line, no body) is still cleaned of removed fields."""
    handler = behind(ContentMode.RAW)
    content = b"From: alice@example.org\r\nX-Remove-Me: forged\r\nSubject: no body\r\n"
    reply = send(talk(Fixed(handler)), content)
    assert reply.code == 250
    assert b"".join(chunks(handler)) == ADDED + b"From: alice@example.org\r\nSubject: no body\r\n"


def test_message_without_header_section() -> None:
    """Content that starts with the empty line: the added field goes on top, the rest as it was."""
    handler = behind(ContentMode.PARSED)
    reply = send(talk(Fixed(handler)), b"\r\nX-Remove-Me: body text\r\n")
    assert reply.code == 250
    assert headers(handler) == [("X-Added", "by the front")]
    assert b"".join(chunks(handler)) == b"X-Remove-Me: body text\r\n"


def bdat(conversation: Conversation, content: bytes, cut: int | None = None) -> Reply:
    """One transaction whose content goes in two BDAT chunks (cut at ``cut``, else in the middle)."""
    cut = len(content) // 2 if cut is None else cut
    first, last = content[:cut], content[cut:]
    conversation.write(b"EHLO c\r\nMAIL FROM:<a@b.test> BODY=BINARYMIME\r\nRCPT TO:<c@d.test>\r\n"
                       + b"BDAT %d\r\n" % len(first) + first + b"BDAT %d LAST\r\n" % len(last) + last)
    return conversation.replies()[-1]


@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
@pytest.mark.parametrize("content", [
    CONTENT + b"no CRLF at the end",
    b"Subject: only a header section, its last line without CRLF",
    b"Subject: s\r\n\r\n",
], ids=["body", "header-only", "empty-body"])
def test_bdat_content_passed_on_as_it_came(mode: ContentMode, content: bytes) -> None:
    """BDAT content (which may end without CRLF) reaches the handler behind the front as it would have reached
    it directly."""
    direct = behind(mode, 9)
    assert bdat(talk(direct), content).code == 250
    handler = behind(mode, 9)
    front = Fixed(handler, Decision())
    assert bdat(talk(front), content).code == 250
    assert front.seen[0][1] == content
    assert calls(handler) == calls(direct)


@pytest.mark.parametrize("content, passed", [
    (b"Subject: s\r\nX-Remove-Me: last, without CRLF", b"Subject: s\r\n"),
    (b"X-Remove-Me: first\r\nSubject: last, without CRLF", b"Subject: last, without CRLF"),
    (b"Subject: s\r\nX-Remove-Me: folded\r\n and its last line without CRLF", b"Subject: s\r\n"),
])
def test_bdat_header_only_message_loses_the_removed_fields(content: bytes, passed: bytes) -> None:
    handler = behind(ContentMode.RAW)
    assert bdat(talk(Fixed(handler)), content, cut=5).code == 250
    assert b"".join(chunks(handler)) == ADDED + passed


def test_each_message_of_a_session_is_held_anew() -> None:
    handler = behind(ContentMode.RAW)
    front = Fixed(handler)
    conversation = talk(front)
    first = b"Subject: one\r\nX-Remove-Me: 1\r\n\r\nfirst\r\n"
    second = b"Subject: two\r\n\r\nsecond\r\n"
    assert send(conversation, first).code == 250
    assert conversation.send("MAIL FROM:<a@b.test>").code == 250
    conversation.send("RCPT TO:<c@d.test>")
    conversation.write(b"DATA\r\n" + second + b".\r\n")
    assert [m["body"] for m in handler.messages] == [ADDED + b"Subject: one\r\n\r\nfirst\r\n", ADDED + second]
    assert [seen[1] for seen in front.seen] == [first, second]


def test_behind_waited_for_while_replaying() -> None:
    """The replay waits on each Deferred the handler behind returns from body() before the next chunk, and on
    its eom() Deferred for the reply."""
    handler = behind(ContentMode.RAW, 10)
    gates: list[Deferred[None]] = []

    def slow_body(chunk: bytes) -> Deferred[None]:
        gates.append(Deferred())
        return gates[-1]

    ending: Deferred[Reply] = Deferred()
    handler.replies.update(body=slow_body, eom=lambda: ending)
    conversation = talk(Fixed(handler))
    conversation.write(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n" + dot_stuff(CONTENT))
    count = 0
    while gates and len(gates) > count:
        assert handler.verbs.count("body") == len(gates)
        count = len(gates)
        gates[-1].callback(None)
    assert b"".join(chunks(handler)) == PASSED
    assert conversation.replies()[-1].code == 354
    ending.callback(Reply.of(250, "stored", enhanced="2.0.0"))
    assert conversation.replies() == [Reply.of(250, "stored", enhanced="2.0.0")]


# ---- holding large messages in a temporary file -------------------------------------------------------------------

LARGE = b"Subject: large\r\nX-Remove-Me: gone\r\n\r\n" + b"".join(b"line %06d " % i + b"z" * 60 + b"\r\n"
                                                                    for i in range(3000))


@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
def test_large_message_spills_to_a_file_and_replays_exactly(temp_dir: Path, mode: ContentMode) -> None:
    handler = behind(mode, 1000)
    front = Fixed(handler)
    front.hold_in_memory = 4096
    reply = send(talk(front), LARGE)
    assert reply.code == 250
    assert len(front.temp_files[0]) == 1, "the message was not in a file while the front decided"
    assert front.seen[0] == (b"Subject: large\r\nX-Remove-Me: gone\r\n", LARGE)
    expected = ADDED + LARGE.replace(b"X-Remove-Me: gone\r\n", b"")
    if mode is ContentMode.RAW:
        assert b"".join(chunks(handler)) == expected
    else:
        assert headers(handler) == [("X-Added", "by the front"), ("Subject", "large")]
        assert b"".join(chunks(handler)) == expected.split(b"\r\n\r\n", 1)[1]
    assert all(len(piece) <= 1000 for piece in chunks(handler))
    assert held_files() == []


def test_small_message_stays_in_memory(temp_dir: Path) -> None:
    front = Fixed(behind(ContentMode.RAW))
    front.hold_in_memory = len(CONTENT)
    assert send(talk(front), CONTENT).code == 250
    assert front.temp_files == [[]]


def start_large(front: Front, bdat: bool = False) -> Conversation:
    """A conversation whose message (`LARGE`, half of it) is on its way to ``front``, already in a file."""
    front.hold_in_memory = 4096
    conversation = talk(front)
    half = LARGE[:len(LARGE) // 2]
    conversation.write(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    if bdat:
        conversation.write(b"BDAT %d\r\n" % len(half) + half)
    else:
        conversation.write(b"DATA\r\n" + half)
    assert len(held_files()) == 1
    return conversation


def test_held_file_removed_when_the_connection_is_lost(temp_dir: Path) -> None:
    handler = behind(ContentMode.RAW)
    conversation = start_large(Fixed(handler))
    conversation.protocol.connectionLost(Failure(ConnectionDone()))
    assert held_files() == []
    assert handler.verbs[-1] == "abort" and "eom" not in handler.verbs


def test_held_file_removed_on_rset_between_chunks(temp_dir: Path) -> None:
    handler = behind(ContentMode.RAW)
    conversation = start_large(Fixed(handler), bdat=True)
    conversation.replies()
    assert conversation.send("RSET").code == 250
    assert held_files() == []
    assert "abort" in handler.verbs and "eom" not in handler.verbs


def test_held_file_removed_when_the_message_is_too_big(temp_dir: Path) -> None:
    handler = behind(ContentMode.RAW)
    front = Fixed(handler)
    front.hold_in_memory = 4096
    reply = send(talk(front, max_message_size=len(LARGE) - 100), LARGE)
    assert reply.code == 552
    assert held_files() == []
    assert "eom" not in handler.verbs


@pytest.mark.parametrize("decision", [Decision(Reply.of(550, "no", enhanced="5.7.1")), RuntimeError("broken")],
                         ids=["refused", "failed"])
def test_held_file_removed_when_not_passed_on(temp_dir: Path, decision: Any) -> None:
    front = Fixed(behind(ContentMode.RAW), decision)
    front.hold_in_memory = 4096
    reply = send(talk(front), LARGE)
    assert reply.code in (550, 451)
    assert len(front.temp_files[0]) == 1
    assert held_files() == []


def test_held_file_removed_when_the_connection_drops_while_deciding(temp_dir: Path) -> None:
    """The client hangs up while the front decides: the server does not abort (eom has begun); once the decision
    comes the front lets go of its file and the handler behind drops the message (the client never heard it was
    taken, and will send it again), then hears that the connection ended."""
    pending: Deferred[Decision] = Deferred()
    handler = behind(ContentMode.RAW)
    front = Fixed(handler, pending)
    front.hold_in_memory = 4096
    conversation = talk(front)
    conversation.write(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n" + LARGE + b".\r\n")
    assert len(held_files()) == 1
    conversation.protocol.connectionLost(Failure(ConnectionDone()))
    pending.callback(Decision())
    assert held_files() == []
    assert b"".join(chunks(handler)) == b""
    assert [c.verb for c in handler.calls][-1] == "abort"


# ---- LMTP ---------------------------------------------------------------------------------------------------------

@implementer(ILMTPHandler)
class PerRecipient(RecordingHandler):
    """An LMTP handler: the mailbox of anyone called ``full`` is full."""

    content_mode = ContentMode.RAW

    def eom_per_recipient(self) -> list[Reply]:
        self.calls.append(Call("eom_per_recipient", ()))
        assert self.session is not None
        return [Reply.of(452, "mailbox full", enhanced="4.2.2") if r.local_part == "full"
                else Reply.of(250, f"delivered to {r}", enhanced="2.0.0") for r in self.session.envelope.recipients]


def lmtp_message(front: Front, content: bytes = CONTENT) -> list[Reply]:
    conversation = talk(front, lmtp=True)
    conversation.write(b"LHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<bob@d.test>\r\nRCPT TO:<full@d.test>\r\n"
                       b"RCPT TO:<carol@d.test>\r\nDATA\r\n" + dot_stuff(content))
    return conversation.replies()[-3:]


def test_lmtp_replies_per_recipient_come_through() -> None:
    handler = PerRecipient()
    front = Fixed(handler)
    assert ILMTPHandler.providedBy(front)
    replies = lmtp_message(front)
    assert [(r.code, r.enhanced) for r in replies] == [(250, "2.0.0"), (452, "4.2.2"), (250, "2.0.0")]
    assert "delivered to carol@d.test" in replies[2].text
    assert "eom_per_recipient" in handler.verbs and "eom" not in handler.verbs
    assert b"".join(chunks(handler)) == PASSED


def test_lmtp_refusal_answers_every_recipient() -> None:
    handler = PerRecipient()
    refusal = Reply.of(550, "not wanted", enhanced="5.7.1")
    replies = lmtp_message(Fixed(handler, Decision(refusal)))
    assert replies == [refusal] * 3
    assert handler.verbs[-1] == "abort" and "eom_per_recipient" not in handler.verbs


def test_lmtp_failing_decision_fails_every_recipient_temporarily() -> None:
    handler = PerRecipient()
    replies = lmtp_message(Fixed(handler, RuntimeError("the decider broke")))
    assert len(replies) == 3 and all(400 <= r.code < 500 for r in replies), replies
    assert handler.verbs[-1] == "abort" and "eom_per_recipient" not in handler.verbs


def test_front_of_an_smtp_handler_is_not_lmtp() -> None:
    assert not ILMTPHandler.providedBy(Fixed(RecordingHandler()))


# ---- refusing, and failing ----------------------------------------------------------------------------------------

def test_refusal_is_the_reply_and_the_handler_behind_is_aborted() -> None:
    handler = behind(ContentMode.PARSED)
    refusal = Reply.of(550, "Message refused by policy", enhanced="5.7.1")
    reply = send(talk(Fixed(handler, Decision(refusal, add=[ADDED]))), CONTENT)
    assert reply == refusal
    assert handler.verbs[-1] == "abort"
    assert not {"header", "eoh", "body", "eom"} & set(handler.verbs)
    assert handler.messages == []


def test_refusal_decided_later() -> None:
    handler = behind(ContentMode.RAW)
    pending: Deferred[Decision] = Deferred()
    conversation = talk(Fixed(handler, pending))
    conversation.write(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n" + dot_stuff(CONTENT))
    assert conversation.replies()[-1].code == 354
    refusal = Reply.of(451, "try later", enhanced="4.7.1")
    pending.callback(Decision(refusal))
    assert conversation.replies() == [refusal]
    assert handler.verbs[-1] == "abort" and "eom" not in handler.verbs
    assert conversation.send("MAIL FROM:<a@b.test>").code == 250  # the session goes on


@pytest.mark.parametrize("how", ["raises", "fails", "coroutine"])
def test_failing_decision_is_a_temporary_failure(how: str) -> None:
    handler = behind(ContentMode.RAW)

    class Failing(Front):
        def decide(self) -> Any:
            if how == "raises":
                raise RuntimeError("the decider broke")
            if how == "fails":
                return fail(RuntimeError("the decider broke"))

            async def broken() -> Decision:
                raise RuntimeError("the decider broke")

            return Deferred.fromCoroutine(broken())

    reply = send(talk(Failing(handler)), CONTENT)
    assert 400 <= reply.code < 500, reply
    assert handler.verbs[-1] == "abort" and "eom" not in handler.verbs and "body" not in handler.verbs


def test_handler_failing_during_replay_is_a_temporary_failure() -> None:
    handler = behind(ContentMode.RAW)

    def broken(chunk: bytes) -> None:
        raise OSError("disk full")

    handler.replies["body"] = broken
    reply = send(talk(Fixed(handler)), CONTENT)
    assert 400 <= reply.code < 500, reply
    assert handler.verbs[-1] == "abort" and "eom" not in handler.verbs


def test_refused_mail_from_the_handler_behind_comes_through() -> None:
    handler = RecordingHandler({"mail": Reply.of(550, "no such sender", enhanced="5.1.8")})
    conversation = talk(Fixed(handler))
    conversation.send("EHLO c")
    reply = conversation.send("MAIL FROM:<a@b.test>")
    assert (reply.code, reply.enhanced) == (550, "5.1.8")


def test_the_handler_behind_may_close_the_connection() -> None:
    """``disconnect`` is the handler behind's: set there, the server closes after the reply."""
    handler = RecordingHandler()

    def closing(*args: Any) -> Reply:
        handler.disconnect = True
        return Reply.of(421, "closing", enhanced="4.3.2")

    handler.replies["mail"] = closing
    front = Fixed(handler)
    conversation = talk(front)
    conversation.send("EHLO c")
    assert conversation.send("MAIL FROM:<a@b.test>").code == 421
    assert front.disconnect and conversation.closed


def test_behind_must_be_a_handler() -> None:
    with pytest.raises(TypeError):
        Front(object())


# ---- Authentication-Results fields claiming to be ours ------------------------------------------------------------

OURS = [
    b"mx.test; spf=pass smtp.mailfrom=a@b.test",
    b"MX.Test; dkim=pass header.d=b.test",
    b"mx.test 1; spf=pass",
    b"(forged) mx.test; dkim=pass",
    b"mx.test(no space); dkim=pass",
    b"(comment; with a semicolon) mx.test; dkim=pass",
    b"(nested (comment) here) mx.test; dkim=pass",
    b"(escaped \\) paren) mx.test; dkim=pass",
    b'"mx.test"; dkim=pass',
    b"mx.test; none",
]
THEIRS = [
    b"other.test; spf=pass",
    b"mx.test.evil; dkim=pass",
    b"evil-mx.test; dkim=pass",
    b"other.test; dkim=pass (mx.test)",
    b"(mx.test) other.test; dkim=pass",
    b"",
]


@pytest.mark.parametrize("value", OURS)
def test_our_results_are_picked(value: bytes) -> None:
    assert claims_to_be("MX.test")(b"Authentication-Results", value)
    assert claims_to_be("mx.test")(b"authentication-RESULTS", value)


@pytest.mark.parametrize("value", THEIRS)
def test_their_results_are_not(value: bytes) -> None:
    assert not claims_to_be("mx.test")(b"Authentication-Results", value)


@pytest.mark.parametrize("name", [b"X-Authentication-Results", b"ARC-Authentication-Results", b"Received"])
def test_other_fields_are_not(name: bytes) -> None:
    assert not claims_to_be("mx.test")(name, b"mx.test; dkim=pass")


class Checks:
    """A `MailAuth` stand-in the test answers: SPF verdicts the test gives (or holds), the message checks'
    verdicts filled in at once, and refusals as set."""

    def __init__(self, spf_reject: bool = False) -> None:
        self.authserv_id = AUTHSERV
        self.spf_reject = spf_reject
        self.senders: list[tuple[str, Deferred[AuthVerdicts]]] = []
        self.hold = False
        self.messages: list[tuple[AuthVerdicts, bytes, bytes]] = []
        self.at_mail: Reply | None = None
        self.at_end: Reply | None = None

    def check_sender(self, session: Any, sender: str) -> Deferred[AuthVerdicts]:
        d: Deferred[AuthVerdicts] = Deferred()
        self.senders.append((sender, d))
        if not self.hold:
            self.answer(-1)
        return d

    def answer(self, index: int, result: str = "pass") -> None:
        sender, d = self.senders[index]
        domain = sender.rpartition("@")[2]
        d.callback(AuthVerdicts(spf_mailfrom=SpfVerdict(result, "mailfrom", sender, domain), remote_ip="127.0.0.1"))

    def refusal_at_mail(self, verdicts: AuthVerdicts) -> Reply | None:
        return self.at_mail

    def check_message(self, session: Any, verdicts: AuthVerdicts, head: bytes,
                      open_message: Callable[[], Any]) -> Deferred[AuthVerdicts]:
        with open_message() as held:
            self.messages.append((verdicts, head, held.read()))
        verdicts.dkim_checked = True
        return succeed(verdicts)

    def refusal_at_end(self, verdicts: AuthVerdicts) -> Reply | None:
        return self.at_end


FORGED = (b"Authentication-Results: mx.test; dkim=pass header.d=bank.test\r\n"
          b"Authentication-Results: other.test; spf=pass smtp.mailfrom=a@b.test\r\n"
          b"authentication-results: MX.TEST (looks official);\r\n"
          b"\tdmarc=pass header.from=bank.test\r\n"
          b"Authentication-Results: (sneaky; comment) mx.test; arc=pass\r\n"
          b"From: alerts@bank.test\r\n"
          b"Subject: forged results\r\n"
          b"\r\n"
          b"Authentication-Results: mx.test; in the body, left alone\r\n")


def results_of(field: bytes) -> list[str]:
    parsed = authres.AuthenticationResultsHeader.parse(field.decode().replace("\r\n", ""))
    return [f"{r.method}={r.result}" for r in parsed.results]


@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
def test_mail_auth_front_replaces_our_results_and_keeps_theirs(mode: ContentMode) -> None:
    handler = behind(mode, 16)
    checks = Checks()
    front = MailAuthFront(handler, checks)  # type: ignore[arg-type]
    reply = send(talk(front), FORGED)
    assert reply.code == 250
    assert checks.messages[0][2] == FORGED
    if mode is ContentMode.RAW:
        head, body = b"".join(chunks(handler)).split(b"\r\n\r\n", 1)
        fields = re.split(rb"\r\n(?![ \t])", head)
    else:
        fields = [f"{n}: {v}".encode() for n, v in headers(handler)]
        body = b"".join(chunks(handler))
    assert fields[0].startswith(b"Authentication-Results: mx.test;")
    assert results_of(fields[0]) == ["spf=pass", "dkim=none"]
    assert fields[1:] == [b"Authentication-Results: other.test; spf=pass smtp.mailfrom=a@b.test",
                          b"From: alerts@bank.test", b"Subject: forged results"]
    assert body == b"Authentication-Results: mx.test; in the body, left alone\r\n"


def test_mail_auth_front_header_only_message_loses_forged_results() -> None:
    handler = behind(ContentMode.RAW)
    content = b"From: alerts@bank.test\r\nAuthentication-Results: mx.test; dmarc=pass header.from=bank.test\r\n"
    reply = send(talk(MailAuthFront(handler, Checks())), content)  # type: ignore[arg-type]
    assert reply.code == 250
    stored = b"".join(chunks(handler))
    assert stored.count(b"Authentication-Results:") == 1 and b"dmarc=pass" not in stored, stored
    assert stored.endswith(b"From: alerts@bank.test\r\n")


def test_mail_auth_front_bdat_forged_results_as_the_last_line() -> None:
    """BDAT lets content end inside its header section without a CRLF; a forged field there goes too."""
    handler = behind(ContentMode.PARSED)
    content = b"From: alerts@bank.test\r\nAuthentication-Results: mx.test; dmarc=pass header.from=bank.test"
    assert bdat(talk(MailAuthFront(handler, Checks())), content).code == 250  # type: ignore[arg-type]
    assert [name for name, _ in headers(handler)] == ["Authentication-Results", "From"]
    assert "dmarc=pass" not in str(headers(handler))


def test_verdicts_on_the_envelope_before_the_handler_sees_the_message() -> None:
    seen: list[tuple[str, Any]] = []
    handler = behind(ContentMode.RAW)

    def noting(verb: str) -> Callable[..., Reply | None]:
        def note(*args: Any) -> Reply | None:
            seen.append((verb, handler.session.envelope.auth))  # type: ignore[union-attr]
            return None if verb == "body" else Reply.of(250, "ok")
        return note

    handler.replies.update(rcpt=noting("rcpt"), body=noting("body"), eom=noting("eom"))
    assert send(talk(MailAuthFront(handler, Checks())), CONTENT).code == 250  # type: ignore[arg-type]
    assert [verb for verb, _ in seen][:2] == ["rcpt", "body"] and seen[-1][0] == "eom"
    assert all(isinstance(auth, AuthVerdicts) for _, auth in seen), seen
    assert all(auth.spf_mailfrom.result == "pass" for _, auth in seen)
    assert all(auth.dkim_checked for verb, auth in seen if verb != "rcpt")


def test_refusal_at_the_end_reaches_the_client_and_not_the_handler() -> None:
    handler = behind(ContentMode.RAW)
    checks = Checks()
    checks.at_end = Reply.of(550, "DMARC says no", enhanced="5.7.26")
    reply = send(talk(MailAuthFront(handler, checks)), CONTENT)  # type: ignore[arg-type]
    assert reply == checks.at_end
    assert handler.verbs[-1] == "abort" and "eom" not in handler.verbs and "body" not in handler.verbs


def test_refusal_at_mail_never_reaches_the_handler() -> None:
    handler = RecordingHandler()
    checks = Checks(spf_reject=True)
    checks.at_mail = Reply.of(550, "SPF says no", enhanced="5.7.23")
    conversation = talk(MailAuthFront(handler, checks))  # type: ignore[arg-type]
    conversation.send("EHLO c")
    assert conversation.send("MAIL FROM:<a@b.test>") == checks.at_mail
    assert "mail" not in handler.verbs


def test_spf_reject_holds_mail_until_spf_answers() -> None:
    handler = RecordingHandler()
    checks = Checks(spf_reject=True)
    checks.hold = True
    conversation = talk(MailAuthFront(handler, checks))  # type: ignore[arg-type]
    conversation.send("EHLO c")
    assert conversation.send("MAIL FROM:<a@b.test>") is None
    assert "mail" not in handler.verbs
    checks.answer(0)
    assert conversation.replies()[0].code == 250
    assert handler.verbs[-1] == "mail"


@pytest.mark.parametrize("stale_first", [True, False], ids=["stale-answer-first", "stale-answer-last"])
def test_late_spf_answer_of_an_earlier_transaction_is_not_taken(stale_first: bool) -> None:
    """MAIL, RSET, MAIL again while the first SPF check is still out: the message gets its own sender's
    verdict, whichever check answers first."""
    handler = behind(ContentMode.RAW)
    noted: list[Any] = []
    handler.replies["eom"] = lambda: noted.append(handler.session.envelope.auth) or Reply.of(250, "ok")
    checks = Checks()
    checks.hold = True
    conversation = talk(MailAuthFront(handler, checks))  # type: ignore[arg-type]
    conversation.write(b"EHLO c\r\nMAIL FROM:<first@pass.test>\r\nRSET\r\nMAIL FROM:<second@fail.test>\r\n")
    if stale_first:
        checks.answer(0, "pass")
    conversation.write(b"RCPT TO:<c@d.test>\r\nDATA\r\n" + dot_stuff(CONTENT))
    checks.answer(1, "fail")
    if not stale_first:
        checks.answer(0, "pass")
    assert conversation.replies()[-1].code == 250
    [(verdicts, _, _)] = checks.messages
    assert verdicts.spf_mailfrom.identity == "second@fail.test"
    assert noted == [verdicts]
    assert b"spf=fail smtp.mailfrom=second@fail.test" in b"".join(chunks(handler)).replace(b"\r\n\t", b" ")


def test_spf_answering_after_the_end_of_data_is_waited_for() -> None:
    handler = behind(ContentMode.RAW)
    checks = Checks()
    checks.hold = True
    conversation = talk(MailAuthFront(handler, checks))  # type: ignore[arg-type]
    conversation.write(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n" + dot_stuff(CONTENT))
    assert conversation.replies()[-1].code == 354 and checks.messages == []
    checks.answer(0, "softfail")
    assert conversation.replies()[-1].code == 250
    assert checks.messages[0][0].spf_mailfrom.result == "softfail"


# ---- end to end, over loopback, with the real checks --------------------------------------------------------------

class Gate:
    """A resolver in front of the real one that holds the queries for ``names`` until `release`."""

    def __init__(self, real: Any, names: tuple[str, ...]) -> None:
        self.real = real
        self.names = names
        self.held: list[tuple[str, Deferred[Any]]] = []
        self.waiting: list[Deferred[None]] = []

    def query(self, query: dns.Query, timeout: Any = None) -> Deferred[Any]:
        name = str(query.name).lower()
        if name not in self.names:
            return self.real.query(query, timeout)
        d: Deferred[Any] = Deferred()
        self.held.append((name, d))
        waiting, self.waiting = self.waiting, []
        for w in waiting:
            w.callback(None)
        return d

    def some_held(self) -> Deferred[None]:
        """Fires once a query is held (failing after a minute, so that a test never hangs on it)."""
        from twisted.internet import reactor

        if self.held:
            return succeed(None)
        self.waiting.append(Deferred())
        return self.waiting[-1].addTimeout(60, reactor)

    def release(self) -> None:
        """Every held query fails as a timeout would."""
        held, self.held = self.held, []
        for name, d in held:
            d.errback(dns_error.DNSQueryTimeoutError(name))


@pytest.fixture
def make(auth_dns: PrivateDNS) -> Iterator[Callable[..., MailAuth]]:
    """``make(**options)``: a MailAuth asking the private name server, closed after the test."""
    with mail_auths(auth_dns.servers, timeout=(0.5,)) as build:
        yield build


class Noting(Collecting):
    """Collects, and notes ``session.envelope.auth`` when its eom() runs."""

    noted: list[Any]

    def eom(self) -> Any:
        self.noted.append(self.session.envelope.auth)  # type: ignore[union-attr]
        return super().eom()


class Loopback:
    """A server on 127.0.0.1 with ``checks`` in front of a `Noting` handler."""

    def __init__(self, checks: MailAuth) -> None:
        self.store = MessageStore()
        self.noted: list[Any] = []
        self.checks = checks

    def handler(self) -> Noting:
        handler = Noting(self.store)
        handler.noted = self.noted
        return handler

    async def start(self) -> "Loopback":
        policy = Policy(hostname=AUTHSERV, fronts=[mail_auth_front(self.checks)])
        self.server = await serve(self.handler, policy=policy)
        return self

    def client(self) -> smtplib.SMTP:
        return smtp_client(self.server.port, timeout=30)

    async def transaction(self, sender: str, content: bytes) -> tuple[int, bytes]:
        """One message to bob@example.test by smtplib, in a thread (`smtp_send`); the reply that ended it."""
        return await in_thread(smtp_send, self.server.port, sender, content, ("bob@example.test",),
                               "helo.good.test", 30)


def in_thread(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return threads.deferToThread(function, *args)


async def served(checks: MailAuth) -> Loopback:
    return await Loopback(checks).start()


def first_field(data: bytes) -> bytes:
    return re.split(rb"\r\n(?![ \t])", data, 1)[0]


@pytest_twisted.ensureDeferred
async def test_signed_message_passes_every_check(make: Any, auth_world: AuthWorld) -> None:
    server = await served(make())
    try:
        signed = dkim_sign(MESSAGE, "good.test", auth_world.keys["good.test"])
        code, _ = await server.transaction("alice@good.test", signed)
        assert code == 250
    finally:
        await server.server.stop()
    [message] = server.store.messages
    field = first_field(message.data)
    assert field.startswith(b"Authentication-Results: mx.test;"), message.data[:300]
    results = results_of(field)
    assert results[:4] == ["spf=pass", "spf=pass", "dkim=pass", "dmarc=pass"], results
    assert message.data.endswith(signed)
    [auth] = server.noted
    assert isinstance(auth, AuthVerdicts)
    assert (auth.spf_mailfrom.result, auth.dmarc.result, [d.result for d in auth.dkim]) == ("pass", "pass", ["pass"])


@pytest_twisted.ensureDeferred
async def test_forged_results_replaced_over_loopback(make: Any) -> None:
    server = await served(make(dkim=False, dmarc=False, arc=False))
    try:
        assert (await server.transaction("alice@good.test", FORGED))[0] == 250
    finally:
        await server.server.stop()
    [message] = server.store.messages
    head = message.data.split(b"\r\n\r\n", 1)[0]
    assert results_of(first_field(head)) == ["spf=pass", "spf=pass"]
    assert head.count(b"Authentication-Results:") + head.count(b"authentication-results:") == 2
    assert b"Authentication-Results: other.test; spf=pass" in head


@pytest_twisted.ensureDeferred
async def test_spf_reject_refuses_a_failing_sender_at_mail(make: Any) -> None:
    server = await served(make(spf_reject=True))
    try:
        def run() -> list[tuple[int, bytes]]:
            with server.client() as client:
                refused = client.mail("someone@other.test")
                client.rset()
                accepted = client.mail("alice@good.test")
                return [refused, accepted]

        refused, accepted = await in_thread(run)
    finally:
        await server.server.stop()
    assert refused[0] == 550 and refused[1].startswith(b"5.7.23 "), refused
    assert b"other.test" in refused[1]
    assert accepted[0] == 250
    assert server.store.messages == []


@pytest_twisted.ensureDeferred
async def test_spf_reject_defers_a_sender_dns_cannot_answer_for(make: Any) -> None:
    server = await served(make(spf_reject=True, timeout=(0.2,)))
    try:
        code, text = await server.transaction("someone@slow.test", MESSAGE)
    finally:
        await server.server.stop()
    assert code == 451 and text.startswith(b"4.7.24 "), (code, text)
    assert server.store.messages == []


@pytest_twisted.ensureDeferred
async def test_dmarc_reject_refuses_at_the_end_of_data(make: Any) -> None:
    server = await served(make(dmarc_reject=True))
    strict = MESSAGE.replace(b"From: Alice <alice@good.test>", b"From: Boss <boss@strict.test>")
    try:
        code, text = await server.transaction("alice@good.test", strict)
    finally:
        await server.server.stop()
    assert code == 550 and text.startswith(b"5.7.26 "), (code, text)
    assert server.store.messages == [] and server.noted == []


@pytest_twisted.ensureDeferred
async def test_without_spf_reject_mail_does_not_wait_for_spf(make: Any) -> None:
    """MAIL FROM a domain whose DNS is held: the 250 comes while the SPF query is still held (it is released
    only after the reply arrived); the message then carries the temperror."""
    monitor = Recorder()
    checks = make(monitor=monitor)
    gate = Gate(checks.lookups.resolver, ("slow.test",))
    checks.lookups = Lookups(checks.reactor, resolver=gate, timeout=(0.5,))
    server = await served(checks)
    client = await in_thread(server.client)
    try:
        code, _ = await in_thread(client.mail, "someone@slow.test")
        assert code == 250
        await gate.some_held()
        assert not [c for c in monitor.called("checked") if c[1] == "spf.mailfrom"]
        gate.release()
        code, _ = await in_thread(client.rcpt, "bob@example.test")
        assert code == 250
        code, _ = await in_thread(client.data, MESSAGE)
        assert code == 250
        await in_thread(client.quit)
    finally:
        gate.release()  # a worker thread waiting on a held query would keep the pool from stopping
        await in_thread(client.close)
        await server.server.stop()
    [message] = server.store.messages
    assert "spf=temperror" in results_of(first_field(message.data))
    [verdicts] = server.noted
    assert verdicts.spf_mailfrom.result == "temperror" and verdicts.spf_mailfrom.domain == "slow.test"


def test_a_line_that_is_not_a_field_ends_the_header_section_as_the_server_reads_it() -> None:
    """What follows a line that is neither a field nor a continuation is body, to the server's parser and so to
    the front: a line there that looks like our own Authentication-Results is body text, kept as it is."""
    content = (b"Subject: hi\r\nthis is not a field\r\nAuthentication-Results: " + AUTHSERV.encode()
               + b"; dkim=pass\r\n\r\nbody\r\n")
    handler = behind(ContentMode.RAW)
    front = Fixed(handler, Decision(remove=claims_to_be(AUTHSERV)))
    assert send(talk(front), content).code == 250
    assert b"".join(chunks(handler)) == content
    assert front.seen[0][0] == b"Subject: hi\r\n"
