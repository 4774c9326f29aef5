"""Trace fields: the RFC 5321 §4.4 ``Received:`` line and ``Return-Path:``, byte for byte."""

from __future__ import annotations

import email
import email.policy
from email.utils import formatdate

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.address import Address
from esmtpkit.handlers.trace import address_literal, received_header, return_path_header
from esmtpkit.session import Envelope, Session

WHEN = 1_700_000_000.0
DATE = formatdate(WHEN, localtime=True)


def session(**changes: object) -> Session:
    values: dict[str, object] = dict(hostname="mx.test", peer=IPv4Address("TCP", "192.0.2.7", 40000),
                                     helo="client.test", esmtp=True,
                                     envelope=Envelope(sender=Address("alice@example.com"),
                                                       recipients=[Address("bob@example.net")]))
    values.update(changes)
    return Session(**values)  # type: ignore[arg-type]


class ReceivedTests(SynchronousTestCase):
    def test_plain_esmtp(self) -> None:
        """From, by, with, id, for and the date, folded before the clause that would pass 78 characters."""
        got = received_header(session(), id="Q1", timestamp=WHEN)
        self.assertEqual(got, (
            "Received: from client.test (192.0.2.7 [192.0.2.7]) by mx.test with ESMTP id Q1\r\n"
            f"\tfor <bob@example.net>; {DATE}\r\n").encode())

    def test_lines_stay_under_78(self) -> None:
        """Every line fits in 78 characters when the clauses allow; continuation lines start with a tab."""
        got = received_header(session(hostname="a-rather-long-host-name.mail.example.org", helo="a.long.client.example",
                                      tls=True, tls_info={"protocol": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"},
                                      authenticated="alice"),
                              id="M123P45Q6Rdeadbeef", timestamp=WHEN)
        lines = got.split(b"\r\n")
        self.assertEqual(lines[-1], b"")
        for line in lines[:-1]:
            self.assertLessEqual(len(line), 78, line)
        for line in lines[1:-1]:
            self.assertTrue(line.startswith(b"\t"), line)
        unfolded = b" ".join(line.strip() for line in lines[:-1]).decode()
        self.assertEqual(unfolded, (
            "Received: from a.long.client.example (192.0.2.7 [192.0.2.7])"
            " by a-rather-long-host-name.mail.example.org with ESMTPSA"
            " (using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384) (authenticated as alice)"
            f" id M123P45Q6Rdeadbeef for <bob@example.net>; {DATE}"))

    def test_exact_folding(self) -> None:
        """The folding itself, byte for byte."""
        got = received_header(session(tls=True, tls_info={"protocol": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256"}),
                              id="ABC", timestamp=WHEN)
        self.assertEqual(got, (
            "Received: from client.test (192.0.2.7 [192.0.2.7]) by mx.test with ESMTPS\r\n"
            "\t(using TLSv1.3 with cipher TLS_AES_128_GCM_SHA256) id ABC\r\n"
            f"\tfor <bob@example.net>; {DATE}\r\n").encode())

    def test_helo_and_one_line(self) -> None:
        """HELO gives ``with SMTP``; a short stamp is one line."""
        got = received_header(session(esmtp=False, helo="c", hostname="m", peer=None), id="1", recipients=[],
                              timestamp=WHEN)
        self.assertEqual(got, f"Received: from c by m with SMTP id 1; {DATE}\r\n".encode())

    def test_user_hidden_on_request(self) -> None:
        """``show_user=False`` keeps ESMTPA but not the identity."""
        got = received_header(session(authenticated="alice"), id="1", timestamp=WHEN, show_user=False)
        self.assertIn(b"with ESMTPA id 1", got)
        self.assertNotIn(b"alice", got)

    def test_several_recipients_not_listed(self) -> None:
        """``for`` appears only with exactly one recipient: one copy must not reveal the others."""
        two = session(envelope=Envelope(sender=Address("a@x.test"),
                                        recipients=[Address("b@y.test"), Address("c@y.test")]))
        got = received_header(two, id="1", timestamp=WHEN)
        self.assertNotIn(b"for", got)
        self.assertNotIn(b"y.test", got)

    def test_ipv6_and_rdns(self) -> None:
        """IPv6 peers get an ``IPv6:`` address literal; a reverse-DNS name replaces the bare IP in the comment."""
        got = received_header(session(peer=IPv6Address("TCP", "2001:db8::1", 1)), id="1", timestamp=WHEN,
                              rdns="host.example.org")
        self.assertTrue(got.startswith(b"Received: from client.test (host.example.org [IPv6:2001:db8::1])"), got)

    def test_no_ip(self) -> None:
        """A UNIX-socket client has no TCP-info comment."""
        got = received_header(session(peer=UNIXAddress(b"/run/smtp.sock")), id="1", timestamp=WHEN)
        self.assertTrue(got.startswith(b"Received: from client.test by mx.test with ESMTP id 1"), got)

    def test_hostile_text_cannot_break_the_field(self) -> None:
        """Client-chosen text (HELO name, AUTH identity) cannot end a comment or start a new field."""
        got = received_header(session(helo="x(y);z\x7f", authenticated="eve) (forged\\"), id="1", timestamp=WHEN)
        self.assertIn(b"from x?y??z? (", got)
        self.assertIn(b"(authenticated as eve? ?forged?)", got)
        parsed = email.message_from_bytes(got + b"\r\nbody\r\n", policy=email.policy.SMTP)
        self.assertEqual(len(parsed.get_all("Received")), 1)
        self.assertEqual(parsed.get_payload(), "body\r\n")

    def test_uses_the_session_envelope_and_now(self) -> None:
        """Without a timestamp the current time is used; without recipients the session's envelope is."""
        got = received_header(session(), id="1")
        self.assertIn(b"for <bob@example.net>; ", got)
        parsed = email.message_from_bytes(got + b"\r\n")
        self.assertIsNotNone(email.utils.parsedate_to_datetime(parsed["Received"].rsplit(";", 1)[1].strip()))


class ReturnPathTests(SynchronousTestCase):
    def test_sender(self) -> None:
        self.assertEqual(return_path_header(Address("alice@example.com")), b"Return-Path: <alice@example.com>\r\n")

    def test_null_sender(self) -> None:
        """Bounces (``MAIL FROM:<>``) get ``<>`` (RFC 5321 §4.4)."""
        self.assertEqual(return_path_header(Address("")), b"Return-Path: <>\r\n")


class AddressLiteralTests(SynchronousTestCase):
    def test_literals(self) -> None:
        """RFC 5321 §4.1.3 forms."""
        self.assertEqual(address_literal("192.0.2.1"), "[192.0.2.1]")
        self.assertEqual(address_literal("2001:db8:0::1"), "[IPv6:2001:db8::1]")
        self.assertEqual(address_literal("not an ip"), "[not?an?ip]")


class Utf8TraceKeywordTests(SynchronousTestCase):
    def test_smtputf8_transaction(self) -> None:
        """RFC 6531 §3.7.3: a transaction with SMTPUTF8 is recorded as UTF8SMTP (UTF8SMTPSA with TLS and AUTH)."""
        from esmtpkit.session import Envelope, Session

        session = Session(hostname="mx.test", esmtp=True, envelope=Envelope(mail_params={"SMTPUTF8": True}))
        self.assertEqual(session.with_protocol, "UTF8SMTP")
        session.tls, session.authenticated = True, "alice"
        self.assertEqual(session.with_protocol, "UTF8SMTPSA")
        session.lmtp = True
        self.assertEqual(session.with_protocol, "UTF8LMTPSA")
        session.envelope = Envelope()
        self.assertEqual(session.with_protocol, "LMTPSA")
