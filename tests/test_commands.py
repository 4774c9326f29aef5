"""Tests for `esmtpkit.core.commands` and `esmtpkit.core.params`: command lines, MAIL/RCPT arguments, ESMTP parameters."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core.commands import (
    BASE_LINE_LIMIT, CommandError, Verb, line_limit, parse_command, parse_mail_rcpt, parse_params,
)
from esmtpkit.core.params import check_mail_params, check_rcpt_params
from esmtpkit.core.reply import Reply

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True, database=None)
OFFERED = {"SIZE", "8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES"}


def mail(argument: str, utf8: bool = True) -> tuple[str, dict[str, str | None]]:
    return parse_mail_rcpt(argument, "FROM:", allow_null=True, allow_postmaster=False, utf8_allowed=utf8)


def rcpt(argument: str, utf8: bool = False) -> tuple[str, dict[str, str | None]]:
    return parse_mail_rcpt(argument, "TO:", allow_null=False, allow_postmaster=True, utf8_allowed=utf8)


class ParseCommandTests(SynchronousTestCase):
    def test_verbs_case_insensitive(self) -> None:
        """RFC 5321 §2.4: verbs are case-insensitive."""
        for raw in (b"NOOP", b"noop", b"NoOp"):
            command = parse_command(raw)
            self.assertEqual((command.verb, command.argument, command.line), (Verb.NOOP, "", raw.decode()))
            self.assertEqual(command.name, raw.decode())

    def test_argument(self) -> None:
        command = parse_command(b"mail FROM:<a@b> SIZE=10")
        self.assertEqual((command.verb, command.argument), (Verb.MAIL, "FROM:<a@b> SIZE=10"))
        self.assertEqual(parse_command(b"VRFY   someone  ").argument, "someone")

    def test_every_verb_known(self) -> None:
        for verb in Verb:
            if verb is not Verb.UNKNOWN:
                self.assertIs(parse_command(verb.value.lower().encode() + b" x").verb, verb)

    def test_unknown(self) -> None:
        command = parse_command(b"FROB the widget")
        self.assertEqual((command.verb, command.line), (Verb.UNKNOWN, "FROB the widget"))
        self.assertIs(parse_command(b"").verb, Verb.UNKNOWN)
        self.assertIs(parse_command(b"NOOPX").verb, Verb.UNKNOWN)

    def test_nul_and_bad_utf8(self) -> None:
        for raw in (b"NOOP\x00", b"NOOP \xff\xfe"):
            with self.assertRaises(CommandError) as caught:
                parse_command(raw)
            self.assertEqual(caught.exception.reply.code, 500)
            self.assertEqual(caught.exception.reply.enhanced, "5.5.2")

    def test_utf8_argument(self) -> None:
        self.assertEqual(parse_command("VRFY j\u00f6rg".encode()).argument, "j\u00f6rg")

    @SETTINGS
    @given(st.binary(max_size=60))
    def test_never_crashes(self, raw: bytes) -> None:
        """Any bytes give a Command or a CommandError with a 500 reply."""
        try:
            parse_command(raw)
        except CommandError as e:
            self.assertEqual(e.reply.code, 500)


class LineLimitTests(SynchronousTestCase):
    """RFC 5321 §4.5.3.1.4 and the allowances extensions add."""

    def test_base(self) -> None:
        self.assertEqual(BASE_LINE_LIMIT, 512)
        self.assertEqual(line_limit(Verb.NOOP), 510)
        self.assertEqual(line_limit(Verb.UNKNOWN), 510)
        self.assertEqual(line_limit(Verb.NOOP, 1000), 998)

    def test_allowances(self) -> None:
        self.assertEqual(line_limit(Verb.MAIL), 510 + 26 + 100 + 10 + 20 + 500)
        self.assertEqual(line_limit(Verb.RCPT), 510 + 500)
        self.assertEqual(line_limit(Verb.AUTH), 12286)


class ParseMailRcptTests(SynchronousTestCase):
    def test_mail(self) -> None:
        sender, params = mail("FROM:<a@b.example> SIZE=100 BODY=8BITMIME")
        self.assertEqual(sender, "a@b.example")
        self.assertEqual(params, {"SIZE": "100", "BODY": "8BITMIME"})

    def test_prefix_case_and_space(self) -> None:
        """``from:`` in any case; a space after the colon is tolerated (many clients send one)."""
        self.assertEqual(mail("from:<a@b>")[0], "a@b")
        self.assertEqual(mail("FROM: <a@b>")[0], "a@b")
        self.assertEqual(rcpt("to:<a@b>")[0], "a@b")

    def test_null_sender(self) -> None:
        self.assertTrue(mail("FROM:<>")[0].is_null)
        with self.assertRaises(CommandError) as caught:
            rcpt("TO:<>")
        self.assertEqual((caught.exception.reply.code, caught.exception.reply.enhanced), (501, "5.1.3"))

    def test_postmaster(self) -> None:
        self.assertEqual(rcpt("TO:<Postmaster>")[0], "Postmaster")
        with self.assertRaises(CommandError) as caught:
            mail("FROM:<Postmaster>")
        self.assertEqual((caught.exception.reply.code, caught.exception.reply.enhanced), (501, "5.1.7"))

    def test_quoted_path_with_angle(self) -> None:
        """A ``>`` inside a quoted local part does not close the path."""
        sender, params = mail('FROM:<"a>b"@c.example> SIZE=1')
        self.assertEqual((sender, params), ('"a>b"@c.example', {"SIZE": "1"}))

    def test_source_route(self) -> None:
        self.assertEqual(rcpt("TO:<@a,@b:u@d>")[0], "u@d")

    def test_missing_prefix(self) -> None:
        with self.assertRaises(CommandError) as caught:
            mail("<a@b>")
        self.assertEqual(caught.exception.reply, Reply(501, ("Syntax: MAIL FROM:<address>",), "5.5.4"))
        with self.assertRaises(CommandError) as caught:
            mail("FROM:")  # an empty path is not the null path
        self.assertEqual(caught.exception.reply, Reply(501, ("Syntax: MAIL FROM:<address>",), "5.5.4"))
        with self.assertRaises(CommandError) as caught:
            rcpt("FROM:<a@b>")
        self.assertEqual(caught.exception.reply, Reply(501, ("Syntax: RCPT TO:<address>",), "5.5.4"))

    def test_syntax_errors(self) -> None:
        for argument in ("FROM:<a@b", "FROM:<a@b>SIZE=1", "FROM:<a b@c>", "FROM:<a@b> =1", "FROM:<a@b> SIZE=1 SIZE=2",
                         "FROM:<a@b> SIZE=a=b", "FROM:", "FROM: "):
            with self.assertRaises(CommandError) as caught:
                mail(argument)
            self.assertEqual(caught.exception.reply.code, 501, argument)

    def test_utf8_needs_smtputf8(self) -> None:
        """RFC 6531 §3.4: a UTF-8 mailbox without SMTPUTF8 gets 553 5.6.7."""
        sender, params = mail("FROM:<j\u00f6rg@example.org> SMTPUTF8")
        self.assertEqual((sender, params), ("j\u00f6rg@example.org", {"SMTPUTF8": None}))
        with self.assertRaises(CommandError) as caught:
            mail("FROM:<j\u00f6rg@example.org>")
        self.assertEqual((caught.exception.reply.code, caught.exception.reply.enhanced), (553, "5.6.7"))
        self.assertEqual(rcpt("TO:<j\u00f6rg@example.org>", utf8=True)[0], "j\u00f6rg@example.org")


class ParseParamsTests(SynchronousTestCase):
    def test_keywords_upper_cased(self) -> None:
        self.assertEqual(parse_params("size=10 body=8bitmime smtputf8"),
                         {"SIZE": "10", "BODY": "8bitmime", "SMTPUTF8": None})

    def test_empty(self) -> None:
        self.assertEqual(parse_params(""), {})
        self.assertEqual(parse_params("   "), {})

    def test_bad(self) -> None:
        for text in ("-X=1", "S_IZE=1", "SIZE=", "SIZE=1 size=2", "X=\u00e9"):
            with self.assertRaises(CommandError) as caught:
                parse_params(text)
            self.assertEqual(caught.exception.reply.code, 501, text)
        self.assertEqual(parse_params("X=\u00e9", utf8=True), {"X": "\u00e9"})


class CheckParamsTests(SynchronousTestCase):
    """RFC 1870, RFC 6152, RFC 6531 values; unknown parameters get 555 5.5.4 (RFC 5321 §4.1.1.11)."""

    def test_size(self) -> None:
        self.assertEqual(check_mail_params({"SIZE": "1000"}, OFFERED), {"SIZE": 1000})
        for value in (None, "", "-1", "1e3", "1" * 21):
            with self.assertRaises(CommandError) as caught:
                check_mail_params({"SIZE": value}, OFFERED)
            self.assertEqual(caught.exception.reply.code, 501)

    def test_body(self) -> None:
        self.assertEqual(check_mail_params({"BODY": "8bitmime"}, OFFERED), {"BODY": "8BITMIME"})
        self.assertEqual(check_mail_params({"BODY": "7BIT"}, OFFERED), {"BODY": "7BIT"})
        for value in ("BINARYMIME", "9BIT", None):
            with self.assertRaises(CommandError) as caught:
                check_mail_params({"BODY": value}, OFFERED)
            self.assertEqual(caught.exception.reply.code, 555)

    def test_smtputf8(self) -> None:
        self.assertEqual(check_mail_params({"SMTPUTF8": None}, OFFERED), {"SMTPUTF8": True})
        with self.assertRaises(CommandError) as caught:
            check_mail_params({"SMTPUTF8": "yes"}, OFFERED)
        self.assertEqual(caught.exception.reply.code, 501)

    def test_not_offered(self) -> None:
        """Parameters of extensions not offered (e.g. after HELO) are unknown: 555."""
        for params in ({"SIZE": "1"}, {"BODY": "8BITMIME"}, {"SMTPUTF8": None}, {"FOO": "bar"}):
            with self.assertRaises(CommandError) as caught:
                check_mail_params(params, set())
            self.assertEqual((caught.exception.reply.code, caught.exception.reply.enhanced), (555, "5.5.4"))

    def test_rcpt(self) -> None:
        self.assertEqual(check_rcpt_params({}, OFFERED), {})
        with self.assertRaises(CommandError) as caught:
            check_rcpt_params({"NOTIFY": "NEVER"}, OFFERED)
        self.assertEqual(caught.exception.reply, Reply(555, ("Unsupported RCPT parameter NOTIFY",), "5.5.4"))
