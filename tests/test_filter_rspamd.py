"""The rspamd filter against a tiny twisted.web server on 127.0.0.1 that answers canned JSON: what it sends (the
protocol headers, the message as the body), what each answer becomes, and every way an answer can be wrong (not
JSON, HTTP 500, too long, never coming: cancelling closes the connection)."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.web.resource import Resource
from twisted.web.client import ResponseNeverReceived
from twisted.web.server import NOT_DONE_YET, Request, Site

from esmtpkit.cli import tap
from esmtpkit.core.address import Address
from esmtpkit.core.reply import Reply
from esmtpkit.core.session import Session
from esmtpkit.core.xclient import Forwarded
from esmtpkit.filters import Action, HeaderEdit, HeldMessage, IFilter
from esmtpkit.filters import rspamd
from esmtpkit.filters.rspamd import MAX_HEAD, MAX_TEXT, RspamdError, RspamdFilter, from_spec
from tests.docblocks import DOCS, blocks
from tests.mailnet import until

HEAD = (b"From: Alice <alice@good.test>\r\n"
        b"To: bob@example.net\r\n"
        b"Subject: hello\r\n"
        b" again\r\n"
        b"X-Spam: No\r\n"
        b"X-Spam: maybe\r\n"
        b"\r\n")
CONTENT = HEAD + b"Hello, Bob.\r\n" * 1000


@dataclass
class Script:
    """What the fake rspamd answers next: a status, a body (JSON of ``answer`` unless ``raw``), ``length``
    False for a chunked answer, ``hang`` to answer nothing (``hang`` and ``partial``: the status and the start of a
    body, then nothing)."""

    answer: Any = field(default_factory=lambda: {"action": "no action", "score": 0.5, "required_score": 15.0})
    code: int = 200
    raw: bytes | None = None
    length: bool = True
    hang: bool = False
    partial: bool = False


class FakeRspamd(Resource):
    """Records each request and answers it from `script`."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.script = Script()
        self.requests: list[Request] = []
        self.bodies: list[bytes] = []
        self.lost: list[Any] = []

    def render_POST(self, request: Request) -> Any:
        self.requests.append(request)
        self.bodies.append(request.content.read())
        request.notifyFinish().addErrback(self.lost.append)
        script = self.script
        if script.hang:
            if script.partial:
                request.write(b'{"action": ')
            return NOT_DONE_YET
        request.setResponseCode(script.code)
        body = script.raw if script.raw is not None else json.dumps(script.answer).encode()
        if script.length:
            return body
        for start in range(0, len(body), 100):
            request.write(body[start:start + 100])
        request.finish()
        return NOT_DONE_YET

    def header(self, name: str, index: int = -1) -> list[str]:
        values = self.requests[index].requestHeaders.getRawHeaders(name, [])
        return [v.decode() if isinstance(v, bytes) else v for v in values]


@pytest.fixture
def fake() -> Iterator[tuple[FakeRspamd, str]]:
    resource = FakeRspamd()
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    yield resource, f"http://127.0.0.1:{port.getHost().port}"
    for request in resource.requests:
        if not request.finished and request.channel is not None:
            request.channel.transport.abortConnection()
    pytest_twisted.blockon(port.stopListening())


def session(**changes: Any) -> Session:
    made = Session(hostname="mx.test", peer=IPv4Address("TCP", "192.0.2.7", 40000), helo="client.good.test")
    made.envelope.id = "4Q7x2Lm9Tz"
    made.envelope.sender = Address("alice@good.test")
    made.envelope.recipients = [Address("bob@example.net"), Address("carol@example.net")]
    for name, value in changes.items():
        setattr(made, name, value)
    return made


def held(content: bytes = CONTENT, **changes: Any) -> HeldMessage:
    head = content.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    return HeldMessage(session(**changes), head, len(content), lambda: io.BytesIO(content))


async def ask(url: str, script: Script | None = None, fake: FakeRspamd | None = None,
              message: HeldMessage | None = None, **options: Any) -> Any:
    if fake is not None and script is not None:
        fake.script = script
    return await RspamdFilter(url, **options).check(message or held())


@pytest_twisted.ensureDeferred
async def test_the_message_goes_to_checkv2_with_the_protocol_headers(fake: tuple[FakeRspamd, str]) -> None:
    server, url = fake
    message = held(client_name="client.good.test", authenticated="alice", tls=True,
                   tls_info={"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "bits": "256"})
    verdict = await RspamdFilter(url, password="pw", pass_all=True).check(message)
    assert verdict.action is Action.CONTINUE
    [request] = server.requests
    assert (request.method, request.path) == (b"POST", b"/checkv2")
    assert server.bodies == [CONTENT]
    assert server.header("Content-Length") == [str(len(CONTENT))]
    assert {name: server.header(name) for name in ("IP", "Helo", "Hostname", "From", "Rcpt", "Queue-Id", "User",
                                                     "Password", "Pass", "TLS-Cipher", "TLS-Version")} == {
        "IP": ["192.0.2.7"], "Helo": ["client.good.test"], "Hostname": ["client.good.test"],
        "From": ["alice@good.test"], "Rcpt": ["bob@example.net", "carol@example.net"], "Queue-Id": ["4Q7x2Lm9Tz"],
        "User": ["alice"], "Password": ["pw"], "Pass": ["all"], "TLS-Cipher": ["TLS_AES_256_GCM_SHA384"],
        "TLS-Version": ["TLSv1.3"]}


@pytest_twisted.ensureDeferred
async def test_what_is_not_known_is_not_sent(fake: tuple[FakeRspamd, str]) -> None:
    server, url = fake
    message = held()
    message.session.envelope.sender = None
    await RspamdFilter(url + "/").check(message)
    assert server.requests[0].path == b"/checkv2"
    assert server.header("From") == ["<>"]
    for name in ("Hostname", "User", "Password", "Pass", "TLS-Cipher"):
        assert server.header(name) == [], name


@pytest_twisted.ensureDeferred
async def test_the_client_xforward_named_takes_the_connections_place(fake: tuple[FakeRspamd, str]) -> None:
    server, url = fake
    message = held(client_name="relay.good.test")
    message.session.forwarded = Forwarded(name="origin.example", addr="198.51.100.9", helo="origin.helo",
                                          transaction=message.session.transactions)
    await RspamdFilter(url).check(message)
    assert (server.header("IP"), server.header("Helo"), server.header("Hostname")) == (
        ["198.51.100.9"], ["origin.helo"], ["origin.example"])


@pytest_twisted.ensureDeferred
async def test_header_values_cannot_carry_line_ends(fake: tuple[FakeRspamd, str]) -> None:
    server, url = fake
    message = held(helo="evil\r\nPass: all", authenticated="bob\x00x")
    await RspamdFilter(url).check(message)
    assert server.header("Helo") == ["evil  Pass: all"]
    assert server.header("Pass") == []
    assert server.header("User") == ["bob x"]


def answer(action: str, **more: Any) -> Script:
    return Script({"action": action, "score": 16.5, "required_score": 15.0,
                   "symbols": {"GTUBE": {"score": 0}, "R_TEST": {"score": 1}}, **more})


@pytest_twisted.ensureDeferred
async def test_reject_is_550_with_rspamds_message(fake: tuple[FakeRspamd, str]) -> None:
    server, url = fake
    verdict = await ask(url, answer("reject", messages={"smtp_message": "Gtube pattern"}), server)
    assert verdict.action is Action.REJECT
    assert verdict.reply == Reply.of(550, "Gtube pattern", enhanced="5.7.1")
    assert verdict.details == {"action": "reject", "score": 16.5, "required_score": 15.0,
                               "symbols": ["GTUBE", "R_TEST"]}
    assert "16.50/15.00" in verdict.reason
    default = await ask(url, answer("reject"), server)
    assert default.reply == Reply.of(550, "Spam message rejected", enhanced="5.7.1")


@pytest_twisted.ensureDeferred
async def test_rspamds_message_is_made_printable_ascii_and_bounded(fake: tuple[FakeRspamd, str]) -> None:
    server, url = fake
    hostile = "Spam\r\n250 OK\u00e9\x00" + "x" * 1000
    verdict = await ask(url, answer("reject", messages={"smtp_message": hostile}), server)
    [line] = verdict.reply.lines
    assert line.startswith("Spam 250 OK??x")
    assert len(line) == MAX_TEXT and all(" " <= c <= "~" for c in line)
    blank = await ask(url, answer("reject", messages={"smtp_message": "   "}), server)
    assert blank.reply.lines == ("Spam message rejected",)


@pytest.mark.parametrize("action, text", [("soft reject", "Try again later"),
                                          ("greylist", "Greylisted, try again later")])
@pytest_twisted.ensureDeferred
async def test_soft_reject_and_greylist_are_451(fake: tuple[FakeRspamd, str], action: str, text: str) -> None:
    server, url = fake
    verdict = await ask(url, answer(action), server)
    assert verdict.action is Action.TEMPFAIL
    assert verdict.reply == Reply.of(451, text, enhanced="4.7.1")


@pytest_twisted.ensureDeferred
async def test_add_header_replaces_any_spam_header_with_yes(fake: tuple[FakeRspamd, str]) -> None:
    server, url = fake
    verdict = await ask(url, answer("add header"), server)
    assert verdict.action is Action.CONTINUE
    assert verdict.edits == (HeaderEdit("delete", "X-Spam"), HeaderEdit("add", "X-Spam", "Yes"))
    named = await ask(url, answer("add header"), server, header="X-Is-Spam")
    assert named.edits == (HeaderEdit("delete", "X-Is-Spam"), HeaderEdit("add", "X-Is-Spam", "Yes"))


@pytest_twisted.ensureDeferred
async def test_rewrite_subject_uses_rspamds_subject_or_a_prefix(fake: tuple[FakeRspamd, str]) -> None:
    server, url = fake
    given = await ask(url, answer("rewrite subject", subject="[SPAM] hello again"), server)
    assert given.action is Action.CONTINUE
    assert given.edits == (HeaderEdit("change", "Subject", "[SPAM] hello again", 1),)
    prefixed = await ask(url, answer("rewrite subject"), server)
    assert prefixed.edits == (HeaderEdit("change", "Subject", "***SPAM*** hello again", 1),)
    none = await ask(url, answer("rewrite subject"), server, held(b"From: a@good.test\r\n\r\nHi\r\n"))
    assert none.edits == (HeaderEdit("add", "Subject", "***SPAM***"),)


@pytest.mark.parametrize("subject", [b"caf\xe9 cr\xe8me", "caf\u00e9 \u2603".encode()], ids=["latin-1", "utf-8"])
@pytest_twisted.ensureDeferred
async def test_the_prefix_keeps_an_8bit_subjects_octets(fake: tuple[FakeRspamd, str], subject: bytes) -> None:
    server, url = fake
    content = b"From: a@good.test\r\nSubject: " + subject + b"\r\n\r\nHi\r\n"
    verdict = await ask(url, answer("rewrite subject"), server, held(content))
    [edit] = verdict.edits
    assert (edit.kind, edit.index) == ("change", 1)
    assert edit.line == b"Subject: ***SPAM*** " + subject + b"\r\n"


@pytest_twisted.ensureDeferred
async def test_lone_surrogates_rspamd_sends_cannot_break_writing_a_field(fake: tuple[FakeRspamd, str]) -> None:
    """JSON may escape a lone surrogate (``\\ud800``), which no field can be written with: it becomes U+FFFD."""
    server, url = fake
    milter = {"add_headers": {"X-Odd": "a\ud800b\udc80c"}}
    verdict = await ask(url, answer("rewrite subject", subject="[SPAM] \ud83d", milter=milter), server)
    assert [edit.line for edit in verdict.edits] == ["X-Odd: a\ufffdb\ufffdc\r\n".encode(),
                                                     "Subject: [SPAM] \ufffd\r\n".encode()]


@pytest_twisted.ensureDeferred
async def test_the_reason_is_printable_and_bounded(fake: tuple[FakeRspamd, str]) -> None:
    """The reason goes into the log (``filter.verdict``) and a quarantine mark: one line, printable, bounded."""
    server, url = fake
    hostile = "quarantine\r\nfilter x stage=message \x1b[31m\u00e9" + "y" * 1000
    verdict = await ask(url, Script({"action": hostile, "score": 1e300, "required_score": 15.0}), server)
    assert verdict.action is Action.CONTINUE
    assert verdict.reason.startswith("rspamd: quarantine filter x stage=message ?[31m?yyy")
    assert len(verdict.reason) == MAX_TEXT and all(" " <= c <= "~" for c in verdict.reason)
    action = verdict.details["action"]
    assert len(action) == MAX_TEXT and action.startswith("quarantine filter x") and action.isprintable()
    quarantined = await ask(url, answer("quarantine"), server)
    assert quarantined.reason == "rspamd: quarantine (16.50/15.00)"


@pytest.mark.parametrize("action, expected", [("no action", Action.CONTINUE), ("discard", Action.DISCARD),
                                              ("quarantine", Action.QUARANTINE),
                                              ("my custom action", Action.CONTINUE)])
@pytest_twisted.ensureDeferred
async def test_other_actions(fake: tuple[FakeRspamd, str], action: str, expected: Action) -> None:
    server, url = fake
    verdict = await ask(url, answer(action), server)
    assert (verdict.action, verdict.reply, verdict.edits) == (expected, None, ())
    assert verdict.details["action"] == action


@pytest_twisted.ensureDeferred
async def test_the_milter_block_becomes_header_edits(fake: tuple[FakeRspamd, str]) -> None:
    server, url = fake
    milter = {"remove_headers": {"X-Spam": -1, "X-Old": 0, "X-Second": 2, "X-Spam-Flag": -3, "Bad": "1"},
              "add_headers": {
                  "X-Spamd-Result": {"value": "default: False [1.00 / 15.00];\r\n\tR_A(1.00)[]", "order": -1},
                  "X-Rspamd-Server": "scanner.test",
                  "X-Top": {"value": "first", "order": 0},
                  "X-Near-End": {"value": "v", "order": -2},
                  "X-Many": [{"value": "one"}, {"value": "two", "order": 1}, {"no value": 1}],
                  "Bad Name": "x", "X-Number": 5}}
    verdict = await ask(url, answer("no action", milter=milter), server)
    assert verdict.action is Action.CONTINUE
    assert verdict.edits == (
        HeaderEdit("delete", "X-Spam", index=2),  # -1: the last of the two
        HeaderEdit("delete", "X-Old", index=0),
        HeaderEdit("delete", "X-Second", index=2),
        HeaderEdit("add", "X-Spamd-Result", "default: False [1.00 / 15.00];\tR_A(1.00)[]"),
        HeaderEdit("add", "X-Rspamd-Server", "scanner.test"),
        HeaderEdit("insert", "X-Top", "first", 0),
        HeaderEdit("insert", "X-Near-End", "v", 4),  # five fields: before the last
        HeaderEdit("add", "X-Many", "one"),
        HeaderEdit("insert", "X-Many", "two", 1))


@pytest_twisted.ensureDeferred
async def test_refusals_carry_no_edits_and_add_header_keeps_the_milter_block(fake: tuple[FakeRspamd, str]) -> None:
    server, url = fake
    milter = {"add_headers": {"X-Spamd-Result": "r"}, "remove_headers": {"X-Spam": 0}}
    rejected = await ask(url, answer("reject", milter=milter), server)
    assert rejected.edits == ()
    added = await ask(url, answer("add header", milter=milter), server)
    assert added.edits == (HeaderEdit("delete", "X-Spam"), HeaderEdit("add", "X-Spamd-Result", "r"),
                           HeaderEdit("delete", "X-Spam"), HeaderEdit("add", "X-Spam", "Yes"))


@pytest.mark.parametrize("script, complaint", [
    (Script(raw=b"<html>not json</html>"), "not JSON"),
    (Script(raw=b"[1, 2]"), "no action"),
    (Script({"score": 3}), "no action"),
    (Script({"action": 7}), "no action"),
    (Script({"error": "failed to parse\r\nmessage"}, code=500), "HTTP 500: failed to parse message"),
    (Script(raw=b"Internal error", code=500), "HTTP 500: Internal error"),
    (Script(raw=b"", code=302), "HTTP 302"),
], ids=["html", "list", "no-action", "action-not-text", "500-json", "500-text", "redirect"])
@pytest_twisted.ensureDeferred
async def test_an_answer_that_is_no_verdict_raises(fake: tuple[FakeRspamd, str], script: Script,
                                                   complaint: str) -> None:
    server, url = fake
    with pytest.raises(RspamdError, match=complaint):
        await ask(url, script, server)


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "chunked"])
@pytest_twisted.ensureDeferred
async def test_an_answer_longer_than_the_bound_raises(fake: tuple[FakeRspamd, str], length: bool) -> None:
    server, url = fake
    big = {"action": "no action", "urls": ["http://example.test/%d" % i for i in range(200)]}
    with pytest.raises(RspamdError, match="longer than|more than"):
        await ask(url, Script(big, length=length), server, max_answer=1000)
    fits = await ask(url, Script({"action": "no action"}, length=length), server, max_answer=1000)
    assert fits.action is Action.CONTINUE


@pytest.mark.parametrize("partial", [False, True], ids=["before-the-answer", "in-the-body"])
@pytest_twisted.ensureDeferred
async def test_cancelling_a_check_closes_its_connection(fake: tuple[FakeRspamd, str], partial: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    server, url = fake
    server.script = Script(hang=True, partial=partial)
    reading: list[bytes] = []
    monkeypatch.setattr(rspamd._BoundedBody, "dataReceived", lambda self, data: reading.append(data))
    checking = RspamdFilter(url).check(held())
    await until(lambda: server.requests, "the request reaches the server")
    if partial:
        await until(lambda: reading, "the start of the answer reaches the filter")
    checking.cancel()
    with pytest.raises((CancelledError, ResponseNeverReceived)) as raised:  # the client's word for a cancel
        await checking
    if raised.type is not CancelledError:
        assert raised.value.reasons[0].check(CancelledError)
    await until(lambda: server.lost, "the server sees the connection closed")


class EndlessHeaders(Protocol):
    """A broken rspamd: answers a request with a status line, then header lines without end, as fast as the
    connection takes them (a pull producer: what it counts as sent is what the kernel took, give or take a
    write), until `LIMIT` octets, when it closes."""

    LIMIT = 16 * 1024 * 1024
    LINE = b"X-Hn: " + b"a" * 1000 + b"\r\n"

    def __init__(self, sent: list[int], lost: list[bool]) -> None:
        self.sent, self.lost = sent, lost
        self.started = False

    def dataReceived(self, data: bytes) -> None:
        if self.started:
            return
        self.started = True
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        self._write(b"HTTP/1.1 200 OK\r\n")
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.sent[0] >= self.LIMIT:
            self.transport.unregisterProducer()
            self.transport.loseConnection()
            return
        self._write(self.LINE * 16)

    def stopProducing(self) -> None:
        pass

    def _write(self, data: bytes) -> None:
        self.sent[0] += len(data)
        self.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(True)


@pytest_twisted.ensureDeferred
async def test_endless_answer_headers_are_cut_off() -> None:
    """Everything read on the connection is bounded, the status line and header fields too (Twisted's parser
    would keep any number of header lines): past the answer's bound and `MAX_HEAD`, the check fails and the
    connection is closed."""
    sent, lost = [0], []
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: EndlessHeaders(sent, lost)), interface="127.0.0.1")
    try:
        with pytest.raises(RspamdError, match="longer than the 66536 octets read on a connection"):
            await RspamdFilter(f"http://127.0.0.1:{port.getHost().port}", max_answer=1000).check(held())
        await until(lambda: lost, "the fake sees the connection closed")
    finally:
        await port.stopListening()
    assert MAX_HEAD < sent[0] < MAX_HEAD + 1000 + 1024 * 1024  # the bound, and what was in flight when cut


@pytest_twisted.ensureDeferred
async def test_long_answer_headers_within_the_bound_are_read(fake: tuple[FakeRspamd, str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    server, url = fake
    original = FakeRspamd.render_POST

    def padded(self: FakeRspamd, request: Request) -> Any:
        for n in range(40):
            request.setHeader(f"X-Pad-{n}", "p" * 1000)
        return original(self, request)

    monkeypatch.setattr(FakeRspamd, "render_POST", padded)
    verdict = await ask(url, answer("reject"), server, max_answer=1000)
    assert verdict.action is Action.REJECT


@pytest_twisted.ensureDeferred
async def test_a_stopped_rspamd_raises() -> None:
    port = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    await port.stopListening()
    with pytest.raises(ConnectError):
        await RspamdFilter(url).check(held())


def test_from_spec_takes_the_url_and_options_and_connects_to_nothing() -> None:
    made = from_spec("http://127.0.0.1:11333", {"password": "pw", "header": "X-Is-Spam", "pass": "all",
                                                "name": "rspamd-in", "timeout": "7.5", "on-failure": "accept"})
    assert IFilter.providedBy(made) and made.stateless
    assert (made.endpoint, made.password, made.header, made.pass_all) == (
        "http://127.0.0.1:11333/checkv2", "pw", "X-Is-Spam", True)
    assert (made.name, made.timeout, made.on_failure) == ("rspamd-in", 7.5, Action.ACCEPT)
    plain = from_spec("https://rspamd.example/scan/", {})
    assert (plain.endpoint, plain.name, plain.timeout, plain.on_failure, plain.header, plain.pass_all) == (
        "https://rspamd.example/scan/checkv2", "rspamd", None, None, "X-Spam", False)


@pytest.mark.parametrize("target, options, complaint", [
    ("127.0.0.1:11333", {}, "not an http:// or https:// URL"),
    ("ftp://127.0.0.1/", {}, "not an http"),
    ("http://", {}, "not an http"),
    ("http://127.0.0.1:99999", {}, "not an http"),
    ("http://127.0.0.1:11333/?x=1", {}, "not an http"),
    ("http://127.0.0.1:11333", {"passwd": "x"}, "unknown option 'passwd'"),
    ("http://127.0.0.1:11333", {"timeout": "soon"}, "not 'soon'"),
    ("http://127.0.0.1:11333", {"timeout": "0"}, "above 0"),
    ("http://127.0.0.1:11333", {"timeout": "inf"}, "above 0"),
    ("http://127.0.0.1:11333", {"on-failure": "discard"}, "tempfail or accept"),
    ("http://127.0.0.1:11333", {"header": "X Spam"}, "not a header field name"),
    ("http://127.0.0.1:11333", {"pass": "some"}, "one value, all"),
])
def test_from_spec_refuses_in_one_sentence(target: str, options: dict[str, str], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint) as raised:
        from_spec(target, options)
    assert "\n" not in str(raised.value)



def test_the_docs_page_example_prints_what_the_page_shows() -> None:
    page = blocks(DOCS / "filters" / "rspamd.md")
    [code] = [b for b in page if b.language == "python"]
    [shown] = [b for b in page if b.language == "text" and "checkv2" in b.text]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.text, code.where, "exec"), {"__name__": "docs"})
    assert printed.getvalue() == shown.text


def test_the_docs_page_command_makes_the_filter_it_describes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # its handler's Maildir is made where the reader runs the command
    [command] = [b for b in blocks(DOCS / "filters" / "rspamd.md") if b.language == "sh"]
    options = tap.Options()
    options.parseOptions(shlex.split(command.text)[3:])
    [made] = options["filter-chain"].filters
    assert isinstance(made, RspamdFilter)
    assert (made.endpoint, made.timeout) == ("http://127.0.0.1:11333/checkv2", 20.0)


def test_from_spec_leaves_the_reactor_alone() -> None:
    """Made while ``twistd`` reads its options, the filter must not install the default reactor (twistd installs
    the one asked for); it looks it up at its first check."""
    code = ("import sys; from esmtpkit.filters.rspamd import from_spec; from_spec('http://127.0.0.1:11333', {}); "
            "print('twisted.internet.reactor' in sys.modules)")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (ran.returncode, ran.stdout.strip()) == (0, "False"), ran.stderr
