"""`ClientProtocol`: one ESMTP (or LMTP) session that offers one message to one server and notes each recipient's
outcome.

The conversation, in order: the greeting; EHLO (HELO when EHLO is unknown and neither TLS nor AUTH is required;
LHLO for LMTP); STARTTLS and EHLO again; AUTH PLAIN or LOGIN, over TLS only; MAIL, each RCPT and DATA, in one
write when the server offers PIPELINING (RFC 2920), else one at a time; the content, dot-stuffed after DATA or in
BDAT chunks (RFC 3030), read from its file 64 KiB at a time as the connection takes it; the reply at the end
(LMTP: one per accepted recipient, RFC 2033 §4.2); QUIT. A 552 to RCPT counts as 452, the server's recipient
limit (RFC 5321 §4.5.3.1.10); a 2xx after the data from a server offering DSN is marked ``dsn`` (it was given
NOTIFY and ORCPT, so the notices are its own, RFC 3461 §5.2.1). With ``all_or_nothing``, a refused recipient stops
the transaction before its end: no DATA or BDAT, or, when DATA was pipelined and got 354, the connection closed
without the final dot, so the server never processes it (RFC 5321 §4.1.1.4). Every wait has a timeout (RFC 5321
§4.5.3.2) on the given clock; `ClientProtocol.cancel` stops it at once. The outcomes and
`ClientProtocol.session_failed` are final once `ClientProtocol.finished` fires, when the connection has closed.

Three layers, one class each: the frame (replies matched to commands, timers, how a session ends), the opening
(greeting to AUTH), and `ClientProtocol` itself (the transaction and the content).
"""

from __future__ import annotations

import base64
from collections import deque
from dataclasses import dataclass
from typing import IO, Any, Callable, Final, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (IDelayedCall, IHandshakeListener, IPushProducer, IReactorTime,
                                         ITLSTransport)
from twisted.internet.protocol import connectionDone
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpkit.core.client import (MAX_REPLY_LINE_LENGTH, Extensions, ReplyError, ReplyParser, check_offer,
                                  check_recipient, mail_command, rcpt_command, requiretls_refusal)
from esmtpkit.core.outbound import Message, Outcome
from esmtpkit.core.reply import Reply
from esmtpkit.core.stuffing import DotStuffer, LineEnds
from esmtpkit.client.options import ClientOptions

__all__ = ["ClientProtocol", "CHUNK_SIZE", "QUIT_TIMEOUT"]

#: Octets read from the content file at a time (one BDAT chunk, or one piece of DATA content).
CHUNK_SIZE: Final = 65536
#: Seconds to wait for the reply to QUIT once the outcomes are known; then the connection is dropped.
QUIT_TIMEOUT: Final = 10.0

OpenContent = Callable[[], IO[bytes]]


@dataclass(frozen=True, slots=True)
class _Wait:
    """A command sent whose reply has not come yet: what it was, how long to wait, what to do with the reply."""

    what: str
    timeout: float
    then: Callable[[Reply], None]


def _rcpt_refusal(reply: Reply, host: str) -> Outcome:
    """A refused RCPT's outcome; 552 is taken as 452, the server's recipient limit (RFC 5321 §4.5.3.1.10)."""
    return _softened(reply, host) if reply.code == 552 else Outcome.of(reply, host)


def _softened(reply: Reply, host: str) -> Outcome:
    """The reply as a temporary outcome: for refusals that another host or a later attempt may not give."""
    outcome = Outcome.of(reply, host)
    if outcome.permanent:
        return Outcome(outcome.code - 100, "4" + outcome.enhanced[1:], outcome.text, host)
    return outcome


@implementer(IPushProducer)
class _Streamer:
    """Writes the content while the connection takes it: paused when the transport's buffer is full, held while
    a BDAT chunk's reply is awaited without PIPELINING."""

    def __init__(self, file: IO[bytes], write_piece: Callable[["_Streamer"], None]) -> None:
        self.file = file
        self.write_piece = write_piece
        self.paused = False
        self.held = False
        self.done = False
        self._pumping = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.pump()

    def stopProducing(self) -> None:
        self.done = True

    def release(self) -> None:
        """The awaited BDAT reply came: go on."""
        self.held = False
        self.pump()

    def pump(self) -> None:
        """Write pieces until paused, held or done (never re-entered from a write that pauses it)."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while not (self.paused or self.held or self.done):
                self.write_piece(self)
        finally:
            self._pumping = False


@implementer(IHandshakeListener)
class _Connection(LineReceiver):
    """The frame of a session: each reply matched to the command awaiting it, a timeout on every wait, and the
    outcomes given when it ends early (connection lost, timed out, or the server broke the protocol)."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_REPLY_LINE_LENGTH + 1

    def __init__(self, options: ClientOptions, indexes: Sequence[int], *, clock: IReactorTime, host: str) -> None:
        self.options = options
        self.indexes = list(indexes)
        self.clock = clock
        self.host = host
        self.finished: Deferred[None] = Deferred()
        self.outcomes: dict[int, Outcome] = {}
        self.session_failed = False
        self.tls_failed = False
        self._parser = ReplyParser()
        self._waits: deque[_Wait] = deque()
        self._timer: IDelayedCall | None = None
        self._streamer: _Streamer | None = None
        self._handshaking = options.tls == "implicit"
        self._quitting = False
        self._closed = False

    @property
    def _where(self) -> str:
        return self.host or "the server"

    def handshakeCompleted(self) -> None:
        """The TLS handshake is done (IHandshakeListener): a failure from now on is no TLS failure."""
        self._handshaking = False

    def lineReceived(self, line: bytes) -> None:
        if self._closed:
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            reply = self._parser.feed(line)
        except ReplyError as e:
            self._protocol_error(str(e))
            return
        if reply is None:
            return
        self._handshaking = False
        if not self._waits:
            if self._quitting:
                return
            if reply.code >= 400 and (reply.code == 421 or self._streamer is not None):
                self._end(Outcome.of(reply, self.host))  # e.g. a server ending the data early: it said why
                return
            self._protocol_error(f"unexpected reply {reply}")
            return
        wait = self._waits.popleft()
        if reply.code == 421 and not self._quitting:
            self._end(Outcome.of(reply, self.host))  # the server is closing the connection (RFC 5321 §3.8)
            return
        wait.then(reply)
        self._arm()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._protocol_error(f"reply line longer than {MAX_REPLY_LINE_LENGTH} octets")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        doing = self._doing()
        self._closed = True
        self._cancel_timer()
        self._stop_streaming()
        if self._handshaking and not self._settled():
            self.tls_failed = True
            self._settle(self._no_tls(Outcome.local(454, "4.7.5", f"TLS handshake with {self._where} failed: "
                                                                  f"{reason.getErrorMessage()}")))
        else:
            self._settle(Outcome.local(451, "4.4.2", f"lost connection with {self._where} {doing}"))
        self._waits.clear()
        if not self.finished.called:
            self.finished.callback(None)

    # ---- replies, timers --------------------------------------------------------------------------------------

    def _send(self, line: bytes, what: str, timeout: float, then: Callable[[Reply], None]) -> None:
        self.transport.write(line + b"\r\n")  # type: ignore[union-attr]
        self._expect(what, timeout, then)

    def _expect(self, what: str, timeout: float, then: Callable[[Reply], None]) -> None:
        self._waits.append(_Wait(what, timeout, then))
        self._arm()

    def _arm(self) -> None:
        """Start the timeout for what we now wait for: the transport taking content, or the oldest reply."""
        if self._closed:
            return  # the timer left is the one that drops a connection slow to close
        self._cancel_timer()
        if self._streamer is not None and not self._streamer.done and not self._streamer.held:
            timeout = self.options.timeouts.block
        elif self._waits:
            timeout = self._waits[0].timeout
        else:
            return
        self._timer = self.clock.callLater(timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._closed or (self._quitting and self._settled()):
            self._abort()
            return
        self._settle(Outcome.local(451, "4.4.2", f"conversation with {self._where} timed out {self._doing()}"))
        self._abort()

    def _doing(self) -> str:
        if self._streamer is not None and not self._streamer.done:
            return "while sending the message content"
        if self._waits:
            what = self._waits[0].what
            return f"while waiting for {what if what.startswith('the ') else 'the reply to ' + what}"
        return "after the last reply"

    # ---- ending -----------------------------------------------------------------------------------------------

    def _settled(self) -> bool:
        return all(i in self.outcomes for i in self.indexes)

    def _settle(self, outcome: Outcome, session: bool = True) -> None:
        """Give ``outcome`` to every recipient that has none yet; ``session``: the session failed as a whole."""
        missing = [i for i in self.indexes if i not in self.outcomes]
        for i in missing:
            self.outcomes[i] = outcome
        if missing and session:
            self.session_failed = True

    def _end(self, outcome: Outcome) -> None:
        """The session failed and the server is closing it: no QUIT."""
        self._settle(outcome, session=outcome.code < 500)
        self._stop_streaming()
        self._close()

    def _fail(self, outcome: Outcome, session: bool = True) -> None:
        """The recipients still open get ``outcome``; then QUIT."""
        self._settle(outcome, session)
        self._quit()

    def _protocol_error(self, why: str) -> None:
        self._settle(self._violation(why))
        self._abort()

    def _no_tls(self, outcome: Outcome) -> Outcome:
        """The outcome when the TLS the options require cannot be had (``outcome`` as for any mail)."""
        return outcome

    def _violation(self, why: str) -> Outcome:
        return Outcome.local(451, "4.5.0", f"protocol error from {self._where}: {why}")

    def _refusal(self, reply: Reply, what: str) -> Outcome:
        """The outcome of a reply that refuses ``what``; a positive reply where none fits is a protocol error."""
        if reply.code < 400:
            return self._violation(f"unexpected reply {reply} to {what}")
        return Outcome.of(reply, self.host)

    def cancel(self) -> None:
        """Stop now, as the caller's deadline has passed: the recipients with no answer yet get 4.4.2 "attempt
        timed out" (those answered keep their answer) and the connection is aborted."""
        if self.finished.called:
            return
        self._settle(Outcome.local(451, "4.4.2", f"attempt timed out ({self._where}, {self._doing()})"))
        if self.transport is None:
            self._closed = True
            self._cancel_timer()
            return
        self._abort()

    def _abort(self) -> None:
        self._stop_streaming()
        self._closed = True
        self._cancel_timer()
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _quit(self) -> None:
        """QUIT, once everything else has been answered; the connection closes on its reply or its timeout."""
        if self._quitting or self._closed:
            return
        self._quitting = True
        self._stop_streaming()
        self._send(b"QUIT", "QUIT", QUIT_TIMEOUT, lambda reply: self._close())

    def _close(self) -> None:
        """Close, and drop the connection if it has not closed within `QUIT_TIMEOUT`."""
        self._stop_streaming()
        self._closed = True
        self._cancel_timer()
        self._timer = self.clock.callLater(QUIT_TIMEOUT, self._timed_out)
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _stop_streaming(self) -> None:
        streamer, self._streamer = self._streamer, None
        if streamer is None:
            return
        streamer.done = True
        if self.transport is not None and not self._closed:
            self.transport.unregisterProducer()
        try:
            streamer.file.close()
        except OSError:
            pass  # a read-only file that cannot be closed has nothing left to lose


class _Opening(_Connection):
    """From the greeting to a session ready for mail: EHLO (or HELO, or LHLO), STARTTLS and EHLO again, AUTH."""

    def __init__(self, options: ClientOptions, indexes: Sequence[int], *, clock: IReactorTime, host: str,
                 tls_creator: Any) -> None:
        super().__init__(options, indexes, clock=clock, host=host)
        self.tls_creator = tls_creator
        self.extensions = Extensions()
        self._tls = options.tls == "implicit"
        self._tls_tried = False
        self._authenticated = False

    def connectionMade(self) -> None:
        self._expect("the greeting", self.options.timeouts.greeting, self._greeted)

    def _greeted(self, reply: Reply) -> None:
        if reply.code != 220:
            refusal = self._refusal(reply, "the greeting")
            self._fail(_softened(reply, self.host) if reply.code >= 400 else refusal)  # RFC 5321 §3.1
            return
        self._hello()

    def _hello(self) -> None:
        verb = "LHLO" if self.options.lmtp else "EHLO"
        self._send(f"{verb} {self.options.helo}".encode("ascii", "replace"), verb, self.options.timeouts.ehlo,
                   self._helloed)

    def _helloed(self, reply: Reply) -> None:
        if reply.code == 250:
            self.extensions = Extensions.parse(reply)
            self._after_hello()
        elif reply.code in (500, 502) and not self.options.lmtp and not self._tls_tried:
            if self.options.tls == "required":  # no EHLO, no STARTTLS
                self._fail(self._no_tls(Outcome.local(454, "4.7.4",
                                                      f"TLS is required, but {self._where} knows no EHLO")))
            elif self.options.username is not None:  # no EHLO, no AUTH
                self._fail(Outcome.local(454, "4.7.0", f"{self._where} knows no EHLO, so no AUTH"))
            else:
                self._send(f"HELO {self.options.helo}".encode("ascii", "replace"), "HELO",
                           self.options.timeouts.ehlo, self._heloed)
        else:
            self._fail(self._refusal(reply, "LHLO" if self.options.lmtp else "EHLO"))

    def _heloed(self, reply: Reply) -> None:
        if reply.code != 250:
            self._fail(self._refusal(reply, "HELO"))
            return
        self.extensions = Extensions()
        self._after_hello()

    def _after_hello(self) -> None:
        if not self._tls and not self._tls_tried and self.options.tls in ("opportunistic", "required"):
            self._tls_tried = True
            if self.extensions.offers("STARTTLS") and self.tls_creator is not None:
                self._send(b"STARTTLS", "STARTTLS", self.options.timeouts.ehlo, self._starttls_answered)
                return
            if self.options.tls == "required":
                self._fail(self._no_tls(Outcome.local(454, "4.7.4",
                                                      f"TLS is required, but was not offered by {self._where}")))
                return
        if self.options.username is not None and not self._authenticated:
            self._authenticate()
            return
        self._transaction()

    def _starttls_answered(self, reply: Reply) -> None:
        if reply.code != 220:
            if reply.code < 400:
                self._protocol_error(f"unexpected reply {reply} to STARTTLS")
            elif self.options.tls == "required":
                self._fail(self._no_tls(_softened(reply, self.host)))
            else:
                self._after_hello()  # opportunistic: carry on in clear
            return
        if not ITLSTransport.providedBy(self.transport):
            self._fail(self._no_tls(Outcome.local(454, "4.7.5", "this connection cannot start TLS")))
            return
        self.clearLineBuffer()  # anything sent in clear after the 220 is not to be read as if encrypted
        self._tls = True
        self._handshaking = True
        self.extensions = Extensions()
        self.transport.startTLS(self.tls_creator)  # type: ignore[union-attr]
        self._hello()

    def _authenticate(self) -> None:
        if not self._tls:
            self._fail(Outcome.local(454, "4.7.10", f"not sending credentials to {self._where} without TLS"))
            return
        mechanisms = self.extensions.auth_mechanisms
        user = (self.options.username or "").encode("utf-8")
        password = (self.options.password or "").encode("utf-8")
        timeout = self.options.timeouts.ehlo
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            self._send(b"AUTH PLAIN " + token, "AUTH", timeout, self._auth_answered)
        elif "LOGIN" in mechanisms:
            def password_asked(reply: Reply) -> None:
                if reply.code != 334:
                    self._auth_answered(reply)
                    return
                self._send(base64.b64encode(password), "AUTH", timeout, self._auth_answered)

            def user_asked(reply: Reply) -> None:
                if reply.code != 334:
                    self._auth_answered(reply)
                    return
                self._send(base64.b64encode(user), "AUTH", timeout, password_asked)

            self._send(b"AUTH LOGIN", "AUTH", timeout, user_asked)
        else:
            self._fail(Outcome.local(454, "4.7.0", f"{self._where} offers no authentication mechanism we use "
                                                   f"(PLAIN or LOGIN)"))

    def _auth_answered(self, reply: Reply) -> None:
        if reply.code != 235:
            refusal = self._refusal(reply, "AUTH")
            self._fail(_softened(reply, self.host) if reply.code >= 400 else refusal)  # ours to fix: mail waits
            return
        self._authenticated = True
        self._transaction()

    def _transaction(self) -> None:
        """The mail transaction, once the session is ready (`ClientProtocol`)."""
        raise NotImplementedError


class ClientProtocol(_Opening):
    """Send ``message`` to the recipients at ``indexes`` over one connection; see the module docstring.

    ``host`` names the server in outcomes (``mx.example.net[192.0.2.1]``). ``tls_creator`` is what STARTTLS (or,
    with ``tls="implicit"``, the endpoint) uses. ``tls_failed`` tells a caller that a TLS handshake failed, so an
    opportunistic sender may try again in clear.

    A REQUIRETLS message (RFC 8689 §4.2.1) goes only over TLS whose certificate was verified (``options.verify``;
    `esmtpkit.client.session.send` sees to it) and only to a server offering REQUIRETLS; otherwise every
    recipient gets 550 5.7.30. A recipient whose RRVS cannot go on (`check_recipient`) gets its refusal and is
    not offered; the others are.
    """

    def __init__(self, message: Message, open_content: OpenContent, options: ClientOptions,
                 indexes: Sequence[int], *, clock: IReactorTime, host: str = "", tls_creator: Any = None) -> None:
        super().__init__(options, indexes, clock=clock, host=host, tls_creator=tls_creator)
        self.message = message
        self.open_content = open_content
        self._pipelining = False
        self._bdat = False
        self._mail_refused = False
        self._accepted: list[int] = []
        self._rcpts_left = 0
        self._stuffer = DotStuffer()
        self._line_ends: LineEnds | None = None
        self._dsn = False
        self._next_piece: bytes | None = None
        self._transaction_over = False
        self._abandoned = False
        self._sending: list[int] = list(self.indexes)

    def _no_tls(self, outcome: Outcome) -> Outcome:
        if self.message.requiretls:
            return requiretls_refusal(f"no verified TLS with {self._where}: {outcome.text}")
        return outcome

    def _transaction(self) -> None:
        ext = self.extensions
        if not self.indexes:
            self._quit()
            return
        if self.message.requiretls and not (self._tls and self.options.verify):
            self._fail(requiretls_refusal(f"no verified TLS with {self._where}"), session=False)
            return
        now = self.clock.seconds()
        refusal = check_offer(self.message, ext, [self.message.recipients[i] for i in self.indexes], now=now)
        if refusal is not None:
            self._fail(Outcome(refusal.code, refusal.enhanced, f"{refusal.text} ({self._where})", ""), session=False)
            return
        for i in self.indexes:
            refused = check_recipient(self.message.recipients[i], ext)
            if refused is not None:
                self.outcomes[i] = Outcome(refused.code, refused.enhanced, f"{refused.text} ({self._where})", "")
        self._sending = [i for i in self.indexes if i not in self.outcomes]
        recipients = [self.message.recipients[i] for i in self._sending]
        if not recipients:
            self._quit()
            return
        self._pipelining = ext.offers("PIPELINING")
        self._dsn = ext.offers("DSN")  # NOTIFY and ORCPT go along, so the server reports from then on
        self._bdat = self.message.body == "BINARYMIME" or (self.options.chunking and ext.offers("CHUNKING"))
        self._line_ends = None if self.message.body == "BINARYMIME" else LineEnds()
        timeouts = self.options.timeouts
        mail = mail_command(self.message, ext, now=now)
        self._rcpts_left = len(recipients)
        if not self._pipelining:
            self._send(mail, "MAIL FROM", timeouts.mail, self._mail_answered)
            return
        lines = [mail] + [rcpt_command(r, ext) for r in recipients]
        if not self._bdat:
            lines.append(b"DATA")
        self.transport.write(b"".join(line + b"\r\n" for line in lines))  # type: ignore[union-attr]
        self._expect("MAIL FROM", timeouts.mail, self._mail_answered)
        for i in self._sending:
            self._expect("RCPT TO", timeouts.rcpt, self._rcpt_answer(i))
        if not self._bdat:
            self._expect("DATA", timeouts.data_init, self._data_answered)

    def _mail_answered(self, reply: Reply) -> None:
        if not 200 <= reply.code < 300:
            self._mail_refused = True
            self._settle(self._refusal(reply, "MAIL FROM"), session=reply.code < 500)
            if not self._pipelining:
                self._quit()
            return
        if not self._pipelining:
            self._next_rcpt()

    def _next_rcpt(self) -> None:
        i = self._sending[len(self._sending) - self._rcpts_left]
        self._send(rcpt_command(self.message.recipients[i], self.extensions), "RCPT TO", self.options.timeouts.rcpt,
                   self._rcpt_answer(i))

    def _rcpt_answer(self, index: int) -> Callable[[Reply], None]:
        def answered(reply: Reply) -> None:
            self._rcpts_left -= 1
            if not self._mail_refused:
                if 200 <= reply.code < 300:
                    self._accepted.append(index)
                elif reply.code < 400:
                    self.outcomes[index] = self._refusal(reply, "RCPT TO")
                else:
                    self.outcomes[index] = _rcpt_refusal(reply, self.host)
            if self._rcpts_left:
                if not self._pipelining:
                    self._next_rcpt()
                return
            self._recipients_answered()
        return answered

    def _recipients_answered(self) -> None:
        if self._mail_refused:
            if self._bdat or not self._pipelining:
                self._quit()
            return  # the pipelined DATA still has its reply to come
        if not self._accepted:
            if self._bdat or not self._pipelining:
                self._quit()
            return
        if self.options.all_or_nothing and len(self._accepted) < len(self.indexes):
            self._abandon()
            if self._bdat or not self._pipelining:
                self._quit()
            return  # the pipelined DATA still has its reply to come
        if self._bdat:
            self._start_content()
        elif not self._pipelining:
            self._send(b"DATA", "DATA", self.options.timeouts.data_init, self._data_answered)

    def _data_answered(self, reply: Reply) -> None:
        if self._mail_refused or not self._accepted:
            if reply.code == 354:  # RFC 2920 §3.1: a server may accept DATA with no recipient; end it at once
                self.transport.write(b".\r\n")  # type: ignore[union-attr]
                self._expect("the reply to the end of the data", self.options.timeouts.data_end,
                             lambda reply: self._quit())
            else:
                self._quit()
            return
        if self._abandoned:
            if reply.code == 354:
                self._close()  # no final dot: the transaction is never processed, for anyone
            else:
                self._quit()
            return
        if reply.code != 354:
            self._fail(self._refusal(reply, "DATA"), session=reply.code < 500)
            return
        self._start_content()

    def _abandon(self) -> None:
        """All or nothing: another recipient was refused, so the accepted ones are not sent the message."""
        self._abandoned = True
        refused = ", ".join(f"<{self.message.recipients[i].address}>" for i in self.indexes if i in self.outcomes)
        self._settle(Outcome.local(451, "4.0.0", f"not sent: {self._where} refused {refused}, and the message "
                                                 f"goes to all of its recipients or to none"), session=False)

    # ---- the content ------------------------------------------------------------------------------------------

    def _start_content(self) -> None:
        try:
            file = self.open_content()
        except Exception as e:
            self._settle(Outcome.local(451, "4.3.0", f"cannot read the message content: {e}"))
            self._abort()
            return
        self._streamer = _Streamer(file, self._write_piece)
        self.transport.registerProducer(self._streamer, True)  # type: ignore[union-attr]
        self._arm()
        self._streamer.pump()

    def _write_piece(self, streamer: _Streamer) -> None:
        """Read one piece of content and write it: dot-stuffed for DATA, as one BDAT chunk otherwise."""
        try:
            piece = self._next_piece if self._next_piece is not None else streamer.file.read(CHUNK_SIZE)
            following = streamer.file.read(CHUNK_SIZE) if self._bdat and piece else b""
        except Exception as e:
            self._settle(Outcome.local(451, "4.3.0", f"cannot read the message content: {e}"))
            self._abort()
            return
        write = self.transport.write  # type: ignore[union-attr]
        if not self._bdat:
            self._next_piece = None
            if piece:
                write(self._stuffer(piece))
            else:
                self._content_written()
                write(self._stuffer.finish())
                self._await_end("the reply to the end of the data")
            self._arm()
            return
        last = not following
        self._next_piece = following
        if self._line_ends is not None:
            piece = self._line_ends(piece) + (self._line_ends.finish() if last else b"")
        header = b"BDAT %d%s\r\n" % (len(piece), b" LAST" if last else b"")
        self.transport.writeSequence([header, piece])  # type: ignore[union-attr]
        if last:
            self._content_written()
            self._await_end("the reply to BDAT LAST")
        else:
            self._expect("BDAT", self.options.timeouts.block, self._chunk_answered)
            if not self._pipelining:
                streamer.held = True
        self._arm()

    def _content_written(self) -> None:
        self._stop_streaming()

    def _chunk_answered(self, reply: Reply) -> None:
        if self._transaction_over:
            return
        if not 200 <= reply.code < 300:
            self._transaction_over = True  # RFC 3030 §2: no more chunks after a refused one
            self._fail(self._refusal(reply, "BDAT"), session=reply.code < 500)
            return
        if self._streamer is not None and self._streamer.held:
            self._streamer.release()

    def _await_end(self, what: str) -> None:
        timeout = self.options.timeouts.data_end
        if not self.options.lmtp:
            self._expect(what, timeout, self._ended)
            return
        for i in self._accepted:  # RFC 2033 §4.2: one reply per accepted recipient, in order
            self._expect(what, timeout, self._lmtp_answer(i))

    def _ended(self, reply: Reply) -> None:
        if self._transaction_over:
            return
        self._transaction_over = True
        outcome = self._delivered(reply) if 200 <= reply.code < 300 else self._refusal(reply, "the data")
        self._fail(outcome, session=400 <= outcome.code < 500)

    def _delivered(self, reply: Reply) -> Outcome:
        """A 2xx to the data: with DSN offered, the server was given NOTIFY and ORCPT and now owes the notices
        (RFC 3461 §5.2.1), so the outcome says so (``dsn``)."""
        return Outcome.of(reply, self.host, dsn=self._dsn)

    def _lmtp_answer(self, index: int) -> Callable[[Reply], None]:
        def answered(reply: Reply) -> None:
            if self._transaction_over:
                return
            self.outcomes[index] = (self._delivered(reply) if 200 <= reply.code < 300
                                    else self._refusal(reply, "the data"))
            if self._settled():
                self._transaction_over = True
                self._quit()
        return answered
