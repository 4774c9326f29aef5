"""`ESMTPProtocol`: one SMTP (or LMTP) connection, speaking RFC 5321 and asking an `IMessageHandler` for every reply.

Commands and header lines are read in line mode; message content in raw mode, decoded by `data.DotDecoder` (DATA)
or counted by `data.CountedReader` (BDAT). While a handler result is pending the transport is paused and nothing
else is read, so replies stay in order under pipelining and a slow handler never makes the server buffer a message.
The extensions the protocol serves itself: STARTTLS (RFC 3207), AUTH (RFC 4954), CHUNKING (RFC 3030), LMTP
(RFC 2033); SIZE, 8BITMIME, SMTPUTF8, DSN and BINARYMIME parameters are checked and handed to the handler.
"""

from __future__ import annotations

import time
from functools import lru_cache
from types import CoroutineType
from typing import Any, Callable, Final

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IPushProducer, IReactorTime, ITLSTransport
from twisted.internet.protocol import connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpkit.core import rules as state
from esmtpkit.core.commands import Command, CommandError, Verb, line_limit, parse_command, parse_mail_rcpt
from esmtpkit.core.content import CountedReader, DotDecoder, HeaderLimits, HeaderSplitter, has_bare_newline
from esmtpkit.core.escape import escape
from esmtpkit.core.ids import new_id
from esmtpkit.core.params import check_mail_params, check_rcpt_params
from esmtpkit.core.reply import Reply, SMTPReply, coerce
from esmtpkit.core.rules import Phase
from esmtpkit.core.session import Envelope, Session
from esmtpkit.server import sasl
from esmtpkit.server.authlimit import AUTH_THROTTLED, AuthThrottle
from esmtpkit.server.interfaces import IMessageHandler
from esmtpkit.server.monitor import Monitor
from esmtpkit.server.policy import Policy
from esmtpkit.server.tls import is_tls, tls_info

__all__ = ["ESMTPProtocol"]

_Step = Callable[[], "Deferred[Any] | None"]

#: Replies the protocol itself writes (handler replies come from the handler).
LINE_TOO_LONG = Reply(500, ("Line too long",), "5.5.2")
HANDLER_ERROR = Reply(451, ("Requested action aborted: local error in processing",), "4.3.0")
TOO_MANY_ERRORS = Reply(421, ("Too many errors, closing connection",), "4.7.0")
TIMEOUT = Reply(421, ("Timeout exceeded, closing connection",), "4.4.2")
TOO_BIG = Reply(552, ("Message size exceeds fixed maximum message size",), "5.3.4")
HEADER_TOO_BIG = Reply(552, ("Message header size exceeds limit",), "5.3.4")
BARE_NEWLINE = Reply(550, ("Message contains a bare CR or LF (only CRLF ends a line)",), "5.5.2")
TOO_MANY_RECIPIENTS = Reply(452, ("Too many recipients",), "4.5.3")
NO_SERVICE = Reply(503, ("No service: send QUIT",), "5.5.1")
SHUTTING_DOWN = Reply(421, ("Service shutting down, try again later",), "4.3.2")
EARLY_TALKER = Reply(554, ("Protocol error: data sent before the greeting",), "5.5.1")
TOO_MANY_TRANSACTIONS = Reply(421, ("Too many transactions in one session, closing connection",), "4.7.0")
TLS_READY = Reply(220, ("Ready to start TLS",), "2.0.0")
TLS_ACTIVE = Reply(503, ("TLS already active",), "5.5.1")
TLS_UNAVAILABLE = Reply(454, ("TLS not available due to temporary reason",), "4.7.0")
TLS_REQUIRED = Reply(530, ("Must issue a STARTTLS command first",), "5.7.0")
EHLO_FIRST = Reply(503, ("Send EHLO first",), "5.5.1")
CHUNK_SYNTAX = Reply(501, ("Syntax: BDAT size [LAST]",), "5.5.4")
CHUNK_FAILED = Reply(503, ("Transaction failed at an earlier BDAT: send RSET",), "5.5.1")
BINARY_NEEDS_BDAT = Reply(503, ("BODY=BINARYMIME needs BDAT, not DATA",), "5.5.1")
LMTP_GREETING = Reply(500, ("This is an LMTP server: use LHLO",), "5.5.1")

#: Seconds a closing connection may take to hand its last replies to the client before it is dropped: a client
#: that reads nothing would otherwise keep its connection (and its slot against the limits) open for ever.
CLOSE_DRAIN_TIMEOUT: Final = 30.0

#: The monitor of a protocol made without one: it hears everything and does nothing.
_SILENT = Monitor()

#: Extension verbs; each is an unknown command (the handler's ``unknown``) unless its extension is enabled.
_EXTENSION_VERBS = frozenset((Verb.STARTTLS, Verb.AUTH, Verb.BDAT, Verb.LHLO))
_LABELS: Final = {verb: verb.value for verb in Verb}  # the monitor's verb label (Enum.value is a slow property)
_NO_KEYWORDS: Final[frozenset[str]] = frozenset()  # shared: each frozenset() call makes a new 216-byte set
_METHODS: Final = {verb: f"_do_{verb.value}" for verb in Verb}
#: Commands that move no mail (Postfix's smtpd_junk_command_limit counts NOOP, VRFY, ETRN and RSET); past
#: ``Policy.junk_command_limit`` of them in a session without a delivered message, each counts as an error.
_JUNK: Final = frozenset((Verb.NOOP, Verb.RSET, Verb.VRFY, Verb.EXPN, Verb.HELP, Verb.HELO, Verb.EHLO, Verb.LHLO))
#: Where a header line has no limit of its own (``max_line_length`` 0), a parsed header line may still not
#: outgrow this: the handler is given it whole, so it has to fit in memory.
_PARSED_LINE_CAP = 1024 * 1024
#: RFC 3030 §2: chunk-size is 1*DIGIT; more than 20 digits is no size a server could read.
_MAX_CHUNK_DIGITS = 20

#: Enhanced codes for handler replies that give none, where the verb makes the meaning clear (RFC 3463 §3.2).
_VERB_ENHANCED = {
    ("mail", 250): "2.1.0",
    ("rcpt", 250): "2.1.5",
    ("rcpt", 251): "2.1.5",
    ("rcpt", 550): "5.1.1",
    ("rcpt", 450): "4.2.0",
    ("rcpt", 551): "5.1.6",
    ("rcpt", 553): "5.1.3",
    ("mail", 553): "5.1.7",
}


def _slices(data: bytes, size: int) -> list[bytes]:
    """``data`` cut into pieces of at most ``size`` bytes (none for empty data)."""
    if len(data) <= size:
        return [data] if data else []
    return [data[i:i + size] for i in range(0, len(data), size)]


class _Message:
    """State of one message's content while it arrives (by DATA, or by BDAT when ``chunked``)."""

    __slots__ = ("decoder", "headers", "size", "error", "chunk", "lines", "partial", "ended", "chunked", "line",
                 "received", "check_bare", "cr", "limits")

    def __init__(self, chunk: int, lines: bool) -> None:
        self.decoder: DotDecoder | None = None
        self.headers: HeaderSplitter | None = None
        self.size = 0
        self.error: Reply | None = None
        self.chunk = chunk
        self.lines = lines
        self.partial = b""
        self.ended = False  # eom() was called (or abort() already was): abort() must not follow
        self.chunked = False  # BDAT: commands come between chunks, header lines are split from raw bytes
        self.line = b""  # BDAT: an incomplete header line carried to the next chunk
        self.received = 0  # BDAT: octets announced by the chunks accepted so far
        self.check_bare = False  # BDAT: the bare CR/LF policy applies (the body is not BINARYMIME)
        self.cr = False  # BDAT: the content so far ends with a CR that the next octet may pair with an LF
        self.limits: HeaderLimits | None = None  # the header limits, for content passed on raw


class _Chunk:
    """One BDAT chunk being read: ``size`` octets, whether it is the LAST, and the refusal if it is only drained."""

    __slots__ = ("reader", "size", "last", "refusal")

    def __init__(self, size: int, last: bool, refusal: Reply | None = None) -> None:
        self.reader = CountedReader(size)
        self.size = size
        self.last = last
        self.refusal = refusal


def _username(step: sasl.Step) -> str | None:
    """The user name a finished AUTH exchange named (for the log), if its credentials carry one."""
    name = getattr(getattr(step, "credentials", None), "username", None)
    if isinstance(name, bytes):
        return name.decode("utf-8", "replace")
    return name if isinstance(name, str) else None


def _parse_bdat(argument: str) -> tuple[int | None, bool, bool]:
    """``BDAT size [LAST]`` (RFC 3030 §2): ``(size or None, last, well_formed)``. A size that parses with a bad
    rest is not well formed, but its octets are still on their way and must be read.
    """
    words = argument.split(" ")
    size = words[0]
    if not (size.isascii() and size.isdigit()) or len(size) > _MAX_CHUNK_DIGITS:
        return None, False, False
    if len(words) == 1:
        return int(size), False, True
    if len(words) == 2 and words[1].upper() == "LAST":
        return int(size), True, True
    return int(size), False, False


@lru_cache(maxsize=32)
def _longest_command(base: int, auth: bool) -> int:
    """The longest command line any verb may have (RFC 4954 §4: 12288 octets for AUTH lines, when AUTH is on)."""
    return max(line_limit(verb, base) for verb in Verb if verb is not Verb.AUTH or auth)


@implementer(IHandshakeListener, IPushProducer)
class ESMTPProtocol(LineReceiver):
    """Speaks ESMTP on one connection and delegates every verb to ``handler``.

    It is its transport's streaming producer (as Twisted's HTTP server is): when the replies waiting to be sent
    pass the transport's buffer size, the transport calls `pauseProducing` and nothing more is read from a
    client that does not read what it is sent, until `resumeProducing`.
    """

    log = Logger()
    delimiter = b"\r\n"
    # Slots keep an idle connection small: more than 30 attributes in the instance __dict__ would make Python give
    # every connection a dict of its own (1.5 KiB) instead of sharing the keys. The base classes' attributes that
    # every connection sets are slots too (so most connections need no __dict__ at all); anything else still works.
    __slots__ = ("transport", "connected", "factory", "MAX_LENGTH", "line_mode", "_buffer", "_busyReceiving", "paused",
                 "handler", "policy", "clock", "monitor", "session", "phase", "errors", "_verb", "_opened_at",
                 "_mail_at", "_admitted", "_close_reason", "_refused", "_todo", "_waiting", "_reprocess",
                 "_skipping_line", "_skip_cr", "_message", "_timer", "_pregreet", "_early_talker", "_closing",
                 "_keywords", "_chunk", "_sasl", "_identity", "_mechanisms", "_command_limit", "_write_blocked", "_junk",
                 "_penalty", "_producing", "_delay", "_auth_attempt")

    def __init__(self, handler: IMessageHandler, policy: Policy | None = None,
                 clock: IReactorTime | None = None, monitor: Monitor | None = None) -> None:
        self.transport = None  # the defaults the base classes keep as class attributes, which slots hide
        self.connected = 0
        self.factory = None
        self.MAX_LENGTH = LineReceiver.MAX_LENGTH
        self.line_mode = 1
        self._buffer = b""
        self._busyReceiving = False
        self.paused = False
        self.handler = handler
        self.policy = policy if policy is not None else Policy()
        self.clock = clock
        self.monitor = monitor if monitor is not None else _SILENT
        self._verb = "CONNECT"  # what the next reply answers, for the monitor
        self._opened_at = 0.0
        self._mail_at = 0.0
        self._admitted = False
        self._close_reason = ""
        self.session = Session(hostname=self.policy.hostname)
        self.phase = Phase.CONNECTED
        self.errors = 0
        self._refused = False
        # The step queue, kept in reverse (the next step is last): taking a step is O(1) however many one read
        # brings (one per line for a chunk_mode=False handler), and an empty list is 700 bytes smaller than a deque.
        self._todo: list[_Step] = []
        self._waiting = False
        self._reprocess = False
        self._skipping_line = False
        self._skip_cr = False
        self._message: _Message | None = None
        self._timer: IDelayedCall | None = None
        self._pregreet: IDelayedCall | None = None
        self._early_talker = False
        self._closing = False
        self._keywords: frozenset[str] = _NO_KEYWORDS  # offered at the last EHLO/LHLO; none after HELO or STARTTLS
        self._chunk: _Chunk | None = None
        self._sasl: sasl.Mechanism | None = None
        self._identity: sasl.Identity | None = None
        p = self.policy
        self._mechanisms = tuple(sasl.mechanisms_for(p.portal, p.auth_mechanisms)) if p.portal is not None else ()
        self.session.lmtp = p.lmtp
        self._command_limit = _longest_command(p.max_command_length, bool(self._mechanisms))
        self._write_blocked = False  # the transport asked us to stop producing replies (its buffer is full)
        self._producing = False  # registered as the transport's producer
        self._delay: Deferred[Any] | None = None  # a pause of our own (tarpit, AUTH failure delay) in progress
        self._auth_attempt: Any = None  # the AUTH check in progress, as the cross-connection throttle counts it
        self._junk = 0  # junk commands since the session began or last delivered a message
        self._penalty = False  # the reply being made counts as an error whatever its code (a junk command too many)

    # ---- extensions -------------------------------------------------------------------------------------------

    def extensions(self) -> list[str]:
        """The ESMTP keywords offered in the EHLO (or LHLO) reply, in order, as this connection stands now."""
        p = self.policy
        keys = []
        if p.pipelining:
            keys.append("PIPELINING")
        keys.append(f"SIZE {p.max_message_size}" if p.max_message_size else "SIZE")
        if p.eightbitmime:
            keys.append("8BITMIME")
        if p.smtputf8:
            keys.append("SMTPUTF8")
        if p.enhanced_status_codes:
            keys.append("ENHANCEDSTATUSCODES")
        if p.chunking:
            keys.append("CHUNKING")
            if p.binarymime:
                keys.append("BINARYMIME")  # RFC 3030 §3: only with CHUNKING
        if p.dsn:
            keys.append("DSN")
        if p.tls_context is not None and not self.session.tls:
            keys.append("STARTTLS")  # RFC 3207 §4.2: not offered again after the handshake
        if self._mechanisms and (self.session.tls or not p.auth_require_tls):
            keys.append("AUTH " + " ".join(self._mechanisms))
        return keys

    # ---- connection life ---------------------------------------------------------------------------------------

    def _now(self) -> float:
        return self.clock.seconds() if self.clock is not None else time.time()

    def connectionMade(self) -> None:
        self.MAX_LENGTH = self._command_limit
        session = self.session
        self._opened_at = now = self._now()
        session.id = new_id(now)
        session.peer = self.transport.getPeer()
        session.host = self.transport.getHost()
        session.transport = self.transport
        session.tls = is_tls(self.transport)  # an implicit-TLS listener (RFC 8314)
        admit = getattr(self.factory, "admit", None)
        refusal = admit(self) if admit is not None else None
        if refusal is not None:
            self.transport.write(refusal.render())
            self.phase = Phase.CLOSED
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
            if self.phase is not Phase.CLOSED:
                self._abort("connection lost")
            self.phase = Phase.CLOSED
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
        if self.phase is Phase.CLOSED:
            return
        if self._pregreet is not None:
            self._early_talker = True  # RFC 5321 §3.1: the client waits for the greeting; this one did not
            return
        if not self._producing and self.session.tls:
            self._start_producing()  # data came over TLS: the handshake is done, even if no one said so
        super().dataReceived(data)
        while self._reprocess and not self.paused and self.phase is not Phase.CLOSED:
            self._reprocess = False
            super().dataReceived(b"")
        self._reset_timer()

    # ---- reading: paused while a handler result is pending, or while the client does not read our replies ---

    def pauseProducing(self) -> None:
        """The transport's outgoing buffer is full (IPushProducer): read nothing more until it drains."""
        self._write_blocked = True
        self._update_reading()

    def resumeProducing(self) -> None:
        """The transport's outgoing buffer drained (IPushProducer): read again, unless a handler result is pending."""
        self._write_blocked = False
        self._update_reading()

    def stopProducing(self) -> None:
        """The connection is going away (IPushProducer): nothing more is read. Unlike LineReceiver's, this does not
        close the transport: the transport calls it as it closes."""
        self._write_blocked = True
        self.paused = True

    def _start_producing(self) -> None:
        """Hear the transport's backpressure from now on.

        Never during a TLS handshake: the TLS layer holds back what is written until the handshake is done and
        asks its producer to pause meanwhile, and pausing reading then would stall the handshake itself.
        """
        if not self._producing and self._admitted and self.phase is not Phase.CLOSED:
            self._producing = True
            self.transport.registerProducer(self, True)

    def _stop_producing(self) -> None:
        if self._producing:
            self._producing = False
            self._write_blocked = False
            self.transport.unregisterProducer()

    def _update_reading(self) -> None:
        """Read from the transport exactly when no handler result is pending and the client takes our replies."""
        hold = self._waiting or self._write_blocked
        if hold == self.paused or self.transport is None:
            return
        self.paused = hold
        if hold:
            self.transport.pauseProducing()
            return
        if self.phase is Phase.CLOSED:
            return
        self.transport.resumeProducing()
        self.dataReceived(b"")  # lines already read and waiting in the buffer

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
            self._refused = True
            self.send(EARLY_TALKER, count_error=False, plain=True)
            self._reset_timer()
            return
        self._schedule(self._greet)

    # ---- shutting down -----------------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """True when no transaction is open and no handler result is pending."""
        return not self._waiting and not state.in_transaction(self.phase)

    def shutdown(self) -> None:
        """The server is stopping: close now if idle (421 4.3.2), else after the transaction in flight ends."""
        self._closing = True
        if self.phase is not Phase.CLOSED and self.idle:
            self._verb = "SHUTDOWN"
            self._close_reason = "shutdown"
            self.send(SHUTTING_DOWN, count_error=False)

    def force_close(self, reason: str = "shutdown deadline") -> None:
        """Close at once with 421 4.3.2, aborting any transaction (the shutdown deadline passed)."""
        if self.phase is not Phase.CLOSED:
            self._unsolicited("SHUTDOWN", SHUTTING_DOWN)
            self._close(reason)

    # ---- the step queue: handler calls in order, pausing while one is pending ----------------------------------

    def _schedule(self, *steps: _Step) -> None:
        self._todo[:0] = steps[::-1]  # after everything already queued
        if not self._waiting:
            self._drive()

    def _drive(self) -> None:
        while self._todo and not self._waiting and self.phase is not Phase.CLOSED:
            pending = self._todo.pop()()
            if pending is not None:
                self._wait_for(pending)
                return

    def _wait_for(self, pending: "Deferred[Any]") -> None:
        """A handler result is pending: read nothing more (and run no timer) until it comes."""
        self._waiting = True
        self._update_reading()
        self._cancel_timer()
        pending.addBoth(self._resume)

    def _resume(self, _: object) -> None:
        self._waiting = False
        if self.phase is Phase.CLOSED:
            return
        self._drive()
        if not self._waiting and self.phase is not Phase.CLOSED:
            self._reset_timer()
            self._update_reading()

    def _call(self, method: Callable[..., Any], args: tuple[Any, ...],
              then: Callable[[Any], None]) -> "Deferred[Any] | None":
        """Call a handler method; give ``then`` its result (a value, or a Failure). Return a Deferred if pending."""
        if self.monitor.timing:
            then = self._timed(method, then)
        try:
            result = method(*args)
            if isinstance(result, CoroutineType):
                result = Deferred.fromCoroutine(result)
        except Exception:
            then(Failure())
            return None
        if not isinstance(result, Deferred):
            then(result)
            return None
        box: list[Any] = []
        result.addBoth(box.append)
        if box:
            then(box[0])
            return None
        done: Deferred[Any] = Deferred()

        def fired(_: object) -> None:
            try:
                then(box[0])
            except Exception:
                self.log.failure("internal error after a handler result")
                self._close("internal error")
            finally:
                done.callback(None)

        result.addBoth(fired)
        return done

    def _timed(self, method: Callable[..., Any], then: Callable[[Any], None]) -> Callable[[Any], None]:
        """Wrap ``then`` to tell the monitor how long the handler took to give its result."""
        name, start = getattr(method, "__name__", "handler"), self._now()

        def timed(value: Any) -> None:
            self.monitor.handled(name, self._now() - start)
            then(value)

        return timed

    def _reply_from(self, value: Any, what: str) -> Reply:
        """Turn a handler result (value or Failure) into a Reply; unexpected errors become 451 4.3.0 and a log."""
        if isinstance(value, Failure):
            if not value.check(SMTPReply):
                self.log.failure("handler {what} failed", value, what=what)
                return HANDLER_ERROR
            reply = value.value.reply
        else:
            try:
                reply = coerce(value)
            except (TypeError, ValueError):
                self.log.error("handler {what} returned {value!r}, not a reply", what=what, value=value)
                return HANDLER_ERROR
        if reply.enhanced is None and (what, reply.code) in _VERB_ENHANCED:
            return Reply(reply.code, reply.lines, _VERB_ENHANCED[what, reply.code])
        return reply

    def _quiet(self, value: Any, what: str) -> bool:
        """For header/eoh/body results: log a failure and return False, else True."""
        if isinstance(value, Failure):
            if not value.check(SMTPReply):
                self.log.failure("handler {what} failed", value, what=what)
            elif self._message is not None:
                self._message.error = value.value.reply
                return False
            if self._message is not None and self._message.error is None:
                self._message.error = HANDLER_ERROR
            return False
        return True

    # ---- writing -----------------------------------------------------------------------------------------------

    def _enhanced(self) -> bool:
        return self.policy.enhanced_status_codes and self.session.esmtp

    def send(self, reply: Reply, count_error: bool = True, plain: bool = False) -> None:
        """Write a reply; count errors toward the limit and honour the handler's ``disconnect``.

        ``plain`` replies (greeting, HELO/EHLO) never carry enhanced codes (RFC 2034 §3).
        """
        if self.phase is Phase.CLOSED or self.transport is None:
            return
        self.transport.write(reply.render(not plain and self._enhanced()))
        self.monitor.replied(self.session, self._verb, reply)
        penalty, self._penalty = self._penalty, False
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
        if self.phase is Phase.CLOSED:
            return
        self._close_reason = self._close_reason or reason
        self._abort(self._close_reason)
        self.phase = Phase.CLOSED
        self._cancel_timer()
        self._todo.clear()
        self._stop_producing()  # a transport with a producer registered never finishes closing
        if self.clock is not None:
            # The last replies go out first; a client that never takes them is dropped (connectionLost cancels this).
            self._timer = self.clock.callLater(CLOSE_DRAIN_TIMEOUT, self.transport.abortConnection)
        self.transport.loseConnection()

    def _with_hostname(self, reply: Reply) -> Reply:
        first = f"{self.policy.hostname} {reply.lines[0]}".rstrip(" ")
        return Reply(reply.code, (first,) + reply.lines[1:], reply.enhanced)

    # ---- timeouts ----------------------------------------------------------------------------------------------

    def _timeout_for(self) -> float:
        return self.policy.data_timeout if self._message is not None else self.policy.command_timeout

    def _reset_timer(self) -> None:
        if self.clock is None or self._waiting or self.phase is Phase.CLOSED:
            return
        seconds = self._timeout_for()
        if self._timer is not None and self._timer.active():
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

    # ---- greeting ----------------------------------------------------------------------------------------------

    def _greet(self) -> "Deferred[Any] | None":
        def then(value: Any) -> None:
            reply = self._reply_from(value, "connect")
            if reply.code == 220:
                reply = self._with_hostname(reply)
            elif reply.code != 421:
                self._refused = True
            self.send(reply, count_error=False, plain=True)
            self._reset_timer()

        return self._call(self.handler.connect, (self.session,), then)

    # ---- line mode ---------------------------------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return
        message = self._message
        if message is not None and not message.chunked:
            self._header_line(line)
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
        message = self._message
        if message is not None and message.headers is not None and not message.chunked:
            self._fail_message(LINE_TOO_LONG)
            self._drain_headers(message)
        else:
            self._skipping_line = True
        self.setRawMode()
        self._buffer = line + self._buffer
        self._reprocess = True

    def _command(self, raw: bytes) -> "Deferred[Any] | None":
        if self.phase is Phase.CLOSED:
            return None
        if self._sasl is not None:
            return self._auth_response(raw)
        try:
            command = parse_command(raw)
        except CommandError as e:
            self._verb = "UNKNOWN"
            self.send(e.reply)
            return None
        verb = self._effective_verb(command)
        self._verb = _LABELS[verb]
        if len(raw) > line_limit(verb, self.policy.max_command_length):
            self.send(LINE_TOO_LONG)
            return None
        if self._refused and command.verb is not Verb.QUIT:
            self.send(NO_SERVICE)
            return None
        if verb in _JUNK:
            self._junk += 1
            limit = self.policy.junk_command_limit
            self._penalty = bool(limit) and self._junk > limit
        try:
            if not state.allowed(self.phase, verb):
                refusal = Reply(503, (state.refusal(self.phase, verb),), "5.5.1")
                if verb is Verb.BDAT:
                    return self._drain(command, refusal)  # RFC 3030 §2: the chunk's octets come anyway
                self.send(refusal)
                return None
            return getattr(self, _METHODS[verb])(command)
        except CommandError as e:
            self.send(e.reply, plain=verb in (Verb.HELO, Verb.EHLO))  # RFC 2034 §3: no enhanced code there
            return None

    def _effective_verb(self, command: Command) -> Verb:
        """Verbs of extensions that are not offered are unknown commands (the handler's ``unknown``).

        STARTTLS and AUTH are known whenever configured (a second STARTTLS gets 503, AUTH before TLS 538); BDAT
        only where CHUNKING was offered; LHLO only in LMTP mode.
        """
        verb = command.verb
        if verb in _EXTENSION_VERBS:
            if verb is Verb.BDAT:
                return verb if "CHUNKING" in self._keywords else Verb.UNKNOWN
            if verb is Verb.STARTTLS:
                enabled = self.policy.tls_context is not None
            else:
                enabled = bool(self._mechanisms) if verb is Verb.AUTH else self.policy.lmtp
            return verb if enabled else Verb.UNKNOWN
        return verb

    # ---- verbs -------------------------------------------------------------------------------------------------

    def _simple(self, method: str, args: tuple[Any, ...], verb: Verb,
                after: Callable[[Reply], None] | None = None) -> "Deferred[Any] | None":
        def then(value: Any) -> None:
            reply = self._reply_from(value, method)
            if self.phase is Phase.CLOSED:
                # The client left while the handler worked: nobody to answer; a sender it accepted is dropped.
                if reply.is_positive and verb is Verb.MAIL:
                    self._abort_now("connection lost")
                return
            if reply.is_positive:
                self.phase = state.advance(self.phase, verb)
            if after is not None:
                after(reply)
            else:
                self.send(reply)

        return self._call(getattr(self.handler, method), args, then)

    def _no_argument(self, command: Command) -> None:
        if command.argument:
            raise CommandError(Reply(501, (f"Syntax: {command.verb.value}",), "5.5.4"))

    def _greeting_name(self, command: Command) -> str:
        name = command.argument.split(" ", 1)[0]
        if not name:
            raise CommandError(Reply(501, (f"Syntax: {command.verb.value} hostname",), "5.5.4"))
        return name

    def _do_HELO(self, command: Command) -> "Deferred[Any] | None":
        if self.policy.lmtp:
            raise CommandError(LMTP_GREETING)  # RFC 2033 §4.1: LMTP has LHLO only
        name = self._greeting_name(command)
        self._reset_transaction("reset by HELO")

        def after(reply: Reply) -> None:
            if reply.code == 250:
                self.session.helo, self.session.esmtp = name, False
                self._keywords = _NO_KEYWORDS
                self._note_tls()
                reply = self._with_hostname(reply)
            self.send(reply, plain=True)

        return self._simple("helo", (name,), Verb.HELO, after)

    def _do_EHLO(self, command: Command) -> "Deferred[Any] | None":
        if self.policy.lmtp:
            raise CommandError(LMTP_GREETING)
        return self._extended_hello(command, Verb.EHLO)

    def _do_LHLO(self, command: Command) -> "Deferred[Any] | None":
        """LHLO (RFC 2033 §4.1): EHLO's twin in LMTP mode; the handler's ``ehlo`` answers it."""
        return self._extended_hello(command, Verb.LHLO)

    def _extended_hello(self, command: Command, verb: Verb) -> "Deferred[Any] | None":
        name = self._greeting_name(command)
        self._reset_transaction(f"reset by {verb.value}")

        def after(reply: Reply) -> None:
            if reply.code == 250:
                self.session.helo, self.session.esmtp = name, True
                self._note_tls()
                keywords = self.extensions()
                self._keywords = frozenset(k.split(" ", 1)[0] for k in keywords)
                reply = self._with_hostname(reply)
                reply = Reply(250, reply.lines + tuple(k for k in keywords if k not in reply.lines), reply.enhanced)
            self.send(reply, plain=True)

        return self._simple("ehlo", (name,), verb, after)

    def _note_tls(self) -> None:
        """Fill ``session.tls_info`` if the handshake was not reported (a wrapper in between may swallow it)."""
        if self.session.tls and not self.session.tls_info:
            self.session.tls_info = tls_info(self.transport)
            if self.session.tls_info:
                self.monitor.tls_established(self.session)

    def _do_MAIL(self, command: Command) -> "Deferred[Any] | None":
        if self.policy.require_tls and not self.session.tls:
            self.send(TLS_REQUIRED)  # RFC 3207 §4
            return None
        if self.policy.require_auth and self.session.authenticated is None:
            self.send(sasl.AUTH_REQUIRED)  # RFC 4954 §6
            return None
        offered = self._keywords
        sender, raw = parse_mail_rcpt(command.argument, "FROM:", allow_null=True, allow_postmaster=False,
                                      utf8_allowed="SMTPUTF8" in offered)
        params = check_mail_params(raw, offered)
        if "AUTH" in params and self.session.authenticated is None:
            params["AUTH"] = "<>"  # RFC 4954 §5: an AUTH= value from a client we do not trust counts as <>
        limit = self.policy.max_message_size
        if limit and params.get("SIZE", 0) > limit:
            self.send(Reply(552, ("Message size exceeds fixed maximum message size",), "5.3.4"))
            return None
        if self.policy.max_transactions and self.session.transactions >= self.policy.max_transactions:
            self.send(TOO_MANY_TRANSACTIONS)
            return None

        def after(reply: Reply) -> None:
            if reply.is_positive:
                self._mail_at = now = self._now()
                self.session.envelope = Envelope(id=new_id(now), sender=sender, mail_params=params)
                self.session.transactions += 1
            self.send(reply)

        return self._simple("mail", (sender, params), Verb.MAIL, after)

    def _do_RCPT(self, command: Command) -> "Deferred[Any] | None":
        envelope = self.session.envelope
        utf8 = "SMTPUTF8" in envelope.mail_params
        recipient, raw = parse_mail_rcpt(command.argument, "TO:", allow_null=False, allow_postmaster=True,
                                         utf8_allowed=utf8)
        params = check_rcpt_params(raw, self._keywords, utf8=utf8) if raw else {}
        limit = self.policy.max_recipients
        if limit and len(envelope.recipients) >= limit:
            self.send(TOO_MANY_RECIPIENTS)
            return None
        previous = self.phase

        def after(reply: Reply) -> None:
            if reply.is_positive:
                envelope.recipients.append(recipient)
                envelope.rcpt_params.append(params)
            else:
                self.phase = previous
            self.send(reply)

        return self._simple("rcpt", (recipient, params), Verb.RCPT, after)

    def _do_DATA(self, command: Command) -> "Deferred[Any] | None":
        self._no_argument(command)
        if self.session.envelope.mail_params.get("BODY") == "BINARYMIME":
            raise CommandError(BINARY_NEEDS_BDAT)  # RFC 3030 §3

        def after(reply: Reply) -> None:
            if reply.code != 354:
                self.phase = Phase.RECIPIENTS
                self.send(reply)
                return
            self.send(reply)
            if self.phase is not Phase.CLOSED:
                self._start_message()

        return self._simple("data", (), Verb.DATA, after)

    def _do_RSET(self, command: Command) -> "Deferred[Any] | None":
        self._no_argument(command)
        self._reset_transaction("reset by RSET")
        self.phase = state.advance(self.phase, Verb.RSET)
        return self._simple("rset", (), Verb.RSET)

    def _do_NOOP(self, command: Command) -> "Deferred[Any] | None":
        return self._simple("noop", (), Verb.NOOP)

    def _do_QUIT(self, command: Command) -> "Deferred[Any] | None":
        self._no_argument(command)
        self._reset_transaction("QUIT")

        def then(value: Any) -> None:
            self.send(self._reply_from(value, "quit"), count_error=False)
            self._close("QUIT")

        return self._call(self.handler.quit, (), then)

    def _do_VRFY(self, command: Command) -> "Deferred[Any] | None":
        if not command.argument:
            raise CommandError(Reply(501, ("Syntax: VRFY address",), "5.5.4"))
        return self._simple("vrfy", (command.argument,), Verb.VRFY)

    def _do_EXPN(self, command: Command) -> "Deferred[Any] | None":
        if not command.argument:
            raise CommandError(Reply(501, ("Syntax: EXPN list",), "5.5.4"))
        return self._simple("expn", (command.argument,), Verb.EXPN)

    def _do_HELP(self, command: Command) -> "Deferred[Any] | None":
        return self._simple("help", (command.argument or None,), Verb.HELP)

    def _do_UNKNOWN(self, command: Command) -> "Deferred[Any] | None":
        return self._simple("unknown", (command.line,), Verb.UNKNOWN)

    # ---- STARTTLS (RFC 3207) -----------------------------------------------------------------------------------

    def _do_STARTTLS(self, command: Command) -> None:
        self._no_argument(command)
        if self.session.tls:
            self.send(TLS_ACTIVE)
            return None
        if not ITLSTransport.providedBy(self.transport):
            self.send(TLS_UNAVAILABLE)
            return None
        self.send(TLS_READY, count_error=False)
        if self.phase is Phase.CLOSED:
            return None
        # RFC 3207 §4.2 (and CVE-2011-0411): whatever the client sent after STARTTLS in plaintext is never run.
        dropped = len(self.clearLineBuffer())
        self._todo.clear()
        self._reprocess = self._skipping_line = self._skip_cr = False
        if dropped:
            self.log.info("discarded {count} plaintext bytes sent after STARTTLS by {peer}", count=dropped,
                          peer=escape(self.session.peer_ip))
        self._reset_transaction("STARTTLS")
        self._logout()
        session = self.session
        session.helo, session.esmtp, session.authenticated, session.auth_mechanism = None, False, None, None
        self._keywords = _NO_KEYWORDS
        self.phase = state.advance(self.phase, Verb.STARTTLS)
        self._stop_producing()  # again once the handshake is done (see _start_producing)
        if self._write_blocked or self.paused:
            self._update_reading()
        self.transport.startTLS(self.policy.tls_context)
        session.tls = True
        return None

    # ---- AUTH (RFC 4954) ---------------------------------------------------------------------------------------

    def _do_AUTH(self, command: Command) -> "Deferred[Any] | None":
        if not self.session.esmtp:
            self.send(EHLO_FIRST)
            return None
        if self.session.authenticated is not None:
            self.send(sasl.AUTH_ALREADY_DONE)
            return None
        name, initial = sasl.parse_auth(command.argument)
        if self.policy.auth_require_tls and not self.session.tls:
            self.send(sasl.AUTH_ENCRYPTION_REQUIRED)
            return None
        mechanism = sasl.new_mechanism(name, hostname=self.policy.hostname, authorize=self.policy.auth_authorize,
                                       offered=self._mechanisms)
        if mechanism is None:
            self.send(sasl.AUTH_MECHANISM_UNKNOWN)
            return None
        throttle: AuthThrottle | None = getattr(self.factory, "auth_throttle", None)
        if throttle is not None and throttle.refuses(self.session.peer_ip, None, self._now()):
            return self._auth_held(AUTH_THROTTLED, throttle.delay)  # the address is in its cool-off
        return self._auth_step(mechanism, mechanism.start(initial))

    def _auth_response(self, line: bytes) -> "Deferred[Any] | None":
        """The client's answer to a 334 challenge (RFC 4954 §4); ``*`` cancels."""
        mechanism = self._sasl
        assert mechanism is not None
        return self._auth_step(mechanism, mechanism.respond(line))

    def _auth_step(self, mechanism: sasl.Mechanism, step: sasl.Step) -> "Deferred[Any] | None":
        if isinstance(step, sasl.Challenge):
            self._sasl = mechanism
            self.transport.write(step.wire)  # "334 " even with an empty challenge; never an enhanced code
            return None
        self._sasl = None
        if isinstance(step, sasl.Failed):
            self.monitor.auth_failed(self.session, mechanism.name, None, step.reply)
            self.send(step.reply)  # counts toward the error limit, as every failure does
            return None
        user = _username(step)
        # Password guessing is counted across connections (esmtpkit.server.authlimit): a check in progress counts toward
        # the limits until its result, so parallel connections cannot run more guesses than the limit allows.
        throttle: AuthThrottle | None = getattr(self.factory, "auth_throttle", None)
        attempt = throttle.begin(self.session.peer_ip, user, self._now()) if throttle is not None else None
        if throttle is not None and attempt is None:
            return self._auth_held(AUTH_THROTTLED, throttle.delay)
        self._auth_attempt = attempt

        def then(value: Any) -> None:
            # A check whose connection was lost first was ended then: its client learns nothing, so it is no guess.
            counted = throttle is not None and attempt is not None and self._auth_attempt is attempt
            self._auth_attempt = None
            if isinstance(value, Failure):
                reply = self._reply_from(value, "auth")
                self.monitor.auth_failed(self.session, mechanism.name, user, reply)
                if counted:
                    if reply.code < 500:  # the checker failed (454), not the client: no guess was judged
                        throttle.ended(attempt, self._now())
                    else:
                        verdict = throttle.failed(attempt, self._now())
                        for scope in verdict.scopes:
                            self.monitor.auth_throttled(self.session, scope, user, throttle.cool_off)
                        if verdict.delay and self.phase is not Phase.CLOSED:
                            self._todo.append(lambda: self._auth_held(reply, verdict.delay))  # next, before the rest
                            return
                self.send(reply)
                return
            if counted:
                throttle.ended(attempt, self._now())
            if self.phase is Phase.CLOSED:
                value.logout()
                return
            self._identity = value
            self.session.authenticated = value.name
            self.session.auth_mechanism = value.mechanism
            self.monitor.auth_succeeded(self.session, value.mechanism, value.name)
            self.send(sasl.AUTH_SUCCEEDED)

        return self._call(sasl.authenticate, (self.policy.portal, step), then)

    def _end_auth_attempt(self) -> None:
        """The connection is gone with a check in progress: that check no longer counts against its client."""
        attempt, self._auth_attempt = self._auth_attempt, None
        throttle = getattr(self.factory, "auth_throttle", None)
        if attempt is not None and throttle is not None:
            throttle.ended(attempt, self._now())

    def _auth_held(self, reply: Reply, delay: float) -> "Deferred[Any] | None":
        """Send an AUTH refusal after ``delay`` seconds in which nothing is read from this connection."""
        if not delay or self.clock is None:
            self.send(reply)
            return None
        return self._pause(delay, lambda: self.send(reply))

    def _logout(self) -> None:
        """Release the authenticated identity (its realm's logout), if any."""
        identity, self._identity = self._identity, None
        if identity is not None:
            try:
                identity.logout()
            except Exception:
                self.log.failure("logout of {name} failed", name=escape(identity.name))

    # ---- BDAT (RFC 3030) ---------------------------------------------------------------------------------------

    def _do_BDAT(self, command: Command) -> "Deferred[Any] | None":
        size, last, well_formed = _parse_bdat(command.argument)
        if size is None:
            raise CommandError(CHUNK_SYNTAX)  # no size: nothing can be drained
        if not well_formed:
            return self._drain(command, CHUNK_SYNTAX)
        message = self._message
        if message is not None and message.error is not None:
            return self._drain(command, CHUNK_FAILED)  # RFC 3030 §2: after a failed chunk, discard the rest
        limit = self.policy.max_message_size
        if limit and (message.received if message is not None else 0) + size > limit:
            self._fail_chunks(TOO_BIG)
            return self._drain(command, TOO_BIG)
        if message is not None:
            self._read_chunk(message, size, last)
            return None

        def then(value: Any) -> None:
            # The first chunk asks data(), as DATA does; its positive reply is not sent (BDAT answers 250).
            reply = self._reply_from(value, "data")
            if self.phase is Phase.CLOSED:
                return
            if not reply.is_positive:
                self._fail_chunks(reply)
                self._drain(command, reply)
                return
            self.phase = state.advance(self.phase, Verb.BDAT)
            self._read_chunk(self._start_chunks(), size, last)

        return self._call(self.handler.data, (), then)

    def _drain(self, command: Command, reply: Reply) -> None:
        """Read and discard the refused chunk's octets, then answer ``reply`` (RFC 3030 §2, §4)."""
        size = _parse_bdat(command.argument)[0]
        if size is None:
            self.send(CHUNK_SYNTAX)
        elif size == 0:
            self.send(reply)
        else:
            self._chunk = _Chunk(size, False, reply)
            self.setRawMode()

    def _fail_chunks(self, reply: Reply) -> None:
        """A chunk failed: abort() now; later chunks are drained and refused until RSET (RFC 3030 §2)."""
        message = self._message
        if message is None:
            message = self._message = _Message(1, False)
            message.chunked = True
        error = message.error = message.error or reply
        if not message.ended:
            message.ended = True
            self.monitor.message_rejected(self.session, self.session.envelope, message.size, error)
            self._abort_now(error.text)
        self.phase = Phase.CHUNKING

    def _start_chunks(self) -> _Message:
        mode = getattr(self.handler, "chunk_mode", None)
        size = getattr(self.handler, "chunk_size", None) or self.policy.chunk_size
        message = _Message(max(1, int(size)), mode is False)
        message.chunked = True
        # Binary content may hold any octet (RFC 3030 §3); 7BIT/8BITMIME content is lines ending in CRLF.
        message.check_bare = (self.policy.bare_newline == "reject"
                              and self.session.envelope.mail_params.get("BODY") != "BINARYMIME")
        if mode is not True:
            message.headers = HeaderSplitter()
        else:
            message.limits = self._raw_limits()
        self._message = message
        return message

    def _read_chunk(self, message: _Message, size: int, last: bool) -> None:
        chunk = _Chunk(size, last)
        message.received += size
        if size:
            self._chunk = chunk
            self.setRawMode()
            return
        # BDAT 0 [LAST]: no octets follow; its end comes next in the queue, before any later command.
        self._todo.extend(reversed(self._chunk_complete(chunk, b"")))

    def _chunk_bytes(self, data: bytes) -> None:
        """Raw octets of the chunk being read: content for the handler, or drained; the rest is commands."""
        chunk = self._chunk
        assert chunk is not None
        part, rest = chunk.reader.feed(data)
        steps: list[_Step] = []
        if chunk.refusal is None and part:
            message = self._message
            if message is not None and message.error is None:
                steps = self._chunk_content(message, part)
        if chunk.reader.remaining == 0:
            self._chunk = None
            steps.extend(self._chunk_complete(chunk, rest))
        if steps:
            self._schedule(*steps)

    def _chunk_content(self, message: _Message, data: bytes) -> list[_Step]:
        """Steps for chunk octets: header lines split here (they may straddle chunks), then body pieces."""
        if message.check_bare:
            probe = b"\r" + data if message.cr else data
            message.cr = probe.endswith(b"\r")
            if has_bare_newline(probe[:-1] if message.cr else probe):
                self._fail_message(BARE_NEWLINE)
                return []
        headers = message.headers
        if headers is None:
            return self._body_steps(message, data)
        buf = message.line + data if message.line else data
        longest = self._header_line_limit() - 2
        most = self.policy.max_header_size
        steps: list[_Step] = []
        pos = 0
        while True:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            line = buf[pos:end]
            pos = end + 2
            if len(line) > longest:
                self._fail_message(LINE_TOO_LONG)
                return []
            events, done, body = headers.line(line)
            if not body:
                self._message_size(message, len(line) + 2)
            if most and headers.size > most:
                self._fail_message(HEADER_TOO_BIG)
            if message.error is not None:
                return []
            steps.extend(self._header_steps(events))
            if done:
                message.headers = None
                message.line = b""
                steps.append(self._eoh_step())
                steps.extend(self._body_steps(message, body + buf[pos:] if body else buf[pos:]))
                return steps
        message.line = buf[pos:]
        if len(message.line) > longest:
            self._fail_message(LINE_TOO_LONG)
            return []
        return steps

    def _chunk_complete(self, chunk: _Chunk, rest: bytes) -> list[_Step]:
        """Steps once a chunk's octets are all read: after LAST, the end of the headers and the last pieces."""
        steps: list[_Step] = []
        message = self._message
        if chunk.last and chunk.refusal is None and message is not None and message.error is None:
            if message.cr:
                self._fail_message(BARE_NEWLINE)  # a CR at the very end pairs with nothing
                return [self._chunk_end_step(chunk, rest)]
            headers = message.headers
            if headers is not None:
                body = b""
                events: list[Any] = []
                if message.line:
                    line, message.line = message.line, b""  # a last line without CRLF
                    events, _, body = headers.line(line)
                    body = body[:-2]  # the splitter gave it the CRLF the message does not have
                    if not body:
                        self._message_size(message, len(line))
                    if self.policy.max_header_size and headers.size > self.policy.max_header_size:
                        self._fail_message(HEADER_TOO_BIG)
                        return [self._chunk_end_step(chunk, rest)]
                events += headers.finish()
                message.headers = None
                steps.extend(self._header_steps(events))
                steps.append(self._eoh_step())
                steps.extend(self._body_steps(message, body))
            if message.partial and message.error is None:
                steps.append(self._quiet_step("body", (message.partial,)))
                message.partial = b""
        steps.append(self._chunk_end_step(chunk, rest))
        return steps

    def _chunk_end_step(self, chunk: _Chunk, rest: bytes) -> _Step:
        def step() -> "Deferred[Any] | None":
            self.setLineMode()
            if rest:
                self._buffer = rest + self._buffer
                self._reprocess = True
            if chunk.refusal is not None:
                self.send(chunk.refusal)
                return None
            message = self._message
            if message is None or message.ended:
                return None  # the transaction ended meanwhile (RSET cannot come between; a lost connection can)
            if chunk.last:
                return self._end_step(b"")()
            if message.error is not None:
                self._fail_chunks(message.error)
                self.send(message.error)
                return None
            self.send(Reply(250, (f"{chunk.size} octets received",), "2.0.0"))
            return None

        return step

    # ---- transactions ------------------------------------------------------------------------------------------

    def _abort(self, reason: str) -> None:
        """Tell the handler a transaction in progress was dropped (no-op outside a transaction)."""
        if not state.in_transaction(self.phase):
            return
        message = self._message
        ended = message is not None and message.ended
        self._message = None
        if not ended:
            self.monitor.message_aborted(self.session, self.session.envelope, message.size if message else 0, reason)
            self.session.envelope = Envelope()
        self.phase = Phase.GREETED
        if not ended:
            self._abort_now(reason)

    def _abort_now(self, reason: str) -> None:
        try:
            result = self.handler.abort(reason)
            if isinstance(result, CoroutineType):
                result = Deferred.fromCoroutine(result)
            if isinstance(result, Deferred):
                result.addErrback(lambda f: self.log.failure("handler abort failed", f))
        except Exception:
            self.log.failure("handler abort failed")

    def _reset_transaction(self, reason: str) -> None:
        self._abort(reason)
        self.session.envelope = Envelope()

    # ---- message content ---------------------------------------------------------------------------------------

    def _start_message(self) -> None:
        mode = getattr(self.handler, "chunk_mode", None)
        size = getattr(self.handler, "chunk_size", None) or self.policy.chunk_size
        message = _Message(max(1, int(size)), mode is False)
        self._message = message
        if mode is True:
            message.decoder = DotDecoder(at_line_start=True, check_bare=self.policy.bare_newline == "reject")
            message.limits = self._raw_limits()
            self.setRawMode()
        else:
            message.headers = HeaderSplitter()
            self.MAX_LENGTH = self._header_line_limit() - 2

    def _header_line_limit(self) -> int:
        """The longest header line read as a line, CRLF included (bounded even when ``max_line_length`` is 0)."""
        p = self.policy
        return p.max_line_length or min(p.max_header_size or _PARSED_LINE_CAP, _PARSED_LINE_CAP)

    def _raw_limits(self) -> HeaderLimits | None:
        """The header limits for content passed on raw; None when both are off."""
        p = self.policy
        if not (p.max_line_length or p.max_header_size):
            return None
        return HeaderLimits(self._header_line_limit(), p.max_header_size)

    def _fail_message(self, reply: Reply) -> None:
        message = self._message
        if message is not None and message.error is None:
            message.error = reply

    def _header_line(self, line: bytes) -> None:
        message = self._message
        assert message is not None and message.headers is not None
        if line == b".":
            events = message.headers.finish()
            message.headers = None
            self._schedule(*self._header_steps(events), self._eoh_step(), self._end_step(b""))
            return
        if line[:1] == b".":
            line = line[1:]
        if (b"\r" in line or b"\n" in line) and self.policy.bare_newline == "reject":
            self._fail_message(BARE_NEWLINE)
        events, done, body = message.headers.line(line)
        if not body:
            self._message_size(message, len(line) + 2)  # a non-header line is counted as body below
        if self.policy.max_header_size and message.headers.size > self.policy.max_header_size:
            self._fail_message(HEADER_TOO_BIG)
        if message.error is not None:
            self._drain_headers(message)
            return
        steps = self._header_steps(events)
        if done:
            self._drain_headers(message)
            steps.append(self._eoh_step())
            if body:
                steps.extend(self._body_steps(message, body))
        if steps:
            self._schedule(*steps)

    def _drain_headers(self, message: _Message) -> None:
        """Leave the header section: the rest of the message is read raw (delivered, or drained after an error)."""
        message.headers = None
        message.decoder = DotDecoder(at_line_start=True, check_bare=self.policy.bare_newline == "reject")
        self.MAX_LENGTH = self._command_limit
        self.setRawMode()

    def _header_steps(self, events: list[Any]) -> list[_Step]:
        message = self._message
        if message is None or message.error is not None:
            return []
        return [self._quiet_step("header", (e.name, e.value)) for e in events]

    def _eoh_step(self) -> _Step:
        return self._quiet_step("eoh", ())

    def _quiet_step(self, method: str, args: tuple[Any, ...]) -> _Step:
        def step() -> "Deferred[Any] | None":
            message = self._message
            if message is None or message.error is not None:
                return None
            return self._call(getattr(self.handler, method), args, lambda v: self._quiet(v, method) and None)

        return step

    def _message_size(self, message: _Message, more: int) -> bool:
        message.size += more
        limit = self.policy.max_message_size
        if limit and message.size > limit:
            self._fail_message(TOO_BIG)
            return False
        return True

    def _body_steps(self, message: _Message, data: bytes) -> list[_Step]:
        limits = message.limits
        if limits is not None and data:
            exceeded = limits.feed(data)
            if exceeded is not None:
                self._fail_message(LINE_TOO_LONG if exceeded == "line" else HEADER_TOO_BIG)
            if limits.done:
                message.limits = None
        if not data or not self._message_size(message, len(data)) or message.error is not None:
            return []
        size = message.chunk
        if message.lines:
            # One call per line; a line longer than chunk_size still arrives in chunk_size pieces.
            data = message.partial + data
            cut = data.rfind(b"\r\n") + 2 if b"\r\n" in data else 0
            lines = [line + b"\r\n" for line in data[: cut - 2].split(b"\r\n")] if cut else []
            rest = data[cut:]
            whole = len(rest) - len(rest) % size
            message.partial = rest[whole:]
            pieces = [piece for line in lines + [rest[:whole]] for piece in _slices(line, size)]
        else:
            pieces = _slices(data, size)
        return [self._quiet_step("body", (piece,)) for piece in pieces]

    def rawDataReceived(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self._skipping_line:
            self._skip_line(data)
            return
        message = self._message
        if message is None or message.decoder is None:
            if self._chunk is not None:
                self._chunk_bytes(data)
                return
            self.setLineMode(data)
            return
        decoder = message.decoder
        content = decoder.feed(data)
        if decoder.bare_newline and self.policy.bare_newline == "reject":
            self._fail_message(BARE_NEWLINE)
        steps = self._body_steps(message, content)
        if decoder.done:
            if message.partial and message.error is None:
                steps.append(self._quiet_step("body", (message.partial,)))
                message.partial = b""
            steps.append(self._end_step(decoder.rest))
            message.decoder = None
        if steps:
            self._schedule(*steps)

    def _skip_line(self, data: bytes) -> None:
        """Discard an over-long command line up to its CRLF, then answer 500 5.5.2 and read commands again."""
        if self._skip_cr:
            data = b"\r" + data
        end = data.find(b"\r\n")
        if end < 0:
            # A CR at the end may begin the CRLF; keep it here (not in _buffer, which raw mode would loop on).
            self._skip_cr = data.endswith(b"\r")
            return
        self._skipping_line = False
        self._skip_cr = False
        self.setLineMode()
        self._buffer = data[end + 2:] + self._buffer
        self._reprocess = True
        if self._sasl is not None:
            self.monitor.auth_failed(self.session, self._sasl.name, None, sasl.AUTH_LINE_TOO_LONG)
            self._sasl = None  # RFC 4954 §4: the exchange ends with 500 5.5.6
            self.send(sasl.AUTH_LINE_TOO_LONG)
            return
        self.send(LINE_TOO_LONG)

    def _end_step(self, rest: bytes) -> _Step:
        def step() -> "Deferred[Any] | None":
            message = self._message
            self.setLineMode()
            self.MAX_LENGTH = self._command_limit
            if rest:
                self._buffer = rest + self._buffer
                self._reprocess = True
            if message is None:
                return None
            # RFC 2033 §4.2: in LMTP one reply per accepted recipient, in RCPT order.
            envelope = self.session.envelope
            count = len(envelope.recipients) if self.policy.lmtp else 0
            if message.error is not None:
                error = message.error
                self._finish_transaction()
                self.monitor.message_rejected(self.session, envelope, message.size, error)
                self._abort_now(error.text)
                self._send_replies([error] * count if count else [error])
                return None

            def then(value: Any) -> None:
                replies = self._lmtp_replies(value, count) if count else [self._reply_from(value, "eom")]
                self._finish_transaction()
                self._report_end(envelope, message.size, replies)
                self._send_replies(replies)

            message.ended = True
            return self._call(self.handler.eom, (), then)

        return step

    def _report_end(self, envelope: Envelope, size: int, replies: list[Reply]) -> None:
        """Tell the monitor the message's fate: accepted if any reply is positive (LMTP: for some recipients)."""
        accepted = next((r for r in replies if r.is_positive), None)
        if accepted is not None:
            self._junk = 0  # a session that delivers mail may keep resetting between messages
            self.monitor.message_accepted(self.session, envelope, size, self._now() - self._mail_at, accepted)
        else:
            self.monitor.message_rejected(self.session, envelope, size, replies[0])

    def _lmtp_replies(self, value: Any, count: int) -> list[Reply]:
        """eom()'s result in LMTP mode: a sequence of one reply per recipient, or one reply for all of them."""
        if isinstance(value, (list, tuple)) and not (value and isinstance(value[0], int)):
            if len(value) != count:
                self.log.error("handler eom returned {got} replies for {count} recipients", got=len(value),
                               count=count)
                return [HANDLER_ERROR] * count
            return [self._reply_from(v, "eom") for v in value]
        return [self._reply_from(value, "eom")] * count

    def _send_replies(self, replies: list[Reply]) -> None:
        """Write the replies to one command; the limit counts one error, and only if every reply is one."""
        if len(replies) == 1:
            self.send(replies[0])
            return
        for reply in replies[:-1]:
            if self.phase is Phase.CLOSED:
                return
            self.transport.write(reply.render(self._enhanced()))
        self.send(replies[-1], count_error=all(r.code >= 400 for r in replies))

    def _finish_transaction(self) -> None:
        self._message = None
        self.session.envelope = Envelope()
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.GREETED
