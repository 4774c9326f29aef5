"""Trace fields: the RFC 5321 §4.4 ``Received:`` line and ``Return-Path:``, byte for byte."""

from __future__ import annotations

import email
import email.policy
from email.errors import NonASCIILocalPartDefect
from email.utils import formatdate

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core.address import Address, parse_path
from esmtpkit.core.trace import address_literal, received_header, return_path_header
from esmtpkit.core.session import Envelope, Session

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


#: A legal quoted local part that reads like the end of the field, a date and a comment of our own.
FORGED = '"x; Tue, 1 Jan 2030 00:00:00 +0000 (authenticated as root)"@evil.test'


def received_for(recipient: str) -> bytes:
    return received_header(session(), id="Q1", recipients=[recipient], timestamp=WHEN)


class TraceAddressTests(SynchronousTestCase):
    """Addresses in ``for`` and ``Return-Path:`` cannot forge the fields' structure (RFC 5321 §4.4)."""

    def test_quoted_local_part_is_not_named_in_for(self) -> None:
        """``for`` is optional: a recipient whose local part needs quotes is left out, so the field has exactly one
        ``;`` (before our date) and no comment the client wrote."""
        recipient = parse_path(f"<{FORGED}>")
        got = received_for(recipient)
        self.assertEqual(got, (
            "Received: from client.test (192.0.2.7 [192.0.2.7]) by mx.test with ESMTP\r\n"
            f"\tid Q1; {DATE}\r\n").encode())
        self.assertEqual(got.count(b";"), 1)
        parsed = email.message_from_bytes(got + b"\r\n", policy=email.policy.SMTP)
        self.assertEqual(email.utils.parsedate_to_datetime(parsed["Received"].split(";")[1].strip()).timestamp(),
                         WHEN)

    def test_needless_quotes_are_dropped(self) -> None:
        """``"bob"@x`` is ``bob@x`` (RFC 5321 §4.1.2): named, in the least-quoted form."""
        self.assertIn(b"\tfor <bob@example.net>; ", received_for(parse_path('<"bob"@example.net>')))

    def test_unusual_but_plain_addresses_are_named(self) -> None:
        """Every atext character, an IP literal and UTF-8 letters fit in ``for`` as they are."""
        for recipient in ("a!#$%&'*+-/=?^_`{|}~.z@example.net", "u@[192.0.2.1]", "u@[IPv6:2001:db8::1]",
                          "\u00fcn\u00efcode@b\u00fccher.example", "\u0939\u093f\u0902\u0926\u0940@example.in"):
            got = received_for(parse_path(f"<{recipient}>", utf8=True))
            unfolded = b" ".join(got.split(b"\r\n\t")).decode()
            self.assertIn(f" for <{recipient}>; ", unfolded)

    def test_what_a_reader_could_take_for_structure_is_left_out(self) -> None:
        """General address literals may hold ``;`` and parentheses; full-width look-alikes of them are not letters;
        a domain-less ``Postmaster`` is no Path; text from a handler is checked as well."""
        for recipient in ("u@[x-tag:;(a)]", "x\uff1by\uff08z\uff09@example.net", "x\u037ey@example.net", "Postmaster",
                          "a b@example.net", "x@example.net>; forged", "x\r\nBcc: y@example.net"):
            got = received_for(recipient)
            self.assertNotIn(b"for", got, recipient)
            self.assertEqual(got.count(b";"), 1, recipient)

    def test_return_path_is_one_angle_addr(self) -> None:
        """The sender is kept exactly, canonically quoted; an RFC 5322 parser reads back the same mailbox."""
        for path, field in ((f"<{FORGED}>", f"<{FORGED}>"), ('<"bob"@example.net>', "<bob@example.net>"),
                            ('<"a\\ b\\\\c"@example.net>', '<"a b\\\\c"@example.net>'),
                            ("<j\u00f6rg@b\u00fccher.example>", "<j\u00f6rg@b\u00fccher.example>")):
            sender = parse_path(path, utf8=True)
            got = return_path_header(sender)
            self.assertEqual(got, f"Return-Path: {field}\r\n".encode())
            value = got.decode()[len("Return-Path: "):-2]
            as_sender = email.policy.SMTPUTF8.header_factory("Sender", value)  # the same single-address syntax
            defects = [d for d in as_sender.defects if not isinstance(d, NonASCIILocalPartDefect)]  # RFC 6532 allows
            self.assertEqual((as_sender.address.addr_spec, defects), (sender.canonical(), []))

    def test_return_path_refuses_controls(self) -> None:
        """No parsed path holds one; a handler's own text that does is refused rather than written."""
        self.assertRaises(ValueError, return_path_header, "x\r\nBcc: y@example.net")
        self.assertRaises(ValueError, return_path_header, Address("x\x1b[2J@example.net"))


class AddressLiteralTests(SynchronousTestCase):
    def test_literals(self) -> None:
        """RFC 5321 §4.1.3 forms."""
        self.assertEqual(address_literal("192.0.2.1"), "[192.0.2.1]")
        self.assertEqual(address_literal("2001:db8:0::1"), "[IPv6:2001:db8::1]")
        self.assertEqual(address_literal("not an ip"), "[not?an?ip]")


class Utf8TraceKeywordTests(SynchronousTestCase):
    def test_smtputf8_transaction(self) -> None:
        """RFC 6531 §3.7.3: a transaction with SMTPUTF8 is recorded as UTF8SMTP (UTF8SMTPSA with TLS and AUTH)."""
        from esmtpkit.core.session import Envelope, Session

        session = Session(hostname="mx.test", esmtp=True, envelope=Envelope(mail_params={"SMTPUTF8": True}))
        self.assertEqual(session.with_protocol, "UTF8SMTP")
        session.tls, session.authenticated = True, "alice"
        self.assertEqual(session.with_protocol, "UTF8SMTPSA")
        session.lmtp = True
        self.assertEqual(session.with_protocol, "UTF8LMTPSA")
        session.envelope = Envelope()
        self.assertEqual(session.with_protocol, "LMTPSA")
