"""A private mail network on loopback for outbound tests: DNS that answers from Python data, and scripted MXes.

- `PrivateDNS`: an authoritative twisted.names server on 127.0.0.1 (UDP and TCP on one free port) serving zones
  given as data (MX, A, AAAA, TXT, CNAME records), plus names that answer SERVFAIL or REFUSED, or never answer.
  Its ``servers`` go straight into ``MXRouter(reactor, servers=dns.servers)``.
- `ScriptedMX`: a real esmtpkit SMTP server on one 127.0.0.x address that answers as scripted (greeting, MAIL,
  RCPT by address, DATA, end of data) and records every transaction (`Transaction`).
- `free_port`, `listen_all`, `stop_all`: every MX of a test listens on the same port (MX records carry none).

Both servers start synchronously (``start()`` / ``listen()``) and stop with a Deferred, so a plain pytest fixture
can run them under pytest-twisted: ``yield dns.start()`` then ``pytest_twisted.blockon(dns.stop())``.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.names import dns, error
from twisted.names.server import DNSServerFactory
from zope.interface import implementer

from esmtpkit.core.address import Address
from esmtpkit.core.content import ContentMode
from esmtpkit.core.reply import Reply, coerce
from esmtpkit.handlers.base import MessageHandler
from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.server.interfaces import ILMTPHandler
from esmtpkit.server.policy import Policy

__all__ = ["MX_ADDRESSES", "PrivateDNS", "ScriptedMX", "Transaction", "free_port", "listen_all", "stop_all"]

#: The loopback addresses tests give their mail exchangers (127.0.0.1 is the DNS server's).
MX_ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def _reactor(reactor: Any) -> Any:
    if reactor is None:
        from twisted.internet import reactor as default

        return default
    return reactor


def _name(name: Any) -> str:
    return str(name).rstrip(".").lower()


# ---- DNS ----------------------------------------------------------------------------------------------------------

class _RCode(Exception):
    """Answer the query with this response code (SERVFAIL, REFUSED) instead of records."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Zones:
    """Answers queries from data: ``{name: {"MX": [(10, "mx1.example")], "A": [...], ...}}``."""

    def __init__(self, owner: "PrivateDNS") -> None:
        self.owner = owner

    def query(self, query: dns.Query, timeout: Any = None) -> "Deferred[Any]":
        owner = self.owner
        name = _name(query.name)
        kind = dns.QUERY_TYPES.get(query.type, str(query.type))
        owner.queries.append((name, kind))
        if owner._matches(owner.silent, name, kind):
            return Deferred()  # never answered: the client times out
        if owner._matches(owner.servfail, name, kind):
            return fail(_RCode(dns.ESERVER))
        if owner._matches(owner.refused, name, kind):
            return fail(_RCode(dns.EREFUSED))
        if not owner._exists(name):
            return fail(error.DNSNameError(name))
        answers: list[dns.RRHeader] = []
        seen = set()
        while name not in seen:
            seen.add(name)
            records = owner.zones.get(name, {})
            target = records.get("CNAME")
            if target is not None and query.type != dns.CNAME:
                answers.append(self._rr(name, dns.CNAME, dns.Record_CNAME(_name(target).encode("idna"), ttl=60)))
                name = _name(target)
                continue
            for payload in self._payloads(records.get(kind, []), query.type):
                answers.append(self._rr(name, query.type, payload))
        return succeed((answers, [], []))

    @staticmethod
    def _rr(name: str, kind: int, payload: Any) -> dns.RRHeader:
        return dns.RRHeader(name.encode("idna") if name else b"", kind, dns.IN, 60, payload, auth=True)

    @staticmethod
    def _payloads(values: Any, kind: int) -> list[Any]:
        if isinstance(values, str) or (kind == dns.MX and isinstance(values, tuple)):
            values = [values]
        if kind == dns.MX:
            return [dns.Record_MX(int(pref), _name(host).encode("idna") if _name(host) else b"", ttl=60)
                    for pref, host in values]
        if kind == dns.A:
            return [dns.Record_A(address, ttl=60) for address in values]
        if kind == dns.AAAA:
            return [dns.Record_AAAA(address, ttl=60) for address in values]
        if kind == dns.TXT:
            return [dns.Record_TXT(*(text.encode() for text in ([v] if isinstance(v, str) else v)), ttl=60)
                    for v in values]
        return []


class _Server(DNSServerFactory):
    """A DNSServerFactory that can answer SERVFAIL and REFUSED on purpose, without logging them as errors, and
    that truncates UDP answers beyond 512 octets (RFC 1035 §4.2.1), so that clients retry over TCP."""

    noisy = False

    def sendReply(self, protocol: Any, message: dns.Message, address: Any) -> None:
        if address is not None:
            message.maxSize = 512
        super().sendReply(protocol, message, address)

    def gotResolverError(self, failure: Any, protocol: Any, message: dns.Message, address: Any) -> None:
        if failure.check(_RCode):
            response = dns.Message(id=message.id, answer=1, opCode=message.opCode, recDes=message.recDes,
                                   rCode=failure.value.code, auth=1)
            response.queries = message.queries
            response.timeReceived = getattr(message, "timeReceived", time.time())
            self.sendReply(protocol, response, address)
            return
        super().gotResolverError(failure, protocol, message, address)


class PrivateDNS:
    """An authoritative DNS server on 127.0.0.1 (UDP and TCP, one free port) answering from ``zones``.

    ``zones`` maps a name to its records: ``{"example.net": {"MX": [(10, "mx1.example.net")], "TXT": ["v=spf1"]},
    "mx1.example.net": {"A": ["127.0.0.2"], "AAAA": ["::1"]}, "alias.example": {"CNAME": "example.net"}}``
    (``(0, ".")`` is a null MX). A name not listed, and with no listed name below it, is NXDOMAIN; a listed name
    without the type asked is NODATA. Names in ``servfail`` answer SERVFAIL, in ``refused`` REFUSED, and in
    ``silent`` never answer (a timeout); an entry is a name (every type) or a ``(name, "A")`` pair. Every query
    is recorded in ``queries`` as ``(name, type)``. ``zones`` may be changed while the server runs.
    """

    def __init__(self, zones: Mapping[str, Mapping[str, Any]] | None = None, *, servfail: Iterable[Any] = (),
                 refused: Iterable[Any] = (), silent: Iterable[Any] = (), reactor: Any = None) -> None:
        self.zones: dict[str, dict[str, Any]] = {_name(k): dict(v) for k, v in (zones or {}).items()}
        self.servfail = set(self._entries(servfail))
        self.refused = set(self._entries(refused))
        self.silent = set(self._entries(silent))
        self.queries: list[tuple[str, str]] = []
        self.reactor = reactor
        self.port = 0
        self.factory = _Server(authorities=[_Zones(self)])
        self._listening: list[Any] = []

    @staticmethod
    def _entries(entries: Iterable[Any]) -> Iterable[tuple[str, str | None]]:
        for entry in entries:
            yield (_name(entry), None) if isinstance(entry, str) else (_name(entry[0]), entry[1].upper())

    @staticmethod
    def _matches(entries: set[tuple[str, str | None]], name: str, kind: str) -> bool:
        return (name, None) in entries or (name, kind) in entries

    def _exists(self, name: str) -> bool:
        return name in self.zones or any(other.endswith("." + name) for other in self.zones)

    @property
    def servers(self) -> list[tuple[str, int]]:
        """``[("127.0.0.1", port)]``, for ``MXRouter(servers=...)``."""
        return [("127.0.0.1", self.port)]

    def start(self, attempts: int = 50) -> "PrivateDNS":
        """Listen on a port free for both TCP and UDP on 127.0.0.1; returns self."""
        reactor = _reactor(self.reactor)
        protocol = dns.DNSDatagramProtocol(self.factory)
        for _ in range(attempts):
            tcp = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
            port = tcp.getHost().port
            try:
                udp = reactor.listenUDP(port, protocol, interface="127.0.0.1")
            except CannotListenError:
                tcp.stopListening()
                continue
            self.port, self._listening = port, [tcp, udp]
            return self
        raise RuntimeError("no port free for both TCP and UDP on 127.0.0.1")

    def stop(self) -> "Deferred[Any]":
        """Stop listening and close the TCP connections clients left open; fires when the ports are closed."""
        listening, self._listening = self._listening, []
        for connection in list(self.factory.connections):
            connection.transport.loseConnection()
        return DeferredList([d for d in (p.stopListening() for p in listening) if d is not None])

    async def __aenter__(self) -> "PrivateDNS":
        return self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


# ---- SMTP ---------------------------------------------------------------------------------------------------------

#: A scripted reply: a Reply, an int code, a ``(code, *lines)`` tuple, or a callable given the command's arguments.
Script = Any


@dataclass
class Transaction:
    """One mail transaction a ScriptedMX saw: from MAIL to the end of the data (or to its abort)."""

    helo: str | None
    sender: str
    mail_params: dict[str, Any]
    recipients: list[str] = field(default_factory=list)
    rcpt_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    content: bytes = b""
    reply: Reply | None = None

    @property
    def delivered(self) -> bool:
        """True when the end of the data got a 2xx (for LMTP: for some recipient)."""
        return self.reply is not None and self.reply.code < 300


def _answer(script: Script, *args: Any) -> Any:
    return script(*args) if callable(script) else script


@implementer(ILMTPHandler)
class ScriptedHandler(MessageHandler):
    """Answers as its ScriptedMX says and records into it; RAW content, so the content is kept as sent."""

    content_mode = ContentMode.RAW

    def __init__(self, mx: "ScriptedMX") -> None:
        self.mx = mx
        self.current: Transaction | None = None

    def connect(self, session: Any) -> Any:
        self.session = session
        self.mx.connections += 1
        return _answer(self.mx.greeting, session)

    def ehlo(self, domain: str) -> Any:
        return super().ehlo(domain) if self.mx.ehlo is None else _answer(self.mx.ehlo, domain)

    def mail(self, sender: Address, params: Mapping[str, Any]) -> Any:
        reply = coerce(super().mail(sender, params) if self.mx.mail is None else _answer(self.mx.mail, sender, params))
        if reply.code < 300:
            self.current = Transaction(self.session.helo if self.session else None, str(sender), dict(params))
            self.mx.transactions.append(self.current)
        return reply

    def rcpt(self, recipient: Address, params: Mapping[str, Any]) -> Any:
        script = self.mx.rcpt.get(str(recipient).lower(), self.mx.rcpt_default)
        limit = self.mx.recipient_limit
        if limit is not None and self.current is not None and len(self.current.recipients) >= limit:
            script = self.mx.limit_reply
        reply = coerce(super().rcpt(recipient, params) if script is None else _answer(script, recipient, params))
        if self.current is not None:
            (self.current.recipients if reply.code < 300 else self.current.refused).append(str(recipient))
            self.current.rcpt_params[str(recipient)] = dict(params)
        return reply

    def data(self) -> Any:
        return super().data() if self.mx.data is None else _answer(self.mx.data)

    def body(self, chunk: bytes) -> Any:
        if self.current is not None:
            self.current.content += chunk
        return None

    def eom(self) -> Any:
        answer = super().eom() if self.mx.eom is None else _answer(self.mx.eom)
        if isinstance(answer, Deferred):
            return answer.addCallback(self._answered)
        return self._answered(answer)

    def _answered(self, answer: Any) -> Reply:
        reply = coerce(answer)
        self._finish(reply)
        return reply

    def eom_per_recipient(self) -> Any:
        recipients = list(self.session.envelope.recipients) if self.session else []
        replies = [coerce(_answer(self.mx.lmtp.get(str(r).lower(), self.mx.eom or super().eom()))) for r in recipients]
        self._finish(next((r for r in replies if r.code < 300), replies[0] if replies else None))
        return replies

    def _finish(self, reply: Reply | None) -> None:
        if self.current is not None:
            self.current.reply = reply
            if reply is not None and reply.code < 300:
                self.mx.messages.append(self.current)
            self.current = None

    def abort(self, reason: str) -> Any:
        self.current = None
        return None


class ScriptedMX:
    """A real esmtpkit SMTP server on one loopback address that answers as scripted and records what it got.

    ``greeting`` (default 220; 421 hangs up, 554 refuses service), ``ehlo``, ``mail``, ``data`` (the reply to the
    DATA command) and ``eom`` (the reply after the content) are scripts: a Reply, an int code, a
    ``(code, *lines)`` tuple or a callable given the command's arguments (``eom``'s may return a Deferred, to answer
    late or never); None keeps esmtpkit's default. ``rcpt``
    maps a recipient address (any case) to its script, ``rcpt_default`` answers the others; beyond
    ``recipient_limit`` accepted recipients in one transaction, every RCPT gets ``limit_reply`` (452 4.5.3 Too many
    recipients, RFC 5321 §4.5.3.1.10); ``lmtp`` maps a
    recipient to its own end-of-data reply on an LMTP server (``Policy(lmtp=True)``). ``policy`` sets the
    extensions offered (default: ``Policy(hostname=name)``: no DSN, no TLS, no AUTH).

    Every accepted MAIL starts a `Transaction` in ``transactions``; those whose data got a 2xx are also in
    ``messages``. ``connections`` counts the connections made.
    """

    def __init__(self, address: str = MX_ADDRESSES[0], *, name: str = "mx.test", greeting: Script = 220,
                 ehlo: Script = None, mail: Script = None, rcpt: Mapping[str, Script] | None = None,
                 rcpt_default: Script = None, data: Script = None, eom: Script = None,
                 lmtp: Mapping[str, Script] | None = None, policy: Policy | None = None,
                 recipient_limit: int | None = None,
                 limit_reply: Script = Reply.of(452, "Too many recipients", enhanced="4.5.3"),
                 reactor: Any = None) -> None:
        self.address = address
        self.name = name
        self.greeting = coerce(greeting) if isinstance(greeting, (int, tuple)) else greeting
        if isinstance(self.greeting, Reply) and self.greeting.lines == ("",):
            self.greeting = Reply.of(self.greeting.code, "scripted")
        self.ehlo, self.mail, self.data, self.eom = ehlo, mail, data, eom
        self.rcpt = {k.lower(): v for k, v in (rcpt or {}).items()}
        self.rcpt_default = rcpt_default
        self.recipient_limit = recipient_limit
        self.limit_reply = limit_reply
        self.lmtp = {k.lower(): v for k, v in (lmtp or {}).items()}
        self.policy = policy if policy is not None else Policy(hostname=name)
        self.reactor = _reactor(reactor)
        self.factory = ESMTPFactory(lambda: ScriptedHandler(self), policy=self.policy, clock=self.reactor)
        self.transactions: list[Transaction] = []
        self.messages: list[Transaction] = []
        self.connections = 0
        self.port = 0
        self._listening: Any = None

    def listen(self, port: int) -> "ScriptedMX":
        """Listen on ``address:port`` (raises CannotListenError if taken); returns self."""
        self._listening = self.reactor.listenTCP(port, self.factory, interface=self.address)
        self.port = self._listening.getHost().port
        return self

    def stop_listening(self) -> "Deferred[Any]":
        """Stop accepting connections (those open go on); fires when the port is closed."""
        listening, self._listening = self._listening, None
        return (listening.stopListening() if listening is not None else None) or succeed(None)

    def stop(self) -> "Deferred[Any]":
        """Stop listening and close every connection still open; fires when both are done."""
        return DeferredList([self.stop_listening(), self.factory.shutdown(timeout=0)])


def free_port(addresses: Sequence[str] = MX_ADDRESSES, attempts: int = 50) -> int:
    """A TCP port that nothing uses on any of ``addresses`` right now (bind-tested on each, then released)."""
    for _ in range(attempts):
        with socket.socket() as first:
            first.bind((addresses[0], 0))
            port = first.getsockname()[1]
            if all(_bindable(address, port) for address in addresses[1:]):
                return port
    raise RuntimeError(f"no port free on all of {addresses}")


def _bindable(address: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((address, port))
        except OSError:
            return False
        return True


def listen_all(servers: Sequence[ScriptedMX], port: int | None = None, *, also_free: Sequence[str] = (),
               attempts: int = 20) -> int:
    """Make every server listen on one port (``port``, or one found free until all can listen); returns it.

    ``also_free`` are addresses where the port must be free too: an MX there refuses connections."""
    if port is not None:
        for server in servers:
            server.listen(port)
        return port
    for _ in range(attempts):
        port = free_port(tuple(s.address for s in servers) + tuple(also_free) or MX_ADDRESSES)
        started: list[ScriptedMX] = []
        try:
            for server in servers:
                started.append(server.listen(port))
        except CannotListenError:
            for server in started:
                server.stop_listening()
            continue
        return port
    raise RuntimeError("could not listen on one port on every address")


def stop_all(servers: Iterable[ScriptedMX]) -> "Deferred[Any]":
    """Stop every server; fires once all are stopped."""
    return DeferredList([server.stop() for server in servers])


# ---- holding the end of the data ----------------------------------------------------------------------------------

@dataclass
class Held:
    """A transaction whose end of data a `HoldingMX` has taken but not answered yet."""

    transaction: Transaction
    answer: "Deferred[Any]"
    handler: "HoldingHandler"


class HoldingHandler(ScriptedHandler):
    """Answers the end of the data as scripted, except while its MX holds: then the answer waits (`HoldingMX`)."""

    mx: "HoldingMX"

    def eom(self) -> Any:
        current = self.current
        if current is None or not self.mx.holding:
            return super().eom()
        waiting: Deferred[Any] = Deferred()
        self.mx.held.append(Held(current, waiting, self))
        return waiting.addCallback(self._answered)


class HoldingMX(ScriptedMX):
    """A ScriptedMX that, while ``holding`` (from the start), holds every end of data unanswered: the client has
    sent the whole message and waits for the reply, the instant in which a crash loses or repeats mail.

    ``held`` lists the transactions waiting (`Held`); `release` answers them, or forgets them. A held transaction
    is in ``messages`` once released with a 2xx. ``holding = False`` answers the next ones at once, as scripted.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.holding = True
        self.held: list[Held] = []
        self.factory = ESMTPFactory(lambda: HoldingHandler(self), policy=self.policy, clock=self.reactor)

    def release(self, which: Any = None, reply: Script = 250) -> list[Held]:
        """Answer the held transactions ``which(held)`` picks (default: all) with ``reply``; those released.

        Answer only a client known to be alive: one whose process died may not have been seen to go yet, and the
        transaction would count as delivered. `forget` drops those instead."""
        picked = [held for held in self.held if which is None or which(held)]
        for held in picked:
            self.held.remove(held)
            held.answer.callback(reply)
        return picked

    def forget(self, which: Any = None) -> list[Held]:
        """Drop the held transactions ``which(held)`` picks (default: all) without answering them; those dropped."""
        picked = [held for held in self.held if which is None or which(held)]
        for held in picked:
            self.held.remove(held)
        return picked


__all__ += ["Held", "HoldingHandler", "HoldingMX"]


#: Bound on waiting for what should happen within moments (a slow machine gets the whole bound).
WAIT = 60.0


async def until(predicate: Callable[[], Any], what: str | Callable[[], str], timeout: float = WAIT) -> Any:
    """Let the reactor run until ``predicate()`` is truthy; fail naming ``what`` after ``timeout`` seconds."""
    from twisted.internet import reactor

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        await task.deferLater(reactor, 0.05, lambda: None)


__all__ += ["WAIT", "until"]
