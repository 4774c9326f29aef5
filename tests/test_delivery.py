"""Delivery to a domain's hops: a fake ``send`` for the rules, then the real client against scripted MXes."""

from __future__ import annotations

import io
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactor
from twisted.logger import capturedLogs, formatEvent

from esmtpkit.client.delivery import Deliverer
from esmtpkit.client.mx import Hop, MXRouter, RouteError, Smarthost
from esmtpkit.client.options import ClientOptions, Timeouts
from esmtpkit.client.session import Attempt
from esmtpkit.core.outbound import Message, Outcome, Recipient
from esmtpkit.core.reply import Reply
from tests.mailnet import MX_ADDRESSES, PrivateDNS, ScriptedMX, listen_all, stop_all

MX1 = Hop("mx1.example.net", "127.0.0.2", 25, 10)
MX2 = Hop("mx2.example.net", "127.0.0.3", 25, 20)
MX3 = Hop("mx3.example.net", "127.0.0.4", 25, 30)

OK = Outcome(250, "2.0.0", "queued", "remote")
UNKNOWN_USER = Outcome(550, "5.1.1", "no such user", "remote")
MAILBOX_BUSY = Outcome(450, "4.2.1", "try later", "remote")


def refused_by(hop: Hop) -> Outcome:
    return Outcome.local(451, "4.4.1", f"connect to {hop.label}: Connection refused")


class FakeRouter:
    def __init__(self, result: Any) -> None:
        self.result = result
        self.domains: list[str] = []

    def route(self, domain: str) -> "Deferred[list[Hop]]":
        self.domains.append(domain)
        if isinstance(self.result, Exception):
            return fail(self.result)
        return succeed(list(self.result))


class FakeSend:
    """Answers each host from a script: its name -> callable(indexes) -> Attempt (or an exception to raise)."""

    def __init__(self, **script: Callable[[list[int]], Any]) -> None:
        self.script = script
        self.calls: list[tuple[str, list[int], Any]] = []

    def __call__(self, reactor: Any, endpoint: Any, message: Message, open_content: Any, options: ClientOptions,
                 *, indexes: list[int], host: str) -> "Deferred[Attempt]":
        self.calls.append((host, list(indexes), endpoint))
        result = self.script[host.partition("[")[0]](list(indexes))
        if isinstance(result, Exception):
            raise result
        return succeed(result)


def all_get(outcome: Outcome, failed: bool = True) -> Callable[[list[int]], Attempt]:
    return lambda indexes: Attempt("", {i: outcome for i in indexes}, failed)


def message(*addresses: str) -> Message:
    return Message("m1", "alice@example.org", [Recipient(a) for a in addresses], size=10)


def content() -> io.BytesIO:
    return io.BytesIO(b"Subject: hi\r\n\r\nhello\r\n")


def deliver(router: Any, send: FakeSend, msg: Message, indexes: list[int], **kwargs: Any) -> dict[int, Outcome]:
    d = Deliverer(MemoryReactor(), router, ClientOptions(), send=send, endpoint_for=lambda hop: hop.label,
                  **kwargs).deliver(msg, indexes, content)
    results: list[Any] = []
    d.addBoth(results.append)
    [result] = results
    assert isinstance(result, dict)
    return result


THREE = message("a@example.net", "b@example.net", "c@example.net")


# ---- fake send: the rules ---------------------------------------------------------------------------------------

def test_route_error_answers_every_recipient() -> None:
    null_mx = Outcome.local(556, "5.1.10", "Domain example.net does not accept mail (null MX)")
    router, send = FakeRouter(RouteError(null_mx)), FakeSend()
    assert deliver(router, send, THREE, [0, 2]) == {0: null_mx, 2: null_mx}
    assert router.domains == ["example.net"]
    assert send.calls == []


def test_nothing_to_deliver() -> None:
    router = FakeRouter([MX1])
    assert deliver(router, FakeSend(), THREE, []) == {}
    assert router.domains == []


def test_best_hop_takes_everything() -> None:
    send = FakeSend(**{"mx1.example.net": all_get(OK, failed=False)})
    assert deliver(FakeRouter([MX1, MX2]), send, THREE, [0, 1, 1, 2]) == {0: OK, 1: OK, 2: OK}
    assert send.calls == [("mx1.example.net[127.0.0.2]", [0, 1, 2], "mx1.example.net[127.0.0.2]")]


def test_session_failure_moves_temporary_recipients_on() -> None:
    def first(indexes: list[int]) -> Attempt:
        return Attempt("", {0: UNKNOWN_USER, 1: Outcome(451, "4.3.0", "data refused"),
                                2: Outcome(451, "4.3.0", "data refused")}, True)

    send = FakeSend(**{"mx1.example.net": first, "mx2.example.net": all_get(OK, failed=False)})
    assert deliver(FakeRouter([MX1, MX2, MX3]), send, THREE, [0, 1, 2]) == {0: UNKNOWN_USER, 1: OK, 2: OK}
    assert [(host, indexes) for host, indexes, _ in send.calls] == [
        ("mx1.example.net[127.0.0.2]", [0, 1, 2]), ("mx2.example.net[127.0.0.3]", [1, 2])]


def test_recipient_4xx_stays_deferred() -> None:
    def partial(indexes: list[int]) -> Attempt:
        return Attempt("", {0: OK, 1: MAILBOX_BUSY, 2: UNKNOWN_USER}, False)

    send = FakeSend(**{"mx1.example.net": partial})
    assert deliver(FakeRouter([MX1, MX2]), send, THREE, [0, 1, 2]) == {0: OK, 1: MAILBOX_BUSY, 2: UNKNOWN_USER}
    assert len(send.calls) == 1


def test_every_hop_fails_the_last_one_is_kept() -> None:
    send = FakeSend(**{hop.name: all_get(refused_by(hop)) for hop in (MX1, MX2, MX3)})
    outcomes = deliver(FakeRouter([MX1, MX2, MX3]), send, THREE, [0, 1])
    assert outcomes == {0: refused_by(MX3), 1: refused_by(MX3)}
    assert outcomes[0].text == "connect to mx3.example.net[127.0.0.4]: Connection refused"
    assert len(send.calls) == 3


def test_log_names_the_next_hop_only_when_one_follows() -> None:
    send = FakeSend(**{hop.name: all_get(refused_by(hop)) for hop in (MX1, MX2)})
    with capturedLogs() as events:
        deliver(FakeRouter([MX1, MX2]), send, THREE, [0])
    lines = [formatEvent(event) for event in events if "recipient(s) left" in formatEvent(event)]
    assert len(lines) == 2
    assert lines[0].endswith("1 recipient(s) left for the next hop")
    assert lines[1].endswith("1 recipient(s) left for a later attempt")
    assert "next hop" not in lines[1]


def test_permanent_session_failure_is_final() -> None:
    rejected = Outcome(554, "5.7.1", "go away", "remote")
    send = FakeSend(**{"mx1.example.net": all_get(rejected)})
    assert deliver(FakeRouter([MX1, MX2]), send, THREE, [0]) == {0: rejected}
    assert len(send.calls) == 1


def test_send_that_raises_counts_as_a_failed_session() -> None:
    send = FakeSend(**{"mx1.example.net": lambda indexes: RuntimeError("client bug"),
                       "mx2.example.net": all_get(OK, failed=False)})
    assert deliver(FakeRouter([MX1, MX2]), send, THREE, [0]) == {0: OK}
    send = FakeSend(**{"mx1.example.net": lambda indexes: RuntimeError("client\r\nbug")})
    [outcome] = deliver(FakeRouter([MX1]), send, THREE, [0]).values()
    assert (outcome.code, outcome.enhanced) == (451, "4.3.0")
    assert outcome.text == "Delivery to mx1.example.net[127.0.0.2] failed: RuntimeError: client bug"


def test_recipient_without_an_outcome_goes_on() -> None:
    send = FakeSend(**{"mx1.example.net": lambda indexes: Attempt("", {0: OK}, False),
                       "mx2.example.net": all_get(OK, failed=False)})
    assert deliver(FakeRouter([MX1, MX2]), send, THREE, [0, 1]) == {0: OK, 1: OK}
    assert [indexes for _, indexes, _ in send.calls] == [[0, 1], [1]]


@pytest.mark.parametrize("result", [ValueError("router bug"), []])
def test_routing_surprises_defer(result: Any) -> None:
    send = FakeSend()
    outcomes = deliver(FakeRouter(result), send, THREE, [0, 1])
    assert set(outcomes) == {0, 1}
    assert {(o.code, o.enhanced) for o in outcomes.values()} == {(451, "4.4.3")}
    assert send.calls == []


# ---- the server's recipient limit: 452 (or 552) to RCPT --------------------------------------------------------

TOO_MANY = Outcome(452, "4.5.3", "too many recipients", "remote")


def limited(limit: int) -> Callable[[list[int]], Attempt]:
    """A hop that takes ``limit`` recipients per session and answers the rest 452."""
    return lambda indexes: Attempt("", {i: OK if n < limit else TOO_MANY for n, i in enumerate(indexes)}, False)


def test_recipients_over_the_limit_go_again_at_once() -> None:
    """RFC 5321 §4.5.3.1.10: the rest go in a new session to the same hop, as long as each round delivers."""
    send = FakeSend(**{"mx1.example.net": limited(2), "mx2.example.net": all_get(OK, failed=False)})
    five = message(*(f"{c}@example.net" for c in "abcde"))
    assert deliver(FakeRouter([MX1, MX2]), send, five, [0, 1, 2, 3, 4]) == {i: OK for i in range(5)}
    assert [(host, indexes) for host, indexes, _ in send.calls] == [
        ("mx1.example.net[127.0.0.2]", [0, 1, 2, 3, 4]), ("mx1.example.net[127.0.0.2]", [2, 3, 4]),
        ("mx1.example.net[127.0.0.2]", [4])]


def test_rounds_stop_when_one_delivers_nothing() -> None:
    rounds = iter([{0: OK, 1: TOO_MANY, 2: MAILBOX_BUSY}, {1: TOO_MANY}])
    send = FakeSend(**{"mx1.example.net": lambda indexes: Attempt("", next(rounds), False)})
    assert deliver(FakeRouter([MX1, MX2]), send, THREE, [0, 1, 2]) == {0: OK, 1: TOO_MANY, 2: MAILBOX_BUSY}
    assert [indexes for _, indexes, _ in send.calls] == [[0, 1, 2], [1]]
    nobody = FakeSend(**{"mx1.example.net": all_get(TOO_MANY, failed=False)})
    assert deliver(FakeRouter([MX1, MX2]), nobody, THREE, [0, 1]) == {0: TOO_MANY, 1: TOO_MANY}
    assert len(nobody.calls) == 1


def test_a_failed_round_sends_its_recipients_to_the_next_hop() -> None:
    rounds = iter([Attempt("", {0: OK, 1: TOO_MANY, 2: TOO_MANY}, False),
                   Attempt("", {1: refused_by(MX1), 2: refused_by(MX1)}, True)])
    send = FakeSend(**{"mx1.example.net": lambda indexes: next(rounds), "mx2.example.net": all_get(OK, False)})
    assert deliver(FakeRouter([MX1, MX2]), send, THREE, [0, 1, 2]) == {0: OK, 1: OK, 2: OK}
    assert [(host.partition("[")[0], indexes) for host, indexes, _ in send.calls] == [
        ("mx1.example.net", [0, 1, 2]), ("mx1.example.net", [1, 2]), ("mx2.example.net", [1, 2])]


# ---- connection limits and cancellation -------------------------------------------------------------------------

class HeldSession:
    """One session a `HeldSend` started: open until the test ends it; cancelled, it answers as send does."""

    def __init__(self, host: str, indexes: list[int]) -> None:
        self.host = host
        self.indexes = indexes
        self.d: Deferred[Attempt] = Deferred(self._cancelled)

    def _cancelled(self, d: "Deferred[Attempt]") -> None:
        d.callback(Attempt(self.host, {i: Outcome.local(451, "4.4.2", "attempt timed out") for i in self.indexes},
                           True))

    def end(self, outcomes: dict[int, Outcome] | None = None) -> None:
        self.d.callback(Attempt(self.host, outcomes or {i: OK for i in self.indexes}, False))


class HeldSend:
    """A send whose sessions stay open until the test ends them."""

    def __init__(self) -> None:
        self.sessions: list[HeldSession] = []

    def __call__(self, reactor: Any, endpoint: Any, message: Message, open_content: Any, options: ClientOptions,
                 *, indexes: list[int], host: str) -> "Deferred[Attempt]":
        self.sessions.append(HeldSession(host, list(indexes)))
        return self.sessions[-1].d

    def open(self) -> list[HeldSession]:
        return [s for s in self.sessions if not s.d.called]


def held(router: Any, **limits: Any) -> tuple[Deliverer, HeldSend]:
    send = HeldSend()
    return Deliverer(MemoryReactor(), router, ClientOptions(), send=send, endpoint_for=lambda hop: hop.label,
                     **limits), send


def fired(d: "Deferred[Any]") -> Any:
    got: list[Any] = []
    d.addBoth(got.append)
    assert got and isinstance(got[0], dict), got
    return got[0]


def test_connection_limits_queue_sessions_and_never_fail_them() -> None:
    """At most ``max_connections`` sessions at once, ``destination_concurrency`` per domain; the rest wait."""
    class ByDomain(FakeRouter):
        def route(self, domain: str) -> "Deferred[list[Hop]]":
            return succeed([Hop(f"mx.{domain}", "127.0.0.2")])

    deliverer, send = held(ByDomain([]), max_connections=3, destination_concurrency=2)
    results = [deliverer.deliver(message(f"r{n}@{domain}"), [0], content)
               for n, domain in enumerate(["a.example", "a.example", "a.example", "b.example", "b.example"])]
    steps = 0
    while send.open():
        open_now = send.open()
        by_host = [s.host.partition("[")[0] for s in open_now]
        assert len(open_now) <= 3 and max(by_host.count(h) for h in by_host) <= 2, by_host
        if steps == 0:
            assert sorted(by_host) == ["mx.a.example", "mx.a.example", "mx.b.example"]
        open_now[0].end()
        steps += 1
    assert steps == 5
    assert [fired(d) for d in results] == [{0: OK}] * 5
    assert deliverer._destinations == {}


def test_a_smarthost_is_one_destination_for_every_domain() -> None:
    deliverer, send = held(Smarthost("127.0.0.9", 2525), destination_concurrency=1)
    first = deliverer.deliver(message("a@a.example"), [0], content)
    second = deliverer.deliver(message("b@b.example"), [0], content)
    assert [s.host for s in send.open()] == ["127.0.0.9[127.0.0.9]"]
    send.open()[0].end()
    assert fired(first) == {0: OK}
    send.open()[0].end()
    assert fired(second) == {0: OK}
    assert deliverer.destination("A.Example") == "[127.0.0.9]:2525"
    assert held(FakeRouter([]))[0].destination("A.Example") == "a.example"
    mx_router = MXRouter(MemoryReactor(), servers=[("127.0.0.1", 53)])
    assert held(mx_router)[0].destination("A.Example") == "a.example"


@pytest.mark.parametrize("limits", [{"max_connections": 0}, {"destination_concurrency": 0}])
def test_limits_must_allow_a_connection(limits: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        held(FakeRouter([]), **limits)


def test_cancel_during_a_session_keeps_final_answers_and_frees_the_slot() -> None:
    deliverer, send = held(FakeRouter([MX1, MX2]), max_connections=1)
    d = deliverer.deliver(THREE, [0, 1, 2], content)
    send.open()[0].end({0: OK, 1: UNKNOWN_USER, 2: TOO_MANY})
    [again] = send.open()
    assert again.indexes == [2]
    d.cancel()
    assert fired(d) == {0: OK, 1: UNKNOWN_USER, 2: Outcome.local(451, "4.4.2", "attempt timed out")}
    other = deliverer.deliver(message("x@example.org"), [0], content)
    send.open()[0].end()
    assert fired(other) == {0: OK}
    assert len(send.sessions) == 3


def test_cancel_while_waiting_for_a_connection() -> None:
    deliverer, send = held(FakeRouter([MX1]), max_connections=1)
    first = deliverer.deliver(THREE, [0], content)
    waiting = deliverer.deliver(message("z@example.org"), [0], content)
    waiting.cancel()
    assert fired(waiting) == {0: Outcome.local(451, "4.4.2", "attempt timed out while waiting for a connection "
                                                             "to mx1.example.net[127.0.0.2] (limit for every "
                                                             "destination)")}
    send.open()[0].end()
    assert fired(first) == {0: OK}
    assert len(send.sessions) == 1 and deliverer._destinations == {}


def test_cancel_while_routing() -> None:
    class Silent(FakeRouter):
        def route(self, domain: str) -> "Deferred[list[Hop]]":
            return Deferred()

    deliverer, send = held(Silent([]))
    d = deliverer.deliver(THREE, [0, 2], content)
    d.cancel()
    timed_out = Outcome.local(451, "4.4.2", "attempt timed out while looking up where mail for example.net goes")
    assert fired(d) == {0: timed_out, 2: timed_out}
    assert send.sessions == []


# ---- the default endpoints ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("source, hop, kind, bind", [
    (None, MX1, TCP4ClientEndpoint, None),
    ("127.0.0.9", MX1, TCP4ClientEndpoint, ("127.0.0.9", 0)),
    ("127.0.0.9", Hop("mx6", "2001:db8::1", 2525), TCP6ClientEndpoint, None),
    ("2001:db8::9", Hop("mx6", "2001:db8::1", 2525), TCP6ClientEndpoint, ("2001:db8::9", 0)),
])
def test_default_endpoint(source: str | None, hop: Hop, kind: type, bind: Any) -> None:
    reactor = MemoryReactor()
    options = ClientOptions(timeouts=Timeouts(connect=7.0))
    endpoint = Deliverer(reactor, FakeRouter([]), options, source_address=source).endpoint_for(hop)
    assert isinstance(endpoint, kind)
    endpoint.connect(Factory())
    [(host, port, _, timeout, bind_address)] = reactor.tcpClients
    assert (host, port, timeout, bind_address) == (hop.address, hop.port, 7.0, bind)


# ---- the real client against scripted MXes on 127.0.0.2/.3/.4 --------------------------------------------------

NET_ZONES: dict[str, dict[str, Any]] = {
    "mail.test": {"MX": [(10, "mx1.mail.test"), (20, "mx2.mail.test"), (30, "mx3.mail.test")]},
    "mx1.mail.test": {"A": [MX_ADDRESSES[0]]},
    "mx2.mail.test": {"A": [MX_ADDRESSES[1]]},
    "mx3.mail.test": {"A": [MX_ADDRESSES[2]]},
    "nomx.test": {"A": [MX_ADDRESSES[0]]},
    "broken.test": {"A": [MX_ADDRESSES[0]]},
    "nullmx.test": {"MX": [(0, ".")], "A": [MX_ADDRESSES[0]]},
}
CONTENT = b"From: alice@example.org\r\nSubject: outbound\r\n\r\nHello.\r\n.leading dot\r\n"


@pytest.fixture
def net() -> Iterator[PrivateDNS]:
    server = PrivateDNS(NET_ZONES, servfail=[("broken.test", "MX")]).start()
    yield server
    pytest_twisted.blockon(server.stop())


class Network:
    """The three MXes of a test (None: nothing listens there, so connections are refused) on one port."""

    def __init__(self, dns: PrivateDNS, *scripts: dict[str, Any] | None) -> None:
        self.mxes = [ScriptedMX(address, name=f"mx{n}.mail.test", **script) if script is not None else None
                     for n, (address, script) in enumerate(zip(MX_ADDRESSES, scripts), 1)]
        listening = [mx for mx in self.mxes if mx is not None]
        self.port = listen_all(listening, also_free=[a for a, mx in zip(MX_ADDRESSES, self.mxes) if mx is None])
        self.dns = dns

    async def deliver(self, *addresses: str) -> dict[int, Outcome]:
        from twisted.internet import reactor

        router = MXRouter(reactor, servers=self.dns.servers, port=self.port, timeout=(5,))
        deliverer = Deliverer(reactor, router, ClientOptions(helo="client.test"))
        msg = Message("m1", "alice@example.org", [Recipient(a) for a in addresses], size=len(CONTENT))
        try:
            return await deliverer.deliver(msg, list(range(len(addresses))), lambda: io.BytesIO(CONTENT))
        finally:
            await stop_all([mx for mx in self.mxes if mx is not None])

    def connections(self) -> list[int]:
        return [mx.connections if mx is not None else 0 for mx in self.mxes]


def remote(outcomes: dict[int, Outcome]) -> set[tuple[int, str]]:
    return {(o.code, o.remote) for o in outcomes.values()}


@pytest_twisted.ensureDeferred
async def test_best_mx_gets_the_message(net: PrivateDNS) -> None:
    network = Network(net, {}, {}, {})
    outcomes = await network.deliver("bob@mail.test", "carol@mail.test")
    assert remote(outcomes) == {(250, "mx1.mail.test[127.0.0.2]")}
    assert network.connections() == [1, 0, 0]
    [received] = network.mxes[0].messages
    assert (received.helo, received.sender, received.recipients) == ("client.test", "alice@example.org",
                                                                    ["bob@mail.test", "carol@mail.test"])
    assert received.content == CONTENT
    assert received.mail_params["SIZE"] == len(CONTENT)


@pytest_twisted.ensureDeferred
async def test_connection_refused_goes_to_the_next_mx(net: PrivateDNS) -> None:
    network = Network(net, None, {}, {})
    outcomes = await network.deliver("bob@mail.test")
    assert remote(outcomes) == {(250, "mx2.mail.test[127.0.0.3]")}
    assert network.connections() == [0, 1, 0]
    assert network.mxes[1].messages[0].content == CONTENT


@pytest.mark.parametrize("script", [{"greeting": Reply.of(421, "4.3.2 busy, try later")},
                                    {"mail": Reply.of(451, "4.3.0 sender check failed, try later")},
                                    {"eom": Reply.of(452, "4.3.1 disk full")}])
@pytest_twisted.ensureDeferred
async def test_session_4xx_goes_to_the_next_mx(net: PrivateDNS, script: dict[str, Any]) -> None:
    network = Network(net, script, {}, {})
    outcomes = await network.deliver("bob@mail.test", "carol@mail.test")
    assert remote(outcomes) == {(250, "mx2.mail.test[127.0.0.3]")}
    assert network.connections() == [1, 1, 0]
    assert network.mxes[0].messages == []
    assert len(network.mxes[1].messages) == 1


@pytest_twisted.ensureDeferred
async def test_every_mx_failing_keeps_the_last_reason(net: PrivateDNS) -> None:
    network = Network(net, {"greeting": Reply.of(421, "4.3.2 busy")}, None, None)
    outcomes = await network.deliver("bob@mail.test")
    [outcome] = outcomes.values()
    assert (outcome.code, outcome.enhanced) == (451, "4.4.1")
    assert "mx3.mail.test[127.0.0.4]" in outcome.text
    assert network.connections() == [1, 0, 0]


@pytest_twisted.ensureDeferred
async def test_a_record_when_there_is_no_mx(net: PrivateDNS) -> None:
    network = Network(net, {}, {}, {})
    outcomes = await network.deliver("bob@nomx.test")
    assert remote(outcomes) == {(250, "nomx.test[127.0.0.2]")}
    assert network.mxes[0].messages[0].recipients == ["bob@nomx.test"]


@pytest_twisted.ensureDeferred
async def test_servfail_defers_and_never_falls_back_to_a(net: PrivateDNS) -> None:
    network = Network(net, {}, {}, {})
    outcomes = await network.deliver("bob@broken.test", "carol@broken.test")
    assert {(o.code, o.enhanced) for o in outcomes.values()} == {(451, "4.4.3")}
    assert network.connections() == [0, 0, 0]
    assert ("broken.test", "A") not in net.queries


@pytest_twisted.ensureDeferred
async def test_null_mx_fails_for_good(net: PrivateDNS) -> None:
    network = Network(net, {}, {}, {})
    outcomes = await network.deliver("bob@nullmx.test")
    assert [(o.code, o.enhanced) for o in outcomes.values()] == [(556, "5.1.10")]
    assert network.connections() == [0, 0, 0]


@pytest_twisted.ensureDeferred
async def test_refused_recipient_fails_alone(net: PrivateDNS) -> None:
    network = Network(net, {"rcpt": {"nobody@mail.test": Reply.of(550, "5.1.1 no such user")}}, {}, {})
    outcomes = await network.deliver("bob@mail.test", "nobody@mail.test", "carol@mail.test")
    assert [(o.code, o.enhanced) for o in outcomes.values()] == [(250, "2.0.0"), (550, "5.1.1"), (250, "2.0.0")]
    assert outcomes[1].remote == "mx1.mail.test[127.0.0.2]"
    assert network.connections() == [1, 0, 0]
    assert network.mxes[0].messages[0].recipients == ["bob@mail.test", "carol@mail.test"]


@pytest_twisted.ensureDeferred
async def test_deferred_recipient_stays_deferred(net: PrivateDNS) -> None:
    network = Network(net, {"rcpt": {"busy@mail.test": Reply.of(450, "4.2.1 mailbox busy")}}, {}, {})
    outcomes = await network.deliver("bob@mail.test", "busy@mail.test")
    assert [(o.code, o.enhanced) for o in outcomes.values()] == [(250, "2.0.0"), (450, "4.2.1")]
    assert network.connections() == [1, 0, 0]
    assert network.mxes[0].messages[0].recipients == ["bob@mail.test"]


@pytest.mark.parametrize("limit_reply", [Reply.of(452, "Too many recipients", enhanced="4.5.3"),
                                         Reply.of(552, "Too many recipients", enhanced="5.5.3")])
@pytest_twisted.ensureDeferred
async def test_recipient_limit_over_the_network(net: PrivateDNS, limit_reply: Reply) -> None:
    """An MX taking two recipients per transaction gets five in three sessions; 552 counts as 452 there."""
    network = Network(net, {"recipient_limit": 2, "limit_reply": limit_reply}, {}, {})
    addresses = [f"{c}@mail.test" for c in "abcde"]
    outcomes = await network.deliver(*addresses)
    assert remote(outcomes) == {(250, "mx1.mail.test[127.0.0.2]")}
    assert network.connections() == [3, 0, 0]
    assert [m.recipients for m in network.mxes[0].messages] == [addresses[:2], addresses[2:4], addresses[4:]]


@pytest_twisted.ensureDeferred
async def test_cancelling_aborts_the_session_under_way(net: PrivateDNS) -> None:
    """The queue's deadline: the connection is aborted and every recipient gets 4.4.2 at once."""
    from twisted.internet import reactor

    reached: Deferred[None] = Deferred()

    def eom() -> "Deferred[Reply]":
        reached.callback(None)
        return Deferred()  # the MX never answers the end of the data

    network = Network(net, {"eom": eom}, {}, {})
    router = MXRouter(reactor, servers=net.servers, port=network.port, timeout=(5,))
    deliverer = Deliverer(reactor, router, ClientOptions(helo="client.test"))
    msg = Message("m1", "alice@example.org", [Recipient("bob@mail.test"), Recipient("carol@mail.test")],
                  size=len(CONTENT))
    d = deliverer.deliver(msg, [0, 1], lambda: io.BytesIO(CONTENT))
    try:
        await reached
        await deferLater(reactor, 0, lambda: None)  # the MX's handler has returned
        d.cancel()
        assert d.called
        outcomes = await d
    finally:
        await stop_all([mx for mx in network.mxes if mx is not None])
    assert {(o.code, o.enhanced) for o in outcomes.values()} == {(451, "4.4.2")}
    assert outcomes[0].text == ("attempt timed out (mx1.mail.test[127.0.0.2], while waiting for the reply to the "
                                "end of the data)")
    assert network.connections() == [1, 0, 0]
    assert deliverer._destinations == {}
