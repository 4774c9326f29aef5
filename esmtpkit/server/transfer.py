"""Message content, by DATA or by BDAT: raw octets into the one `ContentReader`, its events into handler steps.

After DATA's 354 the connection switches to raw mode and the reader undoes dot-stuffing and finds the end; BDAT
chunks are counted off the wire and fed to the same reader, which `end`\\ s at BDAT LAST. Either way the handler
gets ``header``/``eoh``/``body`` calls as its content mode asks, then ``eom`` (`esmtpkit.server.protocol` mixes
this in).
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from esmtpkit.core.commands import Command, CommandError, Verb
from esmtpkit.core.content import EOH, ContentEvent, ContentMode, ContentReader, CountedReader
from esmtpkit.core.reply import Reply, SMTPReply
from esmtpkit.core.session import Envelope
from esmtpkit.server.interfaces import ILMTPHandler, content_mode_of
from esmtpkit.server.replies import CHUNK_FAILED, CHUNK_SYNTAX, CONTENT_ERRORS, HANDLER_ERROR, TOO_BIG
from esmtpkit.server.steps import Step

__all__ = ["Transfer"]

#: Where a header line has no limit of its own (``max_line_length`` 0), a parsed header line may still not
#: outgrow this: the handler is given it whole, so it has to fit in memory.
_PARSED_LINE_CAP: Final = 1024 * 1024
#: RFC 3030 §2: chunk-size is 1*DIGIT; more than 20 digits is no size a server could read.
_MAX_CHUNK_DIGITS: Final = 20


class _Message:
    """One message's content while it arrives: its reader, the reply it failed with, and BDAT's count."""

    __slots__ = ("reader", "error", "ended", "chunked", "received")

    def __init__(self, reader: ContentReader, chunked: bool) -> None:
        self.reader = reader
        self.error: Reply | None = None
        self.ended = False  # eom() was called (or abort() already was): abort() must not follow
        self.chunked = chunked  # BDAT: commands come between chunks
        self.received = 0  # BDAT: octets announced by the chunks accepted so far

    @property
    def size(self) -> int:
        """Content octets read so far."""
        return self.reader.size


class _Chunk:
    """One BDAT chunk being read: ``size`` octets, whether it is the LAST, and the refusal if it is only drained."""

    __slots__ = ("reader", "size", "last", "refusal")

    def __init__(self, size: int, last: bool, refusal: Reply | None = None) -> None:
        self.reader = CountedReader(size)
        self.size = size
        self.last = last
        self.refusal = refusal


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


class Transfer:
    """Mixin: DATA content, BDAT chunks, and the end of the message."""

    __slots__ = ()

    # ---- one message -------------------------------------------------------------------------------------------

    def _new_message(self, chunked: bool) -> _Message:
        """The reader for a message starting now, with the handler's content mode and the policy's limits."""
        handler, p = self.handler, self.policy
        mode = content_mode_of(handler)
        size = getattr(handler, "chunk_size", None) or p.chunk_size
        # Binary content may hold any octet (RFC 3030 §3); 7BIT/8BITMIME content is lines ending in CRLF.
        binary = chunked and self.session.envelope.mail_params.get("BODY") == "BINARYMIME"
        # Raw content is never held as lines, so without limits its header section need not be read at all.
        limited = mode is not ContentMode.RAW or p.max_line_length or p.max_header_size
        reader = ContentReader(mode, max(1, int(size)), dotted=not chunked, max_size=p.max_message_size,
                               max_line=self._header_line_limit() if limited else 0, max_header=p.max_header_size,
                               check_bare=p.bare_newline == "reject" and not binary)
        return _Message(reader, chunked)

    def _header_line_limit(self) -> int:
        """The longest header line, CRLF included (bounded even when ``max_line_length`` is 0)."""
        p = self.policy
        return p.max_line_length or min(p.max_header_size or _PARSED_LINE_CAP, _PARSED_LINE_CAP)

    def _fail_message(self, reply: Reply) -> None:
        message = self._message
        if message is not None and message.error is None:
            message.error = reply
            message.reader.discard()

    def _content_steps(self, message: _Message, events: list[ContentEvent]) -> list[Step]:
        """The handler step for the reader's events (none once the message failed)."""
        error = message.reader.error
        if error is not None:
            self._fail_message(CONTENT_ERRORS[error])
        if message.error is not None or not events:
            return []
        return [partial(self._deliver, events, 0)]

    def _deliver(self, events: list[ContentEvent], at: int) -> "Deferred[Any] | None":
        """Give the handler ``events[at:]`` in order; if one returns a Deferred, the rest wait for it.

        One step per read rather than one per event: a read of content seldom brings more than one or two.
        """
        handler = self.handler
        while at < len(events):
            message = self._message
            if self._gone or message is None or message.error is not None:
                return None
            event = events[at]
            at += 1
            if type(event) is bytes:
                pending = self._call(handler.body, (event,), partial(self._quiet, "body"))
            elif event is EOH:
                pending = self._call(handler.eoh, (), partial(self._quiet, "eoh"))
            else:
                pending = self._call(handler.header, (event.name, event.value), partial(self._quiet, "header"))
            if pending is not None:
                if at < len(events):
                    self._todo.append(partial(self._deliver, events, at))  # next, before anything queued
                return pending
        return None

    def _quiet(self, what: str, value: Any) -> bool:
        """For header/eoh/body results: on a failure, fail the message (with the handler's reply if it raised
        `SMTPReply`, else 451 4.3.0 and a log) and return False."""
        if not isinstance(value, Failure):
            return True
        if value.check(SMTPReply):
            self._fail_message(value.value.reply)
        else:
            self.log.failure("handler {what} failed", value, what=what)
            self._fail_message(HANDLER_ERROR)
        return False

    # ---- DATA (RFC 5321 §4.1.1.4) ------------------------------------------------------------------------------

    def _start_message(self) -> None:
        """DATA was answered 354: the content follows, read raw until ``CRLF.CRLF``."""
        self._message = self._new_message(chunked=False)
        self.setRawMode()

    def _data_bytes(self, data: bytes) -> None:
        reader = self._message.reader
        if reader.done:
            self._unread += data  # after the end of data, behind what its end step gives back
            return
        steps = self._content_steps(self._message, reader.feed(data))
        if reader.done:
            steps.append(self._end_step(reader.rest))
        if steps:
            self._schedule(*steps)

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
            if self._gone:
                return
            if not reply.is_positive:
                self._fail_chunks(reply)
                self._drain(command, reply)
                return
            self.conversation.answered(Verb.BDAT, reply.code)
            self._message = self._new_message(chunked=True)
            self._read_chunk(self._message, size, last)

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
            message = self._message = self._new_message(chunked=True)
        self._fail_message(reply)
        if not message.ended:
            message.ended = True
            self.monitor.message_rejected(self.session, self.session.envelope, message.size, message.error)
            self._abort_now(message.error.text)
        self.conversation.chunk_failed()

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
        """Raw octets of the chunk being read: content for the reader, or drained; what follows is commands."""
        chunk = self._chunk
        part, rest = chunk.reader.feed(data)
        steps: list[Step] = []
        if chunk.refusal is None and part:
            message = self._message
            if message is not None and message.error is None:
                steps = self._content_steps(message, message.reader.feed(part))
        if chunk.reader.remaining == 0:
            self._chunk = None
            steps.extend(self._chunk_complete(chunk, rest))
        if steps:
            self._schedule(*steps)

    def _chunk_complete(self, chunk: _Chunk, rest: bytes) -> list[Step]:
        """Steps once a chunk's octets are all read: after LAST, the reader's last events; then the chunk's end."""
        steps: list[Step] = []
        message = self._message
        if chunk.last and chunk.refusal is None and message is not None and message.error is None:
            steps = self._content_steps(message, message.reader.end())
        steps.append(self._chunk_end_step(chunk, rest))
        return steps

    def _chunk_end_step(self, chunk: _Chunk, rest: bytes) -> Step:
        def step() -> "Deferred[Any] | None":
            self.setLineMode()
            if rest:
                self._push_back(rest)
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

    # ---- the end of the message --------------------------------------------------------------------------------

    def _end_step(self, rest: bytes) -> Step:
        def step() -> "Deferred[Any] | None":
            message = self._message
            self.setLineMode()
            if rest:
                self._push_back(rest)
            if message is None:
                return None
            # RFC 2033 §4.2: in LMTP one reply per accepted recipient, in RCPT order.
            envelope = self.session.envelope
            count = len(envelope.recipients) if self.policy.lmtp else 0
            if message.error is not None:
                error = message.error
                self._message = None
                self.conversation.message_ended(delivered=False)
                self.monitor.message_rejected(self.session, envelope, message.size, error)
                self._abort_now(error.text)
                self._send_replies([error] * count if count else [error])
                return None

            def then(value: Any) -> None:
                replies = self._lmtp_replies(value, count) if count else [self._reply_from(value, "eom")]
                self._message = None
                accepted = self._accepted(replies)
                self.conversation.message_ended(delivered=accepted is not None)
                self._report_end(envelope, message.size, replies, accepted)
                self._send_replies(replies)

            message.ended = True
            if count and ILMTPHandler.providedBy(self.handler):
                return self._call(self.handler.eom_per_recipient, (), then)
            return self._call(self.handler.eom, (), then)

        return step

    @staticmethod
    def _accepted(replies: list[Reply]) -> Reply | None:
        """The first positive reply: the message was accepted (LMTP: for some recipients), or None."""
        for reply in replies:
            if reply.is_positive:
                return reply
        return None

    def _report_end(self, envelope: Envelope, size: int, replies: list[Reply], accepted: Reply | None) -> None:
        """Tell the monitor the message's fate: ``accepted`` (the first positive reply), or rejected."""
        if accepted is not None:
            self.monitor.message_accepted(self.session, envelope, size, self._now() - self._mail_at, accepted)
        else:
            self.monitor.message_rejected(self.session, envelope, size, replies[0])

    def _lmtp_replies(self, value: Any, count: int) -> list[Reply]:
        """The end-of-message result in LMTP mode: a sequence of one reply per recipient, or one reply for all."""
        if isinstance(value, (list, tuple)) and not (value and isinstance(value[0], int)):
            if not ILMTPHandler.providedBy(self.handler):
                warnings.warn("eom() returning one reply per LMTP recipient is deprecated: provide ILMTPHandler"
                              " and return them from eom_per_recipient()", DeprecationWarning, stacklevel=2)
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
            if self._gone:
                return
            self.transport.write(reply.render(self._enhanced()))
        self.send(replies[-1], count_error=all(r.code >= 400 for r in replies))
