"""What a hostile message cannot do to the mail-authentication front: write into this server's
``Authentication-Results:`` field (its signature tags, its From: domain, an SPF explanation are made safe first),
keep a forged field of ours past the part of the header section held in memory, or hold the reactor while a large
message is passed on; and what SPF writes for a null sender whose HELO is not a domain."""

from __future__ import annotations

import io
import random
import re
from typing import Any, Iterator

import authres
import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from esmtpkit.core.content import ContentMode, dot_stuff
from esmtpkit.core.reply import Reply
from esmtpkit.core.session import Session
from esmtpkit.handlers.front import FIELD_TOO_LONG, MAX_FIELD, MAX_HEAD, REPLAY_SLICE, Decision, Front
from esmtpkit.handlers.mailauth import MailAuthFront, claims_to_be
from esmtpkit.mailauth import MailAuth, spf as spf_check
from esmtpkit.mailauth.verdicts import (MAX_REASON, ArcVerdict, AuthVerdicts, DkimVerdict, DmarcVerdict,
                                        SpfVerdict, pvalue)
from esmtpkit.server.policy import Policy
from esmtpkit.testing import Conversation, RecordingHandler

from .authzone import AUTHSERV, MESSAGE, SELECTOR, AuthWorld, dkim_sign, mail_auths
from .mailnet import PrivateDNS

# ---- reading a field back ------------------------------------------------------------------------------------------


def unquoted(value: str) -> str:
    """A property value as written, without the quotes of a quoted-string (authres keeps quoted pairs as written)."""
    return value[1:-1] if len(value) > 1 and value[0] == value[-1] == '"' else value


def read_back(field: bytes) -> list[tuple[str, str, str | None, dict[str, str]]]:
    """The field as authres reads it: (method, result, reason, properties) for each result. The field must be
    printable ASCII, folded only before a result, and its comments balanced."""
    text = field.decode("ascii")
    assert text.endswith("\r\n")
    value = text[:-2]
    assert re.fullmatch(r"[\x20-\x7e]*(?:\r\n\t[\x20-\x7e]+)*", value), value
    unfolded = value.replace("\r\n\t", " ")
    assert balanced(unfolded), unfolded
    header = authres.AuthenticationResultsHeader.parse(unfolded)
    assert header.authserv_id == AUTHSERV
    return [(r.method, r.result, r.reason, {f"{p.type}.{p.name}": p.value for p in r.properties})
            for r in header.results]


def _comment(depth: int) -> str:
    """RFC 5322's ``comment``, nested at most ``depth`` deep: ctext, quoted-pairs and comments inside parentheses."""
    inner = r"[^()\\]|\\." + (f"|{_comment(depth - 1)}" if depth > 1 else "")
    return rf"\((?:{inner})*\)"


#: Text whose comments close (nested up to 8 deep), its quoted-strings and quoted-pairs read as RFC 5322 reads them.
CLOSED = re.compile(rf'(?:[^"()\\]|\\.|"(?:[^"\\]|\\.)*"|{_comment(8)})*', re.S)


def balanced(text: str) -> bool:
    """True when every comment in ``text`` closes, quoted-strings and quoted pairs aside (by RFC 5322's grammar)."""
    return CLOSED.fullmatch(text) is not None


def decided(verdicts: AuthVerdicts) -> list[tuple[str, str]]:
    """(method, result) of each verdict, in the field's order: what the server decided."""
    out = []
    if verdicts.spf_mailfrom is not None:
        out.append(("spf", verdicts.spf_mailfrom.result))
    if verdicts.spf_helo is not None:
        out.append(("spf", verdicts.spf_helo.result))
    if verdicts.dkim_checked and not verdicts.dkim:
        out.append(("dkim", "none"))
    out += [("dkim", s.result) for s in verdicts.dkim]
    if verdicts.dmarc is not None:
        out.append(("dmarc", verdicts.dmarc.result))
    if verdicts.arc is not None:
        out.append(("arc", verdicts.arc.result))
    return out


# ---- hostile values in the verdicts --------------------------------------------------------------------------------

HOSTILE = [
    "evil.test; s=x) dkim=pass (",
    "x) dkim=pass (",
    '@a"b',
    'a"b@evil.test',
    "a@evil.test; dkim=pass header.d=bank.test",
    "evil.test\r\nAuthentication-Results: mx.test; dkim=pass",
    "\u00e9vil.test\udce9",
    "\x00\x7f\x1b[31m",
    "\u2028dkim=pass",
    "a\\)b",
    "(((",
    ")))",
    "x" * 400,
    "",
]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_a_hostile_dkim_signature_writes_only_what_was_decided(value: str) -> None:
    verdicts = AuthVerdicts(
        dkim=(DkimVerdict("permerror", value, value, identity=value, algorithm=value, b=value, reason=value),
              DkimVerdict("fail", "good.test", SELECTOR, identity=value, b=value, reason=value)),
        dkim_checked=True, remote_ip="127.0.0.5")
    field = verdicts.field(AUTHSERV)
    got = read_back(field)
    assert [(m, r) for m, r, _, _ in got] == decided(verdicts) == [("dkim", "permerror"), ("dkim", "fail")]
    assert not re.search(rb"=\s*pass", field)
    for (_, _, reason, props), verdict in zip(got, verdicts.dkim):
        expected = {f"header.{name}": pvalue(text, kind) for name, text, kind in [
            ("d", verdict.domain, "domain"), ("s", verdict.selector, "domain"), ("i", verdict.identity, "identity"),
            ("a", verdict.algorithm, "keyword"), ("b", verdict.b, "base64")]}
        assert {k: unquoted(v) for k, v in props.items()} == {k: unquoted(v) for k, v in expected.items() if v}
        assert reason is None or (len(reason) <= MAX_REASON and not set(reason) & set('"\\();'))
    assert {"header.d": "good.test", "header.s": SELECTOR}.items() <= got[1][3].items()


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_spf_dmarc_and_arc_values_write_only_what_was_decided(value: str) -> None:
    verdicts = AuthVerdicts(
        spf_mailfrom=SpfVerdict("fail", "mailfrom", value, value, explanation=value),
        spf_helo=SpfVerdict("neutral", "helo", value, value, explanation=value),
        dmarc=DmarcVerdict("fail", value, policy=value, disposition=value, reason=value),
        arc=ArcVerdict("fail", 2, value, value, value, value, reason=value), remote_ip=value)
    field = verdicts.field(AUTHSERV)
    got = read_back(field)
    assert [(m, r) for m, r, _, _ in got] == decided(verdicts)
    assert not re.search(rb"=\s*pass", field)
    for _, _, _, props in got:
        assert all(v == pvalue(v, "address") or unquoted(v) == v for v in props.values())
    assert all(not set(unquoted(v)) & set(";()\r\n ") for _, _, _, props in got for v in props.values())


def test_values_that_are_fine_are_written_as_they_are() -> None:
    verdicts = AuthVerdicts(
        spf_mailfrom=SpfVerdict("pass", "mailfrom", '"a;b (c)"@good.test', "good.test"),
        spf_helo=SpfVerdict("pass", "helo", "helo.good.test", "helo.good.test"),
        dkim=(DkimVerdict("pass", "good.test", "s_1", identity="@good.test", algorithm="rsa-sha256", b="ab/c+d=="),),
        dkim_checked=True, dmarc=DmarcVerdict("pass", "good.test", "reject"),
        arc=ArcVerdict("pass", 1, "other.test", "s1", "other.test", "s1"), remote_ip="2001:db8::5")
    got = read_back(verdicts.field(AUTHSERV))
    assert [(m, r, props) for m, r, _, props in got] == [
        ("spf", "pass", {"smtp.mailfrom": '"a;b (c)"@good.test'}),
        ("spf", "pass", {"smtp.helo": "helo.good.test"}),
        ("dkim", "pass", {"header.d": "good.test", "header.i": "@good.test", "header.a": "rsa-sha256",
                          "header.s": "s_1", "header.b": "ab/c+d"}),
        ("dmarc", "pass", {"header.from": "good.test"}),
        ("arc", "pass", {"header.ams-d": "other.test", "header.ams-s": "s1", "header.as-d": "other.test",
                         "header.as-s": "s1", "header.oldest-pass": "0", "smtp.remote-ip": "2001:db8::5"})]


@pytest.mark.parametrize("written, kind, expected", [
    ("a b@good.test", "address", '"a b"@good.test'),
    ('a"b@good.test', "address", '"a\\"b"@good.test'),
    ("\u00e9l\u00e8ve@good.test", "address", "good.test"),
    ("user@[192.0.2.1]", "address", None),
    ("@a\"b", "identity", None),
    ("\u00e9l\u00e8ve@good.test", "identity", "@good.test"),
    ("b\u00fccher.test", "domain", "xn--bcher-kva.test"),
    ("good.test.", "domain", "good.test"),
    ("-bad.test", "domain", None),
    ("rsa-sha256; x", "keyword", None),
    ("ab/c", "base64", '"ab/c"'),
    ("ab\"c", "base64", None),
    ("127.0.0.1", "ip", "127.0.0.1"),
    ("127.0.0.1; dkim=pass", "ip", None),
])
def test_pvalue(written: str, kind: str, expected: str | None) -> None:
    assert pvalue(written, kind) == expected


def test_long_reasons_are_cut() -> None:
    verdicts = AuthVerdicts(spf_mailfrom=SpfVerdict("fail", "mailfrom", "a@good.test", "good.test",
                                                    explanation="why " * 200))
    [(_, _, reason, _)] = read_back(verdicts.field(AUTHSERV))
    assert reason is not None and len(reason) <= MAX_REASON and reason.endswith("...")


def test_random_hostile_text_always_reads_back() -> None:
    rng = random.Random(8601)
    alphabet = "ab.@-_\"\\();=: \t\r\n\x00\x7f\u00e9\u2028[]/+"
    for _ in range(300):
        def text() -> str:
            return "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        verdicts = AuthVerdicts(
            spf_mailfrom=SpfVerdict("softfail", "mailfrom", text(), text(), text()),
            dkim=(DkimVerdict("fail", text(), text(), text(), text(), text(), text()),),
            dkim_checked=True, dmarc=DmarcVerdict("none", text(), text(), text(), reason=text()),
            arc=ArcVerdict("none", 1, text(), text(), text(), text(), reason=text()), remote_ip=text())
        field = verdicts.field(AUTHSERV)
        assert [(m, r) for m, r, _, _ in read_back(field)] == decided(verdicts), field
        assert not re.search(rb"=\s*pass", field)


# ---- hostile signatures through the real checks --------------------------------------------------------------------

CLIENT = "127.0.0.5"

@pytest.fixture
def dns(auth_dns: PrivateDNS) -> PrivateDNS:
    return auth_dns


@pytest.fixture
def checks(dns: PrivateDNS) -> Iterator[MailAuth]:
    with mail_auths(dns.servers, timeout=(0.3,), rng=random.Random(1)) as build:
        yield build(authserv_id=AUTHSERV, max_signatures=len(SIGNATURES) + 1)


def hostile_signature(tags: bytes) -> bytes:
    return (b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/simple; h=from:to; bh=AAAA; " + tags
            + b"; b=QUJD/RUY=\r\n")


SIGNATURES = [
    b"d=evil.test; s=x) dkim=pass (",
    b's=s1; d=good.test; i=@a"b',
    b"s=s1; d=\xe9vil.test; i=\xff@good.test",
    b"s=s1; d=good.test; i=x@good.test;\r\n dkim=pass",
    b"s=s1; d=evil.test\r\n (dkim=pass)",
]


@pytest_twisted.ensureDeferred
async def test_hostile_signatures_read_back_as_the_results_decided(checks: MailAuth, auth_world: AuthWorld) -> None:
    signed = dkim_sign(MESSAGE, "good.test", auth_world.keys["good.test"])
    content = b"".join(hostile_signature(tags) for tags in SIGNATURES) + signed
    session = Session(hostname=AUTHSERV, helo="helo.good.test", peer=IPv4Address("TCP", CLIENT, 1000))
    verdicts = await checks.check_sender(session, "alice@good.test")
    head = content.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    verdicts = await checks.check_message(session, verdicts, head, lambda: io.BytesIO(content))
    field = verdicts.field(AUTHSERV)
    got = read_back(field)
    assert [(m, r) for m, r, _, _ in got] == decided(verdicts)
    assert [(m, r) for m, r, _, _ in got if m != "dkim"] == [("spf", "pass"), ("spf", "fail"), ("dmarc", "pass"),
                                                             ("arc", "none")]
    dkim = [(r, props) for m, r, _, props in got if m == "dkim"]
    assert [r for r, _ in dkim].count("pass") == 1 == [s.result for s in verdicts.dkim].count("pass")
    assert dkim[-1] == ("pass", {"header.d": "good.test", "header.i": "@good.test", "header.a": "rsa-sha256",
                                 "header.s": SELECTOR, "header.b": dkim[-1][1]["header.b"]})
    assert all(props.get("header.d") in (None, "evil.test", "good.test") for _, props in dkim)
    assert all(props.get("header.s") in (None, SELECTOR) for _, props in dkim)
    assert all(props.get("header.i") in (None, "@good.test", "x@good.test") for _, props in dkim)


# ---- forged fields of ours, however long the header section --------------------------------------------------------

OURS = b"Authentication-Results: mx.test; dkim=pass header.d=bank.test\r\n"
THEIRS = b"Authentication-Results: other.test; spf=pass smtp.mailfrom=a@b.test\r\n"
FILLER = b"".join(b"X-Filler-%05d: " % i + b"f" * 900 + b"\r\n" for i in range(320))  # 918 octets a field


class Removing(Front):
    """A front that removes the fields claiming to be ``mx.test``'s, as `MailAuthFront` does, and adds none."""

    def decide(self) -> Decision:
        return Decision(remove=claims_to_be(AUTHSERV))


def behind(mode: ContentMode = ContentMode.RAW, size: int | None = None) -> RecordingHandler:
    handler = RecordingHandler()
    handler.content_mode = mode
    handler.chunk_size = size
    return handler


def deliver(front: Front, content: bytes, clock: Clock, **policy: Any) -> Reply:
    """One transaction through ``front`` on ``clock``, turning the clock until the final reply comes."""
    conversation = Conversation(front, Policy(hostname=AUTHSERV, **policy), clock=clock)
    conversation.write(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n" + dot_stuff(content))
    replies = conversation.replies()
    for _ in range(10000):
        if len(replies) >= 5:
            break
        clock.advance(0)
        replies += conversation.replies()
    return replies[4]


def passed(handler: RecordingHandler) -> bytes:
    return b"".join(call.args[0] for call in handler.calls if call.verb == "body")


def test_forged_field_after_a_short_header_section_is_removed() -> None:
    handler = behind()
    content = b"From: a@b.test\r\n" + OURS + THEIRS + b"Subject: s\r\n\r\nbody\r\n"
    assert deliver(Removing(handler, Clock()), content, Clock()).code == 250
    assert passed(handler) == content.replace(OURS, b"")


@pytest.mark.parametrize("mode", [ContentMode.RAW, ContentMode.PARSED], ids=["RAW", "PARSED"])
def test_forged_fields_anywhere_in_a_header_section_over_256_kib_are_removed(mode: ContentMode) -> None:
    assert len(FILLER) > MAX_HEAD
    folded = b"Authentication-Results: (a comment; with\r\n\t\\) in it) MX.TEST;\r\n\tspf=pass\r\n"
    content = OURS + FILLER + OURS + THEIRS + FILLER[:5 * 918] + folded + b"Subject: s\r\n\r\n" + OURS + b"body\r\n"
    handler = behind(mode, 4096)
    clock = Clock()
    front = Removing(handler, clock)
    assert deliver(front, content, clock, max_header_size=0).code == 250
    expected = FILLER + THEIRS + FILLER[:5 * 918] + b"Subject: s\r\n\r\n" + OURS + b"body\r\n"
    if mode is ContentMode.RAW:
        assert passed(handler) == expected
    else:
        names = [call.args[0] for call in handler.calls if call.verb == "header"]
        assert names.count("Authentication-Results") == 1 and len(names) == 320 + 1 + 5 + 1
        assert passed(handler) == OURS + b"body\r\n"
    assert handler.verbs[-1] == "eom"
    assert len(front.head) <= MAX_HEAD and front.head == b""  # dropped once the message went on


def test_a_field_over_the_bound_refuses_the_message_when_fields_are_removed() -> None:
    long_field = b"X-Long: start\r\n" + b"".join(b"\t" + b"l" * 900 + b"\r\n" for i in range(MAX_FIELD // 900 + 2))
    content = b"From: a@b.test\r\n" + long_field + OURS + b"\r\nbody\r\n"
    handler = behind()
    clock = Clock()
    assert deliver(Removing(handler, clock), content, clock, max_header_size=0) == FIELD_TOO_LONG
    assert "abort" in handler.verbs and "eom" not in handler.verbs
    unchanged = behind()
    assert deliver(Front(unchanged, clock), content, clock, max_header_size=0).code == 250
    assert passed(unchanged) == content


def test_a_long_line_that_is_no_field_ends_the_header_section() -> None:
    """Content whose first line is not a field, longer than a field may be, is all body: it goes on."""
    handler = behind()
    content = b"not a field " + b"n" * MAX_FIELD + b"\r\n" + OURS
    clock = Clock()
    assert deliver(Removing(handler, clock), content, clock, max_line_length=0, max_header_size=0).code == 250
    assert passed(handler) == content


def test_a_field_of_ours_behind_a_bare_line_feed_is_removed() -> None:
    """With bare line ends allowed, a reader that ends lines at a bare LF would see a field of ours inside
    another field: the whole field goes."""
    handler = behind()
    smuggled = b"X-Note: hello\n" + OURS
    content = b"From: a@b.test\r\n" + smuggled + b"Subject: s\r\n\r\nbody\r\n"
    assert deliver(Removing(handler, Clock()), content, Clock(), bare_newline="allow").code == 250
    assert passed(handler) == content.replace(smuggled, b"")


class StubChecks:
    """What `MailAuthFront` asks of its checks, answering at once with no verdicts."""

    authserv_id = AUTHSERV
    spf_reject = False

    def __init__(self, reactor: Clock) -> None:
        self.reactor = reactor

    def check_sender(self, session: Session, sender: str) -> Deferred[AuthVerdicts]:
        d: Deferred[AuthVerdicts] = Deferred()
        d.callback(AuthVerdicts(remote_ip=session.peer_ip))
        return d

    def check_message(self, session: Session, verdicts: AuthVerdicts, head: bytes, open_message: Any) -> Any:
        d: Deferred[AuthVerdicts] = Deferred()
        d.callback(verdicts)
        return d

    def refusal_at_end(self, verdicts: AuthVerdicts) -> None:
        return None


def test_the_mail_auth_front_removes_forged_fields_past_256_kib() -> None:
    handler = behind()
    clock = Clock()
    content = FILLER + OURS + b"Subject: s\r\n\r\nbody\r\n"
    front = MailAuthFront(handler, StubChecks(clock))  # type: ignore[arg-type]
    assert deliver(front, content, clock, max_header_size=0).code == 250
    given = passed(handler)
    assert given.startswith(b"Authentication-Results: mx.test;") and given.count(b"Authentication-Results:") == 1
    assert given.endswith(FILLER + b"Subject: s\r\n\r\nbody\r\n")


# ---- replay in turns -----------------------------------------------------------------------------------------------

class Turns:
    """A reactor's timer for the front alone: each call it is given waits for the test to run it (one turn)."""

    def __init__(self) -> None:
        self.pending: list[Any] = []

    def seconds(self) -> float:
        return 0.0

    def callLater(self, delay: float, function: Any, *args: Any, **kwargs: Any) -> Any:
        call = Clock().callLater(delay, function, *args, **kwargs)
        self.pending.append(call)
        return call

    def turn(self) -> None:
        call = self.pending.pop(0)
        if call.active():
            call.func(*call.args, **call.kw)


def test_replay_gives_the_reactor_a_turn_between_slices() -> None:
    handler = behind(ContentMode.RAW, 100)
    turns = Turns()
    front = Front(handler, turns)  # type: ignore[arg-type]
    front.replay_slice = 1000
    content = b"Subject: big\r\n\r\n" + b"".join(b"%04d " % i + b"b" * 93 + b"\r\n" for i in range(100))
    conversation = Conversation(front, Policy(hostname=AUTHSERV))
    conversation.write(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n" + dot_stuff(content))
    assert [r.code for r in conversation.replies()] == [250, 250, 250, 354]
    sizes = [len(passed(handler))]
    while turns.pending:
        assert not conversation.replies()
        turns.turn()
        sizes.append(len(passed(handler)))
    assert conversation.replies()[0].code == 250
    assert passed(handler) == content
    assert sizes[:-1] == list(range(1000, len(content), 1000)) and sizes[-1] == len(content)


def test_a_handler_that_makes_the_replay_wait_gets_no_extra_turns() -> None:
    handler = behind(ContentMode.RAW, 500)
    gates: list[Deferred[None]] = []

    def slow(chunk: bytes) -> Deferred[None]:
        gates.append(Deferred())
        return gates[-1]

    handler.replies["body"] = slow
    turns = Turns()
    front = Front(handler, turns)  # type: ignore[arg-type]
    front.replay_slice = 1000
    content = b"Subject: s\r\n\r\n" + b"w" * 5000 + b"\r\n"
    conversation = Conversation(front, Policy(hostname=AUTHSERV))
    conversation.write(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n" + dot_stuff(content))
    while gates and not gates[-1].called:
        assert turns.pending == []
        gates[-1].callback(None)
    assert passed(handler) == content
    assert conversation.replies()[-1].code == 250


def test_the_default_slice() -> None:
    assert Front.replay_slice == REPLAY_SLICE == 256 * 1024


# ---- SPF for a null sender whose HELO is not a domain --------------------------------------------------------------

@pytest.mark.parametrize("helo", ["[192.0.2.1]", "[IPv6:2001:db8::1]", "localhost", "192.0.2.1", "x.123", ""])
def test_null_sender_with_a_helo_that_is_not_a_domain(monkeypatch: pytest.MonkeyPatch, helo: str) -> None:
    def no_query(**kwargs: Any) -> Any:
        raise AssertionError(f"SPF asked DNS about {kwargs}")

    monkeypatch.setattr(spf_check.spf, "query", no_query)
    helo_verdict, mailfrom = spf_check.evaluate("192.0.2.1", "", helo)
    assert helo_verdict is None
    assert (mailfrom.result, mailfrom.identity, mailfrom.domain) == ("none", "", "")
    verdicts = AuthVerdicts(spf_helo=helo_verdict, spf_mailfrom=mailfrom, remote_ip="192.0.2.1")
    assert [(m, r, props) for m, r, _, props in read_back(verdicts.field(AUTHSERV))] == [("spf", "none", {})]


def test_null_sender_with_a_domain_helo_checks_postmaster_at_it(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[dict[str, Any]] = []

    class Query:
        def __init__(self, **kwargs: Any) -> None:
            asked.append(kwargs)

        def check(self) -> tuple[str, int, str]:
            return "pass", 250, "sender SPF authorized"

    monkeypatch.setattr(spf_check.spf, "query", Query)
    helo_verdict, mailfrom = spf_check.evaluate("192.0.2.1", "", "helo.good.test")
    assert [(a["s"], a["h"]) for a in asked] == [("postmaster@helo.good.test", "helo.good.test")] * 2
    verdicts = AuthVerdicts(spf_helo=helo_verdict, spf_mailfrom=mailfrom)
    assert [(m, r, props) for m, r, _, props in read_back(verdicts.field(AUTHSERV))] == [
        ("spf", "pass", {"smtp.mailfrom": "postmaster@helo.good.test"}),
        ("spf", "pass", {"smtp.helo": "helo.good.test"})]


# ---- what the documentation says of short keys ---------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_key_shorter_than_the_minimum_gives_permerror(dns: PrivateDNS, auth_world: AuthWorld) -> None:
    """docs/mail-authentication.md: a key shorter than ``minkey`` is a ``permerror`` (dkimpy's KeyFormatError),
    not a ``fail``."""
    with mail_auths(dns.servers, timeout=(0.3,), rng=random.Random(1)) as build:
        strict = build(authserv_id=AUTHSERV, minkey=2048)
        content = dkim_sign(MESSAGE, "good.test", auth_world.keys["good.test"])
        session = Session(hostname=AUTHSERV, helo="helo.good.test", peer=IPv4Address("TCP", CLIENT, 1000))
        head = content.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        verdicts = await strict.check_message(session, AuthVerdicts(), head, lambda: io.BytesIO(content))
    [signature] = verdicts.dkim
    assert (signature.result, signature.domain) == ("permerror", "good.test")
    assert "too small" in signature.reason
