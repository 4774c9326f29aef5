"""`ESMTPProtocol`: one SMTP (or LMTP) connection, speaking RFC 5321 and asking an `IMessageHandler` for every reply.

The Twisted edge around the pure conversation (`esmtpkit.core.conversation`): this module reads and writes bytes,
runs the timers, pauses and resumes the transport, and switches between line mode (commands) and raw mode
(message content, read by `esmtpkit.core.content.ContentReader`). The verbs are in `esmtpkit.server.verbs`, AUTH in
`esmtpkit.server.auth`, message content (DATA and BDAT) in `esmtpkit.server.transfer`, the step queue that runs
handler calls in order in `esmtpkit.server.steps`, and when reading pauses in `esmtpkit.server.flow`.
"""

from __future__ import annotations

import time
import weakref
from functools import lru_cache
from typing import Any, Callable, Final

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IPushProducer, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpkit.core.commands import CommandError, Verb, line_limit
from esmtpkit.core.conversation import ServerConversation
from esmtpkit.core.escape import escape
from esmtpkit.core.ids import new_id
from esmtpkit.core.reply import Reply
from esmtpkit.core.rules import Phase, Standing
from esmtpkit.core.session import Session
from esmtpkit.server import sasl
from esmtpkit.server.auth import Auth
from esmtpkit.server.extensions import extensions_for, trusted
from esmtpkit.server.flow import PIECE, Flow
from esmtpkit.server.interfaces import IMessageHandler
from esmtpkit.server.monitor import Monitor
from esmtpkit.server.policy import Policy
from esmtpkit.server.replies import (EARLY_TALKER, LINE_TOO_LONG, SHUTTING_DOWN, TIMEOUT, TOO_MANY_ERRORS)
from esmtpkit.server.steps import Steps
from esmtpkit.server.tls import is_tls, tls_info
from esmtpkit.server.transfer import Transfer
from esmtpkit.server.verbs import Verbs

__all__ = ["ESMTPProtocol", "CLOSE_DRAIN_TIMEOUT", "SHUTTING_DOWN"]

#: Seconds a closing connection may take to hand its last replies to the client before it is dropped: a client
#: that reads nothing would otherwise keep its connection (and its slot against the limits) open for ever.
CLOSE_DRAIN_TIMEOUT: Final = 30.0

#: The monitor of a protocol made without one: it hears everything and does nothing.
_SILENT = Monitor()
_LABELS: Final = {verb: verb.value for verb in Verb}  # the monitor's verb label (Enum.value is a slow property)
_METHODS: Final = {verb: f"_do_{verb.value}" for verb in Verb}


@lru_cache(maxsize=32)
def _longest_command(base: int, auth: bool, mail_extra: int = 0, rcpt_extra: int = 0, verb_extra: int = -1) -> int:
    """The longest command line any verb may have (RFC 4954 §4: 12288 octets for AUTH lines, when AUTH is on),
    with the room extensions add to MAIL, to RCPT and (``verb_extra``, -1 for none) to their own verbs."""
    longest = max(line_limit(verb, base) for verb in Verb if verb is not Verb.AUTH or auth)
    longest = max(longest, line_limit(Verb.MAIL, base) + mail_extra, line_limit(Verb.RCPT, base) + rcpt_extra)
    if verb_extra >= 0:
        longest = max(longest, line_limit(Verb.UNKNOWN, base) + verb_extra)
    return longest


#: The admission settings of the policies in use, by identity (equal policies may differ in their TLS context).
_STANDINGS: dict[int, dict[tuple[str, ...], Standing]] = {}


def _standing(policy: Policy, auth: tuple[str, ...]) -> Standing:
    """The admission settings of ``policy`` (with the AUTH mechanisms ``auth`` offered), one object shared by all
    its connections."""
    known = _STANDINGS.get(id(policy))
    if known is None:
        known = _STANDINGS[id(policy)] = {}
        weakref.finalize(policy, _STANDINGS.pop, id(policy), None)
    standing = known.get(auth)
    if standing is None:
        standing = known[auth] = _new_standing(policy, auth)
    return standing


def _new_standing(policy: Policy, auth: tuple[str, ...]) -> Standing:
    return Standing(lmtp=policy.lmtp, starttls=policy.tls_context is not None, auth=bool(auth),
                    require_tls=policy.require_tls, require_auth=policy.require_auth,
                    auth_require_tls=policy.auth_require_tls, max_transactions=policy.max_transactions,
                    extensions=extensions_for(policy, auth))


@implementer(IHandshakeListener, IPushProducer)
class ESMTPProtocol(Transfer, Verbs, Auth, Steps, Flow, LineReceiver):
    """Speaks ESMTP on one connection and delegates every verb to ``handler``.

    It is its transport's streaming producer (as Twisted's HTTP server is): when the replies waiting to be sent
    pass the transport's buffer size, the transport calls `pauseProducing` and nothing more is read from a
    client that does not read what it is sent, until `resumeProducing`.
    """

    delimiter = b"\r\n"
    # Slots keep an idle connection small: more than 30 attributes in the instance __dict__ would make Python give
    # every connection a dict of its own (1.5 KiB) instead of sharing the keys. The base classes' attributes that
    # every connection sets are slots too (so most connections need no __dict__ at all); anything else still works.
    __slots__ = ("transport", "connected", "factory", "MAX_LENGTH", "line_mode", "_buffer", "_busyReceiving", "paused",
                 "handler", "policy", "clock", "monitor", "session", "conversation", "errors", "_verb", "_opened_at",
                 "_mail_at", "_admitted", "_close_reason", "_todo", "_waiting", "_reprocess", "_unread", "_later",
                 "_skipping_line", "_skip_cr", "_message", "_timer", "_pregreet", "_early_talker", "_closing",
                 "_chunk", "_sasl", "_identity", "_mechanisms", "_write_blocked", "_producing", "_delay",
                 "_auth_attempt", "_gone")

    def __init__(self, handler: IMessageHandler, policy: Policy | None = None,
                 clock: IReactorTime | None = None, monitor: Monitor | None = None) -> None:
        # The defaults the base classes keep as class attributes, which slots hide.
        self.transport = None
        self.connected = 0
        self.factory = None
        self.MAX_LENGTH = LineReceiver.MAX_LENGTH
        self.line_mode = 1
        self._buffer = b""
        self._busyReceiving = False
        self.paused = False
        self.handler = handler
        self.policy = p = policy if policy is not None else Policy()
        self.clock = clock
        self.monitor = monitor if monitor is not None else _SILENT
        self._verb = "CONNECT"  # what the next reply answers, for the monitor
        self._opened_at = 0.0
        self._mail_at = 0.0
        self._admitted = False
        self._close_reason = ""
        self._mechanisms = tuple(sasl.mechanisms_for(p.portal, p.auth_mechanisms)) if p.portal is not None else ()
        self.session = Session(hostname=p.hostname, lmtp=p.lmtp)
        self.conversation = ServerConversation(self.session, _standing(p, self._mechanisms),
                                               p.max_command_length, p.junk_command_limit)
        self._gone = False
        self.errors = 0
        # The step queue, kept in reverse (the next step is last): taking a step is O(1) however many one read
        # brings (one per line for a LINES handler), and an empty list is 700 bytes smaller than a deque.
        self._todo: list[Any] = []
        self._waiting = False
        self._reprocess = False
        self._unread = b""  # bytes read past the end of a message or chunk, to be parsed before anything newer
        # The newest read and how much of it LineReceiver was given, while some is left (see Flow); one slot for
        # the two, as every connection carries it.
        self._later: tuple[bytes, int] | None = None
        self._skipping_line = False
        self._skip_cr = False
        self._message: Any = None
        self._timer: IDelayedCall | None = None
        self._pregreet: IDelayedCall | None = None
        self._early_talker = False
        self._closing = False
        self._chunk: Any = None
        self._sasl: sasl.Mechanism | None = None
        self._identity: sasl.Identity | None = None
        self._write_blocked = False  # the transport asked us to stop producing replies (its buffer is full)
        self._producing = False  # registered as the transport's producer
        self._delay: Deferred[Any] | None = None  # a pause of our own (tarpit, AUTH failure delay) in progress
        self._auth_attempt: Any = None  # the AUTH check in progress, as the cross-connection throttle counts it

    @property
    def phase(self) -> Phase:
        """Where the dialogue stands (the conversation's phase; only the rule book moves it)."""
        return self.conversation.phase

    def _handler_lost(self) -> None:
        """Tell a handler that has ``connection_lost`` (optional, see `IMessageHandler`) that the connection ended."""
        lost = getattr(self.handler, "connection_lost", None)
        if lost is not None:
            try:
                lost()
            except Exception:
                self.log.failure("the handler's connection_lost failed")

    def _end_dialogue(self) -> None:
        """The conversation is over; ``_gone`` mirrors it (read on every step, so it is a plain attribute)."""
        self.conversation.close()
        self._gone = True

    # ---- connection life ---------------------------------------------------------------------------------------

    def _now(self) -> float:
        return self.clock.seconds() if self.clock is not None else time.time()

    def connectionMade(self) -> None:
        extensions = self.conversation.standing.extensions
        self.MAX_LENGTH = _longest_command(
            self.policy.max_command_length, bool(self._mechanisms), extensions.mail_allowance,
            extensions.rcpt_allowance, max((spec.line_allowance for _, spec in extensions.verbs.values()), default=-1))
        session = self.session
        self._opened_at = now = self._now()
        session.id = new_id(now)
        session.peer = self.transport.getPeer()
        session.host = self.transport.getHost()
        session.transport = self.transport
        session.tls = is_tls(self.transport)  # an implicit-TLS listener (RFC 8314)
        if self.policy.trusted_networks:
            session.trusted = trusted(self.policy, session.peer_ip)
        admit = getattr(self.factory, "admit", None)
        refusal = admit(self) if admit is not None else None
        if refusal is not None:
            self.transport.write(refusal.render())
            self._end_dialogue()
            self.transport.loseConnection()
            self.monitor.connection_refused(session, refusal)
            return
        self._admitted = True
        if not session.tls:
            self._start_producing()  # over TLS, once the handshake is done (handshakeCompleted)
        self.monitor.connection_opened(session)
        if self.policy.pregreet_delay and self.clock is not None:
            self._pregreet = self.clock.callLater(self.policy.pregreet_delay, self._pregreet_over)
            return
        self._schedule(self._greet)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            self._cancel_timer()
            if self._pregreet is not None and self._pregreet.active():
                self._pregreet.cancel()
            self._pregreet = None
            if not self._gone:
                self._abort("connection lost")
            self._end_dialogue()
            self._handler_lost()
            self._todo.clear()
            delay, self._delay = self._delay, None
            if delay is not None:
                delay.cancel()  # no timer outlives the connection
            self._end_auth_attempt()
            self._chunk = None
            self._sasl = None
            self._logout()
            self.session.transport = None
            if self._admitted:
                self._admitted = False
                self._report_close(reason)
        finally:
            release = getattr(self.factory, "release", None)
            if release is not None:
                release(self)  # always: a leaked slot would count against the limits forever

    def dataReceived(self, data: bytes) -> None:
        if self._gone:
            return
        if self._pregreet is not None:
            self._early_talker = True  # RFC 5321 §3.1: the client waits for the greeting; this one did not
            return
        if not self._producing and self.session.tls:
            self._start_producing()  # data came over TLS: the handshake is done, even if no one said so
        if self._unread or self._later is not None or len(data) > PIECE:
            self._queue(data)
            self._parse()
        else:
            super().dataReceived(data)  # the usual read, a command or some content: straight in, nothing to queue
            if self._reprocess and self._parse_pushed():
                self._parse()
        self._reset_timer()

    def _report_close(self, reason: Failure) -> None:
        """Tell the monitor how the connection ended (and that TLS failed, if it never came up)."""
        session = self.session
        if not self._close_reason:
            self._close_reason = "client closed" if reason is None or reason.check(ConnectionDone) else \
                f"connection lost: {reason.getErrorMessage()}"
        self._note_tls()
        if session.tls and not session.tls_info:
            self.monitor.tls_failed(session, reason.getErrorMessage() if reason is not None else "connection lost")
        self.monitor.connection_closed(session, self._now() - self._opened_at, self._close_reason)

    def handshakeCompleted(self) -> None:
        """TLS is up (after STARTTLS, or on an implicit-TLS listener): note what was negotiated."""
        self.session.tls_info = tls_info(self.transport)
        self.monitor.tls_established(self.session)
        self._start_producing()

    def _pregreet_over(self) -> None:
        """The greeting delay passed: greet, or refuse a client that talked first (postscreen's pregreet test)."""
        self._pregreet = None
        if self._early_talker:
            self.log.info("early talker {peer} refused", peer=escape(self.session.peer_ip))
            self.conversation.refuse_service()
            self.send(EARLY_TALKER, count_error=False, plain=True)
            self._reset_timer()
            return
        self._schedule(self._greet)

    # ---- shutting down -----------------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """True when no transaction is open and no handler result is pending."""
        return not self._waiting and not self.conversation.in_transaction

    def shutdown(self) -> None:
        """The server is stopping: close now if idle (421 4.3.2), else after the transaction in flight ends."""
        self._closing = True
        if not self._gone and self.idle:
            self._verb = "SHUTDOWN"
            self._close_reason = "shutdown"
            self.send(SHUTTING_DOWN, count_error=False)

    def force_close(self, reason: str = "shutdown deadline") -> None:
        """Close at once with 421 4.3.2, aborting any transaction (the shutdown deadline passed)."""
        if not self._gone:
            self._unsolicited("SHUTDOWN", SHUTTING_DOWN)
            self._close(reason)

    # ---- writing -----------------------------------------------------------------------------------------------

    def _enhanced(self) -> bool:
        return self.policy.enhanced_status_codes and self.session.esmtp

    def send(self, reply: Reply, count_error: bool = True, plain: bool = False) -> None:
        """Write a reply; count errors toward the limit and honour the handler's ``disconnect``.

        ``plain`` replies (greeting, HELO/EHLO) never carry enhanced codes (RFC 2034 §3).
        """
        if self._gone or self.transport is None:
            return
        session = self.session
        # Called for every reply: _enhanced() and take_penalty() inlined as reads (the penalty is rarely set).
        self.transport.write(reply.render(not plain and self.policy.enhanced_status_codes and session.esmtp))
        self.monitor.replied(session, self._verb, reply)
        penalty = self.conversation.penalty and self.conversation.take_penalty()
        if (reply.code >= 500 and count_error) or penalty:  # client errors; the server's own 4xx troubles do not
            self.errors += 1
            if self.policy.error_limit and self.errors >= self.policy.error_limit:
                self._unsolicited("ERRORS", TOO_MANY_ERRORS)
                self._close("too many errors")
                return
            if self.policy.error_delay and self.errors > self.policy.soft_error_limit and self.clock is not None:
                self._todo.append(self._tarpit)  # next, before anything queued
        if reply.code == 421 or getattr(self.handler, "disconnect", False):
            self._close("closed by server")
        elif self._closing and self.idle:
            self._unsolicited("SHUTDOWN", SHUTTING_DOWN)
            self._close("shutdown")

    def _unsolicited(self, verb: str, reply: Reply) -> None:
        """Write a 421 no command asked for (error limit, shutdown) just before closing; the monitor hears it."""
        self._verb = verb
        self.transport.write(reply.render(self._enhanced()))
        self.monitor.replied(self.session, verb, reply)

    def _tarpit(self) -> "Deferred[Any]":
        """Read nothing for ``error_delay`` seconds (Postfix's smtpd_error_sleep_time)."""
        return self._pause(self.policy.error_delay, lambda: None)

    def _pause(self, seconds: float, then: Callable[[], None]) -> "Deferred[Any]":
        """A step that waits ``seconds`` on the clock, then calls ``then``; cancelled if the connection is lost."""
        assert self.clock is not None
        delay = self._delay = deferLater(self.clock, seconds, then)

        def over(result: Any) -> Any:
            if self._delay is delay:
                self._delay = None
            return result

        return delay.addBoth(over)

    def _close(self, reason: str) -> None:
        if self._gone:
            return
        self._close_reason = self._close_reason or reason
        self._abort(self._close_reason)
        self._end_dialogue()
        self._cancel_timer()
        self._todo.clear()
        self._stop_producing()  # a transport with a producer registered never finishes closing
        if self.clock is not None:
            # The last replies go out first; a client that never takes them is dropped (connectionLost cancels this).
            self._timer = self.clock.callLater(CLOSE_DRAIN_TIMEOUT, self.transport.abortConnection)
        self.transport.loseConnection()

    # ---- timeouts ----------------------------------------------------------------------------------------------

    def _reset_timer(self) -> None:
        if self.clock is None or self._waiting or self._gone:
            return
        seconds = self.policy.data_timeout if self._message is not None else self.policy.command_timeout
        # Once per read, so no active() test: until the dialogue ends, _timer is None or pending (it is cleared
        # when cancelled and as it fires).
        if self._timer is not None:
            self._timer.reset(seconds)
        elif seconds:
            self._timer = self.clock.callLater(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self.monitor.timed_out(self.session, "data" if self._message is not None else self.phase.value)
        self._verb = "TIMEOUT"
        self._close_reason = "timeout"
        self.send(TIMEOUT)

    # ---- line mode: commands -----------------------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self._gone:
            return
        if self._todo or self._waiting:
            self._schedule(lambda: self._command(line))
            return
        pending = self._command(line)  # nothing queued: run it now, as _drive would
        if pending is not None:
            self._wait_for(pending)
        elif self._todo:
            self._drive()  # the command queued steps of its own (a tarpit delay)

    def lineLengthExceeded(self, line: bytes) -> None:
        """An over-long line: drain it to its CRLF in raw mode, then answer (never drop the connection)."""
        if self._sasl is None:
            self._verb = "UNKNOWN"  # the line was never parsed: its verb is not known
        self._skipping_line = True
        self.setRawMode()
        self._push_back(line)

    def _command(self, raw: bytes) -> "Deferred[Any] | None":
        if self._gone:
            return None
        if self._sasl is not None:
            return self._auth_response(raw)
        turn = self.conversation.receive(raw)
        self._verb = _LABELS[turn.verb]
        if turn.extension is not None:
            self._verb = turn.extension.name
            if turn.refusal is None:
                return self._run_extension(turn.extension, turn.command)
        if turn.refusal is not None:
            if turn.verb is Verb.BDAT and turn.command is not None and turn.refusal.code == 503:
                return self._drain(turn.command, turn.refusal)  # RFC 3030 §2: the chunk's octets come anyway
            self.send(turn.refusal, plain=turn.verb in (Verb.HELO, Verb.EHLO))  # RFC 2034 §3
            return None
        try:
            return getattr(self, _METHODS[turn.verb])(turn.command)  # type: ignore[no-any-return]
        except CommandError as e:
            self.send(e.reply, plain=turn.verb in (Verb.HELO, Verb.EHLO))  # RFC 2034 §3: no enhanced code there
            return None

    # ---- raw mode: message content, or an over-long line being skipped -----------------------------------------

    def rawDataReceived(self, data: bytes) -> None:
        if self._gone:
            return
        if self._skipping_line:
            self._skip_line(data)
        elif self._chunk is not None:
            self._chunk_bytes(data)
        elif self._message is not None and not self._message.chunked:
            self._data_bytes(data)
        else:
            self.setLineMode(data)

    def _skip_line(self, data: bytes) -> None:
        """Discard an over-long command line up to its CRLF, then answer 500 5.5.2 and read commands again."""
        if self._skip_cr:
            data = b"\r" + data
        end = data.find(b"\r\n")
        if end < 0:
            # A CR at the end may begin the CRLF: keep it for the next read.
            self._skip_cr = data.endswith(b"\r")
            return
        self._skipping_line = False
        self._skip_cr = False
        self.setLineMode()
        self._push_back(data[end + 2:])
        if self._sasl is not None:
            self.monitor.auth_failed(self.session, self._sasl.name, None, sasl.AUTH_LINE_TOO_LONG)
            self._sasl = None  # RFC 4954 §4: the exchange ends with 500 5.5.6
            self.send(sasl.AUTH_LINE_TOO_LONG)
            return
        self.send(LINE_TOO_LONG)
