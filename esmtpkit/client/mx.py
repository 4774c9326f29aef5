"""Where mail for a domain goes: its mail exchangers in order, each address of each (RFC 5321 §5.1, RFC 7505).

DNS goes through twisted.names, so routing never blocks the reactor. A route is a list of `Hop` values to try in
turn; when there is none, `RouteError` carries the outcome every recipient of the domain gets (permanent for a
domain that does not exist or takes no mail, temporary when DNS could not answer).
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, replace
from typing import Any, Iterable, Protocol, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.names import client, dns, error
from twisted.python.failure import Failure

from esmtpkit.core.outbound import Outcome

__all__ = ["Hop", "RouteError", "Router", "MXRouter", "Smarthost", "ascii_domain", "address_literal", "answer_records",
           "dns_name"]

#: The address families looked up for a mail exchanger, by Postfix's name for them, with their record types.
_FAMILIES = {"ipv4": dns.A, "ipv6": dns.AAAA}

#: Why a lookup found nothing: the name does not exist (as opposed to a DNS failure, which is temporary).
_NXDOMAIN = "Host not found"


@dataclass(frozen=True)
class Hop:
    """One place to try: a mail exchanger's name, one of its addresses, the port, and the MX preference."""

    name: str
    address: str
    port: int = 25
    preference: int = 0

    @property
    def label(self) -> str:
        """How logs and DSNs name it (Postfix style): ``mx1.example.net[192.0.2.1]``."""
        return f"{self.name}[{self.address}]"


class RouteError(Exception):
    """No hop to try; ``outcome`` is what every recipient of the domain gets (temporary or permanent)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(str(outcome))
        self.outcome = outcome


class Router(Protocol):
    """Anything that routes a domain: `MXRouter`, `Smarthost`, or a fake in tests.

    A router may also name the destination a domain's mail goes to, ``destination(domain) -> str``, which
    `esmtpkit.client.delivery.Deliverer` limits connections by (a smarthost: one for every domain); without it,
    each domain is a destination of its own.
    """

    def route(self, domain: str) -> "Deferred[list[Hop]]":
        """The hops for ``domain``, best first; fails with `RouteError`."""


def _shown(text: str) -> str:
    """``text`` safe to put in a reply text or a log line (no control characters, bounded)."""
    return "".join(c if c.isprintable() else "?" for c in text[:300])


def _not_found(domain: str, kind: str) -> RouteError:
    return RouteError(Outcome.local(550, "5.1.2", f"Host or domain name not found. Name service error for"
                                                  f" name={_shown(domain)} type={kind}: {_NXDOMAIN}"))


def _lookup_failed(name: str, kind: str, reason: str) -> RouteError:
    return RouteError(Outcome.local(451, "4.4.3", f"Host or domain name lookup failed. Name service error for"
                                                  f" name={_shown(name)} type={kind}: {reason}"))


def _bad_domain(domain: str) -> RouteError:
    return RouteError(Outcome.local(550, "5.1.2", f"Bad destination domain: {_shown(domain)}"))


def _null_mx(domain: str) -> RouteError:
    return RouteError(Outcome.local(556, "5.1.10", f"Domain {_shown(domain)} does not accept mail (null MX)"))


def _loop(domain: str) -> RouteError:
    return RouteError(Outcome.local(554, "5.4.6", f"Mail for {_shown(domain)} loops back to myself"))


def _no_address(domain: str, what: str) -> RouteError:
    return RouteError(Outcome.local(550, "5.4.4", f"Host or domain name not found: {what} {_shown(domain)}"))


def _reason(failure: Failure) -> str:
    """Why a DNS query failed, in words; `_NXDOMAIN` when the name does not exist."""
    if failure.check(error.DNSNameError):
        return _NXDOMAIN
    if failure.check(error.DNSServerError):
        return "server failure"
    if failure.check(error.DNSQueryRefusedError):
        return "query refused"
    if failure.check(defer.TimeoutError):
        return "timed out"
    if failure.check(error.DNSFormatError):
        return "format error"
    if failure.check(error.DNSNotImplementedError):
        return "not implemented"
    return _shown(f"{type(failure.value).__name__}: {failure.value}")


def dns_name(name: Any) -> str:
    """A DNS name as text for comparisons: lower case, no trailing dot ("" is the root)."""
    return str(name).rstrip(".").lower()


def ascii_domain(domain: str) -> str:
    """``domain`` as DNS looks it up: lower case, no trailing dot, U-labels as A-labels (IDNA); RouteError if bad."""
    text = domain.strip().rstrip(".").lower()
    if not text or len(text) > 253 or not text.isprintable() or " " in text:
        raise _bad_domain(domain)
    labels = []
    for label in text.split("."):
        try:
            encoded = label if label.isascii() else label.encode("idna").decode("ascii")
        except UnicodeError:
            raise _bad_domain(domain) from None
        if not 0 < len(encoded) <= 63:
            raise _bad_domain(domain)
        labels.append(encoded)
    return ".".join(labels)


def address_literal(domain: str) -> str | None:
    """The address in ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 §4.1.3), None for a domain name;
    RouteError for a bracketed text that is no address."""
    if not domain.startswith("["):
        return None
    if not domain.endswith("]"):
        raise _bad_domain(domain)
    inner = domain[1:-1]
    version = 4
    if inner[:5].lower() == "ipv6:":
        inner, version = inner[5:], 6
    try:
        address = ipaddress.ip_address(inner)
    except ValueError:
        raise _bad_domain(domain) from None
    if address.version != version:
        raise _bad_domain(domain)
    return str(address)


def _ip(text: str) -> str | None:
    """``text`` as a canonical IP address, or None when it is not one."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def answer_records(answers: Iterable[dns.RRHeader], name: str, kind: int) -> list[Any]:
    """The payloads of type ``kind`` for ``name`` in an answer section, following CNAMEs within it."""
    answers = list(answers)
    names = {name}
    grown = True
    while grown:
        grown = False
        for rr in answers:
            if rr.type == dns.CNAME and dns_name(rr.name) in names and dns_name(rr.payload.name) not in names:
                names.add(dns_name(rr.payload.name))
                grown = True
    return [rr.payload for rr in answers if rr.type == kind and dns_name(rr.name) in names]


@dataclass
class _Lookup:
    """The addresses found for one exchanger, and why a lookup failed (None: none failed; `_NXDOMAIN`: absent)."""

    name: str
    preference: int
    addresses: list[str]
    failure: str | None
    kind: str = "A"

    @property
    def temporary(self) -> bool:
        return self.failure is not None and self.failure != _NXDOMAIN


class MXRouter:
    """Routes a domain by its MX records (RFC 5321 §5.1), through a twisted.names resolver.

    ``servers`` are the name servers to ask (``[("192.0.2.53", 53)]``); None reads ``resolv_conf`` (the system's
    ``/etc/resolv.conf``). ``local_names`` and ``local_addresses`` are this host's own: an MX that is one of them
    and every MX of equal or worse preference are dropped, as RFC 5321 §5.1 requires. ``inet_protocols`` says
    which address families to use and in which order for each exchanger (A first by default). At most
    ``max_hops`` hops are returned. ``resolver`` replaces the one built from ``servers`` (any IResolver).
    """

    def __init__(self, reactor: Any, *, servers: Sequence[tuple[str, int]] | None = None, port: int = 25,
                 local_names: Iterable[str] = (), local_addresses: Iterable[str] = (),
                 timeout: Sequence[float] = (1, 3, 11), rng: random.Random | None = None,
                 inet_protocols: Sequence[str] = ("ipv4", "ipv6"), max_hops: int = 5,
                 resolv_conf: str = "/etc/resolv.conf", resolver: Any = None) -> None:
        unknown = [p for p in inet_protocols if p not in _FAMILIES]
        if unknown or not inet_protocols:
            raise ValueError(f"inet_protocols must name ipv4 and/or ipv6, not {list(inet_protocols)!r}")
        if max_hops < 1:
            raise ValueError("max_hops must be at least 1")
        self.reactor = reactor
        self.port = port
        self.timeout = tuple(timeout)
        self.local_names = frozenset(dns_name(n) for n in local_names)
        self.local_addresses = frozenset(_ip(a) or a for a in local_addresses)
        self.rng = rng if rng is not None else random.SystemRandom()
        self.families = tuple(_FAMILIES[p] for p in inet_protocols)
        self.max_hops = max_hops
        if resolver is None:
            if servers is not None:
                resolver = client.Resolver(servers=list(servers), timeout=self.timeout, reactor=reactor)
            else:
                resolver = client.Resolver(resolv=resolv_conf, timeout=self.timeout, reactor=reactor)
        self.resolver = resolver

    # ---- the two entry points ----------------------------------------------------------------------------------

    def destination(self, domain: str) -> str:
        """What connections for ``domain`` are counted under: the domain itself, lower-cased."""
        return domain.lower()

    def route(self, domain: str) -> "Deferred[list[Hop]]":
        """The hops for mail to ``domain``, best first; fails with `RouteError` (never anything else)."""
        return self._guarded(self._route(domain))

    def route_host(self, host: str, port: int | None = None) -> "Deferred[list[Hop]]":
        """The hops of one host, with no MX lookup: an IP address as it is, a name through its A/AAAA records."""
        return self._guarded(self._route_host(host, self.port if port is None else port))

    # ---- how -------------------------------------------------------------------------------------------------

    def _guarded(self, coroutine: Any) -> "Deferred[list[Hop]]":
        def unexpected(failure: Failure) -> Failure:
            if failure.check(RouteError):
                return failure
            return Failure(RouteError(Outcome.local(451, "4.4.3", f"Routing failed: {_reason(failure)}")))

        return Deferred.fromCoroutine(coroutine).addErrback(unexpected)

    async def _route(self, domain: str) -> list[Hop]:
        literal = address_literal(domain.strip())
        if literal is not None:
            return self._cut_addresses(domain, [_Lookup(literal, 0, [literal], None)])
        name = ascii_domain(domain)
        exchangers, failure = await self._query(name, dns.MX)
        if failure == _NXDOMAIN:
            raise _not_found(name, "MX")
        if failure is not None:
            raise _lookup_failed(name, "MX", failure)
        if not exchangers:  # NODATA: the domain itself is the implicit MX, preference 0 (RFC 5321 §5.1)
            if name in self.local_names:
                raise _loop(name)
            found = await self._addresses(name, 0)
            if not found.addresses and not found.temporary:
                raise _no_address(name, "no MX and no address record for")
            return self._cut_addresses(name, [found])
        if len(exchangers) == 1 and dns_name(exchangers[0].name) == "":
            raise _null_mx(name)
        ordered = self._order((mx.preference, dns_name(mx.name)) for mx in exchangers)
        usable = self._cut_names(name, ordered)
        found_all = await gatherResults([Deferred.fromCoroutine(self._addresses(host, pref))
                                         for pref, host in usable[:self.max_hops]])
        return self._cut_addresses(name, list(found_all))

    async def _route_host(self, host: str, port: int) -> list[Hop]:
        literal = _ip(host) or address_literal(host)
        if literal is not None:
            found = _Lookup(literal, 0, [literal], None)
        else:
            name = ascii_domain(host)
            if name in self.local_names:
                raise _loop(name)
            found = await self._addresses(name, 0)
            if found.failure == _NXDOMAIN and not found.addresses:
                raise _not_found(name, "A")
        hops = self._cut_addresses(host, [found], "no address record for")
        return [replace(hop, port=port) for hop in hops]

    def _order(self, exchangers: Iterable[tuple[int, str]]) -> list[tuple[int, str]]:
        """By preference; equal preferences shuffled (RFC 5321 §5.1); one entry per name, the root left out."""
        best: dict[str, int] = {}
        for pref, host in exchangers:
            if host and (host not in best or pref < best[host]):
                best[host] = pref
        groups: dict[int, list[str]] = {}
        for host, pref in sorted(best.items()):
            groups.setdefault(pref, []).append(host)
        ordered = []
        for pref in sorted(groups):
            hosts = groups[pref]
            self.rng.shuffle(hosts)
            ordered.extend((pref, host) for host in hosts)
        return ordered

    def _cut_names(self, domain: str, ordered: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """Drop this host's own name and every MX of equal or worse preference; 5.4.6 if none is better."""
        for pref, host in ordered:
            if host in self.local_names:
                kept = [(p, h) for p, h in ordered if p < pref]
                if not kept:
                    raise _loop(domain)
                return kept
        return ordered

    def _cut_addresses(self, domain: str, found: list[_Lookup],
                       nothing: str = "no address record for any mail exchanger of") -> list[Hop]:
        """Hops from the lookups, cut at the first exchanger with one of this host's addresses (as for names)."""
        cut = next((f.preference for f in found if any(a in self.local_addresses for a in f.addresses)), None)
        kept = [f for f in found if cut is None or f.preference < cut]
        if cut is not None and not kept:
            raise _loop(domain)
        hops: list[Hop] = []
        seen: set[str] = set()
        for f in kept:
            for address in f.addresses:
                if address not in seen:
                    seen.add(address)
                    hops.append(Hop(f.name, address, self.port, f.preference))
        if hops:
            return hops[:self.max_hops]
        temporary = next((f for f in kept if f.temporary), None)
        if temporary is not None:
            raise _lookup_failed(temporary.name, temporary.kind, temporary.failure or "")
        raise _no_address(domain, nothing)

    async def _addresses(self, name: str, preference: int) -> _Lookup:
        """Every address of one exchanger, the families in the configured order; the first failure, if any."""
        results = await gatherResults([self._query(name, kind) for kind in self.families])
        addresses: list[str] = []
        failures: list[tuple[str, str]] = []
        for kind, (records, failure) in zip(self.families, results):
            addresses.extend(a for a in map(_address_of, records) if a)
            if failure is not None:
                failures.append((failure, dns.QUERY_TYPES[kind]))
        failures.sort(key=lambda f: f[0] == _NXDOMAIN)  # a temporary failure first: it decides
        failure, kind = failures[0] if failures else (None, "A")
        return _Lookup(name, preference, addresses, failure, kind)

    def _query(self, name: str, kind: int) -> "Deferred[tuple[list[Any], str | None]]":
        """One lookup: the records of ``kind`` for ``name`` and None, or no records and why the lookup failed."""
        method = {dns.MX: "lookupMailExchange", dns.A: "lookupAddress", dns.AAAA: "lookupIPV6Address"}[kind]
        d = maybeDeferred(lambda: getattr(self.resolver, method)(name, self.timeout))
        return d.addCallbacks(lambda result: (answer_records(result[0], name, kind), None),
                              lambda failure: ([], _reason(failure)))


def _address_of(record: Any) -> str | None:
    """The address an A or AAAA record holds, as text."""
    if isinstance(record, dns.Record_A):
        return _ip(record.dottedQuad())
    return _ip(str(ipaddress.IPv6Address(record.address)))


class Smarthost:
    """Routes every domain to one relay host, as Postfix's ``relayhost`` does.

    ``host`` is a name (its MX records are looked up), ``[name]`` (its A/AAAA records only), or an IP address
    (``192.0.2.1``, ``[2001:db8::1]``, used as is); ``[host]:port`` and ``name:port`` give the port too. Names go
    through ``resolver_router`` (an `MXRouter`; one on the global reactor's system resolver when None). A relay
    that cannot be found is a problem here, not the recipient's: every failure is temporary, so mail waits.
    """

    def __init__(self, host: str, port: int = 25, *, resolver_router: MXRouter | None = None,
                 reactor: Any = None) -> None:
        self.host, self.port, self.mx_lookup = _parse_relay(host, port)
        self.router = resolver_router
        self.reactor = reactor

    def destination(self, domain: str) -> str:
        """What connections for ``domain`` are counted under: the relay, whatever the domain
        (``[smtp.example.net]:587``)."""
        return f"[{self.host}]:{self.port}"

    def route(self, domain: str) -> "Deferred[list[Hop]]":
        """The relay's hops, whatever ``domain`` is; fails with a temporary `RouteError`."""
        address = _ip(self.host)
        if address is not None:
            return succeed([Hop(address, address, self.port, 0)])
        router = self._router()
        d = router.route(self.host) if self.mx_lookup else router.route_host(self.host)
        return d.addCallbacks(lambda hops: [replace(h, port=self.port) for h in hops], _soften)

    def _router(self) -> MXRouter:
        if self.router is None:
            reactor = self.reactor
            if reactor is None:
                from twisted.internet import reactor as default

                reactor = default
            self.router = MXRouter(reactor)
        return self.router


def _soften(failure: Failure) -> Failure:
    """A permanent routing failure as a temporary one (5.x.y becomes 4.x.y, as Postfix's soft_bounce does)."""
    failure.trap(RouteError)
    outcome = failure.value.outcome
    if outcome.permanent:
        outcome = Outcome.local(451, "4" + outcome.enhanced[1:], outcome.text)
    return Failure(RouteError(outcome))


def _parse_relay(host: str, port: int) -> tuple[str, int, bool]:
    """``(host, port, mx_lookup)`` from a relayhost setting (``[host]:port``, ``host:port``, ``host``)."""
    text = host.strip()
    if text.startswith("["):
        inner, bracket, rest = text[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port, rest = int(rest[1:]), ""
        if rest or not inner or not bracket:
            raise ValueError(f"bad relay host {host!r}")
        if inner[:5].lower() == "ipv6:":
            inner = inner[5:]
        return inner, port, False
    if text.count(":") == 1:
        name, _, number = text.partition(":")
        if not number.isdigit():
            raise ValueError(f"bad relay host {host!r}")
        return name, int(number), _ip(name) is None
    if not text:
        raise ValueError("empty relay host")
    return text, port, _ip(text) is None
