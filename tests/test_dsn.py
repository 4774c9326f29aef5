"""Tests for `esmtpkit.core.dsn`: xtext, RFC 6533 address encoding, and the RET/ENVID/NOTIFY/ORCPT values."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core.commands import CommandError
from esmtpkit.core.dsn import (
    MAX_ENVID_LENGTH, MAX_ORCPT_LENGTH, Notify, OriginalRecipient, Ret, XtextError, parse_envid, parse_notify,
    parse_orcpt, parse_ret, utf8_addr_decode, utf8_addr_encode, xtext_decode, xtext_encode,
)
from esmtpkit.core.reply import Reply

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None)


class XtextTests(SynchronousTestCase):
    def test_decode(self) -> None:
        self.assertEqual(xtext_decode("abc"), b"abc")
        self.assertEqual(xtext_decode("a+2Bb+3Dc"), b"a+b=c")
        self.assertEqual(xtext_decode("+20+0D+0A"), b" \r\n")
        self.assertEqual(xtext_decode("+FF"), b"\xff")
        self.assertEqual(xtext_decode(""), b"")
        self.assertEqual(xtext_decode("!~\\"), b"!~\\")

    def test_decode_rejects(self) -> None:
        """RFC 3461 §4: '+' needs two upper-case hex digits; '=', space, controls and non-ASCII are not xchars."""
        for text in ("+", "+2", "a+2", "+2b", "+GG", "+ 2B", "a=b", "a b", "a\tb", "\x7f", "é", "++2B"):
            with self.assertRaises(XtextError, msg=text):
                xtext_decode(text)

    def test_encode(self) -> None:
        self.assertEqual(xtext_encode("a+b=c d"), "a+2Bb+3Dc+20d")
        self.assertEqual(xtext_encode(b"\x00\x7f\xff~!"), "+00+7F+FF~!")
        self.assertEqual(xtext_encode("é"), "+C3+A9")

    @SETTINGS
    @given(st.binary(max_size=60))
    def test_round_trip(self, data: bytes) -> None:
        encoded = xtext_encode(data)
        self.assertTrue(encoded.isascii())
        self.assertEqual(xtext_decode(encoded), data)


class UTF8AddressTests(SynchronousTestCase):
    def test_decode_xtext_form(self) -> None:
        """RFC 6533 §3: QCHARs stand for themselves, \\x{HEX} for the rest."""
        self.assertEqual(utf8_addr_decode("user@example.com"), "user@example.com")
        self.assertEqual(utf8_addr_decode("J\\x{F6}rg@example.com"), "Jörg@example.com")
        self.assertEqual(utf8_addr_decode("\\x{5C}\\x{20}\\x{2B}\\x{3D}@x"), "\\ +=@x")
        self.assertEqual(utf8_addr_decode("\\x{4E2D}\\x{1F600}\\x{10FFFF}@x"), "中\U0001F600\U0010ffff@x")
        self.assertEqual(utf8_addr_decode("\\x{e9}@x"), "é@x")

    def test_decode_unitext_form(self) -> None:
        self.assertEqual(utf8_addr_decode("jörg@例え.jp", unitext=True), "jörg@例え.jp")
        with self.assertRaises(XtextError):
            utf8_addr_decode("jörg@example.com")

    def test_decode_rejects(self) -> None:
        bad = [
            "", "a b@x", "a+b@x", "a=b@x", "a\\b@x", "a\\x{}@x", "a\\x{F}@x", "a\\x{1234567}@x", "a\\x{0F6}@x",
            "\\x{41}@x",  # plain ASCII letters are not escaped
            "\\x{0A}@x", "\\x{0D}@x", "\\x{01}@x", "\\x{7F}@x",  # controls never decode
            "\\x{D800}@x", "\\x{110000}@x", "\\x{F6@x", "\x7f@x", "a\r@x",
        ]
        for text in bad:
            with self.assertRaises(XtextError, msg=text):
                utf8_addr_decode(text, unitext=True)

    def test_encode(self) -> None:
        self.assertEqual(utf8_addr_encode("Jörg+x=y z\\@例"), "J\\x{F6}rg\\x{2B}x\\x{3D}y\\x{20}z\\x{5C}@\\x{4F8B}")
        self.assertEqual(utf8_addr_encode("jörg+1@x", unitext=True), "jörg\\x{2B}1@x")
        with self.assertRaises(XtextError):
            utf8_addr_encode("a\r\nb")

    @SETTINGS
    @given(st.text(st.characters(min_codepoint=0x20, exclude_categories=("Cs",)).filter(lambda c: c != "\x7f"),
                   min_size=1, max_size=30))
    def test_round_trip(self, address: str) -> None:
        self.assertEqual(utf8_addr_decode(utf8_addr_encode(address)), address)
        self.assertEqual(utf8_addr_decode(utf8_addr_encode(address, unitext=True), unitext=True), address)


class RetEnvidTests(SynchronousTestCase):
    def test_ret(self) -> None:
        self.assertIs(parse_ret("FULL"), Ret.FULL)
        self.assertIs(parse_ret("hdrs"), Ret.HDRS)
        self.assertEqual(f"RET={parse_ret('Hdrs')}", "RET=HDRS")

    def test_ret_rejects(self) -> None:
        for value in ("", None, "HEADERS", "FULL,HDRS", "NEVER"):
            with self.assertRaises(CommandError) as caught:
                parse_ret(value)
            self.assertEqual(caught.exception.reply, Reply(501, ("Bad RET parameter: expected FULL or HDRS",),
                                                           "5.5.4"))

    def test_envid(self) -> None:
        self.assertEqual(parse_envid("QQ314159"), "QQ314159")
        self.assertEqual(parse_envid("a+2Bb+20c"), "a+b c")
        self.assertEqual(parse_envid("x" * MAX_ENVID_LENGTH), "x" * MAX_ENVID_LENGTH)

    def test_envid_rejects(self) -> None:
        cases = {
            "": "a value is required",
            "x" * (MAX_ENVID_LENGTH + 1): "longer than 100 characters",
            "a+0Db": "must decode to printable ASCII",
            "a+00": "must decode to printable ASCII",
            "a+C3+A9": "must decode to printable ASCII",
            "a+2b": "'+' must be followed by two upper-case hex digits at offset 1",
            "a=b": "character '=' not allowed in xtext at offset 1",
        }
        for value, why in cases.items():
            with self.assertRaises(CommandError, msg=value) as caught:
                parse_envid(value)
            self.assertEqual(caught.exception.reply, Reply(501, (f"Bad ENVID parameter: {why}",), "5.5.4"))
        with self.assertRaises(CommandError):
            parse_envid(None)


class NotifyTests(SynchronousTestCase):
    def test_values(self) -> None:
        self.assertEqual(parse_notify("NEVER"), Notify())
        self.assertTrue(parse_notify("never").never)
        self.assertEqual(parse_notify("SUCCESS"), Notify(success=True))
        self.assertEqual(parse_notify("delay,Failure"), Notify(failure=True, delay=True))
        self.assertEqual(parse_notify("FAILURE,SUCCESS,DELAY"), Notify(True, True, True))
        self.assertEqual(parse_notify("FAILURE,FAILURE"), Notify(failure=True))
        self.assertFalse(parse_notify("DELAY").never)

    def test_str(self) -> None:
        self.assertEqual(str(Notify()), "NEVER")
        self.assertEqual(str(parse_notify("DELAY,SUCCESS")), "SUCCESS,DELAY")

    def test_rejects(self) -> None:
        cases = {
            "NEVER,SUCCESS": "NEVER cannot be combined with other values",
            "FAILURE,NEVER": "NEVER cannot be combined with other values",
            "": "expected NEVER or a list of SUCCESS, FAILURE, DELAY",
            "SUCCESS,": "expected NEVER or a list of SUCCESS, FAILURE, DELAY",
            ",SUCCESS": "expected NEVER or a list of SUCCESS, FAILURE, DELAY",
            "SUCCESS,,DELAY": "expected NEVER or a list of SUCCESS, FAILURE, DELAY",
            "ALWAYS": "expected NEVER or a list of SUCCESS, FAILURE, DELAY",
            "SUCCESS;DELAY": "expected NEVER or a list of SUCCESS, FAILURE, DELAY",
        }
        for value, why in cases.items():
            with self.assertRaises(CommandError, msg=value) as caught:
                parse_notify(value)
            self.assertEqual(caught.exception.reply, Reply(501, (f"Bad NOTIFY parameter: {why}",), "5.5.4"))
        with self.assertRaises(CommandError):
            parse_notify(None)


class OrcptTests(SynchronousTestCase):
    def test_rfc822(self) -> None:
        self.assertEqual(parse_orcpt("rfc822;bob@example.com"), OriginalRecipient("rfc822", "bob@example.com"))
        self.assertEqual(parse_orcpt("RFC822;a+2Bb@x"), OriginalRecipient("rfc822", "a+b@x"))
        self.assertEqual(parse_orcpt("rfc822;+22a+20b+22@x").address, '"a b"@x')

    def test_utf8(self) -> None:
        """RFC 6533: the utf-8 type uses \\x{HEX} escapes; raw UTF-8 only when the transaction uses SMTPUTF8."""
        self.assertEqual(parse_orcpt("utf-8;J\\x{F6}rg@x"), OriginalRecipient("utf-8", "Jörg@x"))
        self.assertEqual(parse_orcpt("UTF-8;jörg@x", utf8=True), OriginalRecipient("utf-8", "jörg@x"))

    def test_other_types_kept(self) -> None:
        self.assertEqual(parse_orcpt("X400;c+3Dus+3Ba+3Dx"), OriginalRecipient("x400", "c=us;a=x"))

    def test_str_for_relaying(self) -> None:
        for value in ("rfc822;a+2Bb@x", "utf-8;J\\x{F6}rg\\x{2B}1@x", "x400;c+3Dus;a+3Dx"):
            self.assertEqual(str(parse_orcpt(value)), value)
        self.assertEqual(str(parse_orcpt("rfc822;+61+3B@x")), "rfc822;a;@x")  # only what xtext must encode
        self.assertEqual(str(parse_orcpt("utf-8;jörg@x", utf8=True)), "utf-8;j\\x{F6}rg@x")

    def test_length(self) -> None:
        value = "rfc822;" + "a" * (MAX_ORCPT_LENGTH - 7)
        self.assertEqual(len(parse_orcpt(value).address), MAX_ORCPT_LENGTH - 7)
        with self.assertRaises(CommandError) as caught:
            parse_orcpt(value + "a")
        self.assertEqual(caught.exception.reply.text, "Bad ORCPT parameter: longer than 500 characters")

    def test_rejects(self) -> None:
        cases = {
            "": "a value is required",
            "bob@example.com": "expected addr-type;address",
            ";bob@x": "expected addr-type;address",
            "rfc 822;bob@x": "expected addr-type;address",
            "rfc822:x;bob@x": "expected addr-type;address",
            "rfc822;": "the address must decode to printable ASCII",
            "rfc822;bob+0D+0A@x": "the address must decode to printable ASCII",
            "rfc822;b+c3@x": "'+' must be followed by two upper-case hex digits at offset 1",
            "rfc822;a=b@x": "character '=' not allowed in xtext at offset 1",
            "rfc822;jörg@x": "non-ASCII address without SMTPUTF8",
            "utf-8;jörg@x": "non-ASCII address without SMTPUTF8",
            "utf-8;": "empty address",
            "utf-8;a\\x{0A}@x": "escape \\x{0A} does not stand for an allowed character",
            "utf-8;a+b@x": "character '+' not allowed at offset 1",
        }
        for value, why in cases.items():
            with self.assertRaises(CommandError, msg=value) as caught:
                parse_orcpt(value)
            self.assertEqual(caught.exception.reply, Reply(501, (f"Bad ORCPT parameter: {why}",), "5.5.4"))
        with self.assertRaises(CommandError) as caught:
            parse_orcpt("rfc822;jörg@x", utf8=True)
        self.assertEqual(caught.exception.reply.text, "Bad ORCPT parameter: character 'ö' not allowed in xtext at "
                                                      "offset 1")
