"""Tests for `esmtpkit.server.protocol.ESMTPProtocol`: exact wire bytes over a StringTransport (RFC 5321, RFC 2034).

`ServerMixin`, `replay` and the replies and scenario the protocol test modules share are in `tests.support`.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, strategies as st
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core import rules as state
from esmtpkit.core.commands import Verb
from esmtpkit.core.reply import Reply
from esmtpkit.core.rules import ADVANCE, Phase
from esmtpkit.testing import Call, Conversation, RecordingHandler, parse_replies

from .support import (
    ACCEPTED, BODY_1, BODY_2, EHLO_REPLY, GO_AHEAD, GREETING, HOST, SCENARIO, SCENARIO_CALLS, SCENARIO_WIRE, SETTINGS,
    TOKENS, ServerMixin, calls, policy, replay, split,
)


class GreetingTests(ServerMixin, SynchronousTestCase):
    def test_greeting(self) -> None:
        """RFC 5321 §4.3.1: 220 with the server's name first; no enhanced code (RFC 2034 §3)."""
        talk = self.connect()
        self.assertEqual(talk.transport.value(), GREETING)
        self.assertEqual(talk.handler.verbs, ["connect"])
        session = talk.handler.calls[0].args[0]
        self.assertIs(session, talk.protocol.session)
        self.assertEqual((session.peer_ip, session.peer.port, session.host.port), ("127.0.0.1", 40000, 25))
        self.assertEqual(session.hostname, HOST)
        self.assertIs(session.transport, talk.transport)

    def test_helo(self) -> None:
        talk = self.connect()
        self.assertEqual(self.exchange(talk, b"HELO client.test\r\n"), b"250 mx.test OK\r\n")
        self.assertEqual(talk.handler.calls[-1], Call("helo", ("client.test",)))
        self.assertEqual((talk.protocol.session.helo, talk.protocol.session.esmtp), ("client.test", False))
        self.assertEqual(self.exchange(talk, b"NOOP\r\n"), b"250 OK\r\n")
        self.assertEqual(talk.protocol.session.with_protocol, "SMTP")

    def test_ehlo(self) -> None:
        """EHLO lists the extensions; enhanced codes follow on every later reply, never on the EHLO reply."""
        talk = self.connect()
        self.assertEqual(self.exchange(talk, b"EHLO client.test\r\n"), EHLO_REPLY)
        self.assertEqual((talk.protocol.session.helo, talk.protocol.session.esmtp), ("client.test", True))
        self.assertEqual(self.exchange(talk, b"NOOP\r\n"), b"250 2.0.0 OK\r\n")
        self.assertEqual(self.exchange(talk, b"EHLO again.test\r\n"), EHLO_REPLY.replace(b"client", b"again"))
        self.assertEqual(self.exchange(talk, b"HELO old.test\r\n"), b"250 mx.test OK\r\n")
        self.assertEqual(self.exchange(talk, b"NOOP\r\n"), b"250 OK\r\n")
        self.assertEqual(talk.protocol.session.with_protocol, "SMTP")

    def test_ehlo_extensions_follow_policy(self) -> None:
        talk = self.connect(pipelining=False, eightbitmime=False, smtputf8=False, enhanced_status_codes=False,
                            max_message_size=0, chunking=False)
        self.assertEqual(self.exchange(talk, b"EHLO client.test\r\n"),
                         b"250-mx.test client.test, pleased to meet you\r\n250-HELP\r\n250 SIZE\r\n")
        self.assertEqual(self.exchange(talk, b"NOOP\r\n"), b"250 OK\r\n")

    def test_greeting_syntax(self) -> None:
        """A name is required; the 501 carries no enhanced code, even after an earlier EHLO (RFC 2034 §3)."""
        talk = self.connect()
        self.assertEqual(self.exchange(talk, b"HELO\r\nEHLO\r\n"),
                         b"501 Syntax: HELO hostname\r\n501 Syntax: EHLO hostname\r\n")
        self.exchange(talk, b"EHLO client.test\r\n")
        self.assertEqual(self.exchange(talk, b"EHLO \r\nHELO\r\n"),
                         b"501 Syntax: EHLO hostname\r\n501 Syntax: HELO hostname\r\n")
        self.assertEqual(talk.handler.verbs, ["connect", "ehlo"])

    def test_verbs_case_insensitive(self) -> None:
        talk = self.connect()
        wire = self.exchange(talk, b"ehlo client.test\r\nmail from:<a@example.org>\r\nRcPt To:<b@example.org>\r\n"
                                   b"data\r\n.\r\nnoop\r\nrset\r\nQuIt\r\n")
        self.assertEqual(wire, EHLO_REPLY + b"250 2.1.0 <a@example.org>, sender ok\r\n"
                               b"250 2.1.5 <b@example.org>, recipient ok\r\n"
                               b"354 Enter mail, end with \".\" on a line by itself\r\n"
                               b"250 2.0.0 Message accepted for delivery\r\n250 2.0.0 OK\r\n250 2.0.0 OK\r\n"
                               b"221 2.0.0 Closing connection\r\n")
        self.assertTrue(talk.closed)


class TransactionTests(ServerMixin, SynchronousTestCase):
    def test_after_helo(self) -> None:
        """A whole transaction after HELO: plain replies, exact bytes, the envelope and content seen."""
        talk = self.connect()
        wire = self.exchange(talk, b"HELO client.test\r\n")
        wire += self.exchange(talk, b"MAIL FROM:<alice@example.org>\r\n")
        wire += self.exchange(talk, b"RCPT TO:<bob@example.net>\r\n")
        wire += self.exchange(talk, b"DATA\r\n")
        wire += self.exchange(talk, b"Subject: hi\r\n\r\nHello\r\n.\r\n")
        self.assertEqual(wire, b"250 mx.test OK\r\n250 <alice@example.org>, sender ok\r\n"
                               b"250 <bob@example.net>, recipient ok\r\n"
                               b"354 Enter mail, end with \".\" on a line by itself\r\n"
                               b"250 Message accepted for delivery\r\n")
        self.assertEqual(talk.handler.messages, [{"sender": "alice@example.org", "recipients": ["bob@example.net"],
                                                   "headers": [("Subject", "hi")], "body": b"Hello\r\n"}])

    def test_after_ehlo(self) -> None:
        talk = self.ehlo()
        wire = self.exchange(talk, b"MAIL FROM:<alice@example.org> SIZE=20 BODY=8BITMIME\r\n"
                                   b"RCPT TO:<bob@example.net>\r\nRCPT TO:<carol@example.net>\r\nDATA\r\n")
        self.assertEqual(wire, b"250 2.1.0 <alice@example.org>, sender ok\r\n"
                               b"250 2.1.5 <bob@example.net>, recipient ok\r\n"
                               b"250 2.1.5 <carol@example.net>, recipient ok\r\n"
                               b"354 Enter mail, end with \".\" on a line by itself\r\n")
        envelope = talk.protocol.session.envelope
        self.assertEqual((envelope.sender, envelope.mail_params), ("alice@example.org", {"SIZE": 20, "BODY": "8BITMIME"}))
        self.assertEqual((envelope.recipients, envelope.rcpt_params), (["bob@example.net", "carol@example.net"], [{}, {}]))
        self.assertEqual(talk.handler.calls[2], Call("mail", ("alice@example.org", {"SIZE": 20, "BODY": "8BITMIME"})))
        self.assertEqual(self.exchange(talk, b"Hi\r\n.\r\n"), b"250 2.0.0 Message accepted for delivery\r\n")
        self.assertEqual(talk.protocol.session.envelope.recipients, [])
        self.assertEqual(talk.protocol.phase, Phase.GREETED)
        self.assertEqual(talk.protocol.session.transactions, 1)

    def test_second_transaction(self) -> None:
        talk = self.ehlo()
        self.assertEqual(talk.message("a@example.org", ["b@example.org"], b"one\r\n", ehlo=None).code, 250)
        self.assertEqual(talk.message("", ["c@example.org"], b"two\r\n", ehlo=None).code, 250)
        self.assertEqual([(m["sender"], m["recipients"], m["body"]) for m in talk.handler.messages],
                         [("a@example.org", ["b@example.org"], b"one\r\n"), ("", ["c@example.org"], b"two\r\n")])

    def test_rset(self) -> None:
        talk = self.ehlo()
        self.exchange(talk, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
        self.assertEqual(self.exchange(talk, b"RSET\r\n"), b"250 2.0.0 OK\r\n")
        self.assertEqual(talk.protocol.session.envelope.sender, None)
        self.assertEqual(self.exchange(talk, b"RCPT TO:<b@example.org>\r\n"), b"503 5.5.1 Need MAIL command\r\n")
        self.assertEqual(self.exchange(talk, b"RSET x\r\n"), b"501 5.5.4 Syntax: RSET\r\n")

    def test_rset_before_greeting(self) -> None:
        talk = self.connect()
        self.assertEqual(self.exchange(talk, b"RSET\r\n"), b"250 OK\r\n")
        self.assertEqual(self.exchange(talk, b"MAIL FROM:<a@b>\r\n"), b"503 Send HELO/EHLO first\r\n")

    def test_noop_vrfy_expn_help(self) -> None:
        talk = self.ehlo()
        wire = self.exchange(talk, b"NOOP\r\nNOOP anything\r\nVRFY bob\r\nEXPN staff\r\nHELP\r\nHELP MAIL\r\n")
        self.assertEqual(wire, b"250 2.0.0 OK\r\n250 2.0.0 OK\r\n"
                               b"252 2.5.2 Cannot VRFY user; try RCPT to attempt delivery\r\n"
                               b"502 5.5.1 Sorry we don't allow this operation\r\n"
                               b"214 2.0.0 This is SMTP::Proxy 1.0\r\n214 2.0.0 This is SMTP::Proxy 1.0\r\n")
        self.assertEqual(calls(talk.handler)[2:], [("noop",), ("noop",), ("vrfy", "bob"), ("expn", "staff"),
                                                   ("help", None), ("help", "MAIL")])
        self.assertEqual(self.exchange(talk, b"VRFY\r\nEXPN\r\n"),
                         b"501 5.5.4 Syntax: VRFY address\r\n501 5.5.4 Syntax: EXPN list\r\n")

    def test_quit(self) -> None:
        """221, then the server closes; nothing after QUIT is read."""
        talk = self.connect()
        self.assertEqual(self.exchange(talk, b"QUIT\r\nNOOP\r\n"), b"221 Closing connection\r\n")
        self.assertTrue(talk.closed)
        self.assertEqual(self.exchange(talk, b"NOOP\r\n"), b"")
        self.assertEqual(talk.handler.verbs, ["connect", "quit"])
        self.assertEqual(talk.protocol.phase, Phase.CLOSED)

    def test_quit_with_argument(self) -> None:
        talk = self.connect()
        self.assertEqual(self.exchange(talk, b"QUIT now\r\n"), b"501 Syntax: QUIT\r\n")
        self.assertFalse(talk.closed)

    def test_unknown(self) -> None:
        """The seed's 500 with the line as received; enhanced code only after EHLO."""
        talk = self.connect()
        self.assertEqual(self.exchange(talk, b"FROB the Widget\r\n"), b"500 Command unrecognized: FROB the Widget\r\n")
        self.exchange(talk, b"EHLO client.test\r\n")
        self.assertEqual(self.exchange(talk, b"frob\r\n"), b"500 5.5.2 Command unrecognized: frob\r\n")
        self.assertEqual(self.exchange(talk, b"\r\n"), b"500 5.5.2 Command unrecognized:\r\n")
        self.assertEqual(calls(talk.handler)[1:], [("unknown", "FROB the Widget"), ("ehlo", "client.test"),
                                                   ("unknown", "frob"), ("unknown", "")])

    def test_unoffered_extension_verbs_are_unknown(self) -> None:
        """STARTTLS, AUTH, BDAT, LHLO are not offered by the base protocol: the handler's ``unknown`` answers."""
        talk = self.connect(chunking=False)
        self.exchange(talk, b"EHLO client.test\r\n")
        for line in (b"STARTTLS", b"AUTH PLAIN", b"BDAT 10 LAST", b"LHLO client.test"):
            self.assertEqual(self.exchange(talk, line + b"\r\n"), b"500 5.5.2 Command unrecognized: " + line + b"\r\n")

    def test_bad_bytes(self) -> None:
        talk = self.ehlo()
        self.assertEqual(self.exchange(talk, b"NOOP \xff\r\nNO\x00OP\r\n"),
                         b"500 5.5.2 Invalid UTF-8 in command\r\n500 5.5.2 NUL character in command\r\n")
        self.assertEqual(self.exchange(talk, b"NOOP\r\n"), b"250 2.0.0 OK\r\n")


class SequenceTests(ServerMixin, SynchronousTestCase):
    """503 for every verb out of order, driven by `state.ADVANCE` itself (RFC 5321 §4.1.4)."""

    #: One line per verb the base protocol implements.
    LINES = {
        Verb.HELO: b"HELO client.test", Verb.EHLO: b"EHLO client.test", Verb.MAIL: b"MAIL FROM:<a@example.org>",
        Verb.RCPT: b"RCPT TO:<b@example.org>", Verb.DATA: b"DATA", Verb.RSET: b"RSET", Verb.NOOP: b"NOOP",
        Verb.QUIT: b"QUIT", Verb.VRFY: b"VRFY b", Verb.EXPN: b"EXPN list", Verb.HELP: b"HELP",
        Verb.UNKNOWN: b"FROB",
    }
    #: How to reach each phase in which commands are read.
    SETUP = {
        Phase.CONNECTED: b"",
        Phase.GREETED: b"EHLO client.test\r\n",
        Phase.SENDER: b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n",
        Phase.RECIPIENTS: b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n",
    }

    def test_every_pair(self) -> None:
        checked = 0
        for phase, setup in self.SETUP.items():
            for verb, line in self.LINES.items():
                talk = self.connect()
                self.exchange(talk, setup)
                self.assertEqual(talk.protocol.phase, phase)
                seen = len(talk.handler.calls)
                wire = self.exchange(talk, line + b"\r\n")
                if (phase, verb) in ADVANCE:
                    self.assertNotEqual(wire[:3], b"503", (phase, verb))
                    self.assertIn(verb.value.lower(), talk.handler.verbs[seen:])
                else:
                    prefix = b"503 " if phase is Phase.CONNECTED else b"503 5.5.1 "
                    self.assertEqual(wire, prefix + state.refusal(phase, verb).encode() + b"\r\n", (phase, verb))
                    self.assertEqual(len(talk.handler.calls), seen, (phase, verb))
                    self.assertEqual(talk.protocol.phase, phase)
                    checked += 1
                talk.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(checked, 8)  # MAIL before HELO and twice nested; RCPT twice before MAIL; DATA three times
        self.assertEqual(checked, sum(1 for p in self.SETUP for v in self.LINES if (p, v) not in ADVANCE))


class ArgumentTests(ServerMixin, SynchronousTestCase):
    """Path and parameter syntax (RFC 5321 §4.1.2): 501 for bad syntax, 555 for unknown parameters."""

    def test_accepted_paths(self) -> None:
        talk = self.ehlo()
        wire = self.exchange(talk, b"MAIL FROM:<>\r\n"
                                   b"RCPT TO:<@relay1.example,@relay2.example:user@d.example>\r\n"
                                   b"RCPT TO:<\"john smith\"@example.org>\r\n"
                                   b"RCPT TO:<user@[192.0.2.1]>\r\n"
                                   b"RCPT TO:<user@[IPv6:2001:db8::1]>\r\n"
                                   b"RCPT TO:<Postmaster>\r\n"
                                   b"RCPT TO: <spaced@example.org>\r\n"
                                   b"RCPT TO:bare@example.org\r\n")
        self.assertEqual(wire, b"250 2.1.0 <>, sender ok\r\n"
                               b"250 2.1.5 <user@d.example>, recipient ok\r\n"
                               b"250 2.1.5 <\"john smith\"@example.org>, recipient ok\r\n"
                               b"250 2.1.5 <user@[192.0.2.1]>, recipient ok\r\n"
                               b"250 2.1.5 <user@[IPv6:2001:db8::1]>, recipient ok\r\n"
                               b"250 2.1.5 <Postmaster>, recipient ok\r\n"
                               b"250 2.1.5 <spaced@example.org>, recipient ok\r\n"
                               b"250 2.1.5 <bare@example.org>, recipient ok\r\n")
        recipients = talk.protocol.session.envelope.recipients
        self.assertEqual(recipients[0].source_route, ("relay1.example", "relay2.example"))
        self.assertEqual(recipients[1].local_part, '"john smith"')
        self.assertTrue(talk.protocol.session.envelope.sender.is_null)

    def test_bad_paths(self) -> None:
        talk = self.ehlo()
        self.assertEqual(self.exchange(talk, b"MAIL FROM:<a b@example.org>\r\n"),
                         b"501 5.1.7 Bad address syntax: bad local part a b\r\n")
        self.assertEqual(self.exchange(talk, b"MAIL FROM:<a@example.org\r\n"),
                         b"501 5.1.7 Bad address syntax: unbalanced <\r\n")
        self.assertEqual(self.exchange(talk, b"MAIL <a@example.org>\r\n"), b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n")
        self.assertEqual(self.exchange(talk, b"MAIL FROM:\r\n"), b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n")
        self.assertEqual(self.exchange(talk, b"MAIL FROM:<Postmaster>\r\n"),
                         b"501 5.1.7 Bad address syntax: no domain in Postmaster\r\n")
        self.assertEqual(talk.protocol.phase, Phase.GREETED)
        self.exchange(talk, b"MAIL FROM:<a@example.org>\r\n")
        self.assertEqual(self.exchange(talk, b"RCPT TO:<>\r\n"),
                         b"501 5.1.3 Bad address syntax: null path not allowed here\r\n")
        self.assertEqual(self.exchange(talk, b"RCPT TO:<u@[300.1.1.1]>\r\n"),
                         b"501 5.1.3 Bad address syntax: bad address literal [300.1.1.1]\r\n")
        self.assertEqual(self.exchange(talk, b"RCPT <b@example.org>\r\n"), b"501 5.5.4 Syntax: RCPT TO:<address>\r\n")
        self.assertEqual(self.exchange(talk, b"DATA\r\n"), b"503 5.5.1 Need RCPT command\r\n")
        self.assertEqual(talk.handler.verbs, ["connect", "ehlo", "mail"])

    def test_bad_paths_before_ehlo(self) -> None:
        talk = self.connect()
        self.exchange(talk, b"HELO client.test\r\n")
        self.assertEqual(self.exchange(talk, b"MAIL FROM:<a@>\r\n"), b"501 Bad address syntax: empty domain\r\n")

    def test_unknown_parameters(self) -> None:
        """RFC 5321 §4.1.1.11: 555 for parameters not recognized."""
        talk = self.ehlo()
        self.assertEqual(self.exchange(talk, b"MAIL FROM:<a@example.org> FOO=bar\r\n"),
                         b"555 5.5.4 Unsupported MAIL parameter FOO\r\n")
        self.assertEqual(self.exchange(talk, b"MAIL FROM:<a@example.org> SIZE=x\r\n"), b"501 5.5.4 Bad SIZE value\r\n")
        self.exchange(talk, b"MAIL FROM:<a@example.org>\r\n")
        self.assertEqual(self.exchange(talk, b"RCPT TO:<b@example.org> NOTIFY=NEVER\r\n"),
                         b"555 5.5.4 Unsupported RCPT parameter NOTIFY\r\n")
        self.assertEqual(talk.handler.verbs, ["connect", "ehlo", "mail"])

    def test_parameters_need_ehlo(self) -> None:
        """After HELO no extension is offered, so every parameter is unknown."""
        talk = self.connect()
        self.exchange(talk, b"HELO client.test\r\n")
        self.assertEqual(self.exchange(talk, b"MAIL FROM:<a@example.org> SIZE=10\r\n"),
                         b"555 Unsupported MAIL parameter SIZE\r\n")

    def test_size_over_limit(self) -> None:
        """RFC 1870 §6.1: a declared SIZE over the limit is refused at MAIL with 552 5.3.4."""
        talk = self.ehlo(max_message_size=1000)
        self.assertEqual(self.exchange(talk, b"MAIL FROM:<a@example.org> SIZE=1001\r\n"),
                         b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")
        self.assertEqual(talk.handler.verbs, ["connect", "ehlo"])
        self.assertEqual(self.exchange(talk, b"MAIL FROM:<a@example.org> SIZE=1000\r\n"),
                         b"250 2.1.0 <a@example.org>, sender ok\r\n")

    def test_smtputf8(self) -> None:
        talk = self.ehlo()
        self.assertEqual(self.exchange(talk, "MAIL FROM:<j\u00f6rg@example.org>\r\n".encode()),
                         b"553 5.6.7 Bad address syntax: non-ASCII address needs SMTPUTF8\r\n")
        self.assertEqual(self.exchange(talk, "MAIL FROM:<j\u00f6rg@example.org> SMTPUTF8\r\n".encode()),
                         "250 2.1.0 <j\u00f6rg@example.org>, sender ok\r\n".encode())
        self.assertEqual(self.exchange(talk, "RCPT TO:<b\u00fcro@example.org>\r\n".encode()),
                         "250 2.1.5 <b\u00fcro@example.org>, recipient ok\r\n".encode())


# ---- DATA: headers, body chunks, unstuffing, pipelined commands after the dot ----------------------------------

def raw_calls(scenario_calls: list[tuple[Any, ...]], contents: list[bytes]) -> list[tuple[Any, ...]]:
    """SCENARIO_CALLS as chunk_mode True sees them: no header/eoh calls, the whole content through body()."""
    out: list[tuple[Any, ...]] = []
    messages = iter(contents)
    for call in scenario_calls:
        if call[0] in ("header", "eoh", "body"):
            continue
        if call[0] == "eom":
            content = next(messages)
            if content:
                out.append(("body", content))
        out.append(call)
    return out


RAW_CONTENTS = [
    b"From: alice@example.org\r\nSubject: a folded\r\n\tsubject line\r\n.Dotted: header\r\n\r\n" + BODY_1,
    b"X-First: 1\r\n" + BODY_2,
    b"",
]


class DataTests(ServerMixin, SynchronousTestCase):
    def test_scenario_whole(self) -> None:
        wire, handler = replay([SCENARIO])
        self.assertEqual(wire, SCENARIO_WIRE)
        self.assertEqual(calls(handler), SCENARIO_CALLS)

    def test_scenario_byte_by_byte(self) -> None:
        wire, handler = replay([bytes([b]) for b in SCENARIO])
        self.assertEqual(wire, SCENARIO_WIRE)
        self.assertEqual(calls(handler), SCENARIO_CALLS)

    @SETTINGS
    @given(cuts=st.lists(st.integers(0, len(SCENARIO)), max_size=25), mode=st.sampled_from([None, True, False]),
           chunk_size=st.sampled_from([1, 3, 7, 65536]))
    def test_scenario_any_split(self, cuts: list[int], mode: bool | None, chunk_size: int) -> None:
        """Any split, any chunk mode and size: the same wire bytes and calls; no chunk bigger than chunk_size."""
        wire, handler = replay(split(SCENARIO, cuts), chunk_mode=mode, chunk_size=chunk_size)
        self.assertEqual(wire, SCENARIO_WIRE)
        expected = raw_calls(SCENARIO_CALLS, RAW_CONTENTS) if mode is True else SCENARIO_CALLS
        self.assertEqual(calls(handler), expected)
        for call in handler.calls:
            if call.verb == "body":
                self.assertLessEqual(len(call.args[0]), chunk_size)
                self.assertNotEqual(call.args[0], b"")

    def test_chunk_size(self) -> None:
        """chunk_mode None: raw chunks after the headers, none bigger than chunk_size."""
        wire, handler = replay([SCENARIO], chunk_size=5)
        self.assertEqual(wire, SCENARIO_WIRE)
        chunks = [c.args[0] for c in handler.calls if c.verb == "body"]
        self.assertEqual(chunks[:4], [b"Body ", b"line ", b"1\r\n.l", b"eadin"])
        self.assertEqual(b"".join(chunks), BODY_1 + BODY_2)

    def test_chunk_mode_true(self) -> None:
        """chunk_mode True: everything raw through body(), no header()/eoh() calls."""
        wire, handler = replay([SCENARIO], chunk_mode=True)
        self.assertEqual(wire, SCENARIO_WIRE)
        self.assertEqual(calls(handler), raw_calls(SCENARIO_CALLS, RAW_CONTENTS))
        self.assertNotIn("header", handler.verbs)
        self.assertNotIn("eoh", handler.verbs)

    def test_chunk_mode_false(self) -> None:
        """chunk_mode False: headers as usual, then one body() call per line, whatever the split."""
        for pieces in ([SCENARIO], [bytes([b]) for b in SCENARIO]):
            wire, handler = replay(pieces, chunk_mode=False)
            self.assertEqual(wire, SCENARIO_WIRE)
            self.assertEqual([c.args[0] for c in handler.calls if c.verb == "body"],
                             [b"Body line 1\r\n", b".leading dot\r\n", b"..\r\n", b"\r\n", b"last line\r\n",
                              b"This line is not a header\r\n", b"X-Second: 2\r\n"])

    def test_empty_message(self) -> None:
        """The dot right after DATA: an empty message, no body() call."""
        talk = self.ehlo()
        self.exchange(talk, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        self.assertEqual(self.exchange(talk, b".\r\n"), ACCEPTED)
        self.assertEqual(talk.handler.verbs[-3:], ["data", "eoh", "eom"])
        self.assertEqual(talk.handler.messages[0]["body"], b"")

    def test_headers_only(self) -> None:
        """The dot ends the message inside the headers: the last header is delivered, then eoh() and eom()."""
        talk = self.ehlo()
        self.exchange(talk, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        self.assertEqual(self.exchange(talk, b"A: 1\r\nB: 2\r\n  two\r\n.\r\n"), ACCEPTED)
        self.assertEqual(calls(talk.handler)[-5:], [("data",), ("header", "A", "1"), ("header", "B", "2  two"),
                                                    ("eoh",), ("eom",)])

    def test_pipelined_after_dot(self) -> None:
        """Commands in the same packet as the final dot are parsed as commands."""
        talk = self.ehlo()
        self.exchange(talk, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        self.assertEqual(self.exchange(talk, b"x\r\n.\r\nNOOP\r\nMAIL FROM:<c@example.org>\r\nRCPT TO:<d@example.org>\r\n"),
                         ACCEPTED + b"250 2.0.0 OK\r\n250 2.1.0 <c@example.org>, sender ok\r\n"
                                    b"250 2.1.5 <d@example.org>, recipient ok\r\n")

    def test_data_with_argument(self) -> None:
        talk = self.ehlo()
        self.exchange(talk, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
        self.assertEqual(self.exchange(talk, b"DATA now\r\n"), b"501 5.5.4 Syntax: DATA\r\n")
        self.assertEqual(talk.protocol.phase, Phase.RECIPIENTS)

    def test_data_refused_by_handler(self) -> None:
        """A DATA reply other than 354 leaves the transaction open; the next lines are commands again."""
        talk = self.ehlo(RecordingHandler({"data": (554, "no content today")}))
        self.exchange(talk, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
        self.assertEqual(self.exchange(talk, b"DATA\r\nNOOP\r\n"), b"554 5.0.0 no content today\r\n250 2.0.0 OK\r\n")
        self.assertEqual(talk.protocol.phase, Phase.RECIPIENTS)
        self.assertEqual(self.exchange(talk, b"RCPT TO:<c@example.org>\r\n"), b"250 2.1.5 <c@example.org>, recipient ok\r\n")

    def test_recipient_refused(self) -> None:
        """Only recipients answered positively join the envelope; with none, DATA is out of order."""
        talk = self.ehlo(RecordingHandler({"rcpt": lambda r, p: (550, "no such user") if r.local_part == "x" else
                                           (250, "ok")}))
        wire = self.exchange(talk, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n"
                                   b"RCPT TO:<y@example.org>\r\n")
        self.assertEqual(wire, b"250 2.1.0 <a@example.org>, sender ok\r\n550 5.1.1 no such user\r\n"
                               b"503 5.5.1 Need RCPT command\r\n250 2.1.5 ok\r\n")
        self.assertEqual(talk.protocol.session.envelope.recipients, ["y@example.org"])

    def test_sender_refused(self) -> None:
        talk = self.ehlo(RecordingHandler({"mail": (550, "5.7.1 go away")}))
        wire = self.exchange(talk, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
        self.assertEqual(wire, b"550 5.7.1 go away\r\n503 5.5.1 Need MAIL command\r\n")
        self.assertEqual(talk.protocol.session.envelope.sender, None)

    def test_eom_refused(self) -> None:
        talk = self.ehlo(RecordingHandler({"eom": (554, "5.7.1 spam")}))
        self.assertEqual(talk.message("a@example.org", ["b@example.org"], b"buy now\r\n", ehlo=None),
                         Reply.of(554, "spam", enhanced="5.7.1"))
        self.assertTrue(talk.transport.value().endswith(GO_AHEAD + b"554 5.7.1 spam\r\n"))
        self.assertEqual(talk.protocol.phase, Phase.GREETED)
        self.assertNotIn("abort", talk.handler.verbs)


class BareNewlineTests(ServerMixin, SynchronousTestCase):
    """Only CRLF.CRLF ends DATA; what a bare CR or LF gets is the policy's choice (SMTP smuggling)."""

    SNEAKY = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n", b"\n.\r"]
    START = b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"

    def smuggle(self, sneaky: bytes) -> bytes:
        """A message whose body hides a second transaction behind a bare-newline 'end of data'."""
        return (self.START + b"Subject: x\r\n\r\nhello" + sneaky
                + b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nforged\r\n"
                + b".\r\nNOOP\r\n")

    def test_reject(self) -> None:
        for sneaky in self.SNEAKY:
            for pieces in (lambda d: [d], lambda d: [bytes([b]) for b in d]):
                wire, handler = replay(pieces(self.smuggle(sneaky)))
                self.assertEqual(wire, GREETING + EHLO_REPLY + b"250 2.1.0 <a@example.org>, sender ok\r\n"
                                       b"250 2.1.5 <b@example.org>, recipient ok\r\n" + GO_AHEAD
                                       + b"550 5.5.2 Message contains a bare CR or LF (only CRLF ends a line)\r\n"
                                       + b"250 2.0.0 OK\r\n", sneaky)
                self.assertEqual(handler.verbs[-2:], ["abort", "noop"], sneaky)
                self.assertNotIn("eom", handler.verbs)
                self.assertEqual(handler.verbs.count("mail"), 1)

    def test_reject_in_headers(self) -> None:
        wire, handler = replay([self.START + b"Subject: x\n.\nMAIL FROM:<evil@example.org>\r\n.\r\n"])
        self.assertTrue(wire.endswith(GO_AHEAD + b"550 5.5.2 Message contains a bare CR or LF (only CRLF ends a line)"
                                                b"\r\n"))
        self.assertEqual(handler.verbs[-1], "abort")

    def test_allow(self) -> None:
        """With bare_newline="allow" the bytes are kept as they came; still only CRLF.CRLF ends DATA."""
        for sneaky in self.SNEAKY:
            wire, handler = replay([self.smuggle(sneaky)], bare_newline="allow")
            self.assertTrue(wire.endswith(GO_AHEAD + ACCEPTED + b"250 2.0.0 OK\r\n"), sneaky)
            self.assertEqual(handler.messages[0]["body"], b"hello" + sneaky + b"MAIL FROM:<evil@example.org>\r\n"
                             b"RCPT TO:<victim@example.org>\r\nDATA\r\nforged\r\n")
            self.assertEqual(handler.verbs.count("mail"), 1)

    def test_allow_in_headers(self) -> None:
        wire, handler = replay([self.START + b"Subject: x\n.\nY\r\n\r\nbody\r\n.\r\n"], bare_newline="allow")
        self.assertTrue(wire.endswith(ACCEPTED))
        self.assertEqual(handler.messages[0]["headers"], [("Subject", "x\n.\nY")])


class FuzzTests(SynchronousTestCase):
    """Any client input: well-formed replies only, no error logged, and the same outcome at any split."""

    @SETTINGS
    @given(tokens=st.lists(TOKENS, max_size=30), cuts=st.lists(st.integers(0, 20000), max_size=10),
           mode=st.sampled_from([None, True, False]))
    def test_any_input(self, tokens: list[bytes], cuts: list[int], mode: bool | None) -> None:
        data = b"".join(tokens)
        wire, handler = replay([data], chunk_mode=mode, chunk_size=5, max_message_size=2000)
        wire_split, handler_split = replay(split(data, cuts), chunk_mode=mode, chunk_size=5, max_message_size=2000)
        self.assertEqual(wire, wire_split)
        self.assertEqual(calls(handler), calls(handler_split))
        replies = parse_replies(wire)
        self.assertEqual(b"".join(r.render() for r in replies).count(b"\r\n"), wire.count(b"\r\n"))
        self.assertNotIn(451, [r.code for r in replies])
        self.assertEqual(self.flushLoggedErrors(), [])
        verbs = handler.verbs
        self.assertLessEqual(verbs.count("eom"), verbs.count("data"))
        self.assertLessEqual(verbs.count("abort") + verbs.count("eom"), verbs.count("mail"))  # one end per transaction


class ConversationTests(ServerMixin, SynchronousTestCase):
    """`esmtpkit.testing.Conversation` reads replies back as values, multi-line and textless ones included."""

    def test_send_and_replies(self) -> None:
        talk = self.connect(RecordingHandler({"noop": (250,), "help": (214, "a", "b")}))
        self.assertEqual(talk.greeting, Reply.of(220, "mx.test ESMTP Mail Server"))
        self.assertEqual(talk.send("NOOP"), Reply.of(250))
        self.assertEqual(talk.send("HELP"), Reply.of(214, "a", "b"))
        self.assertEqual(talk.send("EHLO client.test").lines[-1], "BINARYMIME")
        self.assertEqual(talk.send("NOOP"), Reply.of(250, enhanced="2.0.0"))
        talk.write(b"NOOP\r\nHELP\r\n")
        self.assertEqual(talk.replies(), [Reply.of(250, enhanced="2.0.0"), Reply.of(214, "a", "b", enhanced="2.0.0")])
        self.assertEqual(talk.replies(), [])

    def test_parse_replies(self) -> None:
        self.assertEqual(parse_replies(b"250\r\n250-a\r\n250 b\r\n354 go\r\n250-incomplete\r\n"),
                         [Reply.of(250), Reply.of(250, "a", "b"), Reply.of(354, "go")])
        self.assertRaises(ValueError, parse_replies, b"hello\r\n")


class FootprintTests(SynchronousTestCase):
    """Idle connections stay small: every attribute the protocol sets per connection is a slot, not a __dict__ entry.

    An attribute added without a slot would, past 30 of them, give every connection a private dict of about 1.5 KiB.
    """

    def test_no_instance_dict_after_a_whole_session(self) -> None:
        from twisted.internet.defer import Deferred

        class Slow(RecordingHandler):
            pending: Deferred[Any] | None = None

            def rcpt(self, recipient: Any, params: Any) -> Any:
                self.pending = Deferred()  # pauses reading until it fires
                return self.pending

        handler = Slow()
        talk = Conversation(handler, policy(max_command_length=512))
        talk.write(b"EHLO c.test\r\nMAIL FROM:<a@b.test> SIZE=10\r\nRCPT TO:<c@d.test>\r\nNOOP\r\n")
        assert handler.pending is not None
        handler.pending.callback(Reply(250, ("OK",)))
        talk.write(b"DATA\r\nSubject: x\r\n\r\nbody\r\n..dot\r\n.\r\n")
        talk.write(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
        handler.pending.callback(Reply(250, ("OK",)))
        talk.write(b"BDAT 6 LAST\r\nabc\r\n" + b"X" * 2000 + b"\r\nRSET\r\nVRFY x\r\nHELP\r\nQUIT\r\n")
        replies = [r.code for r in talk.replies()]
        self.assertEqual(replies, [250, 250, 250, 250, 354, 250, 250, 250, 250, 500, 250, 252, 214, 221])
        talk.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(getattr(talk.protocol, "__dict__", {}), {})
