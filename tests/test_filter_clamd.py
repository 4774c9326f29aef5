"""`ClamdFilter` and the stream it sends, without clamd: a `StringTransport` per connection (what is written, when
the message is read, answers in pieces, garbage, an answer too long, a close too early, cancellation) and a tiny
fake clamd on 127.0.0.1 for the same over real sockets."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from esmtpkit.core.session import Session
from esmtpkit.filters import Action, FilterChain
from esmtpkit.filters.clamd import ANSWER_LIMIT, CHUNK, ClamdError, ClamdFilter, from_spec, safe_name
from esmtpkit.filters.stream import FilterProtocolError

from .docblocks import DOCS, example_output, said_printed
from .filterfakes import Endpoint, Held, pump, results, spec_mistake

PAGE = DOCS / "filters" / "clamd.md"


def framed(data: bytes, size: int = CHUNK) -> bytes:
    out = b"zINSTREAM\0"
    for start in range(0, len(data), size):
        piece = data[start:start + size]
        out += struct.pack(">I", len(piece)) + piece
    return out + struct.pack(">I", 0)


def start(data: bytes = b"Subject: hi\r\n\r\nhello\r\n", **options: Any) -> tuple[Held, Deferred[Any], Any,
                                                                                 StringTransport, Endpoint]:
    endpoint = Endpoint()
    held = Held(data)
    d = ClamdFilter(endpoint, **options).check(held.message)
    protocol, transport = endpoint.accept()
    return held, d, protocol, transport, endpoint


def answered(answer: bytes, **options: Any) -> Any:
    held, d, protocol, transport, _ = start(**options)
    pump(transport)
    found = results(d)
    protocol.dataReceived(answer)
    assert found, "no verdict yet"
    assert transport.disconnecting and transport.producer is None
    assert held.opened[0].closed
    return found[0]


def test_the_message_is_framed_and_read_only_as_the_connection_drains() -> None:
    data = b"Subject: big\r\n\r\n" + bytes(range(256)) * 1000  # 256016 octets: four chunks and a bit
    held, d, protocol, transport, _ = start(data)
    assert transport.value() == b"zINSTREAM\0" and held.opened == []  # nothing read before it is asked for
    transport.producer.resumeProducing()
    assert held.opened[0].read_octets == CHUNK and len(transport.value()) == 10 + 4 + CHUNK
    transport.producer.resumeProducing()
    assert held.opened[0].read_octets == 2 * CHUNK
    pump(transport)
    assert transport.value() == framed(data)
    found = results(d)
    assert not transport.disconnecting and found == []
    protocol.dataReceived(b"stream: OK\0")
    assert found[0].action is Action.CONTINUE


def test_an_empty_message_is_an_empty_stream() -> None:
    held, d, protocol, transport, _ = start(b"")
    pump(transport)
    assert transport.value() == b"zINSTREAM\0" + struct.pack(">I", 0)


def test_ok_continues_and_may_add_a_field() -> None:
    assert answered(b"stream: OK\0").edits == ()
    marked = answered(b"stream: OK\0", header=True)
    assert [(e.kind, e.name, e.value) for e in marked.edits] == [("add", "X-Virus-Scanned", "clamav")]


def test_a_virus_is_refused_naming_it() -> None:
    verdict = answered(b"stream: Win.Test.EICAR_HDB-1 FOUND\0")
    assert verdict.action is Action.REJECT
    assert (verdict.reply.code, verdict.reply.enhanced, verdict.reply.text) == (554, "5.7.1",
                                                                               "Virus found: Win.Test.EICAR_HDB-1")
    assert verdict.details == {"signature": "Win.Test.EICAR_HDB-1"}


def test_a_virus_discarded_or_quarantined_as_configured() -> None:
    for action in ("discard", "quarantine"):
        verdict = answered(b"stream: Eicar FOUND\0", action=action)
        assert (verdict.action.value, verdict.reply, verdict.reason) == (action, None, "virus found: Eicar")


def test_the_name_is_made_safe() -> None:
    verdict = answered(b"stream: Bad\x1b[31m Name\r\n250 OK\xff" + b"x" * 300 + b" FOUND\0")
    name = verdict.details["signature"]
    assert name.startswith("Bad?") and len(name) == 100 and name.isprintable() and " " not in name
    assert verdict.reply.text == f"Virus found: {name}"
    assert safe_name("") == "?"


def test_an_answer_in_pieces() -> None:
    held, d, protocol, transport, _ = start()
    pump(transport)
    found = results(d)
    for piece in (b"str", b"eam: Eic", b"ar FOUND"):
        protocol.dataReceived(piece)
        assert found == [] and not transport.disconnecting
    protocol.dataReceived(b"\0")
    assert found[0].action is Action.REJECT


def test_too_big_is_accepted_with_a_log_line_or_as_configured() -> None:
    with capturedLogs() as events:
        verdict = answered(b"INSTREAM size limit exceeded. ERROR\0")
    assert verdict.action is Action.CONTINUE and verdict.details["too_big"] is True
    assert any("StreamMaxLength" in e.get("log_format", "") for e in events)
    tempfailed = answered(b"INSTREAM size limit exceeded. ERROR\0", too_big="tempfail")
    refused = answered(b"INSTREAM size limit exceeded. ERROR\0", too_big="reject")
    assert (tempfailed.action, tempfailed.reply.code, tempfailed.reply.enhanced) == (Action.TEMPFAIL, 451, "4.3.4")
    assert (refused.action, refused.reply.code, refused.reply.enhanced) == (Action.REJECT, 552, "5.3.4")


def test_an_early_answer_stops_the_stream() -> None:
    """clamd answers as soon as the stream is too long, while the rest is still being sent: stop sending."""
    held, d, protocol, transport, _ = start(b"x" * (10 * CHUNK))
    transport.producer.resumeProducing()
    producer = transport.producer
    protocol.dataReceived(b"INSTREAM size limit exceeded. ERROR\0")
    assert results(d)[0].details["too_big"] is True
    assert transport.producer is None and transport.disconnecting and held.opened[0].closed
    producer.resumeProducing()  # a late call from the transport writes nothing more
    assert len(transport.value()) == 10 + 4 + CHUNK


@pytest.mark.parametrize("answer, error", [
    (b"stream: Can't allocate memory ERROR\0", ClamdError),
    (b"UNKNOWN COMMAND\0", FilterProtocolError),
    (b"stream: OKAY\0", FilterProtocolError),
    (b"\0", FilterProtocolError),
])
def test_errors_and_garbage_raise(answer: bytes, error: type[Exception]) -> None:
    failure = answered(answer)
    assert isinstance(failure, Failure) and failure.check(error)


def test_an_answer_too_long_raises_and_closes() -> None:
    held, d, protocol, transport, _ = start()
    pump(transport)
    found = results(d)
    protocol.dataReceived(b"A" * ANSWER_LIMIT)
    assert found == [] and not transport.disconnecting
    protocol.dataReceived(b"A")
    assert found[0].check(FilterProtocolError) and "longer than 4096" in found[0].getErrorMessage()
    assert transport.disconnecting


def test_a_close_before_the_whole_answer_raises() -> None:
    held, d, protocol, transport, _ = start(b"y" * (3 * CHUNK))
    transport.producer.resumeProducing()
    protocol.dataReceived(b"stream: OK")  # no NUL yet
    protocol.connectionLost(Failure(ConnectionError("reset")))
    (failure,) = results(d)
    assert failure.check(FilterProtocolError) and "b'stream: OK'" in failure.getErrorMessage()
    assert held.opened[0].closed


def test_a_refused_connection_raises_and_reads_nothing() -> None:
    endpoint = Endpoint()
    held = Held(b"x")
    d = ClamdFilter(endpoint).check(held.message)
    endpoint.refuse(ConnectionRefusedError("refused"))
    assert results(d)[0].check(ConnectionRefusedError)
    assert held.opened == []


def test_a_message_that_cannot_be_read_raises_and_closes() -> None:
    endpoint = Endpoint()
    held = Held(b"x" * (3 * CHUNK), fail_after=CHUNK)
    d = ClamdFilter(endpoint).check(held.message)
    _, transport = endpoint.accept()
    transport.producer.resumeProducing()
    transport.producer.resumeProducing()
    assert results(d)[0].check(OSError)
    assert transport.disconnecting and transport.producer is None


def test_cancelling_closes_the_connection_and_the_message() -> None:
    held, d, protocol, transport, _ = start(b"z" * (3 * CHUNK))
    transport.producer.resumeProducing()
    d.cancel()
    assert results(d)[0].check(CancelledError)
    assert transport.disconnecting and transport.producer is None and held.opened[0].closed
    protocol.dataReceived(b"stream: OK\0")  # too late: nothing fires twice
    protocol.connectionLost(Failure(ConnectionError()))


def test_cancelling_while_connecting_stops_the_connecting() -> None:
    endpoint = Endpoint()
    d = ClamdFilter(endpoint).check(Held(b"x").message)
    d.cancel()
    assert results(d)[0].check(CancelledError)
    assert endpoint.cancelled == 1


def test_the_chains_timeout_closes_the_connection() -> None:
    endpoint = Endpoint()
    clock = Clock()
    held = Held(b"x" * 100)
    chain = FilterChain([ClamdFilter(endpoint, timeout=5)], reactor=clock).start(Session(hostname="mx.test"))
    found = results(Deferred.fromCoroutine(chain.stage("message", held.message)))
    _, transport = endpoint.accept()
    pump(transport)
    clock.advance(5)
    assert (found[0].action, found[0].reply.code) == (Action.TEMPFAIL, 451)
    assert transport.disconnecting and held.opened[0].closed


# ---- from_spec ---------------------------------------------------------------------------------------------------

def test_from_spec_makes_endpoints_and_connects_only_to_check() -> None:
    memory = MemoryReactor()
    tcp = from_spec("tcp:127.0.0.1:3310", {"name": "av", "timeout": "7.5", "on-failure": "accept",
                                           "action": "quarantine", "too-big": "reject", "header": "yes"},
                    reactor=memory)
    unix = from_spec("unix:/run/clamav/clamd.ctl", {}, reactor=memory)
    named = from_spec("tcp:host=127.0.0.1:port=3311", {}, reactor=memory)
    assert memory.tcpClients == [] and memory.unixClients == []
    assert (tcp.name, tcp.timeout, tcp.on_failure, tcp.action, tcp.too_big, tcp.header) == (
        "av", 7.5, Action.ACCEPT, Action.QUARANTINE, Action.REJECT, True)
    assert (unix.name, unix.timeout, unix.on_failure, unix.action, unix.too_big, unix.header) == (
        "clamd", None, None, Action.REJECT, Action.CONTINUE, False)
    tcp.check(Held(b"x").message)
    unix.check(Held(b"x").message)
    named.check(Held(b"x").message)
    assert [c[:2] for c in memory.tcpClients] == [("127.0.0.1", 3310), ("127.0.0.1", 3311)]
    assert [c[0] for c in memory.unixClients] == ["/run/clamav/clamd.ctl"]


def test_from_spec_without_a_reactor_installs_none() -> None:
    made = from_spec("tcp:127.0.0.1:3310", {})
    assert made.endpoint.target == "tcp:127.0.0.1:3310"


@pytest.mark.parametrize("target, options, says", [
    ("127.0.0.1:3310", {}, "'127.0.0.1:3310' is not a client endpoint"),
    ("tcp:127.0.0.1", {}, "'tcp:127.0.0.1' is not a client endpoint"),
    ("tcp:127.0.0.1:port", {}, "'tcp:127.0.0.1:port' is not a client endpoint"),
    ("unix:", {}, "'unix:' names no socket path"),
    ("tcp:127.0.0.1:99999999", {}, "the port is a number from 1 to 65535, not '99999999'"),
    ("tcp:127.0.0.1:-5", {}, "the port is a number from 1 to 65535, not '-5'"),
    ("tcp:127.0.0.1:3310:bindAddress=zzz", {}, "bindAddress is an IP address, not 'zzz'"),
    ("tcp:127.0.0.1:3310:timeout=never", {}, "timeout is a whole number of seconds above 0, not 'never'"),
    ("unix:/run/clamav/clamd.ctl:checkPID=1", {}, "'checkPID' is not one of path, timeout"),
    ("ssl:127.0.0.1:3310", {}, "'ssl:127.0.0.1:3310' is not a client endpoint"),
    ("tcp:127.0.0.1:3310", {"action": "bounce"}, "action is one of reject, discard, quarantine, not 'bounce'"),
    ("tcp:127.0.0.1:3310", {"too-big": "discard"}, "too-big is one of accept, tempfail, reject, not 'discard'"),
    ("tcp:127.0.0.1:3310", {"header": "maybe"}, "header is yes or no, not 'maybe'"),
    ("tcp:127.0.0.1:3310", {"timeout": "0"}, "timeout is a number of seconds above 0, not '0'"),
    ("tcp:127.0.0.1:3310", {"timeout": "inf"}, "timeout is a number of seconds above 0, not 'inf'"),
    ("tcp:127.0.0.1:3310", {"on-failure": "reject"}, "on-failure is tempfail or accept, not 'reject'"),
    ("tcp:127.0.0.1:3310", {"size": "1"}, "unknown option 'size'"),
])
def test_from_spec_refuses_in_one_sentence(target: str, options: dict[str, str], says: str) -> None:
    assert says in spec_mistake(from_spec, target, options)


def test_the_registry_builds_it_and_names_the_kind() -> None:
    from esmtpkit.filters.registry import build

    made = build("clamd:unix:/run/clamav/clamd.ctl,action=discard", reactor=MemoryReactor())
    assert isinstance(made, ClamdFilter) and made.action is Action.DISCARD
    with pytest.raises(ValueError, match=r"^clamd: action is one of"):
        build("clamd:unix:/run/clamav/clamd.ctl,action=drop", reactor=MemoryReactor())


# ---- a fake clamd on 127.0.0.1 ------------------------------------------------------------------------------------

class FakeClamd(Protocol):
    """Reads the stream; answers ``answer`` once ``after`` octets came (``after`` None: at the zero length)."""

    answer = b"stream: OK\0"
    after: int | None = None

    def connectionMade(self) -> None:
        self.received = bytearray()
        self.factory.connections.append(self)
        self.answered = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        whole = self.after is None and self.received.endswith(struct.pack(">I", 0))
        if not self.answered and (whole or (self.after is not None and len(self.received) >= self.after)):
            self.answered = True
            self.transport.write(self.answer)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.factory.lost.append(bytes(self.received))


async def fake_clamd(protocol: Callable[[], Protocol]) -> Any:
    factory = Factory.forProtocol(protocol)
    factory.connections = []  # type: ignore[attr-defined]
    factory.lost = []  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return factory, port


async def wait_lost(factory: Any, count: int) -> None:
    from twisted.internet.task import deferLater

    for _ in range(2000):
        if len(factory.lost) >= count:
            return
        await deferLater(reactor, 0.005, lambda: None)
    raise AssertionError("the fake clamd's connection was not closed")


@pytest_twisted.ensureDeferred
async def test_a_long_message_over_a_real_socket() -> None:
    """5 MB streamed through loopback in bounded pieces, answered at the end."""
    factory, port = await fake_clamd(FakeClamd)
    try:
        data = b"Subject: long\r\n\r\n" + b"0123456789abcdef" * (5 * 2 ** 16)
        held = Held(data)
        made = from_spec(f"tcp:127.0.0.1:{port.getHost().port}", {}, reactor=reactor)
        assert (await made.check(held.message)).action is Action.CONTINUE
        await wait_lost(factory, 1)
        assert factory.lost[0] == framed(data)
        assert held.opened[0].closed
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_endless_answer_over_a_real_socket_is_cut() -> None:
    class Babbler(FakeClamd):
        answer = b"X" * (ANSWER_LIMIT * 4)
        after = 1

    factory, port = await fake_clamd(Babbler)
    try:
        made = from_spec(f"tcp:127.0.0.1:{port.getHost().port}", {}, reactor=reactor)
        with pytest.raises(FilterProtocolError, match="longer than 4096"):
            await made.check(Held(b"x" * (20 * CHUNK)).message)
        await wait_lost(factory, 1)
    finally:
        await port.stopListening()


# ---- docs/filters/clamd.md ---------------------------------------------------------------------------------------

def test_the_pages_python_example_prints_what_the_page_says(tmp_path: Path) -> None:
    """Run as a reader would (``python -`` from an empty folder, the installed package): nothing connects."""
    assert example_output(PAGE, tmp_path) == said_printed(PAGE) + "\n"
