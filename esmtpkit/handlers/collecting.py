"""`Collecting`: keep each message (sender, recipients, bytes) in memory, for tests and small embedded servers.

The Net::SMTP::Server Client's ``FROM``, ``TO`` and ``MSG`` in Pythonic form: every accepted transaction becomes a
`Message` value in a `MessageStore`, which may be shared by all connections, and optionally goes to a callback.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from twisted.internet.defer import Deferred, DeferredQueue, maybeDeferred

from esmtpkit.core.address import Address
from esmtpkit.core.content import ContentMode
from esmtpkit.handlers.base import MessageHandler

__all__ = ["Collecting", "Message", "MessageStore"]


@dataclass(frozen=True)
class Message:
    """One message as the client sent it: the envelope, the content bytes (dot-unstuffed) and where it came from."""

    sender: Address
    recipients: tuple[Address, ...]
    data: bytes
    mail_params: dict[str, Any] = field(default_factory=dict)
    rcpt_params: tuple[dict[str, Any], ...] = ()
    peer: str = ""
    helo: str | None = None
    protocol: str = "SMTP"
    tls: bool = False
    authenticated: str | None = None
    #: The transaction's id (``session.envelope.id``), as the log events and the 250 reply show it.
    id: str = ""


class MessageStore:
    """Messages accepted by any number of `Collecting` handlers, in order; `next_message` waits for one."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._queue: DeferredQueue[Message] = DeferredQueue()

    def add(self, message: Message) -> None:
        """Keep ``message`` and hand it to the oldest `next_message` waiter, if any."""
        self.messages.append(message)
        self._queue.put(message)

    def next_message(self) -> "Deferred[Message]":
        """A Deferred firing with the oldest message not yet handed out by this method (at once if there is one)."""
        return self._queue.get()

    def clear(self) -> None:
        """Forget every message (waiters keep waiting)."""
        self.messages.clear()
        self._queue.pending.clear()

    def __len__(self) -> int:
        return len(self.messages)


class Collecting(MessageHandler):
    """Accept every message into ``store`` (by default `Collecting.shared`, one per process).

    ``on_message`` is called with each `Message` before the final reply; it may return a Deferred or be a
    coroutine function. The client gets 250 once it succeeds (and the message is in the store); if it fails,
    the client gets 451 4.3.0 (or the reply of an `SMTPReply` it raised) and the store does not keep the message.
    """

    content_mode = ContentMode.RAW
    #: The store used when none is given, e.g. by ``twistd esmtpkit --handler esmtpkit.handlers.Collecting``.
    shared: ClassVar[MessageStore] = MessageStore()

    def __init__(self, store: MessageStore | None = None,
                 on_message: Callable[[Message], Any] | None = None) -> None:
        self.store = store if store is not None else self.shared
        self.on_message = on_message
        self._chunks: list[bytes] = []
        self._receiving = False

    @classmethod
    def factory(cls, store: MessageStore | None = None,
                on_message: Callable[[Message], Any] | None = None) -> Callable[[], "Collecting"]:
        """A zero-argument handler factory for `ESMTPFactory`: every connection collects into the same store."""
        shared = store if store is not None else MessageStore()
        return lambda: cls(shared, on_message)

    def data(self) -> Any:
        """Start a new message."""
        self._chunks = []
        self._receiving = True
        return super().data()

    def body(self, chunk: bytes) -> None:
        """Keep the chunk (the whole message is in memory; Policy.max_message_size bounds it)."""
        self._chunks.append(chunk)

    def eom(self) -> Any:
        """Build the Message, run ``on_message``, keep it; 250 only when that succeeded."""
        message = self._message()
        self._chunks, self._receiving = [], False
        if self.on_message is None:
            self.store.add(message)
            return super().eom()
        d = maybeDeferred(self.on_message, message)

        def done(result: Any) -> Any:
            if inspect.iscoroutine(result):
                return Deferred.fromCoroutine(result).addCallback(done)
            self.store.add(message)
            return MessageHandler.eom(self)

        return d.addCallback(done)

    def abort(self, reason: str) -> None:
        """Drop the partial message."""
        if self._receiving:
            self._chunks, self._receiving = [], False

    def _message(self) -> Message:
        session = self.session
        if session is None:
            return Message(Address(""), (), b"".join(self._chunks))
        envelope = session.envelope
        return Message(
            sender=envelope.sender if envelope.sender is not None else Address(""),
            recipients=tuple(envelope.recipients),
            data=b"".join(self._chunks),
            mail_params=dict(envelope.mail_params),
            rcpt_params=tuple(dict(p) for p in envelope.rcpt_params),
            peer=session.peer_ip,
            helo=session.helo,
            protocol=session.with_protocol,
            tls=session.tls,
            authenticated=session.authenticated,
            id=envelope.id,
        )
