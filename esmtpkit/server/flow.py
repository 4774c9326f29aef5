"""When and how the server reads: paused while a handler result is pending, or while the client does not read our
replies; what was read handed to LineReceiver a piece at a time.

The protocol is its transport's streaming producer (as Twisted's HTTP server is): when the replies waiting to be
sent pass the transport's buffer size, the transport calls `pauseProducing` and nothing more is read from the
client until `resumeProducing` (`esmtpkit.server.protocol` mixes this in, before LineReceiver).
"""

from __future__ import annotations

from typing import Final

__all__ = ["Flow", "PIECE"]

#: The most bytes of commands handed to LineReceiver at once (see `Flow._parse`).
PIECE: Final = 8192


class Flow:
    """Mixin: IPushProducer for the transport, the one place that pauses and resumes reading, and the queue of
    bytes read but not yet parsed (``_unread``, pushed back; ``_later``, the rest of the newest read)."""

    __slots__ = ()

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
        if not self._producing and self._admitted and not self._gone:
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
        if self._gone:
            return
        self.transport.resumeProducing()
        self.dataReceived(b"")  # lines already read and waiting in the buffer

    def _queue(self, data: bytes) -> None:
        """Put ``data`` behind what is still to be parsed: the bytes pushed back, then the rest of ``_later``."""
        if self._later is not None:
            if not data and not self._unread:
                return  # nothing new: the rest stays where it is, uncopied
            later, at = self._later
            data = later[at:] + data
        data, self._unread = self._unread + data, b""
        self._later = (data, 0) if data else None

    def _parse(self) -> None:
        """Hand ``_later`` to LineReceiver, commands at most `PIECE` bytes at a time, until reading pauses.

        LineReceiver copies what follows each line it takes, so a whole 64 KiB read of pipelined commands would be
        copied over and over; in pieces, each copy is small. Content (raw mode) goes whole: it is not split.
        """
        while True:
            later, at = self._later if self._later is not None else (b"", 0)
            end = at + PIECE if self.line_mode else len(later)
            self._later = (later, end) if end < len(later) else None
            super().dataReceived(later[at:end] if at or end < len(later) else later)
            if self._reprocess:
                self._parse_pushed()
            if self._later is None or self.paused or self._gone or (self.transport and self.transport.disconnecting):
                return

    def _parse_pushed(self) -> bool:
        """Parse what `_push_back` gave back, before anything newer. A large rest becomes ``_later`` instead, to be
        parsed in pieces: then return True."""
        while self._reprocess and not self.paused and not self._gone:
            self._reprocess = False
            data, self._unread = self._unread, b""
            if len(data) > PIECE and self._later is None:
                self._later = (data, 0)
                return True
            super().dataReceived(data)
        return False

    def _discard_unparsed(self) -> int:
        """Forget every byte read and not yet parsed (RFC 3207 §4.2: what came with STARTTLS); return how many."""
        dropped = len(self.clearLineBuffer()) + len(self._unread)
        if self._later is not None:
            later, at = self._later
            dropped += len(later) - at
        self._unread, self._later = b"", None
        return dropped

    def _push_back(self, data: bytes) -> None:
        """Bytes read past the end of a message, a chunk or a skipped line: parse them next, before anything that
        arrived later (which LineReceiver may be holding), once the current read is done."""
        self._unread = data + self._unread + self.clearLineBuffer()
        self._reprocess = True
