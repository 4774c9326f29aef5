"""Helpers for testing handlers: an in-memory conversation, a recording handler, and a loopback server.

Usable from trial (`twisted.trial.unittest.TestCase`, return the Deferreds) and from pytest-twisted alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from esmtpkit.core.address import Address
from esmtpkit.core.reply import Reply, strip_enhanced
from esmtpkit.core.session import Session
from esmtpkit.handlers.base import MessageHandler
from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.server.interfaces import IMessageHandler
from esmtpkit.server.monitor import Monitor
from esmtpkit.server.policy import Policy
from esmtpkit.server.protocol import ESMTPProtocol

__all__ = ["Conversation", "RecordingHandler", "LoopbackServer", "serve", "parse_replies"]

_REPLY_LINE = re.compile(rb"(\d{3})([ -]|$)(.*)")


def parse_replies(data: bytes) -> list[Reply]:
    """Parse wire bytes into complete replies (multi-line replies joined); an incomplete tail is ignored."""
    replies: list[Reply] = []
    lines: list[str] = []
    for raw in data.split(b"\r\n")[:-1]:
        match = _REPLY_LINE.fullmatch(raw)
        if match is None:
            raise ValueError(f"not an SMTP reply line: {raw!r}")
        lines.append(match.group(3).decode("utf-8", "surrogateescape"))
        if match.group(2) != b"-":
            replies.append(strip_enhanced(Reply(int(match.group(1)), tuple(lines))))
            lines = []
    return replies


class _ClosingTransport(StringTransport):
    """A StringTransport that ends the connection when the server closes it, as a real one does once the client
    has taken the last replies (unless ``reading`` is False: a client that takes nothing)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reading = True
        self.protocol: Any = None

    def loseConnection(self) -> None:
        already = self.disconnecting
        super().loseConnection()
        if not already and self.reading and self.protocol is not None:
            from twisted.internet.error import ConnectionDone
            from twisted.python.failure import Failure

            self.protocol.connectionLost(Failure(ConnectionDone()))


class Conversation:
    """Talk to an `ESMTPProtocol` in memory: no sockets, no reactor; time moves only with ``clock.advance``.

    When the server closes, the connection ends at once, as it does for a client that takes its last replies;
    set ``transport.reading = False`` first to play a client that takes nothing (the server then drops it
    after `esmtpkit.server.protocol.CLOSE_DRAIN_TIMEOUT` seconds).

    >>> talk = Conversation(MessageHandler(), Policy(hostname="mx.test"))
    >>> talk.greeting.code
    220
    >>> talk.send("EHLO client.test").code
    250
    """

    def __init__(self, handler: IMessageHandler, policy: Policy | None = None,
                 clock: IReactorTime | None = None, peer: tuple[str, int] = ("127.0.0.1", 40000),
                 monitor: Monitor | None = None) -> None:
        from twisted.internet.address import IPv4Address

        self.handler = handler
        self.clock = clock if clock is not None else Clock()
        self.policy = policy if policy is not None else Policy(hostname="mx.test")
        self.protocol = ESMTPProtocol(handler, self.policy, self.clock, monitor)
        self.transport = _ClosingTransport(peerAddress=IPv4Address("TCP", *peer),
                                         hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)
        self._seen = 0
        replies = self.replies()
        self.greeting: Reply | None = replies[0] if replies else None

    @property
    def closed(self) -> bool:
        """True once the server closed (or asked to close) the connection."""
        return bool(self.transport.disconnecting)

    def write(self, data: bytes | str) -> None:
        """Send raw bytes (or text, encoded as UTF-8) exactly as given."""
        self.protocol.dataReceived(data.encode("utf-8") if isinstance(data, str) else data)

    def replies(self) -> list[Reply]:
        """The complete replies written since the last call."""
        data = self.transport.value()
        end = data.rfind(b"\r\n") + 2 if data.endswith(b"\r\n") else _complete(data)
        out = parse_replies(data[self._seen:end])
        self._seen = _advance(data, self._seen, len(out))
        return out

    def send(self, line: bytes | str) -> Reply | None:
        """Send one command line (CRLF added) and return the one reply it produced, or None if none yet."""
        self.write((line.encode("utf-8") if isinstance(line, str) else line) + b"\r\n")
        got = self.replies()
        if len(got) > 1:
            raise AssertionError(f"expected at most one reply, got {got}")
        return got[0] if got else None

    def message(self, sender: str, recipients: list[str], content: bytes, ehlo: str | None = "client.test") -> Reply:
        """Run a whole transaction (EHLO if given, MAIL, RCPT…, DATA, content, dot); return the final reply."""
        from esmtpkit.core.content import dot_stuff

        lines = []
        if ehlo:
            lines.append(f"EHLO {ehlo}")
        lines.append(f"MAIL FROM:<{sender}>")
        lines.extend(f"RCPT TO:<{r}>" for r in recipients)
        lines.append("DATA")
        self.write("".join(line + "\r\n" for line in lines).encode("utf-8") + dot_stuff(content))
        got = self.replies()
        if not got:
            raise AssertionError("no reply yet (is a handler Deferred pending?)")
        return got[-1]


def _complete(data: bytes) -> int:
    return data.rfind(b"\r\n") + 2


def _advance(data: bytes, start: int, count: int) -> int:
    pos = start
    done = 0
    while done < count:
        end = data.index(b"\r\n", pos)
        if data[pos + 3: pos + 4] != b"-":
            done += 1
        pos = end + 2
    return pos


@dataclass
class Call:
    """One call a RecordingHandler saw: the verb name and its arguments."""

    verb: str
    args: tuple[Any, ...]


@implementer(IMessageHandler)
class RecordingHandler(MessageHandler):
    """A MessageHandler that records every call (``calls``) and keeps each finished message (``messages``).

    ``replies`` maps a verb name to a Reply (or callable returning one) to answer differently from the defaults.
    """

    def __init__(self, replies: Mapping[str, Any] | None = None) -> None:
        self.calls: list[Call] = []
        self.messages: list[dict[str, Any]] = []
        self.replies = dict(replies or {})
        self._content: list[bytes] = []
        self._headers: list[tuple[str, str]] = []

    def _record(self, verb: str, *args: Any) -> Any:
        self.calls.append(Call(verb, args))
        override = self.replies.get(verb)
        if override is None:
            return getattr(MessageHandler, verb)(self, *args)
        return override(*args) if callable(override) else override

    @property
    def verbs(self) -> list[str]:
        """The verb names seen, in order."""
        return [c.verb for c in self.calls]

    def connect(self, session: Session) -> Any:
        self.session = session
        return self._record("connect", session)

    def helo(self, domain: str) -> Any:
        return self._record("helo", domain)

    def ehlo(self, domain: str) -> Any:
        return self._record("ehlo", domain)

    def mail(self, sender: Address, params: Mapping[str, Any]) -> Any:
        self._content, self._headers = [], []
        return self._record("mail", sender, dict(params))

    def rcpt(self, recipient: Address, params: Mapping[str, Any]) -> Any:
        return self._record("rcpt", recipient, dict(params))

    def data(self) -> Any:
        return self._record("data")

    def header(self, name: str, value: str) -> Any:
        self._headers.append((name, value))
        return self._record("header", name, value)

    def eoh(self) -> Any:
        return self._record("eoh")

    def body(self, chunk: bytes) -> Any:
        self._content.append(chunk)
        return self._record("body", chunk)

    def eom(self) -> Any:
        reply = self._record("eom")
        envelope = self.session.envelope if self.session else None
        self.messages.append({
            "sender": envelope.sender if envelope else None,
            "recipients": list(envelope.recipients) if envelope else [],
            "headers": list(self._headers),
            "body": b"".join(self._content),
        })
        return reply

    def abort(self, reason: str) -> Any:
        self._content, self._headers = [], []
        return self._record("abort", reason)

    def expn(self, argument: str) -> Any:
        return self._record("expn", argument)

    def vrfy(self, argument: str) -> Any:
        return self._record("vrfy", argument)

    def noop(self) -> Any:
        return self._record("noop")

    def rset(self) -> Any:
        return self._record("rset")

    def help(self, topic: str | None) -> Any:
        return self._record("help", topic)

    def quit(self) -> Any:
        return self._record("quit")

    def unknown(self, command: str) -> Any:
        return self._record("unknown", command)


@dataclass
class LoopbackServer:
    """A factory listening on 127.0.0.1: ``port`` to connect to, ``stop()`` to close the listener."""

    port: int
    listening: IListeningPort
    factory: ESMTPFactory

    @property
    def address(self) -> tuple[str, int]:
        """``("127.0.0.1", port)`` for smtplib and friends."""
        return ("127.0.0.1", self.port)

    def stop(self) -> "Deferred[None]":
        """Stop listening; the Deferred fires when the port is closed."""
        return self.listening.stopListening()  # type: ignore[return-value]


def serve(factory: ESMTPFactory | Callable[[], IMessageHandler], reactor: Any = None,
          policy: Policy | None = None, endpoint: str = "tcp:0:interface=127.0.0.1") -> "Deferred[LoopbackServer]":
    """Listen on a free loopback port; fires with a LoopbackServer. Accepts a factory or a handler factory."""
    from twisted.internet.endpoints import serverFromString

    if reactor is None:
        from twisted.internet import reactor as default

        reactor = default
    if not isinstance(factory, ESMTPFactory):
        factory = ESMTPFactory(factory, policy=policy if policy is not None else Policy(hostname="localhost"),
                               clock=reactor)
    built: ESMTPFactory = factory
    d = serverFromString(reactor, endpoint).listen(built)
    return d.addCallback(lambda port: LoopbackServer(getattr(port.getHost(), "port", 0), port, built))
