"""MX routing (RFC 5321 §5.1, RFC 7505) against a private DNS server on 127.0.0.1 (pytest-twisted)."""

from __future__ import annotations

import random
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from esmtpkit.client.mx import Hop, MXRouter, RouteError, Smarthost, address_literal, ascii_domain
from tests.mailnet import PrivateDNS

ZONES: dict[str, dict[str, Any]] = {
    "example.net": {"MX": [(20, "mx2.example.net"), (10, "mx1.example.net"), (30, "mx3.example.net")],
                    "TXT": ["v=spf1 -all"]},
    "mx1.example.net": {"A": ["127.0.0.2"]},
    "mx2.example.net": {"A": ["127.0.0.3"], "AAAA": ["2001:db8::3"]},
    "mx3.example.net": {"AAAA": ["2001:db8::4"]},
    "equal.example": {"MX": [(10, "a.equal.example"), (10, "b.equal.example"), (10, "c.equal.example"),
                             (20, "d.equal.example")]},
    "a.equal.example": {"A": ["192.0.2.1"]},
    "b.equal.example": {"A": ["192.0.2.2"]},
    "c.equal.example": {"A": ["192.0.2.3"]},
    "d.equal.example": {"A": ["192.0.2.4"]},
    "bare.example": {"A": ["192.0.2.10"], "AAAA": ["2001:db8::10"], "TXT": ["no MX here"]},
    "empty.example": {"TXT": ["neither MX nor address"]},
    "nullmx.example": {"MX": [(0, ".")], "A": ["192.0.2.20"]},
    "partial.example": {"MX": [(10, "gone.partial.example"), (20, "mx1.example.net")]},
    "unresolvable.example": {"MX": [(10, "gone.partial.example"), (20, "nothing.partial.example")]},
    "nothing.partial.example": {"TXT": ["no address"]},
    "flaky.example": {"MX": [(10, "broken-mx.flaky.example"), (20, "gone.partial.example")]},
    "broken-mx.flaky.example": {"A": ["192.0.2.30"]},
    "broken.example": {"A": ["192.0.2.40"]},
    "alias.example": {"CNAME": "example.net"},
    "many.example": {"MX": [(10, "big.many.example")]},
    "big.many.example": {"A": [f"192.0.2.{n}" for n in range(100, 160)]},
    "xn--bcher-kva.example": {"MX": [(10, "mx1.example.net")]},
    "relay.example": {"MX": [(10, "mx2.example.net")], "A": ["192.0.2.50"]},
    "same.example": {"MX": [(10, "mx1.example.net"), (20, "also-mx1.example")]},
    "also-mx1.example": {"A": ["127.0.0.2"]},
}


@pytest.fixture
def dns() -> Iterator[PrivateDNS]:
    server = PrivateDNS(ZONES, servfail=[("broken.example", "MX"), ("broken-mx.flaky.example", "A")],
                        refused=["refusing.example"], silent=["slow.example"]).start()
    yield server
    pytest_twisted.blockon(server.stop())


def router(dns: PrivateDNS, **kwargs: Any) -> MXRouter:
    from twisted.internet import reactor

    kwargs.setdefault("rng", random.Random(1))
    return MXRouter(reactor, servers=dns.servers, timeout=(2,), **kwargs)


async def refused(d: "Deferred[Any]") -> Any:
    """The outcome a routing Deferred failed with (the test fails if it succeeded)."""
    try:
        hops = await d
    except RouteError as e:
        return e.outcome
    raise AssertionError(f"routed to {hops}")


def labels(hops: list[Hop]) -> list[tuple[str, str, int]]:
    return [(h.name, h.address, h.preference) for h in hops]


# ---- order -------------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_order_by_preference_every_address_ipv4_first(dns: PrivateDNS) -> None:
    hops = await router(dns).route("Example.NET.")
    assert labels(hops) == [("mx1.example.net", "127.0.0.2", 10), ("mx2.example.net", "127.0.0.3", 20),
                            ("mx2.example.net", "2001:db8::3", 20), ("mx3.example.net", "2001:db8::4", 30)]
    assert {h.port for h in hops} == {25}
    assert hops[0].label == "mx1.example.net[127.0.0.2]"


@pytest_twisted.ensureDeferred
async def test_address_families_and_port(dns: PrivateDNS) -> None:
    six_first = await router(dns, inet_protocols=("ipv6", "ipv4"), port=2525).route("example.net")
    assert labels(six_first)[1:3] == [("mx2.example.net", "2001:db8::3", 20), ("mx2.example.net", "127.0.0.3", 20)]
    assert {h.port for h in six_first} == {2525}
    dns.queries.clear()
    only_four = await router(dns, inet_protocols=("ipv4",)).route("example.net")
    assert [h.address for h in only_four] == ["127.0.0.2", "127.0.0.3"]
    assert not [q for q in dns.queries if q[1] == "AAAA"]


@pytest_twisted.ensureDeferred
async def test_equal_preferences_shuffled_by_the_rng(dns: PrivateDNS) -> None:
    seen = set()
    for seed in range(12):
        hops = await router(dns, rng=random.Random(seed)).route("equal.example")
        expected = ["a.equal.example", "b.equal.example", "c.equal.example"]
        random.Random(seed).shuffle(expected)
        assert [h.name for h in hops] == expected + ["d.equal.example"]
        seen.add(tuple(expected))
    assert len(seen) > 1


@pytest_twisted.ensureDeferred
async def test_max_hops_and_duplicate_addresses(dns: PrivateDNS) -> None:
    assert len(await router(dns, max_hops=2).route("example.net")) == 2
    hops = await router(dns).route("same.example")
    assert labels(hops) == [("mx1.example.net", "127.0.0.2", 10)]


@pytest_twisted.ensureDeferred
async def test_cname_and_idn(dns: PrivateDNS) -> None:
    hops = await router(dns).route("alias.example")
    assert [h.name for h in hops][:2] == ["mx1.example.net", "mx2.example.net"]
    hops = await router(dns).route("bücher.example")
    assert labels(hops) == [("mx1.example.net", "127.0.0.2", 10)]


@pytest_twisted.ensureDeferred
async def test_truncated_answer_retried_over_tcp(dns: PrivateDNS) -> None:
    hops = await router(dns, max_hops=100).route("many.example")
    assert [h.address for h in hops] == [f"192.0.2.{n}" for n in range(100, 160)]
    assert dns.factory.connections  # the 60 addresses do not fit a UDP answer


@pytest_twisted.ensureDeferred
async def test_private_dns_serves_what_it_is_given(dns: PrivateDNS) -> None:
    from twisted.internet import reactor
    from twisted.names import client
    from twisted.names import error as dns_error

    resolver = client.Resolver(servers=dns.servers, reactor=reactor, timeout=(2,))
    answers, _, _ = await resolver.lookupText("example.net")
    assert [rr.payload.data for rr in answers] == [[b"v=spf1 -all"]]
    answers, _, _ = await resolver.lookupIPV6Address("alias.example")  # the alias, and no AAAA where it leads
    assert [(rr.type, str(rr.payload.name)) for rr in answers] == [(5, "example.net")]
    answers, _, _ = await resolver.lookupAddress("mx2.example.net")
    assert [rr.payload.dottedQuad() for rr in answers] == ["127.0.0.3"]
    with pytest.raises(dns_error.DNSNameError):
        await resolver.lookupAddress("nosuch.example")
    answers, _, _ = await resolver.lookupAddress("equal.example")  # a name with names below it exists
    assert answers == []
    with pytest.raises(dns_error.DNSServerError):
        await resolver.lookupMailExchange("broken.example")
    answers, _, _ = await resolver.lookupAddress("broken.example")
    assert [rr.payload.dottedQuad() for rr in answers] == ["192.0.2.40"]


# ---- no MX records, no domain, no answer ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_nodata_gives_the_implicit_mx(dns: PrivateDNS) -> None:
    hops = await router(dns).route("bare.example")
    assert labels(hops) == [("bare.example", "192.0.2.10", 0), ("bare.example", "2001:db8::10", 0)]


@pytest_twisted.ensureDeferred
async def test_nodata_without_any_address_is_permanent(dns: PrivateDNS) -> None:
    outcome = await refused(router(dns).route("empty.example"))
    assert (outcome.code, outcome.enhanced, outcome.remote) == (550, "5.4.4", "")
    assert "empty.example" in outcome.text


@pytest_twisted.ensureDeferred
async def test_nxdomain_is_permanent_and_no_address_is_asked(dns: PrivateDNS) -> None:
    outcome = await refused(router(dns).route("nosuch.example"))
    assert (outcome.code, outcome.enhanced) == (550, "5.1.2")
    assert outcome.text == ("Host or domain name not found. Name service error for name=nosuch.example type=MX:"
                            " Host not found")
    assert dns.queries == [("nosuch.example", "MX")]


@pytest_twisted.ensureDeferred
async def test_servfail_defers_without_falling_back_to_a(dns: PrivateDNS) -> None:
    outcome = await refused(router(dns).route("broken.example"))
    assert (outcome.code, outcome.enhanced, outcome.temporary) == (451, "4.4.3", True)
    assert outcome.text.endswith("name=broken.example type=MX: server failure")
    assert dns.queries == [("broken.example", "MX")]


@pytest_twisted.ensureDeferred
async def test_refused_query_defers(dns: PrivateDNS) -> None:
    outcome = await refused(router(dns).route("refusing.example"))
    assert (outcome.enhanced, outcome.text.rpartition(": ")[2]) == ("4.4.3", "query refused")


@pytest_twisted.ensureDeferred
async def test_timeout_defers(dns: PrivateDNS) -> None:
    from twisted.internet import reactor

    slow = MXRouter(reactor, servers=dns.servers, timeout=(0.2, 0.2))
    outcome = await refused(slow.route("slow.example"))
    assert (outcome.code, outcome.enhanced) == (451, "4.4.3")
    assert outcome.text.endswith("type=MX: timed out")
    assert dns.queries == [("slow.example", "MX"), ("slow.example", "MX")]


@pytest_twisted.ensureDeferred
async def test_null_mx_is_permanent(dns: PrivateDNS) -> None:
    outcome = await refused(router(dns).route("nullmx.example"))
    assert (outcome.code, outcome.enhanced) == (556, "5.1.10")
    assert outcome.text == "Domain nullmx.example does not accept mail (null MX)"
    assert dns.queries == [("nullmx.example", "MX")]


# ---- exchangers that do not resolve ---------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_exchanger_without_address_is_skipped(dns: PrivateDNS) -> None:
    hops = await router(dns).route("partial.example")
    assert labels(hops) == [("mx1.example.net", "127.0.0.2", 20)]


@pytest_twisted.ensureDeferred
async def test_no_exchanger_resolves_permanent_or_temporary(dns: PrivateDNS) -> None:
    outcome = await refused(router(dns).route("unresolvable.example"))
    assert (outcome.code, outcome.enhanced) == (550, "5.4.4")
    outcome = await refused(router(dns).route("flaky.example"))
    assert (outcome.code, outcome.enhanced) == (451, "4.4.3")
    assert outcome.text.endswith("name=broken-mx.flaky.example type=A: server failure")


# ---- loops -------------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_own_name_drops_it_and_every_worse_mx(dns: PrivateDNS) -> None:
    hops = await router(dns, local_names=["MX2.example.net."]).route("example.net")
    assert labels(hops) == [("mx1.example.net", "127.0.0.2", 10)]
    outcome = await refused(router(dns, local_names=["mx1.example.net"]).route("example.net"))
    assert (outcome.code, outcome.enhanced) == (554, "5.4.6")
    assert outcome.text == "Mail for example.net loops back to myself"


@pytest_twisted.ensureDeferred
async def test_own_name_among_equal_preferences(dns: PrivateDNS) -> None:
    outcome = await refused(router(dns, local_names=["c.equal.example"]).route("equal.example"))
    assert outcome.enhanced == "5.4.6"


@pytest_twisted.ensureDeferred
async def test_own_address_drops_it_and_every_worse_mx(dns: PrivateDNS) -> None:
    hops = await router(dns, local_addresses=["2001:db8:0::3"]).route("example.net")
    assert labels(hops) == [("mx1.example.net", "127.0.0.2", 10)]
    outcome = await refused(router(dns, local_addresses=["127.0.0.2"]).route("example.net"))
    assert outcome.enhanced == "5.4.6"
    outcome = await refused(router(dns, local_addresses=["192.0.2.10"]).route("bare.example"))
    assert outcome.enhanced == "5.4.6"


# ---- address literals and bad domains ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_address_literals_need_no_dns(dns: PrivateDNS) -> None:
    assert await router(dns).route("[192.0.2.1]") == [Hop("192.0.2.1", "192.0.2.1", 25, 0)]
    assert await router(dns, port=2525).route("[IPv6:2001:DB8::1]") == [Hop("2001:db8::1", "2001:db8::1", 2525, 0)]
    assert dns.queries == []
    outcome = await refused(router(dns, local_addresses=["192.0.2.1"]).route("[192.0.2.1]"))
    assert outcome.enhanced == "5.4.6"


@pytest.mark.parametrize("domain", ["[300.1.1.1]", "[IPv6:192.0.2.1]", "[2001:db8::1]", "[192.0.2.1", "",
                                    "a..example", "x" * 64 + ".example", "bad\r\nname.example"])
def test_bad_destinations_are_permanent(domain: str) -> None:
    with pytest.raises(RouteError) as caught:
        address_literal(domain) or ascii_domain(domain)
    assert (caught.value.outcome.code, caught.value.outcome.enhanced) == (550, "5.1.2")
    assert "\n" not in caught.value.outcome.text


@pytest_twisted.ensureDeferred
async def test_bad_domain_is_a_route_error(dns: PrivateDNS) -> None:
    outcome = await refused(router(dns).route("a..example"))
    assert outcome.enhanced == "5.1.2"
    assert dns.queries == []


@pytest_twisted.ensureDeferred
async def test_resolver_crash_is_temporary() -> None:
    class Broken:
        def lookupMailExchange(self, name: str, timeout: Any) -> Any:
            raise RuntimeError("resolver bug")

    outcome = await refused(MXRouter(MemoryReactorClock(), resolver=Broken()).route("example.net"))
    assert (outcome.code, outcome.enhanced) == (451, "4.4.3")
    assert "RuntimeError: resolver bug" in outcome.text


def test_system_resolver_configuration(tmp_path: Any) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.9\n")
    resolver = MXRouter(MemoryReactorClock(), resolv_conf=str(conf)).resolver
    assert resolver.pickServer() == ("127.0.0.9", 53)


def test_bad_settings() -> None:
    with pytest.raises(ValueError):
        MXRouter(MemoryReactorClock(), servers=[("127.0.0.1", 53)], inet_protocols=("ipx",))
    with pytest.raises(ValueError):
        MXRouter(MemoryReactorClock(), servers=[("127.0.0.1", 53)], max_hops=0)
    for bad in ("", "[relay.example", "[relay.example]x", "relay.example:port", "[]"):
        with pytest.raises(ValueError):
            Smarthost(bad)


# ---- smarthost ---------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_smarthost_in_brackets_skips_mx(dns: PrivateDNS) -> None:
    relay = Smarthost("[relay.example]", 587, resolver_router=router(dns))
    assert await relay.route("anything.example") == [Hop("relay.example", "192.0.2.50", 587, 0)]
    assert ("relay.example", "MX") not in dns.queries
    relay = Smarthost("[relay.example]:2525", resolver_router=router(dns))
    assert [h.port for h in await relay.route("anything.example")] == [2525]


@pytest_twisted.ensureDeferred
async def test_smarthost_name_follows_its_mx(dns: PrivateDNS) -> None:
    relay = Smarthost("relay.example:2525", resolver_router=router(dns))
    assert await relay.route("anything.example") == [Hop("mx2.example.net", "127.0.0.3", 2525, 10),
                                                    Hop("mx2.example.net", "2001:db8::3", 2525, 10)]


@pytest_twisted.ensureDeferred
async def test_smarthost_address_used_directly(dns: PrivateDNS) -> None:
    assert await Smarthost("192.0.2.9:2525").route("x.example") == [Hop("192.0.2.9", "192.0.2.9", 2525, 0)]
    assert await Smarthost("[IPv6:2001:db8::9]").route("x.example") == [Hop("2001:db8::9", "2001:db8::9", 25, 0)]
    assert await Smarthost("2001:db8::9", 26).route("x.example") == [Hop("2001:db8::9", "2001:db8::9", 26, 0)]
    assert dns.queries == []


@pytest_twisted.ensureDeferred
async def test_smarthost_failures_are_temporary(dns: PrivateDNS) -> None:
    outcome = await refused(Smarthost("[nosuch.example]", resolver_router=router(dns)).route("x.example"))
    assert (outcome.code, outcome.enhanced) == (451, "4.1.2")
    outcome = await refused(Smarthost("nullmx.example", resolver_router=router(dns)).route("x.example"))
    assert (outcome.code, outcome.enhanced) == (451, "4.1.10")
    looping = router(dns, local_addresses=["192.0.2.50"])
    outcome = await refused(Smarthost("[relay.example]", resolver_router=looping).route("x.example"))
    assert outcome.enhanced == "4.4.6"
