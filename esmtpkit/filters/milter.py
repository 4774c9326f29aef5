"""Any milter (OpenDKIM, OpenDMARC, clamav-milter, rspamd's proxy...) as a filter: the MTA's side of libmilter's
protocol, version 6, over a Twisted connection, one connection to the milter per SMTP connection.

The milter hears the stages it asks for (connect, HELO, MAIL, RCPT, then DATA, each header field, the end of the
header section, the body in chunks and the end of the message), each with the macros Postfix sends by default
(or those the milter lists), and its answers become `Verdict` values; header changes and quarantine, asked at the
end of the message, go into the last one. See docs/filters/milter.md.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

import esmtpkit
from esmtpkit.core.reply import Reply
from esmtpkit.core.session import Session
from esmtpkit.filters import milter_codec as mc
from esmtpkit.filters.base import FilterSession, parse_failure
from esmtpkit.filters.interfaces import HeldMessage, IFilter, IFilterSession
from esmtpkit.filters.milter_codec import MilterProtocolError
from esmtpkit.filters.stream import client_endpoint
from esmtpkit.filters.verdict import CONTINUE, Action, HeaderEdit, Verdict

__all__ = ["MilterFilter", "MilterSession", "MilterProtocolError", "from_spec", "REJECTED", "TEMPFAILED"]

#: The replies to a milter's plain reject and tempfail.
REJECTED = Reply.of(550, "Rejected by the mail filter", enhanced="5.7.1")
TEMPFAILED = Reply.of(451, "The mail filter says try again later", enhanced="4.7.1")

#: The most header changes one message may collect, and their octets together.
MAX_EDITS, MAX_EDIT_OCTETS = 1000, 1 << 20

#: The macros sent with each command when the milter gives no list of its own (Postfix's defaults).
DEFAULT_MACROS: Mapping[bytes, tuple[str, ...]] = {
    mc.SMFIC_CONNECT: ("j", "{daemon_name}", "{daemon_addr}", "v", "_", "{client_addr}", "{client_port}",
                       "{client_name}"),
    mc.SMFIC_HELO: ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}"),
    mc.SMFIC_MAIL: ("i", "{auth_type}", "{auth_authen}", "{auth_author}", "{mail_addr}", "{mail_host}",
                    "{mail_mailer}"),
    mc.SMFIC_RCPT: ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
    mc.SMFIC_DATA: ("i",),
    mc.SMFIC_EOH: ("i",),
    mc.SMFIC_BODYEOB: ("i",),
}

#: The replies that end a step (the others change headers, quarantine, or say the milter is still working).
_DECISIONS = {mc.SMFIR_ACCEPT, mc.SMFIR_CONTINUE, mc.SMFIR_DISCARD, mc.SMFIR_REJECT, mc.SMFIR_TEMPFAIL,
              mc.SMFIR_SKIP, mc.SMFIR_REPLYCODE}
_EDITS = {mc.SMFIR_ADDHEADER: mc.SMFIF_ADDHDRS, mc.SMFIR_INSHEADER: mc.SMFIF_ADDHDRS,
          mc.SMFIR_CHGHEADER: mc.SMFIF_CHGHDRS, mc.SMFIR_QUARANTINE: mc.SMFIF_QUARANTINE}
#: A body chunk's SMFIR_SKIP: send no more of the body.
_SKIP = Verdict(reason="the milter wants no more of the body")


@implementer(IPushProducer)
class MilterProtocol(Protocol):
    """One connection to a milter: sends packets, and hands each reply to the one step waiting for it (`reply`).
    Replies that change the message are passed to ``collect`` while it is set (the end of the message); anything
    else unasked, or malformed, aborts the connection. Pauses its writer when the transport's buffer is full."""

    def __init__(self) -> None:
        self.decoder = mc.Decoder()
        self.waiter: Deferred[tuple[bytes, bytes]] | None = None
        self.collect: Callable[[bytes, bytes], None] | None = None
        self.error: BaseException | None = None
        self.lost = False
        self.paused: Deferred[None] | None = None

    def connectionMade(self) -> None:
        nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if nodelay is not None:
            nodelay(True)  # a step is a few small packets and a wait for the answer: Nagle would hold the last one
        self.transport.registerProducer(self, True)

    def send(self, data: bytes) -> None:
        if self.error is not None or self.lost:
            raise self.error or ConnectionDone("the milter closed the connection")
        self.transport.write(data)

    def reply(self) -> Deferred[tuple[bytes, bytes]]:
        """The next decision the milter sends; cancelling it closes the connection."""
        if self.error is not None or self.lost:
            raise self.error or ConnectionDone("the milter closed the connection")
        self.waiter = Deferred(self._cancelled)
        return self.waiter

    async def drain(self) -> None:
        """Wait while the connection's send buffer is full."""
        while self.paused is not None:
            await self.paused

    def dataReceived(self, data: bytes) -> None:
        try:
            for command, payload in self.decoder.feed(data):
                self._packet(command, payload)
        except Exception as e:
            self.fail(e)

    def _packet(self, command: bytes, data: bytes) -> None:
        if self.error is not None:
            return
        if self.waiter is None:
            raise MilterProtocolError(f"the milter sent {command!r} unasked")
        if command == mc.SMFIR_PROGRESS:
            return
        if command in _EDITS and self.collect is not None:
            self.collect(command, data)
            return
        if command not in _DECISIONS and command != mc.SMFIC_OPTNEG:
            raise MilterProtocolError(f"the milter sent {command!r}, not a reply it may send here")
        waiter, self.waiter = self.waiter, None
        waiter.callback((command, data))

    def fail(self, error: BaseException) -> None:
        """Give up on the connection: the waiting step fails with ``error``."""
        if self.error is None:
            self.error = error
        if not self.lost and self.transport is not None:
            self.transport.abortConnection()
        self._release(self.error)

    def _cancelled(self, waiter: Deferred[Any]) -> None:
        self.waiter = None
        self.fail(CancelledError("a step of the milter was cancelled"))

    def _release(self, error: BaseException) -> None:
        waiter, self.waiter = self.waiter, None
        paused, self.paused = self.paused, None
        if waiter is not None:
            waiter.errback(error)
        if paused is not None:
            paused.errback(error)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        self._release(self.error or ConnectionDone("the milter closed the connection"))

    def close(self) -> None:
        """SMFIC_QUIT, then close."""
        if not self.lost and self.error is None:
            self.transport.write(mc.packet(mc.SMFIC_QUIT))
            self.transport.unregisterProducer()  # a paused producer would hold the connection open
            self.transport.loseConnection()
        self.error = self.error or ConnectionDone("closed")

    def pauseProducing(self) -> None:
        if self.paused is None:
            self.paused = Deferred(lambda d: self.fail(CancelledError("a step of the milter was cancelled")))

    def resumeProducing(self) -> None:
        paused, self.paused = self.paused, None
        if paused is not None:
            paused.callback(None)

    def stopProducing(self) -> None:
        pass


def _address(value: Any) -> str:
    return str(value or "")


def _domain(address: str) -> str:
    return address.rpartition("@")[2] if "@" in address else ""


@implementer(IFilterSession)
class MilterSession(FilterSession):
    """One SMTP connection's conversation with the milter (see the module docstring)."""

    def __init__(self, session: Session, owner: "MilterFilter") -> None:
        super().__init__(session)
        self.owner = owner
        self.protocol: MilterProtocol | None = None
        self.negotiated: mc.Negotiated | None = None
        self.connecting: Deferred[Any] | None = None
        self.in_message = False
        self.closed = False

    # ---- stages ------------------------------------------------------------------------------------------------

    def connect(self) -> Deferred[Verdict]:
        return Deferred.fromCoroutine(self._connect())

    def helo(self, name: str) -> Deferred[Verdict]:
        return Deferred.fromCoroutine(self._step(mc.SMFIC_HELO, mc.SMFIP_NOHELO, mc.SMFIP_NR_HELO,
                                                 lambda: mc.helo(name)))

    def mail(self, sender: str, params: Mapping[str, Any]) -> Deferred[Verdict]:
        self.in_message = True
        return Deferred.fromCoroutine(self._step(mc.SMFIC_MAIL, mc.SMFIP_NOMAIL, mc.SMFIP_NR_MAIL,
                                                 lambda: mc.envelope(mc.SMFIC_MAIL, sender, params),
                                                 sender=sender, params=params))

    def rcpt(self, recipient: str, params: Mapping[str, Any]) -> Deferred[Verdict]:
        return Deferred.fromCoroutine(self._step(mc.SMFIC_RCPT, mc.SMFIP_NORCPT, mc.SMFIP_NR_RCPT,
                                                 lambda: mc.envelope(mc.SMFIC_RCPT, recipient, params),
                                                 recipient=recipient))

    def message(self, message: HeldMessage) -> Deferred[Verdict]:
        self.in_message = True
        return Deferred.fromCoroutine(self._message(message))

    def reset(self) -> None:
        """SMFIC_ABORT, when the milter has a transaction to forget."""
        if self.in_message and self._usable():
            self.in_message = False
            assert self.protocol is not None
            self.protocol.send(mc.packet(mc.SMFIC_ABORT))

    def close(self) -> None:
        """SMFIC_QUIT and close the connection (or stop connecting)."""
        self.closed = True
        if self.connecting is not None:
            self.connecting.cancel()
        if self.protocol is not None:
            self.protocol.close()

    # ---- the conversation --------------------------------------------------------------------------------------

    def _usable(self) -> bool:
        return self.protocol is not None and self.protocol.error is None and not self.protocol.lost

    def _live(self) -> tuple[MilterProtocol, mc.Negotiated]:
        if self.protocol is None or self.negotiated is None:
            raise MilterProtocolError("no connection to the milter (connect was not asked or failed)")
        return self.protocol, self.negotiated

    async def _connect(self) -> Verdict:
        factory = Factory.forProtocol(MilterProtocol)
        factory.noisy = False  # one connection per SMTP connection: not worth two log lines each
        self.connecting = self.owner.endpoint.connect(factory)
        try:
            protocol = await self.connecting
        finally:
            self.connecting = None
        self.protocol = protocol
        if self.closed:
            protocol.close()
            raise ConnectionDone("closed while connecting to the milter")
        protocol.send(mc.optneg())
        command, data = await protocol.reply()
        if command != mc.SMFIC_OPTNEG:
            protocol.fail(MilterProtocolError(f"the milter answered {command!r} to option negotiation"))
            raise protocol.error  # type: ignore[misc]
        try:
            self.negotiated = mc.parse_optneg(data)
        except MilterProtocolError as e:
            protocol.fail(e)
            raise
        family, port, address = self._peer()
        name = self.session.client_name or (f"[{address}]" if address else "unknown")
        return await self._step(mc.SMFIC_CONNECT, mc.SMFIP_NOCONNECT, mc.SMFIP_NR_CONN,
                                lambda: mc.connect(name, family, port, address))

    def _peer(self) -> tuple[bytes, int, str]:
        peer = self.session.peer
        host = self.session.peer_ip
        if host:
            return (b"6" if ":" in host else b"4"), int(getattr(peer, "port", 0) or 0), host
        name = getattr(peer, "name", None)
        if isinstance(name, (str, bytes)) and name:
            return b"L", 0, name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        return b"U", 0, ""

    async def _step(self, command: bytes, skip: int, silent: int, encode: Callable[[], bytes],
                    **context: Any) -> Verdict:
        """Send ``command`` (with its macros) unless the milter set ``skip``; its decision unless it set
        ``silent``."""
        protocol, negotiated = self._live()
        if negotiated.has(skip):
            return CONTINUE
        self._macros(command, **context)
        protocol.send(encode())
        if negotiated.has(silent):
            await protocol.drain()
            return CONTINUE
        return self._decision(await protocol.reply())

    def _decision(self, answer: tuple[bytes, bytes], body: bool = False) -> Verdict:
        """The verdict for a milter's decision; a decision it may not give here closes the connection."""
        try:
            return self._decide(*answer, body=body)
        except MilterProtocolError as e:
            if self.protocol is not None:
                self.protocol.fail(e)
            raise

    def _decide(self, command: bytes, data: bytes, body: bool) -> Verdict:
        if command == mc.SMFIR_CONTINUE:
            return CONTINUE
        if command == mc.SMFIR_ACCEPT:
            return Verdict(Action.ACCEPT, reason="accepted by the milter")
        if command == mc.SMFIR_REJECT:
            return Verdict(Action.REJECT, REJECTED, reason="rejected by the milter")
        if command == mc.SMFIR_TEMPFAIL:
            return Verdict(Action.TEMPFAIL, TEMPFAILED, reason="tempfail from the milter")
        if command == mc.SMFIR_DISCARD:
            return Verdict(Action.DISCARD, reason="discarded by the milter")
        if command == mc.SMFIR_REPLYCODE:
            reply = mc.parse_replycode(data)
            action = Action.TEMPFAIL if reply.code < 500 else Action.REJECT
            return Verdict(action, reply, reason=f"{action.value} from the milter: {reply.code}")
        if command == mc.SMFIR_SKIP and body and self.negotiated is not None and self.negotiated.has(mc.SMFIP_SKIP):
            return _SKIP
        raise MilterProtocolError(f"the milter answered {command!r} where it may not")

    def _macros(self, command: bytes, sender: str | None = None, params: Mapping[str, Any] | None = None,
                recipient: str | None = None) -> None:
        protocol, negotiated = self._live()
        names = negotiated.macros.get(command, DEFAULT_MACROS.get(command, ()))
        known = self._known(command, sender, params, recipient)
        values = [(name, known[name]) for name in names if known.get(name)]
        if values:
            protocol.send(mc.macros(command, values))

    def _known(self, command: bytes, sender: str | None, params: Mapping[str, Any] | None,
               recipient: str | None) -> dict[str, str]:
        """Every macro esmtpkit knows a value for at ``command``."""
        session = self.session
        values = {"j": session.hostname, "{daemon_name}": session.hostname, "i": session.envelope.id,
                  "v": f"esmtpkit {esmtpkit.__version__}"}
        if command == mc.SMFIC_CONNECT:
            address = session.peer_ip
            name = session.client_name or "unknown"
            values.update({"{daemon_addr}": str(getattr(session.host, "host", "") or ""),
                           "_": f"{name} [{address}]" if address else name, "{client_addr}": address,
                           "{client_port}": str(getattr(session.peer, "port", "") or ""),
                           "{client_name}": name})
        elif command == mc.SMFIC_HELO and session.tls:
            info = session.tls_info
            values.update({"{tls_version}": info.get("version", ""), "{cipher}": info.get("cipher", ""),
                           "{cipher_bits}": info.get("bits", "")})
        elif command == mc.SMFIC_MAIL:
            address = _address(sender)
            author = str((params or {}).get("AUTH", "") or "")
            values.update({"{auth_type}": session.auth_mechanism or "", "{auth_authen}": session.authenticated
                           or "", "{auth_author}": "" if author == "<>" else author, "{mail_addr}": address,
                           "{mail_host}": _domain(address), "{mail_mailer}": "smtp" if address else ""})
        elif command == mc.SMFIC_RCPT:
            address = _address(recipient)
            values.update({"{rcpt_addr}": address, "{rcpt_host}": _domain(address), "{rcpt_mailer}": "smtp"})
        return values

    async def _message(self, message: HeldMessage) -> Verdict:
        protocol, negotiated = self._live()
        verdict = await self._step(mc.SMFIC_DATA, mc.SMFIP_NODATA, mc.SMFIP_NR_DATA, lambda: mc.packet(mc.SMFIC_DATA))
        if verdict.action is not Action.CONTINUE:
            return verdict
        leading = negotiated.has(mc.SMFIP_HDR_LEADSPC)
        with message.open() as stream:
            reader = mc.HeaderReader(stream)
            for name, value in reader.fields():
                if not leading:
                    value = value.lstrip(b" \t")
                verdict = await self._step(mc.SMFIC_HEADER, mc.SMFIP_NOHDRS, mc.SMFIP_NR_HDR,
                                           lambda: mc.header(name, value))
                if verdict.action is not Action.CONTINUE:
                    return verdict
            verdict = await self._step(mc.SMFIC_EOH, mc.SMFIP_NOEOH, mc.SMFIP_NR_EOH,
                                       lambda: mc.packet(mc.SMFIC_EOH))
            if verdict.action is not Action.CONTINUE:
                return verdict
            if not negotiated.has(mc.SMFIP_NOBODY):
                for chunk in reader.chunks():
                    protocol.send(mc.packet(mc.SMFIC_BODY, chunk))
                    if negotiated.has(mc.SMFIP_NR_BODY):
                        await protocol.drain()
                        continue
                    verdict = self._decision(await protocol.reply(), body=True)
                    if verdict is _SKIP:
                        break
                    if verdict.action is not Action.CONTINUE:
                        return verdict
        return await self._end(protocol, negotiated)

    async def _end(self, protocol: MilterProtocol, negotiated: mc.Negotiated) -> Verdict:
        """SMFIC_BODYEOB, then the header changes and quarantine until the milter's decision."""
        edits: list[HeaderEdit] = []
        quarantine: list[str] = []
        octets = 0
        leading = negotiated.has(mc.SMFIP_HDR_LEADSPC)

        def collect(command: bytes, data: bytes) -> None:
            nonlocal octets
            if not negotiated.actions & _EDITS[command]:
                raise MilterProtocolError(f"the milter sent {command!r}, an action it did not negotiate")
            octets += len(data)
            if len(edits) >= MAX_EDITS or octets > MAX_EDIT_OCTETS:
                raise MilterProtocolError(f"more than {MAX_EDITS} header changes or {MAX_EDIT_OCTETS} octets")
            if command == mc.SMFIR_QUARANTINE:
                quarantine.append(mc.safe_text(data.rstrip(b"\0"))[:200])
            else:
                edits.append(mc.parse_edit(command, data, leading))

        self._macros(mc.SMFIC_BODYEOB)
        protocol.send(mc.packet(mc.SMFIC_BODYEOB))
        protocol.collect = collect
        try:
            answer = await protocol.reply()
        finally:
            protocol.collect = None
        self.in_message = False
        verdict = self._decision(answer)
        if verdict.final:
            return verdict
        if quarantine:
            return Verdict(Action.QUARANTINE, edits=tuple(edits), reason=quarantine[0] or "quarantined by the milter")
        return Verdict(verdict.action, edits=tuple(edits), reason=verdict.reason)


@implementer(IFilter)
class MilterFilter:
    """A milter at ``endpoint`` (a Twisted client endpoint): one connection per SMTP connection, opened at
    connect. ``name``, ``timeout`` and ``on_failure`` as for every filter."""

    #: A session's milter conversation cannot be picked up again after a failure.
    stateless = False

    def __init__(self, endpoint: Any, *, name: str = "milter", timeout: float | None = None,
                 on_failure: str | Action | None = None) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout is a number of seconds above 0")
        self.endpoint = endpoint
        self.name = name
        self.timeout = timeout
        self.on_failure = parse_failure(on_failure)

    def start(self, session: Session) -> MilterSession:
        return MilterSession(session, self)


def from_spec(target: str, options: Mapping[str, str], *, reactor: Any = None) -> MilterFilter:
    """``--filter milter:TARGET[,name=N][,timeout=S][,on-failure=tempfail|accept]``; TARGET is a client endpoint
    (``tcp:127.0.0.1:8891``, ``unix:/run/opendkim/opendkim.sock``), checked by `client_endpoint`; without
    ``reactor`` the global one is looked up only when connecting."""
    unknown = sorted(set(options) - {"name", "timeout", "on-failure"})
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} (name, timeout, on-failure)")
    if not target:
        raise ValueError("no target (a client endpoint such as tcp:127.0.0.1:8891)")
    try:
        endpoint = client_endpoint(target, reactor)
    except ValueError as e:
        raise ValueError(f"{e}") from None
    timeout = None
    if "timeout" in options:
        try:
            timeout = float(options["timeout"])
        except ValueError:
            timeout = -1.0
        if not 0 < timeout < float("inf"):
            raise ValueError(f"timeout must be a number of seconds above 0, not "
                             f"{options['timeout']!r}")
    try:
        on_failure = parse_failure(options.get("on-failure"))
    except ValueError as e:
        raise ValueError(f"{e}") from None
    name = options.get("name") or "milter"
    return MilterFilter(endpoint, name=name, timeout=timeout, on_failure=on_failure)
