"""Delivery to a domain's hops: a fake ``send`` for the rules, then the real client against scripted MXes."""

from __future__ import annotations

import io
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor

from esmtpkit.client.delivery import Deliverer
from esmtpkit.client.mx import Hop, MXRouter, RouteError
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
