"""Monitors: what happens on each connection, told to the log (`EventLog`) and to metrics (`esmtpkit.ops.metrics`).

The protocol calls one `Monitor` per factory at fixed points (connection opened and closed, TLS, AUTH, every
reply, every message's end). The base class does nothing, so a monitor overrides only what it needs; `Monitors`
passes each call to several. `EventLog` turns the calls into `twisted.logger` events with a stable vocabulary
(the ``event`` field), which text, JSON and syslog observers all show: docs/operating.md lists every field.
AUTH arguments, passwords and message content are never part of an event. Text a client may have chosen (its
address, the sender, user names, reply text, reasons) goes into an event through `escape`: one event, one line.
"""

from __future__ import annotations

from string import Formatter
from time import time
from typing import Any, Iterable

from twisted.logger import Logger, LogLevel

from esmtpkit.core.commands import Verb
from esmtpkit.core.escape import escape
from esmtpkit.core.reply import Reply
from esmtpkit.core.session import Envelope, Session

__all__ = ["Monitor", "Monitors", "EventLog", "EVENTS", "guarded"]

#: Every event name EventLog emits, with its log level.
EVENTS = {
    "connection.opened": LogLevel.info,
    "connection.refused": LogLevel.warn,
    "connection.closed": LogLevel.info,
    "tls.established": LogLevel.info,
    "tls.failed": LogLevel.info,
    "auth.succeeded": LogLevel.info,
    "auth.failed": LogLevel.warn,
    "auth.throttled": LogLevel.warn,
    "client.replaced": LogLevel.info,
    "reply.error": LogLevel.info,
    "session.timeout": LogLevel.info,
    "message.accepted": LogLevel.info,
    "message.rejected": LogLevel.info,
    "message.aborted": LogLevel.info,
    "mailauth.verdict": LogLevel.info,
    "filter.verdict": LogLevel.info,
}

#: Replies to these verbs may echo what the client sent (an AUTH response, an unknown line): no text in the log.
_UNSAFE_TEXT = frozenset((Verb.AUTH.value, Verb.UNKNOWN.value))


class Monitor:
    """Told what happens on connections; every method does nothing here. Subclass and override what you need.

    Calls come from the reactor thread and must return quickly. Behind an `ESMTPFactory` (which wraps its monitor
    with `guarded`) an exception in a monitor is logged and never reaches the connection. ``timing``: set true to be given handler latencies
    (`handled`); the protocol only measures them when some monitor asks.
    """

    timing: bool = False

    def connection_opened(self, session: Session) -> None:
        """A connection was admitted (its greeting follows)."""

    def connection_refused(self, session: Session, reply: Reply) -> None:
        """A connection was answered ``reply`` (421) and closed at once: a connection limit, or shutting down."""

    def connection_closed(self, session: Session, duration: float, reason: str) -> None:
        """An admitted connection ended after ``duration`` seconds; ``reason`` says who ended it and why."""

    def tls_established(self, session: Session) -> None:
        """A TLS handshake completed; ``session.tls_info`` holds the version and cipher."""

    def tls_failed(self, session: Session, reason: str) -> None:
        """A connection ended before its TLS handshake completed."""

    def replied(self, session: Session, verb: str, reply: Reply) -> None:
        """The server answered ``reply`` to ``verb`` (CONNECT for the greeting; DATA/BDAT for end of data; TIMEOUT,
        SHUTDOWN and ERRORS for the 421s no command asked for)."""

    def handled(self, verb: str, seconds: float) -> None:
        """The handler's ``verb`` method took ``seconds`` to give its result (only when ``timing`` is set)."""

    def auth_succeeded(self, session: Session, mechanism: str, user: str) -> None:
        """AUTH succeeded; ``session.authenticated`` is ``user``."""

    def auth_failed(self, session: Session, mechanism: str, user: str | None, reply: Reply) -> None:
        """AUTH failed (wrong credentials, a malformed or cancelled exchange); ``user`` when the client named one."""

    def auth_throttled(self, session: Session, scope: str, user: str | None, seconds: float) -> None:
        """A wrong password brought the client's address (``scope`` "address") or the user name it named ("user")
        to its failure limit: AUTH from that address, or for that user, gets 454 4.7.0 for ``seconds``."""

    def client_replaced(self, session: Session, verb: str, previous: str) -> None:
        """A trusted proxy's ``verb`` (XCLIENT) replaced the client: ``session.peer`` is now the client it named;
        ``previous`` is the address it replaced (the proxy's)."""

    def timed_out(self, session: Session, phase: str) -> None:
        """The client said nothing for the command (or data) timeout; the connection closes with 421."""

    def message_accepted(self, session: Session, envelope: Envelope, size: int, seconds: float,
                         reply: Reply) -> None:
        """The handler accepted a message (``reply`` is the 2xx sent); ``seconds`` since MAIL was accepted."""

    def message_rejected(self, session: Session, envelope: Envelope, size: int, reply: Reply) -> None:
        """A message reached its end and was refused with ``reply`` (by the handler or by a limit)."""

    def message_aborted(self, session: Session, envelope: Envelope, size: int, reason: str) -> None:
        """A transaction ended without a final reply: RSET, HELO/EHLO, QUIT, a lost connection, a timeout."""

    def checked(self, session: Session, method: str, result: str, domain: str, seconds: float) -> None:
        """A mail-authentication check gave a verdict (`esmtpkit.mailauth`): ``method`` is ``spf.mailfrom``,
        ``spf.helo``, ``dkim`` (once per signature), ``arc`` or ``dmarc``; ``seconds`` the time it took."""

    def filtered(self, session: Session, name: str, stage: str, action: str, seconds: float,
                 reason: str = "") -> None:
        """A filter (`esmtpkit.filters`) answered ``action`` (``continue``, ``accept``, ``reject``, ``tempfail``,
        ``discard``, ``quarantine``) at ``stage`` (``connect``, ``helo``, ``mail``, ``rcpt``, ``message``), for
        ``reason`` (what it found, or why it failed; may be empty)."""


class Monitors(Monitor):
    """Passes every call on to each of ``monitors``, in order; an exception in one is logged, never raised."""

    def __init__(self, monitors: Iterable[Monitor]) -> None:
        self.monitors = tuple(monitors)
        self.timing = any(m.timing for m in self.monitors)
        for name in _CALLS:
            setattr(self, name, _fan_out(name, tuple(getattr(m, name) for m in self.monitors)))


#: The Monitor methods the protocol calls.
_CALLS = tuple(name for name, value in vars(Monitor).items() if callable(value) and not name.startswith("_"))

_log = Logger()


def _nothing(*args: Any) -> None:
    """A monitor method that was switched off."""


def _fan_out(name: str, methods: tuple[Any, ...]) -> Any:
    methods = tuple(m for m in methods if m is not _nothing)
    if not methods:
        return _nothing

    def each(*args: Any) -> None:
        for method in methods:
            try:
                method(*args)
            except Exception:
                _log.failure("monitor call {name} failed", name=name)

    return each


def guarded(monitor: Monitor) -> Monitors:
    """``monitor`` behind a `Monitors`, so that its failures are logged and never reach a connection."""
    return monitor if isinstance(monitor, Monitors) else Monitors([monitor])


def _user(text: str | None) -> str:
    """An AUTH user name as the event shows it (``""`` when none was given)."""
    return "" if text is None else escape(text)


def _common(event: str, session: Session) -> dict[str, Any]:
    # A PROXY header read by Twisted's own haproxy: endpoint can name any text as the peer's address.
    return {"event": event, "conn": session.id, "peer": escape(session.peer_ip)}


def _envelope(fields: dict[str, Any], envelope: Envelope) -> dict[str, Any]:
    fields["id"] = envelope.id
    fields["sender"] = escape(str(envelope.sender)) if envelope.sender is not None else ""
    fields["recipients"] = len(envelope.recipients)
    return fields


def _flat_keys(format: str) -> tuple[tuple[str, str, str], ...] | None:
    """(field, flattened key, structured key) for each ``{field}`` of ``format``, named as `twisted.logger`'s
    ``flattenEvent`` names them; None when a field has a conversion, a format spec or a repeat (left to Twisted)."""
    keys = []
    for _, name, spec, conversion in Formatter().parse(format):
        if name is None:
            continue
        if spec or conversion or not name.isidentifier() or any(name == k[0] for k in keys):
            return None
        keys.append((name, f"{name}!s:", f"{name}!:"))
    return tuple(keys)


#: The events each Monitor method may emit.
_EMITS = {
    "connection_opened": ("connection.opened",),
    "connection_refused": ("connection.refused",),
    "connection_closed": ("connection.closed",),
    "tls_established": ("tls.established",),
    "tls_failed": ("tls.failed",),
    "auth_succeeded": ("auth.succeeded",),
    "auth_failed": ("auth.failed",),
    "auth_throttled": ("auth.throttled",),
    "client_replaced": ("client.replaced",),
    "replied": ("reply.error",),
    "timed_out": ("session.timeout",),
    "message_accepted": ("message.accepted",),
    "message_rejected": ("message.rejected",),
    "message_aborted": ("message.aborted",),
}


class EventLog(Monitor):
    """Emits each call as a `twisted.logger` event in namespace ``esmtpkit.events``, named by its ``event`` field.

    ``minimum`` drops the events below a level before any work is done for them (``LogLevel.warn`` keeps refused
    connections and AUTH failures only): a log line per message can cost more CPU than receiving a small message
    does, which a server under load may not want to spend. Each event reaches the logger's observer already
    flattened (``log_flattened``, as `twisted.logger.jsonFileLogObserver` stores it), so that formatting its text or
    its JSON need not parse the format string again: see docs/performance.md.
    """

    def __init__(self, logger: Logger | None = None, minimum: LogLevel = LogLevel.info) -> None:
        self.log = logger if logger is not None else Logger(namespace="esmtpkit.events")
        self.minimum = minimum
        self._keys: dict[str, tuple[tuple[str, str, str], ...] | None] = {}
        self._direct = type(self.log).emit is Logger.emit  # else a subclass's emit must see every event
        for method, events in _EMITS.items():
            if all(EVENTS[e] < minimum for e in events):
                setattr(self, method, _nothing)

    def _emit(self, format: str, fields: dict[str, Any]) -> None:
        """Send ``fields`` (``event`` first) to the logger's observer as the event `Logger.emit` makes, plus its
        ``log_flattened`` values (through ``emit`` itself when the logger's class overrides it)."""
        keys = self._keys.get(format, False)
        if keys is False:
            keys = self._keys[format] = _flat_keys(format)
        if keys:
            flat: dict[str, Any] = {}
            for name, text_key, value_key in keys:
                value = fields[name]
                flat[text_key] = str(value)
                flat[value_key] = value
        log = self.log
        if not self._direct:
            if keys:
                fields["log_flattened"] = flat
            log.emit(EVENTS[fields["event"]], format, **fields)
            return
        fields["log_logger"] = log
        fields["log_level"] = EVENTS[fields["event"]]
        fields["log_namespace"] = log.namespace
        fields["log_source"] = log.source
        fields["log_format"] = format
        fields["log_time"] = time()
        if keys:
            fields["log_flattened"] = flat
        log.observer(fields)

    def connection_opened(self, session: Session) -> None:
        host = session.host
        fields = _common("connection.opened", session)
        fields["port"] = getattr(session.peer, "port", None)
        fields["local"] = escape(str(getattr(host, "host", "") or ""))
        fields["local_port"] = getattr(host, "port", None)
        fields["tls"] = session.tls
        self._emit("connection {conn} from {peer} port {port}", fields)

    def connection_refused(self, session: Session, reply: Reply) -> None:
        fields = _common("connection.refused", session)
        fields.update(code=reply.code, enhanced=reply.enhanced or "", reply_text=escape(reply.text))
        self._emit("connection {conn} from {peer} refused: {code} {reply_text}", fields)

    def connection_closed(self, session: Session, duration: float, reason: str) -> None:
        info = session.tls_info
        fields = _common("connection.closed", session)
        fields["duration"] = round(duration, 3)
        fields["reason"] = escape(reason)
        fields["messages"] = session.transactions
        fields["tls_version"] = info.get("version", "")
        fields["tls_cipher"] = info.get("cipher", "")
        fields["user"] = _user(session.authenticated)
        self._emit("connection {conn} from {peer} closed after {duration}s ({messages} message(s)): {reason}",
                   fields)

    def tls_established(self, session: Session) -> None:
        info = session.tls_info
        fields = _common("tls.established", session)
        fields.update(tls_version=info.get("version", ""), tls_cipher=info.get("cipher", ""),
                      tls_bits=info.get("bits", ""))
        self._emit("connection {conn} from {peer}: {tls_version} {tls_cipher}", fields)

    def tls_failed(self, session: Session, reason: str) -> None:
        fields = _common("tls.failed", session)
        fields["reason"] = escape(reason)
        self._emit("connection {conn} from {peer}: TLS handshake failed: {reason}", fields)

    def auth_succeeded(self, session: Session, mechanism: str, user: str) -> None:
        fields = _common("auth.succeeded", session)
        fields.update(mechanism=mechanism, user=_user(user))
        self._emit("connection {conn} from {peer}: AUTH {mechanism} as {user}", fields)

    def auth_failed(self, session: Session, mechanism: str, user: str | None, reply: Reply) -> None:
        fields = _common("auth.failed", session)
        fields.update(mechanism=mechanism, user=_user(user), code=reply.code, enhanced=reply.enhanced or "")
        self._emit("connection {conn} from {peer}: AUTH {mechanism} failed for {user}: {code}", fields)

    def auth_throttled(self, session: Session, scope: str, user: str | None, seconds: float) -> None:
        fields = _common("auth.throttled", session)
        fields.update(scope=scope, user=_user(user), cool_off=seconds)
        self._emit("connection {conn} from {peer}: AUTH failure limit of this {scope} reached "
                   "(user {user}): AUTH refused for {cool_off}s", fields)

    def replied(self, session: Session, verb: str, reply: Reply) -> None:
        if reply.code < 400:
            return
        text = "" if verb in _UNSAFE_TEXT else escape(reply.lines[0])
        fields = _common("reply.error", session)
        fields.update(verb=verb, code=reply.code, enhanced=reply.enhanced or "", reply_text=text)
        self._emit("connection {conn} from {peer}: {verb} answered {code} {enhanced}"
                   + (" {reply_text}" if text else ""), fields)

    def client_replaced(self, session: Session, verb: str, previous: str) -> None:
        fields = _common("client.replaced", session)
        fields.update(verb=verb, previous=escape(previous), client_name=escape(session.client_name or ""),
                      user=_user(session.authenticated))
        self._emit("connection {conn} from {previous}: {verb} names the client {peer}", fields)

    def timed_out(self, session: Session, phase: str) -> None:
        fields = _common("session.timeout", session)
        fields["phase"] = phase
        self._emit("connection {conn} from {peer}: timeout in {phase}", fields)

    def message_accepted(self, session: Session, envelope: Envelope, size: int, seconds: float,
                         reply: Reply) -> None:
        fields = _envelope(_common("message.accepted", session), envelope)
        fields["size"] = size
        fields["elapsed"] = round(seconds, 3)
        fields["code"] = reply.code
        fields["enhanced"] = reply.enhanced or ""
        self._emit("message {id} accepted: from=<{sender}> recipients={recipients} size={size} "
                   "elapsed={elapsed}s conn={conn} peer={peer}", fields)

    def message_rejected(self, session: Session, envelope: Envelope, size: int, reply: Reply) -> None:
        fields = _envelope(_common("message.rejected", session), envelope)
        fields.update(size=size, code=reply.code, enhanced=reply.enhanced or "", reply_text=escape(reply.lines[0]))
        self._emit("message {id} rejected: {code} {enhanced} {reply_text} from=<{sender}> recipients={recipients} "
                   "size={size} conn={conn} peer={peer}", fields)

    def message_aborted(self, session: Session, envelope: Envelope, size: int, reason: str) -> None:
        fields = _envelope(_common("message.aborted", session), envelope)
        fields.update(size=size, reason=escape(reason))
        self._emit("message {id} aborted: {reason} from=<{sender}> recipients={recipients} size={size} "
                   "conn={conn} peer={peer}", fields)

    def filtered(self, session: Session, name: str, stage: str, action: str, seconds: float,
                 reason: str = "") -> None:
        fields = _common("filter.verdict", session)
        fields.update(id=session.envelope.id, filter=escape(name), stage=stage, action=action,
                      elapsed=round(seconds, 3), reason=escape(reason))
        self._emit("filter {filter} {stage}={action} elapsed={elapsed}s message={id} conn={conn} peer={peer} "
                   "reason={reason}", fields)

    def checked(self, session: Session, method: str, result: str, domain: str, seconds: float) -> None:
        fields = _common("mailauth.verdict", session)
        fields.update(id=session.envelope.id, method=method, result=result, domain=escape(domain),
                      elapsed=round(seconds, 3))
        self._emit("message {id} {method}={result} domain={domain} elapsed={elapsed}s conn={conn} peer={peer}",
                   fields)
