"""The client role's pure core: reading replies and EHLO keywords, writing MAIL and RCPT, and what cannot be sent."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given, strategies as st

from esmtpkit.core.client import (MAX_REPLY_LINE_LENGTH, MAX_REPLY_LINES, Extensions, ReplyError, ReplyParser,
                                  check_offer, mail_command, rcpt_command)
from esmtpkit.core.outbound import Message, Outcome, Recipient
from esmtpkit.core.reply import Reply
from esmtpkit.core.stuffing import DotStuffer, LineEnds

from .support import SETTINGS

EHLO = Reply(250, ("mx.test greets client.test", "PIPELINING", "SIZE 1000", "8BITMIME", "smtputf8", "DSN",
                   "CHUNKING", "BINARYMIME", "AUTH PLAIN login", "STARTTLS", "ENHANCEDSTATUSCODES"))
EVERYTHING = Extensions.parse(EHLO)
NOTHING = Extensions()


def parse_all(lines: list[bytes]) -> list[Reply]:
    parser = ReplyParser()
    return [reply for reply in map(parser.feed, lines) if reply is not None]


def message(**changes: object) -> Message:
    fields: dict[str, object] = {"id": "Q1", "sender": "a@example.org", "size": 300,
                                 "recipients": [Recipient("b@example.net"), Recipient("c@example.net")]}
    fields.update(changes)
    return Message(**fields)  # type: ignore[arg-type]


# ---- ReplyParser ----------------------------------------------------------------------------------------------

def test_one_line_reply() -> None:
    assert parse_all([b"250 2.1.0 Sender ok"]) == [Reply(250, ("Sender ok",), "2.1.0")]


def test_multi_line_reply_waits_for_its_last_line() -> None:
    parser = ReplyParser()
    assert parser.feed(b"250-mx.test") is None
    assert parser.pending
    assert parser.feed(b"250-PIPELINING") is None
    assert parser.feed(b"250 SIZE 1000") == Reply(250, ("mx.test", "PIPELINING", "SIZE 1000"))
    assert not parser.pending


def test_enhanced_code_is_taken_off_every_line() -> None:
    """RFC 2034 §3 repeats the enhanced code on each line of a multi-line reply."""
    [reply] = parse_all([b"550-5.1.1 No such user", b"550-5.1.1", b"550 5.1.1 try another"])
    assert (reply.code, reply.enhanced, reply.lines) == (550, "5.1.1", ("No such user", "", "try another"))
    assert Outcome.of(reply, "mx").text == "No such user try another"


def test_bare_code_and_empty_text() -> None:
    assert parse_all([b"250-", b"250"]) == [Reply(250, ("", ""))]


@pytest.mark.parametrize("line", [b"", b"25", b"hello", b"250x", b"250ok", b"199 too low", b"600 too high",
                                  b"2500 ok", b" 250 ok"])
def test_malformed_lines_are_refused(line: bytes) -> None:
    with pytest.raises(ReplyError):
        ReplyParser().feed(line)


def test_a_code_changing_within_a_reply_is_refused() -> None:
    parser = ReplyParser()
    parser.feed(b"250-first")
    with pytest.raises(ReplyError, match="changed from 250 to 550"):
        parser.feed(b"550 second")


def test_replies_are_bounded() -> None:
    parser = ReplyParser()
    for _ in range(MAX_REPLY_LINES):
        assert parser.feed(b"250-x") is None
    with pytest.raises(ReplyError, match="lines"):
        parser.feed(b"250 x")
    with pytest.raises(ReplyError, match="octets"):
        ReplyParser().feed(b"250 " + b"x" * MAX_REPLY_LINE_LENGTH)
    assert ReplyParser().feed(b"250 " + b"x" * (MAX_REPLY_LINE_LENGTH - 4)) is not None


def test_hostile_text_is_made_safe() -> None:
    """Undecodable octets and control characters never reach an Outcome's text as they were sent."""
    [reply] = parse_all([b"550 bad \xff\xfe \x1b[31m red \x00 nul\tok"])
    assert reply.lines == ("bad \ufffd\ufffd ?[31m red ? nul\tok",)


@SETTINGS
@given(code=st.sampled_from([220, 250, 354, 421, 450, 550]),
       lines=st.lists(st.text(string.ascii_letters + ",<>@-", min_size=1), min_size=1, max_size=5),
       enhanced=st.booleans())
def test_whatever_a_server_renders_reads_back(code: int, lines: list[str], enhanced: bool) -> None:
    """A Reply rendered by esmtpkit's server, with or without enhanced codes, parses back to the same Reply."""
    reply = Reply(code, tuple(lines), f"{code // 100}.1.0" if enhanced and code != 354 else None)
    assert parse_all(reply.render(enhanced=enhanced).split(b"\r\n")[:-1]) == [reply]


# ---- Extensions -----------------------------------------------------------------------------------------------

def test_extensions_are_read_from_the_ehlo_reply() -> None:
    assert EVERYTHING.offers("pipelining") and EVERYTHING.offers("SMTPUTF8")
    assert not EVERYTHING.offers("mx.test")  # the first line is the greeting, not a keyword
    assert EVERYTHING.size_limit == 1000
    assert EVERYTHING.auth_mechanisms == ("PLAIN", "LOGIN")
    assert EVERYTHING.keywords["SIZE"] == ("1000",)
    assert not NOTHING.offers("PIPELINING") and NOTHING.size_limit is None and NOTHING.auth_mechanisms == ()


@pytest.mark.parametrize("line, limit", [("SIZE", None), ("SIZE 0", None), ("SIZE many", None),
                                         ("SIZE 52428800", 52428800)])
def test_size_limit(line: str, limit: int | None) -> None:
    assert Extensions.parse(Reply(250, ("mx", line))).size_limit == limit


def test_old_auth_form_and_junk_lines() -> None:
    """``AUTH=LOGIN PLAIN`` counts when there is no AUTH line; lines that are no keyword are skipped."""
    ext = Extensions.parse(Reply(250, ("mx", "AUTH=LOGIN PLAIN", "", "~weird", "X-EXPS GSSAPI")))
    assert ext.auth_mechanisms == ("LOGIN", "PLAIN")
    assert set(ext.keywords) == {"AUTH", "X-EXPS"}
    both = Extensions.parse(Reply(250, ("mx", "AUTH CRAM-MD5", "AUTH=LOGIN")))
    assert both.auth_mechanisms == ("CRAM-MD5",)


# ---- MAIL and RCPT --------------------------------------------------------------------------------------------

def test_mail_without_extensions() -> None:
    assert mail_command(message(body="8BITMIME", ret="FULL", envid="x"), NOTHING) == b"MAIL FROM:<a@example.org>"
    assert mail_command(message(sender=""), NOTHING) == b"MAIL FROM:<>"


def test_mail_with_every_parameter() -> None:
    sent = mail_command(message(body="8BITMIME", smtputf8=True, ret="HDRS", envid="id 1+2=3"), EVERYTHING,
                        auth="a@example.org")
    assert sent == (b"MAIL FROM:<a@example.org> SIZE=300 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=id+201+2B2+3D3"
                    b" AUTH=a@example.org")
    assert mail_command(message(size=0), EVERYTHING, auth="") == b"MAIL FROM:<a@example.org> AUTH=<>"


def test_mail_binary_and_utf8() -> None:
    assert mail_command(message(body="BINARYMIME"), EVERYTHING) == b"MAIL FROM:<a@example.org> SIZE=300 BODY=BINARYMIME"
    assert (mail_command(message(sender="jörg@bücher.example"), EVERYTHING)
            == "MAIL FROM:<jörg@bücher.example> SIZE=300 SMTPUTF8".encode())


def test_rcpt_with_and_without_dsn() -> None:
    recipient = Recipient("b@example.net", notify=("SUCCESS", "DELAY"), orcpt="rfc822;b+2Bx@example.net")
    assert rcpt_command(recipient, EVERYTHING) == (b"RCPT TO:<b@example.net> NOTIFY=SUCCESS,DELAY"
                                                   b" ORCPT=rfc822;b+2Bx@example.net")
    assert rcpt_command(recipient, NOTHING) == b"RCPT TO:<b@example.net>"
    never = Recipient("b@example.net", notify=("NEVER",))
    assert rcpt_command(never, EVERYTHING) == b"RCPT TO:<b@example.net> NOTIFY=NEVER"
    assert rcpt_command(Recipient("ü@example.net"), EVERYTHING) == "RCPT TO:<ü@example.net>".encode()


# ---- what cannot go to a server at all --------------------------------------------------------------------------

def test_check_offer_passes_what_fits() -> None:
    assert check_offer(message(size=1000, body="BINARYMIME", smtputf8=True), EVERYTHING) is None
    assert check_offer(message(size=10 ** 9), NOTHING) is None  # no SIZE offered: no limit known


def test_check_offer_refusals() -> None:
    no_utf8 = Extensions.parse(Reply(250, ("mx", "SIZE 1000", "CHUNKING")))
    refused = check_offer(message(smtputf8=True), no_utf8)
    assert refused is not None and (refused.code, refused.enhanced) == (553, "5.6.7") and refused.permanent
    assert check_offer(message(sender="jörg@example.org"), no_utf8).enhanced == "5.6.7"  # type: ignore[union-attr]
    utf8_recipient = message(recipients=[Recipient("b@example.net"), Recipient("ü@example.net")])
    assert check_offer(utf8_recipient, no_utf8).enhanced == "5.6.7"  # type: ignore[union-attr]
    assert check_offer(utf8_recipient, no_utf8, utf8_recipient.recipients[:1]) is None
    assert check_offer(message(body="BINARYMIME"), no_utf8) == Outcome.local(
        554, "5.6.3", "binary content (BODY=BINARYMIME) needs CHUNKING and BINARYMIME, which the server does not "
                      "offer")
    assert check_offer(message(size=1001), no_utf8) == Outcome.local(
        552, "5.3.4", "message size 1001 exceeds the server's limit of 1000")


def test_check_offer_8bit_content_needs_8bitmime() -> None:
    """RFC 6152 §3: 8-bit content never goes to a server that does not offer 8BITMIME (nothing is converted)."""
    no_8bit = Extensions.parse(Reply(250, ("mx", "SIZE 1000", "PIPELINING")))
    assert check_offer(message(body="8BITMIME"), no_8bit) == Outcome.local(
        554, "5.6.3", "8-bit content (BODY=8BITMIME) needs 8BITMIME, which the server does not offer (no "
                      "conversion is made)")
    assert check_offer(message(body="8BITMIME"), NOTHING) is not None  # a HELO session offers nothing
    assert check_offer(message(body="8BITMIME"), EVERYTHING) is None
    assert check_offer(message(), no_8bit) is None  # 7-bit content goes anywhere


def test_dot_stuffer_lives_in_the_core_and_is_still_where_relay_had_it() -> None:
    from esmtpkit.handlers.relay import DotStuffer as relayed

    assert relayed is DotStuffer
    stuffer = DotStuffer()
    assert stuffer(b".a\r\nb\n.c\r") + stuffer(b"\n") + stuffer.finish() == b"..a\r\nb\r\n..c\r\n.\r\n"


@SETTINGS
@given(content=st.binary(max_size=64).map(lambda b: b.replace(b"x", b"\r").replace(b"y", b"\n")),
       cuts=st.lists(st.integers(0, 64), max_size=6))
def test_line_ends_are_crlf_however_the_content_is_cut(content: bytes, cuts: list[int]) -> None:
    fixer = LineEnds()
    points = [0, *sorted(min(c, len(content)) for c in cuts), len(content)]
    out = b"".join(fixer(content[a:b]) for a, b in zip(points, points[1:])) + fixer.finish()
    assert out == re.sub(rb"\r\n?|\n", b"\r\n", content)
