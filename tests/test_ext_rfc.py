"""LIMITS (RFC 9422), RRVS (RFC 7293), DELIVERBY (RFC 2852), MT-PRIORITY (RFC 6710) and REQUIRETLS (RFC 8689) on
the extension interface: when EHLO offers each, the grammar of each parameter, accepted and refused with the exact
reply, the values handlers see and the room each adds to a command line."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core.commands import Verb, line_limit
from esmtpkit.core.deliverby import By, DeliverBy, parse_by
from esmtpkit.core.extension import Extensions
from esmtpkit.core.limits import Limits
from esmtpkit.core.priority import MtPriority
from esmtpkit.core.reply import Reply
from esmtpkit.core.requiretls import RequireTLS
from esmtpkit.core.rrvs import CANNOT_CHECK, OWNER_CHANGED, Rrvs, ValidSince, parse_rrvs
from esmtpkit.core.session import Session
from esmtpkit.handlers.collecting import Collecting, MessageStore
from esmtpkit.server.extensions import IExtension, extensions_for, resolve
from esmtpkit.server.policy import Policy
from esmtpkit.server.sasl import portal_from_strings
from esmtpkit.testing import Conversation, RecordingHandler

from .support import TLSMixin

UTC = timezone.utc


def talk(*extensions: Any, **changes: Any) -> Conversation:
    """A conversation with ``extensions`` on a server for mx.test, greeted with EHLO."""
    conversation = Conversation(RecordingHandler(), Policy(hostname="mx.test", extensions=extensions, **changes))
    assert conversation.send("EHLO client.test").code == 250  # type: ignore[union-attr]
    return conversation


def keywords(conversation: Conversation, greeting: str = "EHLO client.test") -> list[str]:
    reply = conversation.send(greeting)
    assert reply is not None and reply.code == 250
    return list(reply.lines[1:])


def answer(conversation: Conversation, line: str) -> tuple[int, str | None]:
    reply = conversation.send(line)
    assert reply is not None
    return reply.code, reply.enhanced


def seen(conversation: Conversation, verb: str) -> list[dict[str, Any]]:
    """The parameters the handler was given with each ``verb`` ("mail" or "rcpt")."""
    return [call.args[1] for call in conversation.handler.calls if call.verb == verb]  # type: ignore[attr-defined]


# ---- all five ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, cls", [("LIMITS", Limits), ("rrvs", Rrvs), ("DeliverBy", DeliverBy),
                                       ("MT-PRIORITY", MtPriority), ("REQUIRETLS", RequireTLS)])
def test_resolved_by_name(name: str, cls: type) -> None:
    """``twistd esmtpkit --extension NAME`` (any case) makes each with its defaults."""
    ext = resolve(name)
    assert type(ext) is cls
    assert IExtension.providedBy(ext)
    assert ext.name == ext.keyword == name.upper()
    assert ext.rfc.startswith("RFC ")


def test_after_the_standard_keywords_in_order() -> None:
    """In the policy's order after the standard keywords; REQUIRETLS not on a cleartext session."""
    conversation = Conversation(RecordingHandler(), Policy(
        hostname="mx.test", extensions=(Limits(), Rrvs(), DeliverBy(), MtPriority(), RequireTLS())))
    assert keywords(conversation)[-5:] == ["BINARYMIME", "LIMITS RCPTMAX=1000", "RRVS", "DELIVERBY", "MT-PRIORITY"]


def test_line_allowances() -> None:
    """What each parameter may add: RFC 2852 §4's 17 octets for BY, the longest MT-PRIORITY, REQUIRETLS and RRVS
    values; LIMITS adds none."""
    assert [ext.mail_line_allowance for ext in (Limits(), DeliverBy(), MtPriority(), RequireTLS(), Rrvs())] == \
        [0, len(" BY=-999999999;RT"), len(" MT-PRIORITY=-9"), len(" REQUIRETLS"), 0]
    assert Rrvs().rcpt_line_allowance == len(" RRVS=2014-01-01T00:00:00.123456789+00:00;C") == 43
    assert [ext.rcpt_line_allowance for ext in (Limits(), DeliverBy(), MtPriority(), RequireTLS())] == [0, 0, 0, 0]
    policy = Policy(hostname="mx.test", extensions=(Limits(), Rrvs(), DeliverBy(), MtPriority(), RequireTLS()))
    made = extensions_for(policy)
    assert (made.mail_allowance, made.rcpt_allowance) == (17 + 15 + 11, 43)


def pad(command: str, params: str, length: int) -> str:
    """``command`` and ``params`` with spaces between them, the whole line ``length`` octets long."""
    return command + " " * (length - len(command) - len(params)) + params


def test_allowances_widen_the_command_lines() -> None:
    """The protocol reads MAIL and RCPT lines up to the base limit plus the extensions' allowances, and no
    further (500 5.5.2)."""
    conversation = talk(DeliverBy(), MtPriority(), Rrvs())
    mail_room = line_limit(Verb.MAIL) + 17 + 15
    rcpt_room = line_limit(Verb.RCPT) + 43
    assert answer(conversation, pad("MAIL FROM:<a@example.org>", " BY=5;N", mail_room + 1)) == (500, "5.5.2")
    assert answer(conversation, pad("MAIL FROM:<a@example.org>", " BY=5;N", mail_room)) == (250, "2.1.0")
    since = " RRVS=2014-04-03T23:01:00Z;C"
    assert answer(conversation, pad("RCPT TO:<b@example.org>", since, rcpt_room + 1)) == (500, "5.5.2")
    assert answer(conversation, pad("RCPT TO:<b@example.org>", since, rcpt_room)) == (250, "2.1.5")
    plain = talk()
    assert answer(plain, pad("MAIL FROM:<a@example.org>", "", line_limit(Verb.MAIL) + 1)) == (500, "5.5.2")


def test_parameters_need_their_extension() -> None:
    """Without the extension on the server each parameter is unknown: 555 5.5.4 (RFC 5321 §4.1.1.11)."""
    conversation = talk()
    for line in ("MAIL FROM:<a@example.org> BY=600;R", "MAIL FROM:<a@example.org> MT-PRIORITY=1",
                 "MAIL FROM:<a@example.org> REQUIRETLS", "MAIL FROM:<a@example.org> RCPTMAX=1"):
        assert answer(conversation, line) == (555, "5.5.4"), line
    assert answer(conversation, "MAIL FROM:<a@example.org>")[0] == 250
    assert answer(conversation, "RCPT TO:<b@example.org> RRVS=2014-04-03T23:01:00Z;C") == (555, "5.5.4")


def test_not_offered_after_helo() -> None:
    """HELO offers no extension, so none of their parameters is accepted (RFC 5321 §4.1.1.1); no enhanced codes
    after HELO (RFC 2034 §3)."""
    conversation = Conversation(RecordingHandler(), Policy(hostname="mx.test", extensions=(DeliverBy(), Rrvs())))
    assert conversation.send("HELO client.test").code == 250  # type: ignore[union-attr]
    assert answer(conversation, "MAIL FROM:<a@example.org> BY=600;R") == (555, None)


# ---- LIMITS -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipients, transactions, shown", [
    (1000, 0, "LIMITS RCPTMAX=1000"), (50, 3, "LIMITS RCPTMAX=50 MAILMAX=3"), (0, 7, "LIMITS MAILMAX=7"),
    (0, 0, None)])
def test_limits_keyword(recipients: int, transactions: int, shown: str | None) -> None:
    conversation = Conversation(RecordingHandler(), Policy(hostname="mx.test", extensions=(Limits(),),
                                                           max_recipients=recipients, max_transactions=transactions))
    found = [k for k in keywords(conversation) if k.startswith("LIMITS")]
    assert found == ([shown] if shown else [])


def test_limits_offered_follows_the_policy() -> None:
    limits, session = Limits(), Session("mx.test")
    assert limits.offered(session, Policy(hostname="mx.test", max_recipients=0)) is False
    assert limits.offered(session, Policy(hostname="mx.test", max_recipients=5)) is True
    assert limits.ehlo_params(session, None) == ""
    assert (limits.mail_params, limits.rcpt_params, limits.verbs) == ({}, {}, ())


def test_limits_advertised_are_the_limits_enforced() -> None:
    """RCPTMAX=2: the third RCPT gets 452 4.5.3 (RFC 9422 §4.2); MAILMAX=2: the third MAIL gets 421 4.7.0 and the
    connection closes (RFC 9422 §4.1)."""
    conversation = Conversation(RecordingHandler(), Policy(hostname="mx.test", extensions=(Limits(),),
                                                           max_recipients=2, max_transactions=2))
    advertised = dict(pair.split("=") for k in keywords(conversation) if k.startswith("LIMITS ")
                      for pair in k.split()[1:])
    assert advertised == {"RCPTMAX": "2", "MAILMAX": "2"}
    for _ in range(int(advertised["MAILMAX"])):
        assert answer(conversation, "MAIL FROM:<a@example.org>")[0] == 250
        for n in range(int(advertised["RCPTMAX"])):
            assert answer(conversation, f"RCPT TO:<b{n}@example.org>")[0] == 250
        assert answer(conversation, "RCPT TO:<over@example.org>") == (452, "4.5.3")
        assert answer(conversation, "RSET")[0] == 250
    assert answer(conversation, "MAIL FROM:<a@example.org>") == (421, "4.7.0")
    assert conversation.closed


# ---- RRVS ---------------------------------------------------------------------------------------------------------

GOOD_DATES = [
    ("2014-04-03T23:01:00Z", datetime(2014, 4, 3, 23, 1, tzinfo=UTC), None),
    ("2014-04-03t23:01:00z;R", datetime(2014, 4, 3, 23, 1, tzinfo=UTC), "R"),
    ("2014-04-03T23:01:00.25+02:00;C", datetime(2014, 4, 3, 21, 1, 0, 250000, tzinfo=UTC), "C"),
    ("2014-04-03T23:01:00.123456789-05:30;c", datetime(2014, 4, 4, 4, 31, 0, 123456, tzinfo=UTC), "C"),
    ("1990-12-31T23:59:60Z;r", datetime(1991, 1, 1, tzinfo=UTC), "R"),  # a leap second: the next second
    ("2000-02-29T00:00:00-00:00", datetime(2000, 2, 29, tzinfo=UTC), None),
]
BAD_DATES = ["", "2014-04-03", "2014-04-03T23:01Z", "2014-04-03T23:01:00", "2014-04-03 23:01:00Z",
             "2014-13-03T23:01:00Z", "2014-02-30T23:01:00Z", "2014-04-03T24:00:00Z", "2014-04-03T23:60:00Z",
             "2014-04-03T23:01:61Z", "2014-04-03T23:01:00+24:00", "2014-04-03T23:01:00+01:60",
             "2014-04-03T23:01:00.Z", "2014-04-03T23:01:00.1234567890Z", "2014-04-03T23:01:00Z;X",
             "2014-04-03T23:01:00Z;", "2014-04-03T23:01:00Z;CR", "14-04-03T23:01:00Z", "2014-04-03T23:01:00+0100"]


@pytest.mark.parametrize("text, since, action", GOOD_DATES)
def test_rrvs_grammar(text: str, since: datetime, action: str | None) -> None:
    value = parse_rrvs(text)
    assert value == ValidSince(value.since, action)
    assert value.since == since and value.since.tzinfo is not None


@pytest.mark.parametrize("text", BAD_DATES)
def test_rrvs_refused(text: str) -> None:
    conversation = talk(Rrvs(handler_checks=True))
    answer(conversation, "MAIL FROM:<a@example.org>")
    assert answer(conversation, f"RCPT TO:<b@example.org> RRVS={text}") == (501, "5.5.4")
    assert answer(conversation, "RCPT TO:<b@example.org> RRVS") == (501, "5.5.4")
    assert seen(conversation, "rcpt") == []


def test_rrvs_on_a_server_that_cannot_check() -> None:
    """RFC 7293 §3.1: no registration dates here, so only ``;C`` goes on; ``;R`` or nothing: 550 5.7.19."""
    conversation = talk(Rrvs())
    assert "RRVS" in keywords(conversation)
    answer(conversation, "MAIL FROM:<a@example.org>")
    assert answer(conversation, "RCPT TO:<b@example.org> RRVS=2014-04-03T23:01:00Z") == (550, "5.7.19")
    assert answer(conversation, "RCPT TO:<b@example.org> RRVS=2014-04-03T23:01:00Z;R") == (550, "5.7.19")
    assert answer(conversation, "RCPT TO:<b@example.org> RRVS=2014-04-03T23:01:00Z;C") == (250, "2.1.5")
    assert answer(conversation, "RCPT TO:<c@example.org> RRVS=2014-04-03T23:01:00Z;X") == (501, "5.5.4")
    assert seen(conversation, "rcpt") == [{"RRVS": ValidSince(datetime(2014, 4, 3, 23, 1, tzinfo=UTC), "C")}]
    assert conversation.protocol.session.envelope.rcpt_params == seen(conversation, "rcpt")


def test_rrvs_checked_by_the_handler() -> None:
    """With ``handler_checks`` every well-formed value reaches the handler, which answers with ``verdict``."""
    registered = {"old@example.org": datetime(2010, 1, 1, tzinfo=UTC),
                  "new@example.org": datetime(2020, 1, 1, tzinfo=UTC)}

    def rcpt(recipient: Any, params: Any) -> Reply:
        refusal = params["RRVS"].verdict(registered.get(str(recipient))) if "RRVS" in params else None
        return refusal or Reply(250, ("ok",), "2.1.5")

    conversation = Conversation(RecordingHandler({"rcpt": rcpt}),
                                Policy(hostname="mx.test", extensions=(Rrvs(handler_checks=True),)))
    keywords(conversation)
    answer(conversation, "MAIL FROM:<a@example.org>")
    since = "RRVS=2014-04-03T23:01:00Z"
    assert answer(conversation, f"RCPT TO:<old@example.org> {since}") == (250, "2.1.5")
    assert answer(conversation, f"RCPT TO:<new@example.org> {since};C") == (550, "5.7.17")
    assert answer(conversation, f"RCPT TO:<unknown@example.org> {since}") == (550, "5.7.19")
    assert answer(conversation, f"RCPT TO:<unknown@example.org> {since};C") == (250, "2.1.5")
    assert [p["RRVS"].action for p in seen(conversation, "rcpt")] == [None, "C", None, "C"]


def test_rrvs_value() -> None:
    value = ValidSince(datetime(2014, 4, 3, 23, 1, tzinfo=UTC))
    assert (value.may_continue, value.param()) == (False, "2014-04-03T23:01:00Z")
    assert value.verdict(None) is CANNOT_CHECK
    assert value.verdict(value.since) is None
    assert value.verdict(value.since + timedelta(seconds=1)) is OWNER_CHANGED
    assert (OWNER_CHANGED.code, OWNER_CHANGED.enhanced, CANNOT_CHECK.enhanced) == (550, "5.7.17", "5.7.19")
    later = ValidSince(datetime(2014, 4, 3, 23, 1, tzinfo=timezone(timedelta(hours=2))), "C")
    assert (later.verdict(None), later.param()) == (None, "2014-04-03T23:01:00+02:00;C")
    assert parse_rrvs(later.param()) == later
    assert Rrvs().rcpt_params.keys() == {"RRVS"} and Rrvs().mail_params == {}


# ---- DELIVERBY ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("600;R", By(600, "R")), ("+600;rt", By(600, "R", True)), ("1;R", By(1, "R")), ("0;N", By(0, "N")),
    ("-0;N", By(0, "N")), ("-5;NT", By(-5, "N", True)), ("999999999;n", By(999999999, "N")),
    ("-999999999;N", By(-999999999, "N")), ("000000010;R", By(10, "R"))])
def test_by_grammar(text: str, value: By) -> None:
    assert parse_by(text) == value


@pytest.mark.parametrize("text", [
    None, "", "600", "600;", ";R", "600;X", "600;RX", "600;RTT", "600;T", "600 ;R", "1000000000;N", "++1;R",
    "1.5;R", "x;R", "600;R;T", "6e2;R", "0;R", "-0;R", "-1;R", "-600;RT"])
def test_by_refused(text: str | None) -> None:
    """Bad syntax, and mode R with a by-time of zero or less (RFC 2852 §4): 501 5.5.4."""
    conversation = talk(DeliverBy())
    line = "MAIL FROM:<a@example.org> BY" + ("" if text is None else f"={text}")
    assert answer(conversation, line) == (501, "5.5.4")
    assert seen(conversation, "mail") == []


def test_deliverby_minimum() -> None:
    """DELIVERBY 300: mode R below it is refused, 555 5.5.4; mode N below it is taken (a delayed DSN then)."""
    conversation = talk(DeliverBy(300))
    assert "DELIVERBY 300" in keywords(conversation)
    assert answer(conversation, "MAIL FROM:<a@example.org> BY=299;R") == (555, "5.5.4")
    assert answer(conversation, "MAIL FROM:<a@example.org> BY=299;RT") == (555, "5.5.4")
    assert answer(conversation, "MAIL FROM:<a@example.org> BY=0;R") == (501, "5.5.4")
    assert answer(conversation, "MAIL FROM:<a@example.org> BY=300;R") == (250, "2.1.0")
    answer(conversation, "RSET")
    assert answer(conversation, "MAIL FROM:<a@example.org> BY=10;N") == (250, "2.1.0")
    assert seen(conversation, "mail") == [{"BY": By(300, "R")}, {"BY": By(10, "N")}]


def test_deliverby_keyword_and_value() -> None:
    conversation = talk(DeliverBy())
    assert "DELIVERBY" in keywords(conversation)
    assert answer(conversation, "MAIL FROM:<a@example.org> BY=120;RT SIZE=10") == (250, "2.1.0")
    by = conversation.protocol.session.envelope.mail_params["BY"]
    assert by == By(120, "R", True)
    assert seen(conversation, "mail") == [{"BY": by, "SIZE": 10}]
    assert by.deadline(1000.0) == 1120.0
    assert (by.remaining(1000.0, 1000.0), by.remaining(1000.0, 1030.5), by.remaining(1000.0, 1120.0)) == (120, 89, 0)
    assert (by.expired(1000.0, 1119.0), by.expired(1000.0, 1119.5), by.expired(1000.0, 1120.0)) == (False, True, True)
    assert (by.param(), by.param(89), By(-5, "N").param()) == ("120;RT", "89;RT", "-5;N")


@pytest.mark.parametrize("minimum", [0, -1, 1_000_000_000])
def test_deliverby_bad_minimum(minimum: int) -> None:
    with pytest.raises(ValueError):
        DeliverBy(minimum)


# ---- MT-PRIORITY --------------------------------------------------------------------------------------------------

def test_priority_keyword() -> None:
    assert "MT-PRIORITY" in keywords(talk(MtPriority()))
    for profile in ("MIXER", "STANAG4406", "nsep"):
        assert f"MT-PRIORITY {profile.upper()}" in keywords(talk(MtPriority(profile)))
    with pytest.raises(ValueError):
        MtPriority("TWO WORDS")


@pytest.mark.parametrize("text, value", [(str(n), n) for n in range(-9, 10)] + [("+9", 9), ("-0", 0), ("+0", 0)])
def test_priority_grammar_from_a_trusted_client(text: str, value: int) -> None:
    conversation = talk(MtPriority(), trusted_networks=("127.0.0.0/8",))
    assert answer(conversation, f"MAIL FROM:<a@example.org> MT-PRIORITY={text}") == (250, "2.1.0")
    assert seen(conversation, "mail") == [{"MT-PRIORITY": value}]
    assert conversation.protocol.session.envelope.mail_params["MT-PRIORITY"] == value


@pytest.mark.parametrize("text", [None, "", "10", "-10", "09", "+", "-", "1.0", "x", "++1", "1;", "٣"])
def test_priority_refused(text: str | None) -> None:
    conversation = talk(MtPriority(), trusted_networks=("127.0.0.0/8",))
    line = "MAIL FROM:<a@example.org> MT-PRIORITY" + ("" if text is None else f"={text}")
    assert answer(conversation, line) == (501, "5.5.4")


def test_priority_from_an_untrusted_client() -> None:
    """RFC 6710 §5: priorities above 0 from a client neither authenticated nor trusted become 0; lower ones
    stand; ``trust_all`` keeps them all."""
    conversation = talk(MtPriority())
    for text in ("5", "+9", "0", "-3"):
        answer(conversation, f"MAIL FROM:<a@example.org> MT-PRIORITY={text}")
        answer(conversation, "RSET")
    assert [p["MT-PRIORITY"] for p in seen(conversation, "mail")] == [0, 0, 0, -3]
    trusting = talk(MtPriority(trust_all=True))
    answer(trusting, "MAIL FROM:<a@example.org> MT-PRIORITY=5")
    assert seen(trusting, "mail") == [{"MT-PRIORITY": 5}]


def test_priority_from_an_authenticated_client() -> None:
    conversation = talk(MtPriority(), portal=portal_from_strings(["memory:alice:secret"]), auth_require_tls=False)
    answer(conversation, "MAIL FROM:<a@example.org> MT-PRIORITY=4")
    answer(conversation, "RSET")
    assert answer(conversation, "AUTH PLAIN AGFsaWNlAHNlY3JldA==")[0] == 235
    answer(conversation, "MAIL FROM:<a@example.org> MT-PRIORITY=4")
    assert [p["MT-PRIORITY"] for p in seen(conversation, "mail")] == [0, 4]


def test_priority_may_raise() -> None:
    ext = MtPriority()
    assert not ext.may_raise(Session("mx.test"))
    assert ext.may_raise(Session("mx.test", authenticated="alice"))
    assert ext.may_raise(Session("mx.test", trusted=True))
    assert MtPriority(trust_all=True).may_raise(Session("mx.test"))


# ---- REQUIRETLS ---------------------------------------------------------------------------------------------------

def test_requiretls_offered_only_inside_tls() -> None:
    ext = RequireTLS()
    assert not ext.offered(Session("mx.test"), None)
    assert ext.offered(Session("mx.test", tls=True), None)
    assert ext.ehlo_params(Session("mx.test", tls=True), None) == ""


class RequireTLSTests(TLSMixin, SynchronousTestCase):
    def ehlo(self, protocol: Any) -> list[bytes]:
        return [line[4:] for line in self.exchange(protocol, b"EHLO client.test\r\n").split(b"\r\n")[:-1]]

    def test_only_after_starttls(self) -> None:
        """Before STARTTLS the keyword is not offered, so the parameter is unknown (555 5.5.4); after it (and a
        new EHLO) MAIL ... REQUIRETLS is taken and handlers see True (RFC 8689 §2, §4.1)."""
        protocol, _ = self.connect(extensions=(RequireTLS(),))
        self.assertNotIn(b"REQUIRETLS", self.ehlo(protocol))
        self.assertEqual(self.exchange(protocol, b"MAIL FROM:<a@example.org> REQUIRETLS\r\n"),
                         b"555 5.5.4 Unsupported MAIL parameter REQUIRETLS\r\n")
        self.assertEqual(self.exchange(protocol, b"STARTTLS\r\n")[:3], b"220")
        self.assertIn(b"REQUIRETLS", self.ehlo(protocol))
        self.assertEqual(self.exchange(protocol, b"MAIL FROM:<a@example.org> REQUIRETLS=YES\r\n"),
                         b"501 5.5.4 REQUIRETLS takes no value\r\n")
        self.assertEqual(self.exchange(protocol, b"MAIL FROM:<a@example.org> requiretls\r\n")[:9], b"250 2.1.0")
        self.assertEqual(protocol.session.envelope.mail_params, {"REQUIRETLS": True})
        mails = [call.args[1] for call in protocol.handler.calls if call.verb == "mail"]
        self.assertEqual(mails, [{"REQUIRETLS": True}])

    def test_without_the_extension(self) -> None:
        protocol, _ = self.connect()
        self.exchange(protocol, b"STARTTLS\r\n")
        self.assertNotIn(b"REQUIRETLS", self.ehlo(protocol))
        self.assertEqual(self.exchange(protocol, b"MAIL FROM:<a@example.org> REQUIRETLS\r\n")[:9], b"555 5.5.4")


def test_a_whole_message_keeps_its_parameters() -> None:
    """A collected message carries the parsed values, for the queue and relay to act on."""
    store = MessageStore()
    conversation = Conversation(Collecting(store), Policy(
        hostname="mx.test", extensions=(Limits(), Rrvs(), DeliverBy(60), MtPriority(), RequireTLS()),
        trusted_networks=("127.0.0.1/32",)))
    conversation.write("EHLO client.test\r\nMAIL FROM:<a@example.org> BY=3600;NT MT-PRIORITY=+2\r\n"
                       "RCPT TO:<b@example.org> RRVS=2014-04-03T23:01:00Z;C\r\nRCPT TO:<c@example.org>\r\n"
                       "DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    assert conversation.replies()[-1].code == 250
    [message] = store.messages
    assert message.mail_params == {"BY": By(3600, "N", True), "MT-PRIORITY": 2}
    assert message.rcpt_params == ({"RRVS": ValidSince(datetime(2014, 4, 3, 23, 1, tzinfo=UTC), "C")}, {})


def test_extensions_table_is_unique() -> None:
    """The five fit with each other and with the standard extensions (names, keywords, parameters)."""
    made = Extensions((Limits(), Rrvs(), DeliverBy(), MtPriority(), RequireTLS()))
    assert set(made.mail_params) == {"BY", "MT-PRIORITY", "REQUIRETLS"}
    assert set(made.rcpt_params) == {"RRVS"}
