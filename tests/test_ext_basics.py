"""SIZE, 8BITMIME, SMTPUTF8, PIPELINING and ENHANCEDSTATUSCODES with every other extension switched on."""

from __future__ import annotations

import re

from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.server.sasl import portal_from_strings

from .support import CONTEXT, TLSMixin

EVERYTHING = dict(tls_context=CONTEXT, portal=portal_from_strings(["memory:alice:secret"]), auth_require_tls=False,
                  dsn=True, max_message_size=1000)
ENHANCED = re.compile(rb"([245])\d\d[ -]([245])\.\d{1,3}\.\d{1,3}( |$)")


class KeywordTests(TLSMixin, SynchronousTestCase):
    def test_every_keyword(self) -> None:
        protocol, _ = self.connect(**EVERYTHING)
        self.assertEqual(self.exchange(protocol, b"EHLO client.test\r\n"),
                         b"250-mx.test client.test, pleased to meet you\r\n250-HELP\r\n250-PIPELINING\r\n"
                         b"250-SIZE 1000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n"
                         b"250-CHUNKING\r\n250-BINARYMIME\r\n250-DSN\r\n250-STARTTLS\r\n"
                         b"250 AUTH PLAIN LOGIN CRAM-MD5\r\n")

    def test_size_declared_over_the_limit(self) -> None:
        """RFC 1870 §6.1: refused at MAIL, before any content."""
        protocol, _ = self.connect(**EVERYTHING)
        self.exchange(protocol, b"EHLO client.test\r\n")
        self.assertEqual(self.exchange(protocol, b"MAIL FROM:<a@example.org> SIZE=1001\r\n"),
                         b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")

    def test_parameters_reach_the_handler(self) -> None:
        """BODY and SMTPUTF8 as parsed values; UTF-8 addresses only in an SMTPUTF8 transaction."""
        protocol, _ = self.connect(**EVERYTHING)
        self.exchange(protocol, b"EHLO client.test\r\n")
        self.assertEqual(self.exchange(protocol, "RCPT TO:<b\u00fcro@example.org>\r\n".encode())[:3], b"503")
        self.exchange(protocol, b"MAIL FROM:<a@example.org> BODY=8BITMIME\r\n")
        self.assertEqual(self.exchange(protocol, "RCPT TO:<b\u00fcro@example.org>\r\n".encode()),
                         b"553 5.6.7 Bad address syntax: non-ASCII address needs SMTPUTF8\r\n")
        self.exchange(protocol, "RSET\r\nMAIL FROM:<j\u00f6rg@example.org> SMTPUTF8 BODY=binarymime\r\n".encode())
        self.assertEqual(self.exchange(protocol, "RCPT TO:<b\u00fcro@example.org>\r\n".encode())[:9], b"250 2.1.5")
        mails = [c.args for c in protocol.handler.calls if c.verb == "mail"]
        self.assertEqual([m[1] for m in mails], [{"BODY": "8BITMIME"}, {"SMTPUTF8": True, "BODY": "BINARYMIME"}])
        self.assertEqual(protocol.session.envelope.recipients, ["b\u00fcro@example.org"])


class EnhancedCodeTests(TLSMixin, SynchronousTestCase):
    """RFC 2034: after EHLO every reply the protocol writes carries an enhanced code of its class."""

    #: Commands the protocol answers itself (refusals, syntax, limits), and a few the handler answers.
    PROVOCATIONS = [
        b"MAIL FROM:<a b@example.org>", b"MAIL FROM:<a@example.org> FOO=1", b"MAIL FROM:<a@example.org> SIZE=x",
        b"MAIL FROM:<a@example.org> SIZE=5000", b"MAIL FROM:<a@example.org> RET=NONE", b"RCPT TO:<b@example.org>",
        b"DATA", b"BDAT 0", b"BDAT x", b"NOOP \xff", b"NO\x00OP", b"X" * 600, b"STARTTLS now", b"AUTH",
        b"AUTH FOO", b"AUTH PLAIN !!", b"AUTH LOGIN\r\n*", b"VRFY", b"EXPN", b"RSET now", b"QUIT now", b"FROB",
        b"VRFY bob", b"EXPN staff", b"HELP",
        b"MAIL FROM:<a@example.org>", b"MAIL FROM:<c@example.org>", "RCPT TO:<\u00fc@example.org>".encode(),
        b"RCPT TO:<b@example.org> NOTIFY=SOMETIMES", b"RCPT TO:<b@example.org>", b"AUTH PLAIN AGFsaWNlAHNlY3JldA==",
        b"DATA\r\nSubject: x\r\n\r\nbare\nLF\r\n.", b"MAIL FROM:<a@example.org> BODY=BINARYMIME",
        b"RCPT TO:<b@example.org>", b"DATA", b"BDAT 3\r\nabc", b"DATA", b"BDAT 2000 LAST\r\n" + b"x" * 2000,
        b"BDAT 1\r\nx", b"RSET", b"AUTH PLAIN AGFsaWNlAHNlY3JldA==", b"AUTH PLAIN AGFsaWNlAHNlY3JldA==",
        b"STARTTLS",
    ]

    def test_every_reply_after_ehlo(self) -> None:
        protocol, _ = self.connect(error_limit=0, **EVERYTHING)
        self.exchange(protocol, b"EHLO client.test\r\n")
        codes = set()
        for command in self.PROVOCATIONS:
            for line in self.exchange(protocol, command + b"\r\n").split(b"\r\n")[:-1]:
                if line[:3] in (b"354", b"334"):
                    continue  # intermediate replies carry none (RFC 2034 §3)
                match = ENHANCED.match(line)
                self.assertIsNotNone(match, line)
                assert match is not None
                self.assertEqual(match.group(1), match.group(2), line)
                codes.add(line[:3])
        self.assertEqual(codes, {b"214", b"220", b"235", b"250", b"252", b"500", b"501", b"502", b"503", b"504",
                                 b"550", b"552", b"553", b"555"})
