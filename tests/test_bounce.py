"""Tests for `esmtpkit.core.bounce`: delivery status notices (RFC 3464, RFC 3461, RFC 6533), read back with `email`."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import datetime, timezone
from email.message import EmailMessage
from email.utils import format_datetime, parsedate_to_datetime

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core.bounce import BOUNCE_SIZE_LIMIT, SUBJECTS, report
from esmtpkit.core.outbound import Message, Outcome, Recipient, Status

ARRIVED = 1_700_000_000.0
NOW = ARRIVED + 3600.0
NEW_ID = "01HGW2N7EXAMPLE0NEWD"
MTA = "mx.example.org"
CONTENT = (b"Received: from client.example by mx.example.org; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
           b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: lunch\r\n"
           b"Message-ID: <m1@example.org>\r\n\r\nSee you at noon.\r\n")
HEADER = CONTENT[:CONTENT.index(b"\r\n\r\n") + 2]
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None)
REJECTED = Outcome(550, "5.1.1", "<bob@example.net>: Recipient address rejected: no such user",
                   "mx.example.net[192.0.2.1]")


def date(when: float) -> str:
    return format_datetime(datetime.fromtimestamp(when, timezone.utc))


def original(*recipients: Recipient, **fields: object) -> Message:
    values: dict = {"size": len(CONTENT), "arrived": ARRIVED, "received_from": "dns; client.example (192.0.2.7)"}
    values.update(fields)
    return Message("Q0000000000000000001", values.pop("sender", "alice@example.org"),
                   list(recipients) or [Recipient("bob@example.net", outcome=REJECTED, status=Status.FAILED)],
                   **values)


def unfold_blocks(body: bytes) -> list[dict[str, str]]:
    """The field blocks of a delivery-status body, unfolded (RFC 5322 §2.2.3), as {name: value} in order."""
    text = body.decode("utf-8")
    assert text.endswith("\r\n") and "\n" not in text.replace("\r\n", ""), "CRLF line ends only"
    blocks = []
    for block in text.rstrip("\r\n").split("\r\n\r\n"):
        fields: dict[str, str] = {}
        for line in re.sub(r"\r\n(?=[ \t])", "", block).split("\r\n"):
            name, _, value = line.partition(":")
            assert name not in fields, f"field {name} repeated"
            fields[name] = value.strip()
        blocks.append(fields)
    return blocks


class Notice:
    """A notice read back: the `email` view, the raw parts, and the delivery-status blocks."""

    def __init__(self, data: bytes, utf8: bool = False) -> None:
        self.data = data
        parsed = (email.message_from_string(data.decode("utf-8"), policy=email.policy.default) if utf8
                  else email.message_from_bytes(data, policy=email.policy.default))
        assert isinstance(parsed, EmailMessage)
        self.message = parsed
        boundary = parsed.get_boundary()
        assert boundary is not None
        pieces = data.split(b"\r\n--" + boundary.encode())
        assert pieces[-1] == b"--\r\n", "the notice ends with the closing delimiter"
        self.raw = []
        for piece in pieces[1:-1]:
            assert piece.startswith(b"\r\n")
            head, _, body = piece[2:].partition(b"\r\n\r\n")
            self.raw.append((head, body))
        self.types = [part.get_content_type() for part in parsed.iter_parts()]
        self.blocks = unfold_blocks(self.raw[1][1])

    @property
    def per_message(self) -> dict[str, str]:
        return self.blocks[0]

    @property
    def recipients(self) -> list[dict[str, str]]:
        return self.blocks[1:]

    def text(self) -> str:
        return self.raw[0][1].decode("utf-8")

    def words(self) -> str:
        """The note for people with its line breaks undone."""
        return " ".join(self.text().split())


def check_wire(test: SynchronousTestCase, data: bytes) -> None:
    """CRLF line ends only, and no line of 998 octets or more (RFC 5322 §2.1.1)."""
    test.assertNotRegex(data, rb"\r(?!\n)|(?<!\r)\n")
    for line in data.split(b"\r\n"):
        test.assertLessEqual(len(line), 998)


class FailedTests(SynchronousTestCase):
    def test_one_recipient_remote_550(self) -> None:
        notice, data = report(original(), [0], "failed", reporting_mta=MTA, content=CONTENT, new_id=NEW_ID,
                              now=NOW)
        check_wire(self, data)
        self.assertTrue(data.isascii())
        got = Notice(data)
        top = got.message
        self.assertEqual(top.get_content_type(), "multipart/report")
        self.assertEqual(top.get_param("report-type"), "delivery-status")
        self.assertEqual(got.types, ["text/plain", "message/delivery-status", "message/rfc822"])
        self.assertIn(b'\r\nFrom: "Mail Delivery System" <MAILER-DAEMON@mx.example.org>\r\n', b"\r\n" + data)
        self.assertIn(b"\r\nTo: <alice@example.org>\r\n", data)
        sender = top["From"].addresses[0]
        self.assertEqual((sender.display_name, sender.addr_spec), ("Mail Delivery System", f"MAILER-DAEMON@{MTA}"))
        self.assertEqual(top["To"].addresses[0].addr_spec, "alice@example.org")
        self.assertEqual(top["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(parsedate_to_datetime(top["Date"]).timestamp(), NOW)
        self.assertEqual(top["Message-ID"], f"<{NEW_ID}@{MTA}>")
        self.assertEqual(top["Auto-Submitted"], "auto-replied")
        self.assertEqual(top["MIME-Version"], "1.0")
        self.assertEqual(top["Content-Transfer-Encoding"], "7bit")
        self.assertIn(NEW_ID, top.get_boundary())
        self.assertEqual(got.per_message, {
            "Reporting-MTA": "dns; mx.example.org",
            "Received-From-MTA": "dns; client.example (192.0.2.7)",
            "Arrival-Date": date(ARRIVED),
            "X-Esmtpkit-Queue-ID": "Q0000000000000000001",
        })
        self.assertEqual(got.recipients, [{
            "Final-Recipient": "rfc822; bob@example.net",
            "Action": "failed",
            "Status": "5.1.1",
            "Remote-MTA": "dns; mx.example.net",
            "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.net>: Recipient address rejected: no such user",
            "Last-Attempt-Date": date(NOW),
        }])
        # email's own reading of the delivery-status part agrees
        status = list(top.iter_parts())[1].get_payload()
        self.assertEqual([dict(block.items()) for block in status], got.blocks)
        text = got.words()
        self.assertIn("This is the mail system at mx.example.org.", text)
        self.assertIn("<postmaster@mx.example.org>", text)
        self.assertIn("<bob@example.net>: host mx.example.net[192.0.2.1] said: 550 5.1.1", text)
        self.assertIn("The message is attached below.", got.words())
        # the notice as a queued message
        self.assertEqual((notice.id, notice.sender, notice.size), (NEW_ID, "", len(data)))
        self.assertEqual([(r.address, r.notify) for r in notice.recipients], [("alice@example.org", ("NEVER",))])
        self.assertEqual((notice.arrived, notice.next_attempt, notice.body, notice.smtputf8), (NOW, NOW, None, False))
        self.assertEqual((notice.ret, notice.envid, notice.attempts), (None, None, 0))

    def test_deterministic(self) -> None:
        args = dict(reporting_mta=MTA, content=CONTENT, new_id=NEW_ID, now=NOW)
        self.assertEqual(report(original(), [0], "failed", **args), report(original(), [0], "failed", **args))
        other = report(original(), [0], "failed", **{**args, "new_id": "01HGW2N7EXAMPLE0OTHER"})[1]
        self.assertIn(b'boundary="01HGW2N7EXAMPLE0OTHER', other)

    def test_several_recipients_mixed(self) -> None:
        """Only the recipients asked for are reported, each with its own status and diagnostic."""
        message = original(
            Recipient("a@example.net", outcome=REJECTED, status=Status.FAILED),
            Recipient("b@example.net", status=Status.DELIVERED, outcome=Outcome(250, "2.0.0", "ok", "mx")),
            Recipient("c@example.com", outcome=Outcome(552, "5.0.0", "mailbox full", "mx.example.com[192.0.2.9]"),
                      status=Status.FAILED),
            Recipient("d@example.info", outcome=Outcome.local(451, "4.4.1", "connection refused"),
                      status=Status.FAILED),
            Recipient("e@example.test", status=Status.FAILED),
        )
        _, data = report(message, [0, 2, 3, 4], "failed", reporting_mta=MTA, content=CONTENT, new_id=NEW_ID,
                         now=NOW)
        got = Notice(data)
        self.assertEqual([r["Final-Recipient"] for r in got.recipients],
                         ["rfc822; a@example.net", "rfc822; c@example.com", "rfc822; d@example.info",
                          "rfc822; e@example.test"])
        self.assertEqual([r["Action"] for r in got.recipients], ["failed"] * 4)
        self.assertEqual([r["Status"] for r in got.recipients], ["5.1.1", "5.0.0", "4.4.1", "5.0.0"])
        self.assertEqual([r.get("Remote-MTA") for r in got.recipients],
                         ["dns; mx.example.net", "dns; mx.example.com", None, None])
        self.assertEqual(got.recipients[1]["Diagnostic-Code"], "smtp; 552 5.0.0 mailbox full")
        self.assertEqual(got.recipients[2]["Diagnostic-Code"], "X-esmtpkit; connection refused")
        self.assertNotIn("Diagnostic-Code", got.recipients[3])
        self.assertNotIn("Last-Attempt-Date", got.recipients[3])
        self.assertNotIn("<b@example.net>", data.decode())
        self.assertNotIn("; b@example.net", data.decode())
        text = got.words()
        for address in ("a@example.net", "c@example.com", "d@example.info", "e@example.test"):
            self.assertIn(f"<{address}>:", text)

    def test_local_outcome(self) -> None:
        """An outcome decided here (no remote host): no Remote-MTA, our own diagnostic type."""
        message = original(Recipient("bob@nullmx.example", status=Status.FAILED,
                                     outcome=Outcome.local(556, "5.1.10", "Domain does not accept mail (null MX)")))
        _, data = report(message, [0], "failed", reporting_mta=MTA, content=CONTENT, new_id=NEW_ID, now=NOW)
        got = Notice(data)
        self.assertEqual(got.recipients, [{
            "Final-Recipient": "rfc822; bob@nullmx.example",
            "Action": "failed",
            "Status": "5.1.10",
            "Diagnostic-Code": "X-esmtpkit; Domain does not accept mail (null MX)",
            "Last-Attempt-Date": date(NOW),
        }])
        self.assertIn("<bob@nullmx.example>: 556 5.1.10 Domain does not accept mail (null MX)",
                      got.words())

    def test_status_from_basic_code_when_enhanced_is_malformed(self) -> None:
        message = original(Recipient("b@x.test", outcome=Outcome(554, "bogus", "no", "mx"), status=Status.FAILED))
        got = Notice(report(message, [0], "failed", reporting_mta=MTA, content=CONTENT, new_id=NEW_ID, now=NOW)[1])
        self.assertEqual(got.recipients[0]["Status"], "5.0.0")

    def test_bad_calls(self) -> None:
        args = dict(reporting_mta=MTA, content=CONTENT, new_id=NEW_ID, now=NOW)
        with self.assertRaisesRegex(ValueError, "action must be one of"):
            report(original(), [0], "bounced", **args)
        with self.assertRaisesRegex(ValueError, "null sender"):
            report(original(sender=""), [0], "failed", **args)
        with self.assertRaisesRegex(ValueError, "no recipients"):
            report(original(), [], "failed", **args)


class OtherActionTests(SynchronousTestCase):
    def test_delayed(self) -> None:
        message = original(Recipient("bob@example.net", outcome=Outcome(451, "4.3.0", "try later",
                                                                        "mx.example.net[192.0.2.1]")))
        until = ARRIVED + 5 * 86400
        _, data = report(message, [0], "delayed", reporting_mta=MTA, content=CONTENT, new_id=NEW_ID, now=NOW,
                         retry_until=until)
        got = Notice(data)
        self.assertEqual(got.message["Subject"], "Delayed Mail (still being retried)")
        self.assertEqual(got.types, ["text/plain", "message/delivery-status", "text/rfc822-headers"])
        self.assertEqual(got.recipients, [{
            "Final-Recipient": "rfc822; bob@example.net",
            "Action": "delayed",
            "Status": "4.3.0",
            "Remote-MTA": "dns; mx.example.net",
            "Diagnostic-Code": "smtp; 451 4.3.0 try later",
            "Last-Attempt-Date": date(NOW),
            "Will-Retry-Until": date(until),
        }])
        self.assertEqual(got.raw[2][1], HEADER)
        self.assertIn(date(until), got.words())

    def test_delayed_default_retry_until(self) -> None:
        """Without a given time, the default lifetime after arrival."""
        _, data = report(original(Recipient("bob@example.net")), [0], "delayed", reporting_mta=MTA,
                         content=CONTENT, new_id=NEW_ID, now=NOW)
        got = Notice(data)
        self.assertEqual(got.recipients[0]["Will-Retry-Until"], date(ARRIVED + 5 * 86400))
        self.assertEqual(got.recipients[0]["Status"], "4.0.0")
        self.assertNotIn("Last-Attempt-Date", got.recipients[0])

    def test_delivered(self) -> None:
        """NOTIFY=SUCCESS: a success report carries the header only, even with RET=FULL (RFC 3461 §4.3)."""
        message = original(Recipient("bob@example.net", notify=("SUCCESS",), status=Status.DELIVERED,
                                     outcome=Outcome(250, "2.0.0", "Ok: queued as 4Xyz", "mx.example.net[192.0.2.1]")),
                           ret="FULL")
        notice, data = report(message, [0], "delivered", reporting_mta=MTA, content=CONTENT, new_id=NEW_ID,
                              now=NOW)
        got = Notice(data)
        self.assertEqual(got.message["Subject"], SUBJECTS["delivered"])
        self.assertEqual(got.message["Subject"], "Successful Mail Delivery Report")
        self.assertEqual(got.types, ["text/plain", "message/delivery-status", "text/rfc822-headers"])
        self.assertEqual(got.recipients, [{
            "Final-Recipient": "rfc822; bob@example.net",
            "Action": "delivered",
            "Status": "2.0.0",
            "Remote-MTA": "dns; mx.example.net",
            "Diagnostic-Code": "smtp; 250 2.0.0 Ok: queued as 4Xyz",
            "Last-Attempt-Date": date(NOW),
        }])
        self.assertIn("was delivered", got.words())
        self.assertEqual(notice.recipients[0].notify, ("NEVER",))

    def test_relayed(self) -> None:
        message = original(Recipient("bob@example.net", notify=("SUCCESS",), status=Status.DELIVERED,
                                     outcome=Outcome(250, "2.0.0", "ok", "old.example.net[192.0.2.3]")))
        got = Notice(report(message, [0], "relayed", reporting_mta=MTA, content=CONTENT, new_id=NEW_ID,
                            now=NOW)[1])
        self.assertEqual(got.recipients[0]["Action"], "relayed")
        self.assertEqual(got.recipients[0]["Status"], "2.0.0")
        self.assertEqual(got.message["Subject"], SUBJECTS["relayed"])
        self.assertNotIn("Will-Retry-Until", got.recipients[0])


class ReturnedContentTests(SynchronousTestCase):
    def notice(self, content: bytes = CONTENT, **fields: object) -> Notice:
        return Notice(report(original(**fields), [0], "failed", reporting_mta=MTA, content=content,
                             new_id=NEW_ID, now=NOW)[1])

    def test_ret_full_small(self) -> None:
        """The original goes back octet for octet, as message/rfc822."""
        got = self.notice(ret="FULL")
        self.assertEqual(got.types[2], "message/rfc822")
        self.assertEqual(got.raw[2][0], b"Content-Description: Undelivered Message\r\n"
                                        b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit")
        self.assertEqual(got.raw[2][1], CONTENT)
        inner = list(got.message.iter_parts())[2].get_payload()[0]
        self.assertEqual(inner["Subject"], "lunch")
        self.assertEqual(inner.get_content().strip(), "See you at noon.")

    def test_ret_unspecified_is_full(self) -> None:
        """Postfix's choice: no RET returns the whole message."""
        got = self.notice(ret=None)
        self.assertEqual(got.types[2], "message/rfc822")
        self.assertEqual(got.raw[2][1], CONTENT)

    def test_ret_full_at_the_limit(self) -> None:
        lines = (BOUNCE_SIZE_LIMIT - len(HEADER) - 2 - 1000) // 72 + 1
        content = HEADER + b"\r\n" + (b"x" * 70 + b"\r\n") * lines
        content += b"y" * (BOUNCE_SIZE_LIMIT - len(content) - 2) + b"\r\n"
        self.assertEqual(len(content), BOUNCE_SIZE_LIMIT)
        got = self.notice(content, ret="FULL", size=len(content))
        self.assertEqual(got.types[2], "message/rfc822")
        self.assertEqual(got.raw[2][1], content)

    def test_ret_full_too_large(self) -> None:
        """Over the limit (the caller passes one octet more): the header only, and a sentence saying why."""
        body = b"".join(b"line %05d of a long message\r\n" % i for i in range(3000))
        content = (HEADER + b"\r\n" + body)[:BOUNCE_SIZE_LIMIT + 1]
        got = self.notice(content, ret="FULL", size=len(HEADER) + 2 + len(body))
        self.assertEqual(got.types[2], "text/rfc822-headers")
        self.assertEqual(got.raw[2][1], HEADER)
        self.assertIn("too large to return", got.words())
        self.assertNotIn(b"line 00001", got.data)

    def test_size_over_limit_with_short_content(self) -> None:
        """The recorded size decides too: a shorter start of a large message is not returned as if whole."""
        got = self.notice(CONTENT, ret="FULL", size=BOUNCE_SIZE_LIMIT + 1)
        self.assertEqual(got.types[2], "text/rfc822-headers")

    def test_ret_hdrs(self) -> None:
        got = self.notice(ret="HDRS")
        self.assertEqual(got.types[2], "text/rfc822-headers")
        self.assertEqual(got.raw[2][0], b"Content-Description: Message Headers\r\n"
                                        b"Content-Type: text/rfc822-headers\r\nContent-Transfer-Encoding: 7bit")
        self.assertEqual(got.raw[2][1], HEADER)
        self.assertNotIn(b"See you at noon", got.data)
        self.assertIn("Its header is attached below.", got.words())

    def test_content_without_final_crlf(self) -> None:
        got = self.notice(CONTENT[:-2])
        self.assertEqual(got.raw[2][1], CONTENT)

    def test_content_mail_cannot_carry(self) -> None:
        """A bare LF or a line over 998 octets cannot go in a 7bit/8bit part: the header goes back instead."""
        for bad in (HEADER + b"\r\nbare\nLF\r\n", HEADER + b"\r\n" + b"z" * 999 + b"\r\n"):
            got = self.notice(bad, size=len(bad))
            self.assertEqual(got.types[2], "text/rfc822-headers")
            self.assertEqual(got.raw[2][1], HEADER)
            self.assertIn("could not be returned as it is", got.words())
            check_wire(self, got.data)

    def test_header_mail_cannot_carry(self) -> None:
        """Not even the header fits: no third part, and the note says so."""
        bad = b"Subject: " + b"q" * 1000 + b"\r\n\r\nbody\r\n"
        got = self.notice(bad, size=len(bad))
        self.assertEqual(got.types, ["text/plain", "message/delivery-status"])
        self.assertIn("could not be attached", got.words())
        check_wire(self, got.data)

    def test_header_only_content(self) -> None:
        """A message with no body: its whole content is its header."""
        got = self.notice(HEADER, ret="HDRS", size=len(HEADER))
        self.assertEqual(got.raw[2][1], HEADER)

    def test_eight_bit_content(self) -> None:
        """An 8BITMIME original goes back in an 8bit part; the notice then needs 8BITMIME itself."""
        content = HEADER + "\r\nCafé à midi.\r\n".encode("latin-1")
        notice, data = report(original(body="8BITMIME", size=len(content)), [0], "failed", reporting_mta=MTA,
                              content=content, new_id=NEW_ID, now=NOW)
        got = Notice(data)
        self.assertEqual(got.types[2], "message/rfc822")
        self.assertEqual(got.raw[2][1], content)
        self.assertIn(b"Content-Transfer-Encoding: 8bit", got.raw[2][0])
        self.assertEqual(got.message["Content-Transfer-Encoding"], "8bit")
        self.assertEqual((notice.body, notice.smtputf8), ("8BITMIME", False))

    def test_boundary_never_in_content(self) -> None:
        """Content holding the boundary a notice would use does not cut the notice short."""
        first = Notice(report(original(), [0], "failed", reporting_mta=MTA, content=CONTENT, new_id=NEW_ID,
                              now=NOW)[1]).message.get_boundary()
        assert first is not None
        content = HEADER + b"\r\n--" + first.encode() + b"\r\n--" + first.encode() + b".1--\r\n"
        got = self.notice(content, size=len(content))
        boundary = got.message.get_boundary()
        self.assertNotIn(boundary, (first, first + ".1"))
        self.assertEqual(got.types, ["text/plain", "message/delivery-status", "message/rfc822"])
        self.assertEqual(got.raw[2][1], content)


class EnvelopeParameterTests(SynchronousTestCase):
    def test_envid_and_orcpt_round_trip(self) -> None:
        """ENVID (stored decoded) and ORCPT (stored as received, xtext) come back decoded (RFC 3461 §4.2)."""
        message = original(Recipient("bob+tag@example.net", orcpt="rfc822;Bob+2Btag@example.net", outcome=REJECTED,
                                     status=Status.FAILED), envid="QQ+314=X")
        got = Notice(report(message, [0], "failed", reporting_mta=MTA, content=CONTENT, new_id=NEW_ID, now=NOW)[1])
        self.assertEqual(list(got.per_message)[0], "Original-Envelope-Id")
        self.assertEqual(got.per_message["Original-Envelope-Id"], "QQ+314=X")
        self.assertEqual(list(got.recipients[0])[:2], ["Original-Recipient", "Final-Recipient"])
        self.assertEqual(got.recipients[0]["Original-Recipient"], "rfc822;Bob+tag@example.net")
        self.assertEqual(got.recipients[0]["Final-Recipient"], "rfc822; bob+tag@example.net")

    def test_orcpt_variants(self) -> None:
        cases = {
            "rfc822;plain@example.net": "rfc822;plain@example.net",
            "RFC822;a+3Db@example.net": "RFC822;a=b@example.net",
            # decodes to a CR: not printable, so it is written as xtext again (never a raw line break)
            "rfc822;a+0Db@example.net": "rfc822;a+0Db@example.net",
            "x400;C+3Dde+3BA+3Dx": "x400;C=de;A=x",
            # the RFC 6533 utf-8 type keeps its own escapes in an ASCII report
            "utf-8;caf\\x{E9}@example.net": "utf-8;caf\\x{E9}@example.net",
            # stored malformed: written as it is, since it is printable
            "rfc822;not xtext@example.net": "rfc822;not xtext@example.net",
            # no type at all: RFC 3464's "unknown" type, the value kept
            "no type@example.net": "unknown;no type@example.net",
        }
        for orcpt, expected in cases.items():
            message = original(Recipient("bob@example.net", orcpt=orcpt, outcome=REJECTED))
            got = Notice(report(message, [0], "failed", reporting_mta=MTA, content=CONTENT, new_id=NEW_ID,
                                now=NOW)[1])
            self.assertEqual(got.recipients[0]["Original-Recipient"], expected, orcpt)
            self.assertEqual(got.types[1], "message/delivery-status", orcpt)

    def test_no_orcpt_no_envid(self) -> None:
        got = Notice(report(original(), [0], "failed", reporting_mta=MTA, content=CONTENT, new_id=NEW_ID,
                            now=NOW)[1])
        self.assertNotIn("Original-Envelope-Id", got.per_message)
        self.assertNotIn("Original-Recipient", got.recipients[0])


class SMTPUTF8Tests(SynchronousTestCase):
    CONTENT = "From: Ålice <ålice@exämple.org>\r\nSubject: déjeuner\r\n\r\nÀ midi.\r\n".encode("utf-8")

    def test_global_types(self) -> None:
        """RFC 6533: message/global-delivery-status and message/global, utf-8 address type, raw UTF-8 header."""
        message = original(
            Recipient("bøb@exämple.net", orcpt="utf-8;b\\x{F8}b@ex\\x{E4}mple.net", status=Status.FAILED,
                      outcome=Outcome(550, "5.1.1", "Unbekannter Empfänger", "mx.example.net[192.0.2.1]")),
            Recipient("carol@example.net", outcome=REJECTED, status=Status.FAILED),
            sender="ålice@exämple.org", smtputf8=True, size=len(self.CONTENT))
        notice, data = report(message, [0, 1], "failed", reporting_mta=MTA, content=self.CONTENT, new_id=NEW_ID,
                              now=NOW)
        check_wire(self, data)
        got = Notice(data, utf8=True)
        self.assertEqual(got.types, ["text/plain", "message/global-delivery-status", "message/global"])
        self.assertIn("\r\nTo: <ålice@exämple.org>\r\n".encode(), data)
        self.assertEqual(got.message["To"].addresses[0].addr_spec, "ålice@exämple.org")
        self.assertEqual(got.message["Content-Transfer-Encoding"], "8bit")
        self.assertEqual(got.recipients[0]["Original-Recipient"], "utf-8;bøb@exämple.net")
        self.assertEqual(got.recipients[0]["Final-Recipient"], "utf-8; bøb@exämple.net")
        self.assertEqual(got.recipients[0]["Diagnostic-Code"], "smtp; 550 5.1.1 Unbekannter Empfänger")
        self.assertEqual(got.recipients[1]["Final-Recipient"], "rfc822; carol@example.net")
        self.assertEqual(got.raw[2][1], self.CONTENT)
        self.assertIn(b"Content-Type: text/plain; charset=utf-8", got.raw[0][0])
        self.assertIn("<bøb@exämple.net>: host mx.example.net[192.0.2.1] said:", got.words())
        inner = list(got.message.iter_parts())[2].get_payload()[0]
        self.assertEqual(inner["Subject"], "déjeuner")
        self.assertEqual((notice.smtputf8, notice.body), (True, "8BITMIME"))
        self.assertEqual(notice.recipients[0].address, "ålice@exämple.org")

    def test_global_headers(self) -> None:
        message = original(Recipient("bob@example.net", outcome=REJECTED), smtputf8=True, ret="HDRS")
        notice, data = report(message, [0], "failed", reporting_mta=MTA, content=self.CONTENT, new_id=NEW_ID,
                              now=NOW)
        got = Notice(data, utf8=True)
        self.assertEqual(got.types, ["text/plain", "message/global-delivery-status", "message/global-headers"])
        self.assertEqual(got.raw[2][1], self.CONTENT[:self.CONTENT.index(b"\r\n\r\n") + 2])
        self.assertEqual((notice.smtputf8, notice.body), (True, "8BITMIME"))

    def test_non_ascii_address_alone_makes_it_global(self) -> None:
        """A non-ASCII recipient needs the global types even when the flag was not recorded."""
        message = original(Recipient("δοκιμή@example.net", outcome=REJECTED))
        notice, data = report(message, [0], "failed", reporting_mta=MTA, content=CONTENT, new_id=NEW_ID, now=NOW)
        got = Notice(data, utf8=True)
        self.assertEqual(got.types[1], "message/global-delivery-status")
        self.assertEqual(got.recipients[0]["Final-Recipient"], "utf-8; δοκιμή@example.net")
        self.assertTrue(notice.smtputf8)

    def test_non_ascii_reply_in_ascii_notice(self) -> None:
        """Without SMTPUTF8, a remote reply beyond ASCII is made ASCII: the notice stays 7bit."""
        message = original(Recipient("bob@example.net", outcome=Outcome(550, "5.1.1", "Empfänger unbekannt", "mx")))
        notice, data = report(message, [0], "failed", reporting_mta=MTA, content=CONTENT, new_id=NEW_ID, now=NOW)
        self.assertTrue(data.isascii())
        self.assertEqual(Notice(data).recipients[0]["Diagnostic-Code"], "smtp; 550 5.1.1 Empf?nger unbekannt")
        self.assertEqual((notice.smtputf8, notice.body), (False, None))


class HostileTextTests(SynchronousTestCase):
    def test_line_breaks_in_reply_cannot_add_fields(self) -> None:
        """CR, LF and other controls in a remote reply become spaces: no new field, part or header."""
        text = "no such user\r\nAction: delivered\r\n\r\nFinal-Recipient: rfc822; x@y\r\n--boundary\x00\x1b"
        message = original(Recipient("bob@example.net", outcome=Outcome(550, "5.1.1", text, "mx.example.net")),
                           envid="e\r\nX-Injected: 1", received_from="dns; evil\r\nX-Injected: 2")
        _, data = report(message, [0], "failed", reporting_mta="mx\r\nX-Injected: 3", content=CONTENT,
                         new_id=NEW_ID + "\r\nX-Injected: 4", now=NOW)
        check_wire(self, data)
        got = Notice(data)
        self.assertEqual(len(got.recipients), 1)
        self.assertEqual(got.recipients[0]["Action"], "failed")
        self.assertEqual(got.recipients[0]["Final-Recipient"], "rfc822; bob@example.net")
        self.assertTrue(got.recipients[0]["Diagnostic-Code"].startswith("smtp; 550 5.1.1 no such user  Action:"))
        self.assertNotIn("X-Injected", got.message)
        self.assertNotIn("X-Injected", got.per_message)
        self.assertEqual(got.per_message["Original-Envelope-Id"], "e+0D+0AX-Injected:+201")
        self.assertEqual(got.types, ["text/plain", "message/delivery-status", "message/rfc822"])
        self.assertNotRegex(data, rb"\r\nX-Injected")

    def test_long_reply_is_folded(self) -> None:
        """A long reply (as long as an outcome keeps) folds at spaces under 78 characters, a long run included."""
        words = " ".join(f"word{i:04d}" for i in range(40))
        run = "R" * 100
        message = original(Recipient("bob@example.net", outcome=Outcome(550, "5.7.1", f"{words} {run} end",
                                                                        "mx.example.net[192.0.2.1]")))
        _, data = report(message, [0], "failed", reporting_mta=MTA, content=CONTENT, new_id=NEW_ID, now=NOW)
        check_wire(self, data)
        got = Notice(data)
        status = got.raw[1][1].decode()
        diagnostic = status[status.index("Diagnostic-Code:"):status.index("Last-Attempt-Date:")]
        lines = diagnostic.split("\r\n")[:-1]
        self.assertGreater(len(lines), 5)
        self.assertTrue(all(line.startswith(" ") for line in lines[1:]))
        self.assertTrue(all(len(line) <= 78 for line in lines if "R" not in line))
        value = got.recipients[0]["Diagnostic-Code"]
        self.assertTrue(value.startswith(f"smtp; 550 5.7.1 {words} R"))
        self.assertTrue(value.endswith("R end"))
        self.assertEqual(value.replace(" ", "").count("R"), 100)
        self.assertEqual(got.recipients[0]["Action"], "failed")
        for line in got.text().split("\r\n"):
            self.assertLessEqual(len(line), 76)

    def test_long_addresses(self) -> None:
        local = "l" * 64
        sender = f"{local}@{'s' * 180}.example"
        message = original(Recipient(f"{local}@{'r' * 180}.example", outcome=REJECTED), sender=sender)
        _, data = report(message, [0], "failed", reporting_mta=MTA, content=CONTENT, new_id=NEW_ID, now=NOW)
        check_wire(self, data)
        got = Notice(data)
        self.assertEqual(got.message["To"].addresses[0].addr_spec, sender)
        self.assertEqual(got.recipients[0]["Final-Recipient"], f"rfc822; {local}@{'r' * 180}.example")

    @SETTINGS
    @given(st.text(max_size=300), st.text(max_size=40), st.sampled_from(["failed", "delayed", "delivered"]))
    def test_any_text_keeps_the_structure(self, text: str, remote: str, action: str) -> None:
        """Whatever a remote server says, and whatever its name, the notice has the same parts and fields."""
        message = original(Recipient("bob@example.net", outcome=Outcome(550, "5.1.1", text, remote or "mx")))
        notice, data = report(message, [0], action, reporting_mta=MTA, content=CONTENT, new_id=NEW_ID, now=NOW)
        check_wire(self, data)
        self.assertTrue(data.isascii())
        got = Notice(data)
        self.assertEqual(got.types[:2], ["text/plain", "message/delivery-status"])
        self.assertEqual(len(got.recipients), 1)
        self.assertEqual(got.recipients[0]["Action"], action)
        self.assertEqual(got.recipients[0]["Final-Recipient"], "rfc822; bob@example.net")
        self.assertTrue(got.recipients[0]["Diagnostic-Code"].startswith("smtp; 550 5.1.1"))
        self.assertEqual(notice.size, len(data))
