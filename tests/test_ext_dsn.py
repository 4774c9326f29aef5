"""DSN (RFC 3461) through the protocol: advertised on request, parameters parsed, handed on, kept in the envelope."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core.dsn import Notify, OriginalRecipient, Ret

from .support import ServerMixin


class DSNTests(ServerMixin, SynchronousTestCase):
    def dsn(self, **changes: Any) -> Any:
        talk = self.connect(dsn=True, **changes)
        self.assertTrue(self.exchange(talk, b"EHLO client.test\r\n").endswith(b"250-BINARYMIME\r\n250 DSN\r\n"))
        return talk

    def test_off_by_default(self) -> None:
        talk = self.ehlo()
        self.assertEqual(self.exchange(talk, b"MAIL FROM:<a@example.org> RET=HDRS\r\n"),
                         b"555 5.5.4 Unsupported MAIL parameter RET\r\n")
        self.exchange(talk, b"MAIL FROM:<a@example.org>\r\n")
        self.assertEqual(self.exchange(talk, b"RCPT TO:<b@example.org> NOTIFY=NEVER\r\n"),
                         b"555 5.5.4 Unsupported RCPT parameter NOTIFY\r\n")

    def test_parameters_reach_the_handler_and_the_envelope(self) -> None:
        talk = self.dsn()
        wire = self.exchange(talk, b"MAIL FROM:<a@example.org> RET=hdrs ENVID=QQ+2B314 SIZE=10\r\n"
                                   b"RCPT TO:<b@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b+2Bx@example.org\r\n"
                                   b"RCPT TO:<c@example.org> NOTIFY=NEVER\r\nRCPT TO:<d@example.org>\r\n")
        self.assertEqual(wire, b"250 2.1.0 <a@example.org>, sender ok\r\n250 2.1.5 <b@example.org>, recipient ok\r\n"
                               b"250 2.1.5 <c@example.org>, recipient ok\r\n250 2.1.5 <d@example.org>, recipient ok\r\n")
        mail = {"RET": Ret.HDRS, "ENVID": "QQ+314", "SIZE": 10}
        first = {"NOTIFY": Notify(failure=True, delay=True), "ORCPT": OriginalRecipient("rfc822", "b+x@example.org")}
        self.assertEqual([c.args[1] for c in talk.handler.calls if c.verb in ("mail", "rcpt")],
                         [mail, first, {"NOTIFY": Notify()}, {}])
        envelope = talk.protocol.session.envelope
        self.assertEqual((envelope.mail_params, envelope.rcpt_params), (mail, [first, {"NOTIFY": Notify()}, {}]))
        self.assertEqual((str(first["NOTIFY"]), str(first["ORCPT"])), ("FAILURE,DELAY", "rfc822;b+2Bx@example.org"))
        self.assertEqual(self.exchange(talk, b"DATA\r\n.\r\n")[-41:], b"250 2.0.0 Message accepted for delivery\r\n")

    def test_bad_values(self) -> None:
        talk = self.dsn()
        self.assertEqual(self.exchange(talk, b"MAIL FROM:<a@example.org> RET=ALL\r\n"),
                         b"501 5.5.4 Bad RET parameter: expected FULL or HDRS\r\n")
        self.exchange(talk, b"MAIL FROM:<a@example.org>\r\n")
        self.assertEqual(self.exchange(talk, b"RCPT TO:<b@example.org> NOTIFY=NEVER,DELAY\r\n"),
                         b"501 5.5.4 Bad NOTIFY parameter: NEVER cannot be combined with other values\r\n")
        self.assertEqual(talk.handler.verbs, ["connect", "ehlo", "mail"])

    def test_utf8_orcpt_needs_smtputf8(self) -> None:
        """RFC 6533: raw UTF-8 in ORCPT only in an SMTPUTF8 transaction; escapes always."""
        talk = self.dsn()
        self.exchange(talk, b"MAIL FROM:<a@example.org>\r\n")
        self.assertEqual(self.exchange(talk, "RCPT TO:<b@example.org> ORCPT=utf-8;j\u00f6rg@example.org\r\n".encode()),
                         b"501 5.5.4 Bad value for parameter ORCPT\r\n")
        self.assertEqual(self.exchange(talk, b"RCPT TO:<b@example.org> ORCPT=utf-8;j\\x{F6}rg@example.org\r\n")[:3],
                         b"250")
        self.exchange(talk, b"RSET\r\nMAIL FROM:<a@example.org> SMTPUTF8\r\n")
        self.assertEqual(self.exchange(talk, "RCPT TO:<b@example.org> ORCPT=utf-8;j\u00f6rg@example.org\r\n".encode())
                         [:3], b"250")
        self.assertEqual(talk.protocol.session.envelope.rcpt_params[-1]["ORCPT"].address, "j\u00f6rg@example.org")

    def test_long_orcpt_fits_the_line(self) -> None:
        """RFC 3461 §5: RCPT lines get 500 more octets for ORCPT."""
        talk = self.dsn()
        self.exchange(talk, b"MAIL FROM:<a@example.org>\r\n")
        orcpt = b"rfc822;" + b"x" * 400 + b"@example.org"
        self.assertEqual(self.exchange(talk, b"RCPT TO:<b@example.org> NOTIFY=SUCCESS ORCPT=" + orcpt + b"\r\n")[:3],
                         b"250")
