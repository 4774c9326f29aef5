"""`ESMTPProtocol`: one SMTP connection, speaking RFC 5321 and asking an `IMessageHandler` for every reply.

Commands and header lines are read in line mode; message content in raw mode, decoded by `data.DotDecoder`.
While a handler result is pending the transport is paused and nothing else is read, so replies stay in order
under pipelining and a slow handler never makes the server buffer a message.
"""

from __future__ import annotations

import inspect
from collections import deque
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from . import state
from .commands import Command, CommandError, Verb, line_limit, parse_command, parse_mail_rcpt
from .data import DotDecoder, HeaderSplitter
from .interfaces import IMessageHandler
from .params import check_mail_params, check_rcpt_params
from .policy import Policy
from .reply import Reply, SMTPReply, coerce
from .session import Envelope, Session
from .state import Phase

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
    """State of one message's content while it arrives."""

    __slots__ = ("decoder", "headers", "size", "error", "chunk", "lines", "partial", "ended")

    def __init__(self, chunk: int, lines: bool) -> None:
        self.decoder: DotDecoder | None = None
        self.headers: HeaderSplitter | None = None
        self.size = 0
        self.error: Reply | None = None
        self.chunk = chunk
        self.lines = lines
        self.partial = b""
        self.ended = False  # eom() was called: the handler owns the outcome, abort() must not follow


class ESMTPProtocol(LineReceiver):
    """Speaks ESMTP on one connection and delegates every verb to ``handler``."""

    log = Logger()
    delimiter = b"\r\n"

    def __init__(self, handler: IMessageHandler, policy: Policy | None = None,
                 clock: IReactorTime | None = None) -> None:
        self.handler = handler
        self.policy = policy if policy is not None else Policy()
        self.clock = clock
        self.session = Session(hostname=self.policy.hostname)
        self.phase = Phase.CONNECTED
        self.errors = 0
        self._refused = False
        self._todo: deque[_Step] = deque()
        self._waiting = False
        self._reprocess = False
        self._skipping_line = False
        self._skip_cr = False
        self._message: _Message | None = None
        self._timer: IDelayedCall | None = None
        self._pregreet: IDelayedCall | None = None
        self._early_talker = False
        self._closing = False
        self._command_limit = max(line_limit(v, self.policy.max_command_length) for v in Verb if v is not Verb.AUTH)

    # ---- extensions -------------------------------------------------------------------------------------------

    def extensions(self) -> list[str]:
        """The ESMTP keywords offered in the EHLO reply, in order."""
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
        return keys

    def _offered(self) -> set[str]:
        return {k.split(" ", 1)[0] for k in self.extensions()} if self.session.esmtp else set()

    # ---- connection life ---------------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.MAX_LENGTH = self._command_limit
        self.session.peer = self.transport.getPeer()
        self.session.host = self.transport.getHost()
        self.session.transport = self.transport
        admit = getattr(self.factory, "admit", None)
        refusal = admit(self) if admit is not None else None
        if refusal is not None:
            self.transport.write(refusal.render())
            self.phase = Phase.CLOSED
            self.transport.loseConnection()
            return
        if self.policy.pregreet_delay and self.clock is not None:
            self._pregreet = self.clock.callLater(self.policy.pregreet_delay, self._pregreet_over)
            return
        self._schedule(self._greet)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        if self._pregreet is not None and self._pregreet.active():
            self._pregreet.cancel()
        self._pregreet = None
        if self.phase is not Phase.CLOSED:
            self._abort("connection lost")
        self.phase = Phase.CLOSED
        self._todo.clear()
        self.session.transport = None
        release = getattr(self.factory, "release", None)
        if release is not None:
            release(self)

    def dataReceived(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self._pregreet is not None:
            self._early_talker = True  # RFC 5321 §3.1: the client waits for the greeting; this one did not
            return
        super().dataReceived(data)
        while self._reprocess and not self.paused and self.phase is not Phase.CLOSED:
            self._reprocess = False
            super().dataReceived(b"")
        self._reset_timer()

    def _pregreet_over(self) -> None:
        """The greeting delay passed: greet, or refuse a client that talked first (postscreen's pregreet test)."""
        self._pregreet = None
        if self._early_talker:
            self.log.info("early talker {peer} refused", peer=self.session.peer_ip)
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
            self.send(SHUTTING_DOWN, count_error=False)

    def force_close(self, reason: str = "shutdown deadline") -> None:
        """Close at once with 421 4.3.2, aborting any transaction (the shutdown deadline passed)."""
        if self.phase is not Phase.CLOSED:
            self.transport.write(SHUTTING_DOWN.render(self._enhanced()))
            self._close(reason)

    # ---- the step queue: handler calls in order, pausing while one is pending ----------------------------------

    def _schedule(self, *steps: _Step) -> None:
        self._todo.extend(steps)
        if not self._waiting:
            self._drive()

    def _drive(self) -> None:
        while self._todo and not self._waiting and self.phase is not Phase.CLOSED:
            pending = self._todo.popleft()()
            if pending is not None:
                self._waiting = True
                self.pauseProducing()
                self._cancel_timer()
                pending.addBoth(self._resume)
                return

    def _resume(self, _: object) -> None:
        self._waiting = False
        if self.phase is Phase.CLOSED:
            return
        self._drive()
        if not self._waiting and self.phase is not Phase.CLOSED:
            self._reset_timer()
            self.resumeProducing()

    def _call(self, method: Callable[..., Any], args: tuple[Any, ...],
              then: Callable[[Any], None]) -> "Deferred[Any] | None":
        """Call a handler method; give ``then`` its result (a value, or a Failure). Return a Deferred if pending."""
        try:
            result = method(*args)
            if inspect.iscoroutine(result):
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
        if reply.code >= 400 and count_error and reply.code != 421:
            self.errors += 1
            if self.policy.error_limit and self.errors >= self.policy.error_limit:
                self.transport.write(TOO_MANY_ERRORS.render(self._enhanced()))
                self._close("too many errors")
                return
            if self.policy.error_delay and self.errors > self.policy.soft_error_limit and self.clock is not None:
                self._todo.appendleft(self._tarpit)
        if reply.code == 421 or getattr(self.handler, "disconnect", False):
            self._close("closed by server")
        elif self._closing and self.idle:
            self.transport.write(SHUTTING_DOWN.render(self._enhanced()))
            self._close("shutdown")

    def _tarpit(self) -> "Deferred[Any]":
        """Read nothing for ``error_delay`` seconds (Postfix's smtpd_error_sleep_time)."""
        return deferLater(self.clock, self.policy.error_delay, lambda: None)

    def _close(self, reason: str) -> None:
        if self.phase is Phase.CLOSED:
            return
        self._abort(reason)
        self.phase = Phase.CLOSED
        self._cancel_timer()
        self._todo.clear()
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
        self.log.info("timeout from {peer}", peer=self.session.peer_ip)
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
        if self._message is not None:
            self._header_line(line)
            return
        self._schedule(lambda: self._command(line))

    def lineLengthExceeded(self, line: bytes) -> None:
        """An over-long line: drain it to its CRLF in raw mode, then answer (never drop the connection)."""
        message = self._message
        if message is not None and message.headers is not None:
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
        try:
            command = parse_command(raw)
        except CommandError as e:
            self.send(e.reply)
            return None
        if len(raw) > line_limit(self._effective_verb(command), self.policy.max_command_length):
            self.send(LINE_TOO_LONG)
            return None
        if self._refused and command.verb is not Verb.QUIT:
            self.send(NO_SERVICE)
            return None
        verb = self._effective_verb(command)
        if not state.allowed(self.phase, verb):
            self.send(Reply(503, (state.refusal(self.phase, verb),), "5.5.1"))
            return None
        handler = getattr(self, "_do_" + verb.value)
        try:
            return handler(command)
        except CommandError as e:
            self.send(e.reply, plain=verb in (Verb.HELO, Verb.EHLO))  # RFC 2034 §3: no enhanced code there
            return None

    def _effective_verb(self, command: Command) -> Verb:
        """Verbs of extensions that are not offered are unknown commands (the handler's ``unknown``)."""
        verb = command.verb
        if verb in (Verb.STARTTLS, Verb.AUTH, Verb.BDAT, Verb.LHLO):
            return Verb.UNKNOWN
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
        name = self._greeting_name(command)
        self._reset_transaction("reset by HELO")

        def after(reply: Reply) -> None:
            if reply.code == 250:
                self.session.helo, self.session.esmtp = name, False
                reply = self._with_hostname(reply)
            self.send(reply, plain=True)

        return self._simple("helo", (name,), Verb.HELO, after)

    def _do_EHLO(self, command: Command) -> "Deferred[Any] | None":
        name = self._greeting_name(command)
        self._reset_transaction("reset by EHLO")

        def after(reply: Reply) -> None:
            if reply.code == 250:
                self.session.helo, self.session.esmtp = name, True
                reply = self._with_hostname(reply)
                reply = Reply(250, reply.lines + tuple(k for k in self.extensions() if k not in reply.lines),
                              reply.enhanced)
            self.send(reply, plain=True)

        return self._simple("ehlo", (name,), Verb.EHLO, after)

    def _do_MAIL(self, command: Command) -> "Deferred[Any] | None":
        offered = self._offered()
        sender, raw = parse_mail_rcpt(command.argument, "FROM:", allow_null=True, allow_postmaster=False,
                                      utf8_allowed="SMTPUTF8" in offered)
        params = check_mail_params(raw, offered)
        limit = self.policy.max_message_size
        if limit and params.get("SIZE", 0) > limit:
            self.send(Reply(552, ("Message size exceeds fixed maximum message size",), "5.3.4"))
            return None
        if self.policy.max_transactions and self.session.transactions >= self.policy.max_transactions:
            self.send(TOO_MANY_TRANSACTIONS)
            return None

        def after(reply: Reply) -> None:
            if reply.is_positive:
                self.session.envelope = Envelope(sender=sender, mail_params=params)
                self.session.transactions += 1
            self.send(reply)

        return self._simple("mail", (sender, params), Verb.MAIL, after)

    def _do_RCPT(self, command: Command) -> "Deferred[Any] | None":
        offered = self._offered()
        envelope = self.session.envelope
        recipient, raw = parse_mail_rcpt(command.argument, "TO:", allow_null=False, allow_postmaster=True,
                                         utf8_allowed="SMTPUTF8" in envelope.mail_params)
        params = check_rcpt_params(raw, offered)
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

    # ---- transactions ------------------------------------------------------------------------------------------

    def _abort(self, reason: str) -> None:
        """Tell the handler a transaction in progress was dropped (no-op outside a transaction)."""
        if not state.in_transaction(self.phase):
            return
        ended = self._message is not None and self._message.ended
        self._message = None
        if not ended:
            self.session.envelope = Envelope()
        self.phase = Phase.GREETED
        if not ended:
            self._abort_now(reason)

    def _abort_now(self, reason: str) -> None:
        try:
            result = self.handler.abort(reason)
            if inspect.iscoroutine(result):
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
            message.decoder = DotDecoder(at_line_start=True)
            self.setRawMode()
        else:
            message.headers = HeaderSplitter()
            self.MAX_LENGTH = self.policy.max_line_length - 2

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
        if message.headers.size > self.policy.max_header_size:
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
        message.decoder = DotDecoder(at_line_start=True)
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
            if message.error is not None:
                self._finish_transaction()
                self._abort_now(message.error.text)
                self.send(message.error)
                return None

            def then(value: Any) -> None:
                reply = self._reply_from(value, "eom")
                self._finish_transaction()
                self.send(reply)

            message.ended = True
            return self._call(self.handler.eom, (), then)

        return step

    def _finish_transaction(self) -> None:
        self._message = None
        self.session.envelope = Envelope()
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.GREETED
