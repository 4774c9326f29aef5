"""Limits: line lengths (RFC 5321 §4.5.3.1), message size (RFC 1870), recipients, timeouts, errors."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.server.protocol import CLOSE_DRAIN_TIMEOUT, ESMTPProtocol
from esmtpkit.testing import Conversation, RecordingHandler

from .support import ACCEPTED, EHLO_REPLY, GO_AHEAD, GREETING, ServerMixin, policy

START = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
START_REPLIES = b"250 2.1.0 <a@example.org>, sender ok\r\n250 2.1.5 <b@example.org>, recipient ok\r\n" + GO_AHEAD
TOO_LONG = b"500 5.5.2 Line too long\r\n"
TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
TIMEOUT = b"421 4.4.2 Timeout exceeded, closing connection\r\n"
KiB = 1024


class CommandLineTests(ServerMixin, SynchronousTestCase):
    """RFC 5321 §4.5.3.1.4: 512 octets per command line, CRLF included; longer gets 500 5.5.2, not a hang-up."""

    def test_limit(self) -> None:
        talk = self.ehlo()
        longest = b"NOOP " + b"x" * 505  # 510 octets + CRLF = 512
        self.assertEqual(self.exchange(talk, longest + b"\r\n"), b"250 2.0.0 OK\r\n")
        self.assertEqual(self.exchange(talk, longest + b"x\r\n"), TOO_LONG)
        self.assertFalse(talk.closed)
        self.assertEqual(self.exchange(talk, b"NOOP\r\n"), b"250 2.0.0 OK\r\n")
        self.assertEqual(talk.handler.verbs.count("noop"), 2)

    def test_before_ehlo(self) -> None:
        talk = self.connect()
        self.assertEqual(self.exchange(talk, b"HELO " + b"x" * 600 + b"\r\n"), b"500 Line too long\r\n")
        self.assertEqual(talk.handler.verbs, ["connect"])

    def test_extension_allowance(self) -> None:
        """MAIL and RCPT get the room their extensions need (RFC 1870 §8, RFC 3461 §5)."""
        talk = self.ehlo()
        local = b"a" * 60
        domain = b".".join([b"d" * 60] * 3)
        mail = b"MAIL FROM:<" + local + b"@" + domain + b"> SIZE=100 BODY=8BITMIME SMTPUTF8" + b" " * 300
        self.assertGreater(len(mail), 510)
        self.assertTrue(self.exchange(talk, mail + b"\r\n").startswith(b"250 2.1.0"))
        self.assertEqual(self.exchange(talk, b"NOOP " + b"x" * 600 + b"\r\n"), TOO_LONG)
        self.assertEqual(self.exchange(talk, b"RCPT TO:<b@example.org>" + b" " * 900 + b"\r\n"),
                         b"250 2.1.5 <b@example.org>, recipient ok\r\n")
        self.assertEqual(self.exchange(talk, b"RCPT TO:<b@example.org>" + b" " * 1100 + b"\r\n"), TOO_LONG)

    def test_policy_base(self) -> None:
        talk = self.ehlo(max_command_length=1024)
        self.assertEqual(self.exchange(talk, b"NOOP " + b"x" * 1017 + b"\r\n"), b"250 2.0.0 OK\r\n")
        self.assertEqual(self.exchange(talk, b"NOOP " + b"x" * 1018 + b"\r\n"), TOO_LONG)

    def test_endless_line(self) -> None:
        """1 MB without CRLF, in 64 KiB pieces: the buffer stays bounded; the CRLF gives one 500 reply."""
        talk = self.ehlo()
        protocol = talk.protocol
        for _ in range(16):
            self.assertEqual(self.exchange(talk, b"x" * (64 * KiB)), b"")
            self.assertLess(len(protocol._buffer), 16 * KiB)
        self.assertEqual(self.exchange(talk, b"\r\nNOOP\r\n"), TOO_LONG + b"250 2.0.0 OK\r\n")
        self.assertFalse(talk.closed)
        self.assertEqual(talk.handler.verbs, ["connect", "ehlo", "noop"])

    def test_endless_line_bytes(self) -> None:
        """The same, fed in odd pieces, with the CRLF split between two reads."""
        talk = self.ehlo()
        for piece in (b"y" * 20000, b"y" * 3 + b"\r", b"\n", b"NOOP\r\n"):
            talk.write(piece)
            self.assertLess(len(talk.protocol._buffer), 16 * KiB)
        self.assertEqual(talk.transport.value(), GREETING + EHLO_REPLY + TOO_LONG + b"250 2.0.0 OK\r\n")
        talk.write(b"z" * 20000 + b"\r")
        talk.write(b"\r")
        talk.write(b"\r\nNOOP\r\n")
        self.assertEqual(talk.transport.value()[-len(TOO_LONG) - 14:], TOO_LONG + b"250 2.0.0 OK\r\n")

    def test_long_line_then_pipelined(self) -> None:
        talk = self.ehlo()
        self.assertEqual(self.exchange(talk, b"x" * 20000 + b"\r\nNOOP\r\nRSET\r\n"),
                         TOO_LONG + b"250 2.0.0 OK\r\n250 2.0.0 OK\r\n")


class HeaderLimitTests(ServerMixin, SynchronousTestCase):
    """RFC 5321 §4.5.3.1.6: text lines of at most 1000 octets with CRLF, enforced on header lines."""

    def test_longest_header_line(self) -> None:
        talk = self.ehlo()
        line = b"X: " + b"v" * 995  # 998 + CRLF
        self.assertEqual(self.exchange(talk, START + line + b"\r\n\r\nbody\r\n.\r\n"), START_REPLIES + ACCEPTED)

    def test_header_line_too_long(self) -> None:
        """Refused after the final dot (never earlier: the client is not reading), abort() called."""
        talk = self.ehlo()
        self.assertEqual(self.exchange(talk, START), START_REPLIES)
        line = b"X: " + b"v" * 996
        self.assertEqual(self.exchange(talk, b"A: 1\r\n" + line + b"\r\n\r\n.body\r\n"), b"")
        self.assertEqual(self.exchange(talk, b"..\r\n.\r\nNOOP\r\n"), TOO_LONG + b"250 2.0.0 OK\r\n")
        self.assertEqual(talk.handler.verbs[-2:], ["abort", "noop"])
        self.assertNotIn("eom", talk.handler.verbs)

    def test_endless_header_line(self) -> None:
        talk = self.ehlo()
        self.exchange(talk, START + b"X: ")
        for _ in range(16):
            self.assertEqual(self.exchange(talk, b"v" * (64 * KiB)), b"")
            self.assertLess(len(talk.protocol._buffer), 16 * KiB)
        self.assertEqual(self.exchange(talk, b"\r\n.\r\n"), TOO_LONG)
        self.assertEqual(talk.handler.verbs[-1], "abort")

    def test_first_line_is_a_text_line(self) -> None:
        """A first line that is not a header is read in header mode too, so the text line limit holds for it."""
        talk = self.ehlo()
        self.assertEqual(self.exchange(talk, START + b"x" * 999 + b"\r\n.\r\n"), START_REPLIES + TOO_LONG)
        self.assertEqual(self.exchange(talk, START + b"x" * 998 + b"\r\n.\r\n"), START_REPLIES + ACCEPTED)

    def test_header_section_too_big(self) -> None:
        talk = self.ehlo(max_header_size=100)
        wire = self.exchange(talk, START + b"X: 123456789\r\n" * 20 + b"\r\nbody\r\n.\r\nNOOP\r\n")
        self.assertEqual(wire, START_REPLIES + b"552 5.3.4 Message header size exceeds limit\r\n250 2.0.0 OK\r\n")
        self.assertEqual(talk.handler.verbs[-2:], ["abort", "noop"])
        self.assertLessEqual(talk.handler.verbs.count("header"), 7)


class MessageSizeTests(ServerMixin, SynchronousTestCase):
    """The size limit holds in raw mode: the rest is drained to the terminator, then 552 5.3.4 and abort()."""

    def test_over_limit(self) -> None:
        talk = self.ehlo(max_message_size=100)
        self.assertEqual(self.exchange(talk, START + b"Subject: big\r\n\r\n"), START_REPLIES)
        for _ in range(10):
            self.assertEqual(self.exchange(talk, b"0123456789" * 10 + b"\r\n..\r\n"), b"")
        self.assertEqual(self.exchange(talk, b".\r\nNOOP\r\n"), TOO_BIG + b"250 2.0.0 OK\r\n")
        self.assertEqual(talk.handler.verbs[-2:], ["abort", "noop"])
        self.assertNotIn("eom", talk.handler.verbs)
        delivered = sum(len(c.args[0]) for c in talk.handler.calls if c.verb == "body")
        self.assertLessEqual(delivered, 100)

    def test_counts_whole_content(self) -> None:
        """Headers count toward the size, whatever the chunk mode; exactly the limit is accepted."""
        content = b"Subject: 0123456789\r\n\r\n" + b"x" * 75 + b"\r\n"
        self.assertEqual(len(content), 100)
        for mode in (None, True, False):
            for limit, reply in ((100, ACCEPTED), (99, TOO_BIG)):
                handler = RecordingHandler()
                handler.chunk_mode = mode
                talk = self.ehlo(handler, max_message_size=limit)
                self.assertEqual(self.exchange(talk, START + content + b".\r\n"), START_REPLIES + reply, (mode, limit))
                self.assertEqual(talk.handler.verbs[-1], "eom" if reply is ACCEPTED else "abort")

    def test_headers_alone_over_limit(self) -> None:
        talk = self.ehlo(max_message_size=50)
        self.assertEqual(self.exchange(talk, START + b"X: 123456789\r\n" * 10 + b".\r\n"), START_REPLIES + TOO_BIG)
        self.assertEqual(talk.handler.verbs[-1], "abort")

    def test_unlimited(self) -> None:
        talk = self.ehlo(max_message_size=0)
        self.assertEqual(self.exchange(talk, START + b"\r\n" + b"x" * 100000 + b"\r\n.\r\n"), START_REPLIES + ACCEPTED)
        self.assertEqual(len(talk.handler.messages[0]["body"]), 100002)


class RecipientLimitTests(ServerMixin, SynchronousTestCase):
    def test_max_recipients(self) -> None:
        """RFC 5321 §4.5.3.1.10: 452 for recipients beyond the limit; the message still goes to the others."""
        talk = self.ehlo(max_recipients=2)
        wire = self.exchange(talk, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\n"
                                   b"RCPT TO:<d@example.org>\r\nDATA\r\nHi\r\n.\r\n")
        self.assertEqual(wire, b"250 2.1.0 <a@example.org>, sender ok\r\n250 2.1.5 <b@example.org>, recipient ok\r\n"
                               b"250 2.1.5 <c@example.org>, recipient ok\r\n452 4.5.3 Too many recipients\r\n"
                               + GO_AHEAD + ACCEPTED)
        self.assertEqual(talk.handler.messages[0]["recipients"], ["b@example.org", "c@example.org"])
        self.assertEqual(talk.handler.verbs.count("rcpt"), 2)


class TimeoutTests(ServerMixin, SynchronousTestCase):
    """Timeouts run on the injected clock: 421 4.4.2 and close; a transaction in progress is aborted."""

    def test_command_timeout(self) -> None:
        talk = self.connect(command_timeout=60)
        talk.clock.advance(59)
        self.assertFalse(talk.closed)
        talk.clock.advance(1)
        self.assertEqual(talk.transport.value(), GREETING + b"421 Timeout exceeded, closing connection\r\n")
        self.assert_closed_cleanly(talk)

    def test_activity_restarts_timer(self) -> None:
        talk = self.ehlo(command_timeout=60)
        for _ in range(5):
            talk.clock.advance(50)
            self.exchange(talk, b"NOOP\r\n")
        talk.clock.advance(50)
        self.assertFalse(talk.closed)
        talk.clock.advance(10)
        self.assertTrue(talk.transport.value().endswith(TIMEOUT))

    def test_timeout_mid_transaction(self) -> None:
        talk = self.ehlo(command_timeout=60)
        self.exchange(talk, b"MAIL FROM:<a@example.org>\r\n")
        talk.clock.advance(60)
        self.assertTrue(talk.transport.value().endswith(TIMEOUT))
        self.assertEqual(talk.handler.verbs[-1], "abort")
        self.assertTrue(talk.closed)

    def test_data_timeout(self) -> None:
        """While content arrives the data timeout applies, from the moment DATA is accepted."""
        talk = self.ehlo(command_timeout=300, data_timeout=30)
        self.assertEqual(self.exchange(talk, START), START_REPLIES)
        talk.clock.advance(29)
        self.exchange(talk, b"Subject: slow\r\n\r\nsome")
        talk.clock.advance(29)
        self.exchange(talk, b" content")
        talk.clock.advance(29)
        self.assertFalse(talk.closed)
        talk.clock.advance(1)
        self.assertTrue(talk.transport.value().endswith(b" recipient ok\r\n" + GO_AHEAD + TIMEOUT))
        self.assertTrue(talk.closed)
        self.assertEqual(talk.handler.verbs[-1], "abort")
        self.assertNotIn("eom", talk.handler.verbs)
        self.assert_closed_cleanly(talk)

    def test_data_timeout_starts_at_go_ahead(self) -> None:
        """DATA in the same read as the envelope: the data timeout, not the command timeout, runs after 354."""
        talk = self.ehlo(command_timeout=300, data_timeout=30)
        self.assertEqual(self.exchange(talk, START), START_REPLIES)
        talk.clock.advance(30)
        self.assertTrue(talk.transport.value().endswith(GO_AHEAD + TIMEOUT))
        self.assertEqual(talk.handler.verbs[-1], "abort")

    def test_command_timeout_again_after_data(self) -> None:
        talk = self.ehlo(command_timeout=300, data_timeout=30)
        self.exchange(talk, START + b"x\r\n.\r\n")
        talk.clock.advance(299)
        self.assertFalse(talk.closed)
        talk.clock.advance(1)
        self.assertTrue(talk.closed)
        self.assertNotIn("abort", talk.handler.verbs)

    def test_no_clock_no_timer(self) -> None:
        protocol = ESMTPProtocol(RecordingHandler(), policy())
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"QUIT\r\n")
        self.assertIsNone(protocol._timer)


class ErrorLimitTests(ServerMixin, SynchronousTestCase):
    def test_error_limit(self) -> None:
        talk = self.ehlo(error_limit=3)
        wire = self.exchange(talk, b"FROB\r\nNOOP\r\nRCPT TO:<a@b>\r\nMAIL FROM:<a b@c>\r\nNOOP\r\n")
        self.assertEqual(wire, b"500 5.5.2 Command unrecognized: FROB\r\n250 2.0.0 OK\r\n503 5.5.1 Need MAIL command\r\n"
                               b"501 5.1.7 Bad address syntax: bad local part a b\r\n"
                               b"421 4.7.0 Too many errors, closing connection\r\n")
        self.assert_closed_cleanly(talk)

    def test_error_limit_mid_transaction_aborts(self) -> None:
        talk = self.ehlo(error_limit=2)
        self.exchange(talk, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<>\r\nRCPT TO:<>\r\n")
        self.assertTrue(talk.closed)
        self.assertEqual(talk.handler.verbs[-1], "abort")

    def test_no_error_limit(self) -> None:
        talk = self.ehlo(error_limit=0)
        self.assertEqual(self.exchange(talk, b"FROB\r\n" * 50 + b"NOOP\r\n")[-14:], b"250 2.0.0 OK\r\n")
        self.assertFalse(talk.closed)


class CleanupTests(SynchronousTestCase):
    def test_hang_up_twice(self) -> None:
        """connectionLost after the server closed is harmless (the transport reports it after QUIT)."""
        handler = RecordingHandler()
        talk = Conversation(handler, policy())
        talk.write(b"QUIT\r\n")
        talk.protocol.connectionLost(Failure(ConnectionDone()))
        talk.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(handler.verbs, ["connect", "quit"])
        self.assertEqual(talk.clock.getDelayedCalls(), [])


def bdat(content: bytes) -> bytes:
    """The whole of ``content`` as one BDAT LAST chunk, after MAIL and RCPT."""
    return (b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"
            + b"BDAT %d LAST\r\n" % len(content) + content)


BDAT_START_REPLIES = b"250 2.1.0 <a@example.org>, sender ok\r\n250 2.1.5 <b@example.org>, recipient ok\r\n"
HEADER_TOO_BIG = b"552 5.3.4 Message header size exceeds limit\r\n"


class HeaderLimitsInEveryModeTests(ServerMixin, SynchronousTestCase):
    """``max_line_length`` and ``max_header_size`` hold whatever the handler's chunk_mode, by DATA or by BDAT."""

    def exchange_message(self, mode: bool | None, framing: str, content: bytes, **changes: object) -> bytes:
        handler = RecordingHandler()
        handler.chunk_mode = mode
        talk = self.ehlo(handler, **changes)
        if framing == "DATA":
            wire = self.exchange(talk, START + content.replace(b"\r\n.", b"\r\n..") + b".\r\nNOOP\r\n")
            self.assertTrue(wire.startswith(START_REPLIES), wire[:300])
            wire = wire[len(START_REPLIES):]
        else:
            wire = self.exchange(talk, bdat(content) + b"NOOP\r\n")
            self.assertTrue(wire.startswith(BDAT_START_REPLIES), wire[:300])
            wire = wire[len(BDAT_START_REPLIES):]
        self.assertTrue(wire.endswith(b"250 2.0.0 OK\r\n"), wire[-200:])  # the session goes on
        verbs = talk.handler.verbs
        if wire.startswith(b"250"):
            self.assertEqual(verbs[-2:], ["eom", "noop"])
        else:
            self.assertEqual(verbs[-2:], ["abort", "noop"])
        return wire[: -len(b"250 2.0.0 OK\r\n")]

    def each_mode(self) -> list[tuple[bool | None, str]]:
        return [(mode, framing) for mode in (None, True, False) for framing in ("DATA", "BDAT")]

    def test_line_too_long(self) -> None:
        content = b"A: 1\r\nX: " + b"v" * 996 + b"\r\n\r\nbody\r\n"
        for mode, framing in self.each_mode():
            self.assertEqual(self.exchange_message(mode, framing, content), TOO_LONG, (mode, framing))

    def test_longest_line_accepted(self) -> None:
        content = b"A: 1\r\nX: " + b"v" * 995 + b"\r\n\r\n" + b"b" * 5000 + b"\r\n"
        for mode, framing in self.each_mode():
            self.assertEqual(self.exchange_message(mode, framing, content), ACCEPTED, (mode, framing))

    def test_section_too_big(self) -> None:
        content = b"X: 123456789\r\n" * 20 + b"\r\nbody\r\n"
        for mode, framing in self.each_mode():
            self.assertEqual(self.exchange_message(mode, framing, content, max_header_size=100), HEADER_TOO_BIG,
                             (mode, framing))

    def test_huge_header_line_and_section(self) -> None:
        """A 200 KB header line, and a 0.6 MB section of ordinary lines: refused in every mode."""
        huge_line = b"X: " + b"v" * 200_000 + b"\r\n\r\nbody\r\n"
        huge_section = (b"X-Filler: " + b"f" * 60 + b"\r\n") * 8600 + b"\r\nbody\r\n"
        for content, refusal in ((huge_line, TOO_LONG), (huge_section, HEADER_TOO_BIG)):
            for mode, framing in self.each_mode():
                self.assertEqual(self.exchange_message(mode, framing, content), refusal, (mode, framing))

    def test_body_lines_are_not_header_lines(self) -> None:
        content = b"Subject: hi\r\n\r\n" + b"x" * 5000 + b"\r\n"
        for mode, framing in self.each_mode():
            self.assertEqual(self.exchange_message(mode, framing, content), ACCEPTED, (mode, framing))

    def test_a_last_line_without_crlf_counts(self) -> None:
        """BDAT content need not end with CRLF; a header line that never ends still has a length."""
        for mode in (None, True, False):
            self.assertEqual(self.exchange_message(mode, "BDAT", b"A: 1\r\nX: " + b"v" * 1200), TOO_LONG, mode)

    def test_limits_off_for_raw_content(self) -> None:
        """0 turns each limit off: a handler given the bytes raw gets them whatever their lines."""
        content = b"X: " + b"v" * 200_000 + b"\r\n\r\nbody\r\n"
        for framing in ("DATA", "BDAT"):
            self.assertEqual(self.exchange_message(True, framing, content, max_line_length=0, max_header_size=0),
                             ACCEPTED, framing)


class JunkCommandTests(ServerMixin, SynchronousTestCase):
    """Postfix's smtpd_junk_command_limit: past the limit each command that moves no mail counts as an error."""

    def test_noop_flood_is_closed(self) -> None:
        talk = self.ehlo(junk_command_limit=10, error_limit=5)  # the EHLO was the first junk command
        wire = self.exchange(talk, b"NOOP\r\n" * 100)
        self.assertEqual(wire, b"250 2.0.0 OK\r\n" * 14 + b"421 4.7.0 Too many errors, closing connection\r\n")
        self.assertTrue(talk.closed)

    def test_every_kind_counts(self) -> None:
        talk = self.ehlo(junk_command_limit=5, error_limit=3)  # EXPN's 502 is one error, HELO and EHLO two more
        wire = self.exchange(talk, b"RSET\r\nVRFY x\r\nEXPN y\r\nHELP\r\nHELO a\r\nEHLO b\r\nNOOP\r\n")
        self.assertTrue(wire.endswith(b"421 4.7.0 Too many errors, closing connection\r\n"), wire)
        self.assertEqual(talk.handler.verbs[-1], "ehlo")

    def test_delivered_message_starts_again(self) -> None:
        talk = self.ehlo(junk_command_limit=3, error_limit=1)
        self.exchange(talk, b"NOOP\r\nRSET\r\n")
        self.assertEqual(self.exchange(talk, START + b"Hi\r\n.\r\n"), START_REPLIES + ACCEPTED)
        self.assertEqual(self.exchange(talk, b"RSET\r\nNOOP\r\nNOOP\r\n"), b"250 2.0.0 OK\r\n" * 3)
        self.assertFalse(talk.closed)
        self.assertEqual(self.exchange(talk, b"NOOP\r\n"),
                         b"250 2.0.0 OK\r\n421 4.7.0 Too many errors, closing connection\r\n")

    def test_off(self) -> None:
        talk = self.ehlo(junk_command_limit=0, error_limit=1)
        self.assertEqual(self.exchange(talk, b"NOOP\r\n" * 500), b"250 2.0.0 OK\r\n" * 500)
        self.assertFalse(talk.closed)


class WriteBackpressureTests(ServerMixin, SynchronousTestCase):
    """The protocol is its transport's streaming producer: while the replies are not taken, nothing is read."""

    def test_registered_as_streaming_producer(self) -> None:
        talk = self.connect()
        self.assertIs(talk.transport.producer, talk.protocol)
        self.assertTrue(talk.transport.streaming)

    def test_paused_reads_nothing_more(self) -> None:
        talk = self.ehlo()
        talk.protocol.pauseProducing()  # as the transport does when its buffer passes its size
        self.assertEqual(talk.transport.producerState, "paused")
        self.assertEqual(self.exchange(talk, b"NOOP\r\n" * 10), b"")
        self.assertEqual(talk.handler.verbs.count("noop"), 0)
        before = len(talk.transport.value())
        talk.protocol.resumeProducing()
        self.assertEqual(talk.transport.value()[before:], b"250 2.0.0 OK\r\n" * 10)
        self.assertEqual(talk.transport.producerState, "producing")

    def test_stops_in_the_middle_of_a_read(self) -> None:
        """A full buffer after the second reply: the third and later lines wait in the line buffer."""
        talk = self.ehlo()
        original = talk.transport.write
        count = []

        def write(data: bytes) -> None:
            original(data)
            count.append(data)
            if len(count) == 2:
                talk.protocol.pauseProducing()

        talk.transport.write = write  # type: ignore[method-assign]
        self.assertEqual(self.exchange(talk, b"NOOP\r\n" * 5), b"250 2.0.0 OK\r\n" * 2)
        talk.protocol.resumeProducing()
        self.assertEqual(talk.handler.verbs.count("noop"), 5)

    def test_handler_wait_and_full_buffer_both_hold_reading(self) -> None:
        from twisted.internet.defer import Deferred

        class Slow(RecordingHandler):
            pending: Deferred[object] | None = None

            def noop(self) -> Deferred[object]:
                self.pending = Deferred()
                return self.pending

        talk = self.ehlo(Slow())
        self.exchange(talk, b"NOOP\r\nRSET\r\n")
        talk.protocol.pauseProducing()
        talk.handler.pending.callback((250, "OK"))
        self.assertEqual(talk.transport.producerState, "paused")  # the buffer is still full
        self.assertNotIn("rset", talk.handler.verbs)
        talk.protocol.resumeProducing()
        self.assertEqual(talk.handler.verbs[-1], "rset")
        self.assertEqual(talk.transport.producerState, "producing")

    def test_a_client_that_never_takes_its_last_replies_is_dropped(self) -> None:
        """The 421 is queued and the connection closed gracefully; a client that still reads nothing is dropped
        after the drain deadline, so it cannot hold its slot against the connection limits."""
        talk = self.ehlo(command_timeout=60)
        talk.transport.reading = False
        talk.protocol.pauseProducing()
        talk.clock.advance(60)
        self.assertTrue(talk.transport.value().endswith(TIMEOUT))
        self.assertTrue(talk.closed)
        self.assertFalse(talk.transport.disconnected)
        self.assertIsNone(talk.transport.producer)
        talk.clock.advance(CLOSE_DRAIN_TIMEOUT)
        self.assertTrue(talk.transport.disconnected)  # abortConnection

    def test_replies_before_quit_are_kept_when_the_buffer_is_full(self) -> None:
        """A full buffer at QUIT means only that this read made many replies: they are all handed over, not
        thrown away with an abort."""
        talk = self.ehlo()
        self.exchange(talk, b"NOOP\r\n")
        talk.protocol.pauseProducing()
        talk.protocol.resumeProducing()
        original = talk.transport.write

        def write(data: bytes) -> None:
            original(data)
            talk.protocol.pauseProducing()  # every reply fills the buffer

        talk.transport.write = write  # type: ignore[method-assign]
        self.assertEqual(self.exchange(talk, b"QUIT\r\n"), b"221 2.0.0 Closing connection\r\n")
        self.assertTrue(talk.closed)
        self.assertFalse(talk.transport.disconnected)

    def test_close_unregisters(self) -> None:
        """A transport with a producer registered never finishes closing: QUIT unregisters first."""
        talk = self.ehlo()
        self.exchange(talk, b"QUIT\r\n")
        self.assertTrue(talk.closed)
        self.assertFalse(talk.transport.disconnected)  # a clean close, the reply flushed first
        self.assertIsNone(talk.transport.producer)
