"""Tests for `esmtpkit.core.params` with DSN (RFC 3461) and BINARYMIME (RFC 3030) offered, from the parsed command on."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core.commands import CommandError, parse_mail_rcpt
from esmtpkit.core.dsn import Notify, OriginalRecipient, Ret
from esmtpkit.core.params import check_mail_params, check_rcpt_params
from esmtpkit.core.reply import Reply

BASE = {"SIZE", "8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES"}
DSN = BASE | {"DSN"}


def mail_params(argument: str, offered: set[str] = DSN) -> dict[str, object]:
    _, raw = parse_mail_rcpt(argument, "FROM:", allow_null=True, allow_postmaster=False,
                             utf8_allowed="SMTPUTF8" in offered)
    return check_mail_params(raw, offered)


def rcpt_params(argument: str, offered: set[str] = DSN, utf8: bool = False) -> dict[str, object]:
    _, raw = parse_mail_rcpt(argument, "TO:", allow_null=False, allow_postmaster=True, utf8_allowed=utf8)
    return check_rcpt_params(raw, offered, utf8=utf8)


def reply_of(call: object, *args: object, **kwargs: object) -> Reply:
    try:
        call(*args, **kwargs)  # type: ignore[operator]
    except CommandError as e:
        return e.reply
    raise AssertionError(f"no CommandError for {args!r}")


class MailDSNTests(SynchronousTestCase):
    def test_ret_and_envid(self) -> None:
        params = mail_params("FROM:<a@x> RET=hdrs ENVID=QQ+2B314 SIZE=10")
        self.assertEqual(params, {"RET": Ret.HDRS, "ENVID": "QQ+314", "SIZE": 10})
        self.assertEqual(mail_params("FROM:<> RET=FULL"), {"RET": Ret.FULL})

    def test_unoffered_dsn_gets_555(self) -> None:
        """RFC 5321 §4.1.1.11: parameters of an extension the server did not offer are unrecognized."""
        for argument, key in (("FROM:<a@x> RET=FULL", "RET"), ("FROM:<a@x> ENVID=x", "ENVID")):
            self.assertEqual(reply_of(mail_params, argument, BASE),
                             Reply(555, (f"Unsupported MAIL parameter {key}",), "5.5.4"))

    def test_bad_values_get_501(self) -> None:
        self.assertEqual(reply_of(mail_params, "FROM:<a@x> RET=NEVER"),
                         Reply(501, ("Bad RET parameter: expected FULL or HDRS",), "5.5.4"))
        self.assertEqual(reply_of(mail_params, "FROM:<a@x> RET"),
                         Reply(501, ("Bad RET parameter: expected FULL or HDRS",), "5.5.4"))
        self.assertEqual(reply_of(mail_params, "FROM:<a@x> ENVID"),
                         Reply(501, ("Bad ENVID parameter: a value is required",), "5.5.4"))
        self.assertEqual(reply_of(mail_params, "FROM:<a@x> ENVID=" + "x" * 101),
                         Reply(501, ("Bad ENVID parameter: longer than 100 characters",), "5.5.4"))
        self.assertEqual(reply_of(mail_params, "FROM:<a@x> ENVID=a+0A"),
                         Reply(501, ("Bad ENVID parameter: must decode to printable ASCII",), "5.5.4"))

    def test_duplicates_refused_by_parser(self) -> None:
        self.assertEqual(reply_of(mail_params, "FROM:<a@x> RET=FULL RET=HDRS"),
                         Reply(501, ("Duplicate parameter RET",), "5.5.4"))


class RcptDSNTests(SynchronousTestCase):
    def test_notify_and_orcpt(self) -> None:
        params = rcpt_params("TO:<b@x> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b+2B1@x")
        self.assertEqual(params, {"NOTIFY": Notify(success=True, delay=True),
                                  "ORCPT": OriginalRecipient("rfc822", "b+1@x")})
        self.assertEqual(rcpt_params("TO:<b@x> NOTIFY=NEVER"), {"NOTIFY": Notify()})
        self.assertEqual(rcpt_params("TO:<b@x>"), {})

    def test_orcpt_utf8_follows_the_transaction(self) -> None:
        """Raw UTF-8 in ORCPT only when MAIL carried SMTPUTF8 (RFC 6533 utf-8-addr-unitext)."""
        self.assertEqual(rcpt_params("TO:<b@x> ORCPT=utf-8;j\u00f6rg@x", utf8=True),
                         {"ORCPT": OriginalRecipient("utf-8", "j\u00f6rg@x")})
        self.assertEqual(rcpt_params("TO:<b@x> ORCPT=utf-8;j\\x{F6}rg@x"),
                         {"ORCPT": OriginalRecipient("utf-8", "j\u00f6rg@x")})
        self.assertEqual(reply_of(rcpt_params, "TO:<b@x> ORCPT=utf-8;j\u00f6rg@x"),
                         Reply(501, ("Bad value for parameter ORCPT",), "5.5.4"))

    def test_unoffered_dsn_gets_555(self) -> None:
        for argument, key in (("TO:<b@x> NOTIFY=NEVER", "NOTIFY"), ("TO:<b@x> ORCPT=rfc822;b@x", "ORCPT"),
                              ("TO:<b@x> RET=FULL", "RET")):
            expected = Reply(555, (f"Unsupported RCPT parameter {key}",), "5.5.4")
            self.assertEqual(reply_of(rcpt_params, argument, BASE if key != "RET" else DSN), expected)

    def test_bad_values_get_501(self) -> None:
        self.assertEqual(reply_of(rcpt_params, "TO:<b@x> NOTIFY=NEVER,DELAY"),
                         Reply(501, ("Bad NOTIFY parameter: NEVER cannot be combined with other values",), "5.5.4"))
        self.assertEqual(reply_of(rcpt_params, "TO:<b@x> NOTIFY"),
                         Reply(501, ("Bad NOTIFY parameter: expected NEVER or a list of SUCCESS, FAILURE, DELAY",),
                               "5.5.4"))
        self.assertEqual(reply_of(rcpt_params, "TO:<b@x> ORCPT=b@x"),
                         Reply(501, ("Bad ORCPT parameter: expected addr-type;address",), "5.5.4"))


class BodyTests(SynchronousTestCase):
    def test_binarymime_when_offered(self) -> None:
        offered = BASE | {"CHUNKING", "BINARYMIME"}
        self.assertEqual(mail_params("FROM:<a@x> BODY=binarymime", offered), {"BODY": "BINARYMIME"})
        self.assertEqual(mail_params("FROM:<a@x> BODY=8BITMIME", offered), {"BODY": "8BITMIME"})

    def test_binarymime_without_8bitmime(self) -> None:
        """BINARYMIME offered alone still makes BODY known (7BIT and BINARYMIME; 8BITMIME is not offered)."""
        offered = {"CHUNKING", "BINARYMIME"}
        self.assertEqual(mail_params("FROM:<a@x> BODY=BINARYMIME", offered), {"BODY": "BINARYMIME"})
        self.assertEqual(mail_params("FROM:<a@x> BODY=7BIT", offered), {"BODY": "7BIT"})
        self.assertEqual(reply_of(mail_params, "FROM:<a@x> BODY=8BITMIME", offered),
                         Reply(555, ("Unsupported BODY type 8BITMIME",), "5.5.4"))

    def test_binarymime_not_offered(self) -> None:
        self.assertEqual(reply_of(mail_params, "FROM:<a@x> BODY=BINARYMIME", BASE),
                         Reply(555, ("Unsupported BODY type BINARYMIME",), "5.5.4"))
        self.assertEqual(reply_of(mail_params, "FROM:<a@x> BODY=BINARYMIME", {"SIZE"}),
                         Reply(555, ("Unsupported MAIL parameter BODY",), "5.5.4"))
