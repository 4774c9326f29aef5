"""`SpamdFilter` without spamd: the request it sends, the answers it takes (in pieces, with and without
Content-length, non-zero codes, garbage, too long, an early close), the fields it adds, cancellation, and a tiny fake
spamd on 127.0.0.1. The StringTransport endpoint and counting message are `tests.filterfakes`'."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from esmtpkit.filters import Action
from esmtpkit.filters.spamd import (ANSWER_LIMIT, MAX_SIZE, SpamdAnswer, SpamdError, SpamdFilter, from_spec,
                                    parse_answer)
from esmtpkit.filters.stream import FilterProtocolError

from .docblocks import DOCS, blocks, example_output, said_printed
from .filterfakes import Endpoint, Held, pump, results, spec_mistake

PAGE = DOCS / "filters" / "spamd.md"

MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n"
SPAM = b"SPAMD/1.1 0 EX_OK\r\nContent-length: 22\r\nSpam: True ; 1003.3 / 5.0\r\n\r\nGTUBE,MISSING_DATE,X_1"
HAM = b"SPAMD/1.1 0 EX_OK\r\nContent-length: 11\r\nSpam: False ; -0.1 / 5.0\r\n\r\nNO_RECEIVED"


def start(data: bytes = MESSAGE, **options: Any) -> tuple[Held, Any, Any, Any]:
    endpoint = Endpoint()
    held = Held(data)
    d = SpamdFilter(endpoint, **options).check(held.message)
    protocol, transport = endpoint.accept()
    return held, d, protocol, transport


def answered(answer: bytes, close: bool = False, **options: Any) -> Any:
    held, d, protocol, transport = start(**options)
    pump(transport)
    found = results(d)
    protocol.dataReceived(answer)
    if close:
        protocol.connectionLost(Failure(ConnectionError("closed")))
    assert found, "no verdict yet"
    assert held.opened[0].closed
    return found[0]


def edits(verdict: Any) -> list[tuple[str, str, str]]:
    return [(e.kind, e.name, e.value) for e in verdict.edits]


def test_the_request() -> None:
    held, d, protocol, transport = start(user="bob")
    pump(transport)
    assert transport.value() == (b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\nUser: bob\r\n\r\n" % len(MESSAGE)
                                 + MESSAGE)
    _, _, _, plain = start()
    pump(plain)
    assert plain.value().startswith(b"SYMBOLS SPAMC/1.5\r\nContent-length: 43\r\n\r\nFrom:")


def test_the_message_is_read_only_as_the_connection_drains() -> None:
    data = b"Subject: x\r\n\r\n" + b"y" * 200_000
    held, d, protocol, transport = start(data)
    assert held.opened == []
    transport.producer.resumeProducing()
    assert held.opened[0].read_octets == 65536
    pump(transport)
    assert transport.value().endswith(data) and held.opened[0].read_octets == len(data)


def test_spam_is_marked() -> None:
    verdict = answered(SPAM)
    assert verdict.action is Action.CONTINUE
    assert edits(verdict) == [("delete", "X-Spam-Flag", ""), ("delete", "X-Spam-Status", ""),
                              ("add", "X-Spam-Flag", "YES"),
                              ("add", "X-Spam-Status", "Yes, score=1003.3 required=5.0 tests=GTUBE,MISSING_DATE,X_1")]
    assert verdict.details == {"spam": True, "score": 1003.3, "threshold": 5.0,
                               "symbols": ["GTUBE", "MISSING_DATE", "X_1"]}


def test_ham_gets_its_status_only() -> None:
    verdict = answered(HAM)
    assert edits(verdict) == [("delete", "X-Spam-Flag", ""), ("delete", "X-Spam-Status", ""),
                              ("add", "X-Spam-Status", "No, score=-0.1 required=5.0 tests=NO_RECEIVED")]
    assert verdict.details["spam"] is False


def test_a_score_at_the_reject_score_is_refused() -> None:
    verdict = answered(SPAM, reject_score=1003.3)
    assert (verdict.action, verdict.reply.code, verdict.reply.enhanced) == (Action.REJECT, 550, "5.7.1")
    assert verdict.details["score"] == 1003.3
    assert answered(SPAM, reject_score=1003.4).action is Action.CONTINUE
    assert answered(HAM, reject_score=-0.1).action is Action.REJECT


def test_an_answer_in_pieces() -> None:
    held, d, protocol, transport = start()
    pump(transport)
    found = results(d)
    for piece in (SPAM[:5], SPAM[5:20], SPAM[20:60], SPAM[60:-1]):
        protocol.dataReceived(piece)
        assert found == [] and not transport.disconnecting
    protocol.dataReceived(SPAM[-1:])
    assert found[0].details["symbols"] == ["GTUBE", "MISSING_DATE", "X_1"]
    assert transport.disconnecting


def test_without_content_length_the_close_ends_the_answer() -> None:
    held, d, protocol, transport = start()
    pump(transport)
    found = results(d)
    protocol.dataReceived(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 7.5 / 5.0\r\n\r\nA,B")
    assert found == []
    protocol.connectionLost(Failure(ConnectionError("closed")))
    assert found[0].details["symbols"] == ["A", "B"]


def test_symbols_that_are_not_names_are_left_out() -> None:
    verdict = answered(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 0 / 5\r\n\r\nOK_1, bad name,\x1b[1m,,X\r\n", close=True)
    assert verdict.details["symbols"] == ["OK_1", "X"]
    assert verdict.details["threshold"] == 5.0


def test_a_non_zero_code_raises_at_once() -> None:
    """spamd may answer an error before it has read the message: the answer is taken as it comes."""
    held, d, protocol, transport = start(b"x" * 300_000)
    transport.producer.resumeProducing()
    protocol.dataReceived(b"SPAMD/1.0 76 Bad header line: (Content-Length mismatch: Expected 3 bytes, got 1)\r\n")
    (failure,) = results(d)
    assert failure.check(SpamdError) and "76 Bad header line" in failure.getErrorMessage()
    assert transport.disconnecting and transport.producer is None and held.opened[0].closed


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\n",
    b"SPAMD/1.1 0 EX_OK\r\nContent-length: 3\r\nSpam: maybe\r\n\r\nA,B",
    b"SPAMD/1.1 0 EX_OK\r\nContent-length: 3\r\n\r\nA,B",
    b"SPAMD/1.1 0 EX_OK\r\nContent-length: three\r\nSpam: True ; 1 / 5\r\n\r\nA,B",
    b"SPAMD/1.1 0 EX_OK\r\nnot a field\r\n\r\n",
])
def test_garbage_raises(answer: bytes) -> None:
    failure = answered(answer, close=True)
    assert isinstance(failure, Failure) and failure.check(FilterProtocolError)


def test_an_answer_too_long_raises_and_closes() -> None:
    held, d, protocol, transport = start()
    pump(transport)
    found = results(d)
    protocol.dataReceived(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 999999\r\nSpam: True ; 1 / 5\r\n\r\n")
    protocol.dataReceived(b"A," * (ANSWER_LIMIT // 2))
    assert found[0].check(FilterProtocolError) and "longer than 65536" in found[0].getErrorMessage()
    assert transport.disconnecting


@pytest.mark.parametrize("partial", [b"", b"SPAMD/1.1 0 EX", b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1 / 5\r\n",
                                     b"SPAMD/1.1 0 EX_OK\r\nContent-length: 9\r\nSpam: True ; 1 / 5\r\n\r\nA,B"])
def test_a_close_before_the_whole_answer_raises(partial: bytes) -> None:
    failure = answered(partial, close=True)
    assert failure.check(FilterProtocolError)


def test_a_message_that_is_not_its_size_raises() -> None:
    endpoint = Endpoint()
    held = Held(MESSAGE)
    short = held.message.__class__(held.message.session, b"", len(MESSAGE) + 1, held.message.opener)
    d = SpamdFilter(endpoint).check(short)
    _, transport = endpoint.accept()
    pump(transport)
    assert results(d)[0].check(FilterProtocolError)
    assert transport.disconnecting


def test_a_message_above_max_size_is_not_sent() -> None:
    endpoint = Endpoint()
    with capturedLogs() as events:
        verdict = results(SpamdFilter(endpoint, max_size=10).check(Held(MESSAGE).message))[0]
    assert endpoint.pending == []
    assert (verdict.action, verdict.edits, verdict.details) == (Action.CONTINUE, (), {"too_big": True, "size": 43})
    assert any("max-size" in e.get("log_format", "") for e in events)


def test_cancelling_closes_the_connection_and_the_message() -> None:
    held, d, protocol, transport = start(b"z" * 300_000)
    transport.producer.resumeProducing()
    d.cancel()
    assert results(d)[0].check(CancelledError)
    assert transport.disconnecting and held.opened[0].closed


def test_parse_answer_waits_for_more() -> None:
    assert parse_answer(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1 / 5\r\n", False) is None
    assert parse_answer(b"SPAMD/1.5 0 EX_OK\r\nContent-length: 1\r\nSpam: Yes ; 6 / 5\r\n\r\nA", False) == \
        SpamdAnswer(True, 6.0, 5.0, ("A",))


# ---- from_spec ---------------------------------------------------------------------------------------------------

def test_from_spec() -> None:
    memory = MemoryReactor()
    made = from_spec("tcp:127.0.0.1:783", {"user": "mail", "reject-score": "12.5", "max-size": "1000000",
                                           "timeout": "30", "on-failure": "accept", "name": "sa"}, reactor=memory)
    assert (made.name, made.user, made.reject_score, made.max_size, made.timeout, made.on_failure) == (
        "sa", "mail", 12.5, 1_000_000, 30.0, Action.ACCEPT)
    plain = from_spec("unix:/run/spamd.sock", {}, reactor=memory)
    assert (plain.name, plain.user, plain.reject_score, plain.max_size) == ("spamd", None, None, MAX_SIZE)
    assert memory.tcpClients == [] and memory.unixClients == []
    made.check(Held(MESSAGE).message)
    plain.check(Held(MESSAGE).message)
    assert [c[:2] for c in memory.tcpClients] == [("127.0.0.1", 783)]
    assert [c[0] for c in memory.unixClients] == ["/run/spamd.sock"]


@pytest.mark.parametrize("target, options, says", [
    ("localhost:783", {}, "'localhost:783' is not a client endpoint"),
    ("tcp:127.0.0.1:65536", {}, "the port is a number from 1 to 65535, not '65536'"),
    ("unix:", {}, "'unix:' names no socket path"),
    ("tcp:127.0.0.1:783", {"user": "two words"}, "user is one word of printable ASCII"),
    ("tcp:127.0.0.1:783", {"user": "a\r\nb"}, "user is one word of printable ASCII"),
    ("tcp:127.0.0.1:783", {"reject-score": "high"}, "reject-score is a number, not 'high'"),
    ("tcp:127.0.0.1:783", {"reject-score": "nan"}, "reject-score is a number, not 'nan'"),
    ("tcp:127.0.0.1:783", {"max-size": "0"}, "max-size is a number of octets above 0, not '0'"),
    ("tcp:127.0.0.1:783", {"max-size": "1k"}, "max-size is a number of octets above 0, not '1k'"),
    ("tcp:127.0.0.1:783", {"timeout": "-1"}, "timeout is a number of seconds above 0"),
    ("tcp:127.0.0.1:783", {"score": "5"}, "unknown option 'score'"),
])
def test_from_spec_refuses_in_one_sentence(target: str, options: dict[str, str], says: str) -> None:
    assert says in spec_mistake(from_spec, target, options)


# ---- a fake spamd on 127.0.0.1 ------------------------------------------------------------------------------------

class FakeSpamd(Protocol):
    """Reads the request up to its Content-length, then answers spam and closes, as spamd does."""

    def connectionMade(self) -> None:
        self.received = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        head, blank, body = bytes(self.received).partition(b"\r\n\r\n")
        if blank and len(body) >= int(head.split(b"Content-length: ")[1].split(b"\r\n")[0]):
            self.factory.requests.append(bytes(self.received))
            self.transport.write(SPAM)
            self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_over_a_real_socket() -> None:
    factory = Factory.forProtocol(FakeSpamd)
    factory.requests = []  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        data = b"Subject: long\r\n\r\n" + b"spam and eggs\r\n" * 30_000
        held = Held(data)
        made = from_spec(f"tcp:127.0.0.1:{port.getHost().port}", {"user": "bob"}, reactor=reactor)
        verdict = await made.check(held.message)
        assert verdict.details["score"] == 1003.3
        assert factory.requests == [b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\nUser: bob\r\n\r\n" % len(data)
                                    + data]
        assert held.opened[0].closed
    finally:
        await port.stopListening()


# ---- docs/filters/spamd.md ---------------------------------------------------------------------------------------

def test_the_pages_python_example_prints_what_the_page_says(tmp_path: Path) -> None:
    """Run as a reader would (``python -`` from an empty folder, the installed package): nothing connects."""
    assert example_output(PAGE, tmp_path) == said_printed(PAGE) + "\n"


def test_the_pages_answer_example_is_what_parse_answer_takes() -> None:
    """The page's example answer (its Content-length right) and the status field it says it becomes."""
    (answer,) = [b.text for b in blocks(PAGE) if b.language == "text" and b.text.startswith("SPAMD/")]
    parsed = parse_answer(answer.rstrip("\n").replace("\n", "\r\n").encode(), False)
    assert parsed == SpamdAnswer(True, 1003.3, 5.0, ("GTUBE", "MISSING_DATE", "NO_RECEIVED"))
    status = [e.value for e in SpamdFilter(Endpoint()).verdict(parsed).edits
              if (e.kind, e.name) == ("add", "X-Spam-Status")]
    assert f"`X-Spam-Status: {status[0]}`" in PAGE.read_text()
