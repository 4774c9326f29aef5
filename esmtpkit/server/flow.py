"""When the server reads: paused while a handler result is pending, or while the client does not read our replies.

The protocol is its transport's streaming producer (as Twisted's HTTP server is): when the replies waiting to be
sent pass the transport's buffer size, the transport calls `pauseProducing` and nothing more is read from the
client until `resumeProducing` (`esmtpkit.server.protocol` mixes this in).
"""

from __future__ import annotations

__all__ = ["Flow"]


class Flow:
    """Mixin: IPushProducer for the transport, and the one place that pauses and resumes reading."""

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
