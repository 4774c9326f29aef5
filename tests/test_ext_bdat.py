"""CHUNKING and BINARYMIME (RFC 3030): BDAT chunks read as exact octet counts, over StringTransport, exact bytes."""

from __future__ import annotations

from typing import Any

from hypothesis import given, strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core.reply import Reply, SMTPReply
from esmtpkit.core.rules import Phase
from esmtpkit.testing import RecordingHandler

from .support import ACCEPTED, EHLO_REPLY, GREETING, SETTINGS, ServerMixin, calls, replay, split

ENVELOPE = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"
ENVELOPE_REPLIES = b"250 2.1.0 <a@example.org>, sender ok\r\n250 2.1.5 <b@example.org>, recipient ok\r\n"
BINARY_ENVELOPE = b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\nRCPT TO:<b@example.org>\r\n"
NESTED = b"503 5.5.1 DATA not allowed after BDAT\r\n"
FAILED = b"503 5.5.1 Transaction failed at an earlier BDAT: send RSET\r\n"
SYNTAX = b"501 5.5.4 Syntax: BDAT size [LAST]\r\n"
TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
BARE = b"550 5.5.2 Message contains a bare CR or LF (only CRLF ends a line)\r\n"
#: Every octet value, ending without CRLF: only BINARYMIME may carry it (RFC 3030 §3).
ALL_OCTETS = bytes(range(256)) * 3 + b"\r\n\r\n.\r\n\x00end"


def bdat(content: bytes, last: bool = False) -> bytes:
    """One BDAT command with its chunk."""
    return b"BDAT %d%s\r\n" % (len(content), b" LAST" if last else b"") + content


def octets(count: int) -> bytes:
    return b"250 2.0.0 %d octets received\r\n" % count


class ChunkTests(ServerMixin, SynchronousTestCase):
    """Chunks reach the handler through data(), header()/eoh(), body() and eom(), as DATA does."""

    def test_advertised(self) -> None:
        self.assertTrue(EHLO_REPLY.endswith(b"250-CHUNKING\r\n250 BINARYMIME\r\n"))
        talk = self.connect(binarymime=False)
        self.assertTrue(self.exchange(talk, b"EHLO client.test\r\n").endswith(b"250 CHUNKING\r\n"))

    def test_one_chunk(self) -> None:
        talk = self.ehlo()
        wire = self.exchange(talk, ENVELOPE + bdat(b"Subject: hi\r\n\r\nHello\r\n", last=True))
        self.assertEqual(wire, ENVELOPE_REPLIES + ACCEPTED)
        self.assertEqual(calls(talk.handler)[4:], [("data",), ("header", "Subject", "hi"), ("eoh",),
                                                   ("body", b"Hello\r\n"), ("eom",)])
        self.assertEqual(talk.protocol.phase, Phase.GREETED)

    def test_several_chunks_split_anywhere(self) -> None:
        """Chunk boundaries fall inside a header name, between CR and LF, and inside the body."""
        talk = self.ehlo()
        wire = self.exchange(talk, ENVELOPE + bdat(b"Subj") + bdat(b"ect: a\r") + bdat(b"\n\tfolded\r\n\r")
                             + bdat(b"\nbody ") + bdat(b"line\r\n", last=True))
        self.assertEqual(wire, ENVELOPE_REPLIES + octets(4) + octets(7) + octets(11) + octets(6) + ACCEPTED)
        self.assertEqual(calls(talk.handler)[4:], [("data",), ("header", "Subject", "a\tfolded"), ("eoh",),
                                                   ("body", b"body line\r\n"), ("eom",)])

    def test_no_dot_unstuffing_and_no_end_marker(self) -> None:
        """A chunk is exactly its octets: leading dots and CRLF.CRLF are content (RFC 3030 §2)."""
        talk = self.ehlo()
        content = b"X: 1\r\n\r\n.leading\r\n..two\r\n.\r\nafter the dot\r\n"
        self.assertEqual(self.exchange(talk, ENVELOPE + bdat(content, last=True) + b"NOOP\r\n"),
                         ENVELOPE_REPLIES + ACCEPTED + b"250 2.0.0 OK\r\n")
        self.assertEqual(talk.handler.messages[0]["body"], b".leading\r\n..two\r\n.\r\nafter the dot\r\n")

    def test_bdat_0_last(self) -> None:
        """BDAT 0 LAST ends a message (RFC 3030 §2), and may be the only chunk: an empty message."""
        talk = self.ehlo()
        wire = self.exchange(talk, ENVELOPE + bdat(b"X: 1\r\n\r\nbody") + bdat(b"", last=True))
        self.assertEqual(wire, ENVELOPE_REPLIES + octets(12) + ACCEPTED)
        self.assertEqual(talk.handler.messages[-1]["body"], b"body")
        self.assertEqual(self.exchange(talk, ENVELOPE + b"BDAT 0 LAST\r\n"), ENVELOPE_REPLIES + ACCEPTED)
        self.assertEqual(calls(talk.handler)[-4:], [("rcpt", "b@example.org", {}), ("data",), ("eoh",), ("eom",)])
        self.assertEqual(talk.handler.messages[-1]["body"], b"")

    def test_bdat_0_in_the_middle(self) -> None:
        talk = self.ehlo()
        self.assertEqual(self.exchange(talk, ENVELOPE + b"BDAT 0\r\n" + bdat(b"a", last=True)),
                         ENVELOPE_REPLIES + octets(0) + ACCEPTED)
        self.assertEqual(talk.handler.messages[0]["body"], b"a")

    def test_last_line_without_crlf(self) -> None:
        """The content may end without CRLF, even inside the headers; nothing is added."""
        talk = self.ehlo()
        self.exchange(talk, ENVELOPE + bdat(b"Subject: x", last=True))
        self.assertEqual(calls(talk.handler)[5:], [("header", "Subject", "x"), ("eoh",), ("eom",)])
        self.exchange(talk, ENVELOPE + bdat(b"not a header", last=True))
        self.assertEqual(calls(talk.handler)[-3:], [("eoh",), ("body", b"not a header"), ("eom",)])

    def test_lowercase_last_and_the_chunk_reply_texts(self) -> None:
        talk = self.ehlo()
        self.assertEqual(self.exchange(talk, ENVELOPE + b"bdat 2 last\r\nhi"), ENVELOPE_REPLIES + ACCEPTED)

    def test_pipelined_in_one_write(self) -> None:
        """RFC 3030 §4.2: every command and chunk of two messages in one packet; replies in order."""
        handler = RecordingHandler()
        talk = self.ehlo(handler)
        wire = self.exchange(talk, ENVELOPE + bdat(b"Subject: 1\r\n\r\none\r\n") + bdat(b"", last=True)
                             + ENVELOPE + bdat(b"two", last=True) + b"QUIT\r\n")
        self.assertEqual(wire, ENVELOPE_REPLIES + octets(19) + ACCEPTED + ENVELOPE_REPLIES + ACCEPTED
                         + b"221 2.0.0 Closing connection\r\n")
        self.assertEqual([m["body"] for m in handler.messages], [b"one\r\n", b"two"])

    def test_backpressure(self) -> None:
        """A pending body() pauses the connection: the chunk's 250 and later commands wait for it."""
        pending: Deferred[Any] = Deferred()
        talk = self.ehlo(RecordingHandler({"body": lambda chunk: pending}))
        wire = self.exchange(talk, ENVELOPE + bdat(b"X: 1\r\n\r\nbody") + b"NOOP\r\n" + bdat(b"", last=True))
        self.assertEqual(wire, ENVELOPE_REPLIES)
        self.assertEqual(talk.transport.producerState, "paused")
        self.assertNoResult(pending)
        before = len(talk.transport.value())
        pending.callback(None)
        self.assertEqual(talk.transport.value()[before:], octets(12) + b"250 2.0.0 OK\r\n" + ACCEPTED)

    def test_eom_pending(self) -> None:
        pending: Deferred[Any] = Deferred()
        talk = self.ehlo(RecordingHandler({"eom": lambda: pending}))
        self.assertEqual(self.exchange(talk, ENVELOPE + bdat(b"x", last=True) + b"NOOP\r\n"), ENVELOPE_REPLIES)
        self.assertNoResult(pending)
        before = len(talk.transport.value())
        pending.callback(Reply.of(250, "queued as 1", enhanced="2.0.0"))
        self.assertEqual(talk.transport.value()[before:], b"250 2.0.0 queued as 1\r\n250 2.0.0 OK\r\n")

    def test_data_pending_on_the_first_chunk(self) -> None:
        """data() is asked at the first chunk; its Deferred holds the chunk's octets until it fires."""
        pending: Deferred[Any] = Deferred()
        talk = self.ehlo(RecordingHandler({"data": lambda: pending}))
        self.assertEqual(self.exchange(talk, ENVELOPE + bdat(b"X: 1\r\n\r\nb") + b"BDAT 0 LAST\r\n"),
                         ENVELOPE_REPLIES)
        self.assertNotIn("body", talk.handler.verbs)
        before = len(talk.transport.value())
        pending.callback(Reply.of(354, "go ahead"))
        self.assertEqual(talk.transport.value()[before:], octets(9) + ACCEPTED)
        self.assertEqual(talk.handler.messages[0]["body"], b"b")

    def test_chunk_size_and_chunk_mode(self) -> None:
        """The handler's chunk_size and chunk_mode hold for BDAT too."""
        content = b"X: 1\r\n\r\nline one\r\nline two\r\nend"
        wire, handler = replay([b"EHLO c\r\n" + ENVELOPE + bdat(content[:13]) + bdat(content[13:], True)],
                               chunk_size=4)
        pieces = [c[1] for c in calls(handler, merge_body=False) if c[0] == "body"]
        self.assertEqual((b"".join(pieces), max(map(len, pieces))), (content[8:], 4))
        wire, handler = replay([b"EHLO c\r\n" + ENVELOPE + bdat(content[:13]) + bdat(content[13:], True)],
                               chunk_mode=False)
        self.assertEqual([c[1] for c in calls(handler, merge_body=False) if c[0] == "body"],
                         [b"line one\r\n", b"line two\r\n", b"end"])
        wire, handler = replay([b"EHLO c\r\n" + ENVELOPE + bdat(content[:13]) + bdat(content[13:], True)],
                               chunk_mode=True)
        self.assertEqual(calls(handler)[4:], [("data",), ("body", content), ("eom",)])


class BinaryTests(ServerMixin, SynchronousTestCase):
    """BODY=BINARYMIME (RFC 3030 §3): any octet, no line structure, and never by DATA."""

    def test_all_octets_round_trip_raw(self) -> None:
        handler = RecordingHandler()
        handler.chunk_mode = True
        talk = self.ehlo(handler)
        wire = self.exchange(talk, BINARY_ENVELOPE + bdat(ALL_OCTETS[:300]) + bdat(ALL_OCTETS[300:], last=True))
        self.assertEqual(wire, b"250 2.1.0 <a@example.org>, sender ok\r\n250 2.1.5 <b@example.org>, recipient ok\r\n"
                         + octets(300) + ACCEPTED)
        self.assertEqual(handler.messages[0]["body"], ALL_OCTETS)
        self.assertEqual(handler.calls[2].args[1], {"BODY": "BINARYMIME"})

    def test_all_octets_after_headers(self) -> None:
        """With headers parsed (chunk_mode None) the binary body after the empty line arrives byte for byte."""
        handler = RecordingHandler()
        talk = self.ehlo(handler)
        content = b"Content-Type: application/octet-stream\r\n\r\n" + ALL_OCTETS
        self.exchange(talk, BINARY_ENVELOPE + bdat(content[:50]) + bdat(content[50:51]) + bdat(content[51:], True))
        self.assertEqual(handler.messages[0]["headers"], [("Content-Type", "application/octet-stream")])
        self.assertEqual(handler.messages[0]["body"], ALL_OCTETS)

    def test_bare_newlines_refused_without_binarymime(self) -> None:
        """7BIT/8BITMIME content is CRLF lines: a bare CR or LF is refused (the smuggling rule)."""
        talk = self.ehlo()
        wire = self.exchange(talk, ENVELOPE + bdat(b"X: 1\r\n\r\na\nb") + bdat(b"more", last=True) + b"RSET\r\n")
        self.assertEqual(wire, ENVELOPE_REPLIES + BARE + FAILED + b"250 2.0.0 OK\r\n")
        self.assertEqual(talk.handler.verbs.count("abort"), 1)
        self.assertEqual(talk.handler.messages, [])

    def test_bare_cr_at_the_end(self) -> None:
        talk = self.ehlo()
        self.assertEqual(self.exchange(talk, ENVELOPE + bdat(b"X: 1\r\n\r\nend\r", last=True)),
                         ENVELOPE_REPLIES + BARE)

    def test_bare_newlines_allowed_by_policy(self) -> None:
        talk = self.ehlo(bare_newline="allow")
        self.exchange(talk, ENVELOPE + bdat(b"X: 1\r\n\r\na\nb\r", last=True))
        self.assertEqual(talk.handler.messages[0]["body"], b"a\nb\r")

    def test_data_refused_for_binarymime(self) -> None:
        talk = self.ehlo()
        self.assertEqual(self.exchange(talk, BINARY_ENVELOPE + b"DATA\r\n"),
                         b"250 2.1.0 <a@example.org>, sender ok\r\n250 2.1.5 <b@example.org>, recipient ok\r\n"
                         b"503 5.5.1 BODY=BINARYMIME needs BDAT, not DATA\r\n")
        self.assertNotIn("data", talk.handler.verbs)
        self.assertEqual(self.exchange(talk, bdat(b"\x00", last=True)), ACCEPTED)

    def test_binarymime_needs_the_extension(self) -> None:
        talk = self.connect(binarymime=False)
        self.exchange(talk, b"EHLO client.test\r\n")
        self.assertEqual(self.exchange(talk, b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\n"),
                         b"555 5.5.4 Unsupported BODY type BINARYMIME\r\n")


class RefusalTests(ServerMixin, SynchronousTestCase):
    """A refused chunk is read and discarded before its reply (RFC 3030 §2, §4.2)."""

    def test_out_of_order_is_drained(self) -> None:
        """BDAT before MAIL: 503 after its octets, which are never run as commands."""
        talk = self.ehlo()
        self.assertEqual(self.exchange(talk, bdat(b"RSET\r\n") + b"NOOP\r\n"),
                         b"503 5.5.1 Need MAIL command\r\n250 2.0.0 OK\r\n")
        self.assertEqual(self.exchange(talk, b"MAIL FROM:<a@example.org>\r\n" + bdat(b"QUIT\r\n", True)),
                         b"250 2.1.0 <a@example.org>, sender ok\r\n503 5.5.1 Need RCPT command\r\n")
        self.assertEqual(talk.handler.verbs, ["connect", "ehlo", "noop", "mail"])
        self.assertEqual(self.exchange(talk, b"BDAT 0\r\n"), b"503 5.5.1 Need RCPT command\r\n")

    def test_syntax(self) -> None:
        """Without a size nothing can be drained; with a size and a bad rest, the octets are drained first."""
        talk = self.ehlo()
        self.exchange(talk, ENVELOPE)
        self.assertEqual(self.exchange(talk, b"BDAT\r\nBDAT x\r\nBDAT -1\r\nBDAT 1" + b"0" * 20 + b"\r\n"),
                         SYNTAX * 4)
        self.assertEqual(self.exchange(talk, b"BDAT 4 FOO\r\nNOOPBDAT 4 LAST LAST\r\nNOOPNOOP\r\n"),
                         SYNTAX + SYNTAX + b"250 2.0.0 OK\r\n")
        self.assertEqual(talk.handler.verbs.count("noop"), 1)
        self.assertEqual(self.exchange(talk, bdat(b"ok", last=True)), ACCEPTED)

    def test_size_limit_across_chunks(self) -> None:
        """Over SIZE: 552 5.3.4 once the chunk is read, abort(), and every later chunk 503 until RSET."""
        talk = self.ehlo(max_message_size=10)
        wire = self.exchange(talk, ENVELOPE + bdat(b"abcdef") + bdat(b"ghijk") + bdat(b"xy", last=True)
                             + b"DATA\r\nBDAT 0 LAST\r\n")
        self.assertEqual(wire, ENVELOPE_REPLIES + octets(6) + TOO_BIG + FAILED + NESTED + FAILED)
        self.assertEqual(calls(talk.handler)[4:], [("data",),
                                                   ("abort", "Message size exceeds fixed maximum message size")])
        self.assertEqual(self.exchange(talk, b"RSET\r\n"), b"250 2.0.0 OK\r\n")
        self.assertEqual(talk.handler.verbs.count("abort"), 1)
        self.assertEqual(self.exchange(talk, ENVELOPE + bdat(b"abcdefghij", last=True)),
                         ENVELOPE_REPLIES + ACCEPTED)

    def test_first_chunk_over_the_limit(self) -> None:
        talk = self.ehlo(max_message_size=10)
        self.assertEqual(self.exchange(talk, ENVELOPE + bdat(b"x" * 11, last=True) + b"RCPT TO:<c@example.org>\r\n"),
                         ENVELOPE_REPLIES + TOO_BIG + b"503 5.5.1 RCPT not allowed during BDAT\r\n")
        self.assertEqual(calls(talk.handler)[4:], [("abort", "Message size exceeds fixed maximum message size")])

    def test_data_refused_by_the_handler(self) -> None:
        """data() answering 451 refuses the first chunk (after its octets); the transaction is over."""
        talk = self.ehlo(RecordingHandler({"data": Reply.of(451, "Cannot store now", enhanced="4.3.0")}))
        wire = self.exchange(talk, ENVELOPE + bdat(b"QUIT\r\n") + bdat(b"", last=True) + b"RSET\r\n")
        self.assertEqual(wire, ENVELOPE_REPLIES + b"451 4.3.0 Cannot store now\r\n" + FAILED + b"250 2.0.0 OK\r\n")
        self.assertEqual(calls(talk.handler)[4:], [("data",), ("abort", "Cannot store now"), ("rset",)])

    def test_body_failure_answers_that_chunk(self) -> None:
        def body(chunk: bytes) -> None:
            raise SMTPReply(552, "Mailbox full", enhanced="5.2.2")

        talk = self.ehlo(RecordingHandler({"body": body}))
        wire = self.exchange(talk, ENVELOPE + bdat(b"X: 1\r\n\r\nabc") + bdat(b"def", last=True))
        self.assertEqual(wire, ENVELOPE_REPLIES + b"552 5.2.2 Mailbox full\r\n" + FAILED)
        self.assertEqual(talk.handler.verbs[-2:], ["body", "abort"])

    def test_header_line_too_long(self) -> None:
        talk = self.ehlo(max_line_length=100)
        wire = self.exchange(talk, ENVELOPE + bdat(b"X: " + b"y" * 120) + b"RSET\r\n")
        self.assertEqual(wire, ENVELOPE_REPLIES + b"500 5.5.2 Line too long\r\n250 2.0.0 OK\r\n")
        self.assertEqual(talk.handler.verbs[-3:], ["data", "abort", "rset"])

    def test_header_section_too_big(self) -> None:
        talk = self.ehlo(max_header_size=50)
        wire = self.exchange(talk, ENVELOPE + bdat(b"X: 1\r\n" * 10 + b"\r\n", last=True))
        self.assertEqual(wire, ENVELOPE_REPLIES + b"552 5.3.4 Message header size exceeds limit\r\n")

    def test_not_offered(self) -> None:
        """Without CHUNKING (or after HELO) BDAT is an unknown command and nothing is drained."""
        talk = self.connect(chunking=False)
        self.exchange(talk, b"EHLO client.test\r\n" + ENVELOPE)
        self.assertEqual(self.exchange(talk, b"BDAT 4 LAST\r\n"),
                         b"500 5.5.2 Command unrecognized: BDAT 4 LAST\r\n")
        talk = self.connect()
        self.exchange(talk, b"HELO client.test\r\n" + ENVELOPE)
        self.assertEqual(self.exchange(talk, b"BDAT 4 LAST\r\n"), b"500 Command unrecognized: BDAT 4 LAST\r\n")


class EndingTests(ServerMixin, SynchronousTestCase):
    """abort() once for a transaction that does not reach eom(), however it ends."""

    def test_rset_between_chunks(self) -> None:
        talk = self.ehlo()
        self.assertEqual(self.exchange(talk, ENVELOPE + bdat(b"abc") + b"RSET\r\n"),
                         ENVELOPE_REPLIES + octets(3) + b"250 2.0.0 OK\r\n")
        self.assertEqual(calls(talk.handler)[-2:], [("abort", "reset by RSET"), ("rset",)])
        self.assertEqual(self.exchange(talk, b"BDAT 0 LAST\r\n"), b"503 5.5.1 Need MAIL command\r\n")

    def test_connection_lost_inside_a_chunk(self) -> None:
        talk = self.ehlo()
        self.exchange(talk, ENVELOPE + b"BDAT 100 LAST\r\nsome of it")
        talk.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(calls(talk.handler)[-1], ("abort", "connection lost"))
        self.assertEqual(talk.handler.verbs.count("abort"), 1)

    def test_timeout_inside_a_chunk(self) -> None:
        talk = self.ehlo()
        self.exchange(talk, ENVELOPE + b"BDAT 100\r\nsome")
        talk.clock.advance(talk.policy.data_timeout)
        self.assertTrue(talk.transport.value().endswith(b"\r\n421 4.4.2 Timeout exceeded, closing connection\r\n"))
        self.assertEqual(talk.handler.verbs[-1], "abort")

    def test_ehlo_between_chunks(self) -> None:
        talk = self.ehlo()
        self.exchange(talk, ENVELOPE + bdat(b"abc") + b"EHLO again.test\r\n")
        self.assertEqual(calls(talk.handler)[-2:], [("abort", "reset by EHLO"), ("ehlo", "again.test")])


#: Two BDAT transactions and their neighbours, fed whole and at random splits.
TEXT = ALL_OCTETS[:40].replace(b"\r", b"").replace(b"\n", b"")
SCENARIO = (b"EHLO client.test\r\n" + ENVELOPE + bdat(b"From: a\r\nSubj") + bdat(b"ect: x\r\n\r\n.\r\nbody\r")
            + b"NOOP\r\n" + bdat(b"\n" + TEXT) + bdat(b"", True)
            + BINARY_ENVELOPE + bdat(ALL_OCTETS, last=True) + b"MAIL FROM:<c@example.org>\r\n"
            + bdat(b"drained") + b"RSET\r\nQUIT\r\n")


class SplitTests(SynchronousTestCase):
    """The same replies and handler calls whatever the read boundaries."""

    def test_whole(self) -> None:
        wire, handler = replay([SCENARIO])
        self.assertEqual(wire, GREETING + EHLO_REPLY + ENVELOPE_REPLIES + octets(13) + octets(18)
                         + b"250 2.0.0 OK\r\n" + octets(1 + len(TEXT)) + ACCEPTED
                         + b"250 2.1.0 <a@example.org>, sender ok\r\n250 2.1.5 <b@example.org>, recipient ok\r\n"
                         + ACCEPTED + b"250 2.1.0 <c@example.org>, sender ok\r\n503 5.5.1 Need RCPT command\r\n"
                         + b"250 2.0.0 OK\r\n221 2.0.0 Closing connection\r\n")
        self.assertEqual([m["body"] for m in handler.messages],
                         [b".\r\nbody\r\n" + TEXT, ALL_OCTETS])

    def test_byte_by_byte(self) -> None:
        whole = replay([SCENARIO])
        pieces = replay([SCENARIO[i:i + 1] for i in range(len(SCENARIO))])
        self.assertEqual(pieces[0], whole[0])
        self.assertEqual(calls(pieces[1]), calls(whole[1]))

    @SETTINGS
    @given(cuts=st.lists(st.integers(0, len(SCENARIO)), max_size=12), mode=st.sampled_from([None, True, False]),
           chunk_size=st.sampled_from([1, 7, 65536]))
    def test_any_split(self, cuts: list[int], mode: bool | None, chunk_size: int) -> None:
        wire, handler = replay([SCENARIO], chunk_mode=mode, chunk_size=chunk_size)
        wire_split, handler_split = replay(split(SCENARIO, cuts), chunk_mode=mode, chunk_size=chunk_size)
        self.assertEqual(wire_split, wire)
        self.assertEqual(calls(handler_split), calls(handler))
        self.assertEqual([m["body"] for m in handler_split.messages], [m["body"] for m in handler.messages])


#: Pieces of client input mixing BDAT with everything else, for the property below.
TOKENS = st.sampled_from([
    b"EHLO c\r\n", b"HELO c\r\n", b"MAIL FROM:<a@b>\r\n", b"MAIL FROM:<a@b> BODY=BINARYMIME\r\n", b"RCPT TO:<c@d>\r\n",
    b"DATA\r\n", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"BDAT 3\r\n", b"BDAT 5 LAST\r\n", b"BDAT 0 LAST\r\n",
    b"BDAT 0\r\n", b"BDAT x\r\n", b"BDAT 2 NOW\r\n", b"BDAT 40\r\n", b"\r\n", b"\r", b"\n", b".\r\n", b"Subject: x\r\n",
    b"body", b"\x00\xff", b"y" * 1100,
])


class FuzzTests(SynchronousTestCase):
    """Any mix of BDAT and other input: well-formed replies, nothing logged, the same at any split."""

    @SETTINGS
    @given(tokens=st.lists(TOKENS, max_size=30), cuts=st.lists(st.integers(0, 3000), max_size=10),
           mode=st.sampled_from([None, True, False]))
    def test_any_input(self, tokens: list[bytes], cuts: list[int], mode: bool | None) -> None:
        data = b"".join(tokens)
        wire, handler = replay([data], chunk_mode=mode, chunk_size=5, max_message_size=60)
        wire_split, handler_split = replay(split(data, cuts), chunk_mode=mode, chunk_size=5, max_message_size=60)
        self.assertEqual(wire_split, wire)
        self.assertEqual(calls(handler_split), calls(handler))
        self.assertEqual(self.flushLoggedErrors(), [])
        verbs = handler.verbs
        self.assertLessEqual(verbs.count("abort") + verbs.count("eom"), verbs.count("mail"))
        self.assertLessEqual(verbs.count("eom"), verbs.count("data"))
