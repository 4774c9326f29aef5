"""What a queue backend promises, so the spool directory and RabbitMQ are interchangeable under one runner.

A backend stores messages durably and hands due ones to a worker; the worker (`esmtpkit.queue.runner`) decides
what became of each recipient, queues any bounce through the same backend, and returns the message with its new
state. The backend then saves that state (or forgets a finished message) before it takes the message as done.
"""

from __future__ import annotations

from typing import IO, Callable

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from esmtpkit.core.outbound import Message

__all__ = ["IQueueEntry", "IQueueStore", "Worker", "OpenContent", "MessageTooBig"]

#: Opens a fresh, readable binary file of a queued message's content, positioned at its start.
OpenContent = Callable[[], IO[bytes]]

#: Given a due message and a way to read its content, attempts delivery and fires with the message's new state.
Worker = Callable[[Message, OpenContent], "Deferred[Message]"]


class MessageTooBig(Exception):
    """A commit that can never succeed because of the message's size (the store's ``max_size``): retrying cannot
    help, so the server answers ``552 5.3.4`` (RFC 1870 §6, RFC 3463 §3.4) rather than a temporary failure."""


class IQueueEntry(Interface):
    """A message being written into the queue: content first, then the envelope that makes it durable."""

    def write(data: bytes) -> None:
        """Append content (memory stays bounded: large content goes to disk as it arrives)."""

    def commit(message: Message) -> "Deferred[None]":
        """Store ``message`` with the content written so far; fires only once both are durable (fsync, rename;
        or the broker's confirm). Fails if they could not be made so: the caller must not answer 250 then;
        `MessageTooBig` says that no later attempt can succeed either."""

    def discard() -> None:
        """Forget the content written so far (the transaction was aborted)."""


class IQueueStore(Interface):
    """Durable storage for queued messages and the schedule of their delivery attempts.

    A store that cannot hold a message beyond some size has a ``max_size`` attribute (octets, not part of the
    required interface): the Queue handler then refuses a larger ``MAIL FROM ... SIZE=`` at once.
    """

    name = Attribute("Short name of the backend for logs and metrics: 'spool' or 'amqp'.")

    def open_entry() -> IQueueEntry:
        """A new entry to write one message into."""

    def enqueue(message: Message, content: bytes) -> "Deferred[None]":
        """Store a message made here (a bounce or a delay notice) whole; fires once it is durable."""

    def start(worker: Worker) -> None:
        """Begin handing due messages to ``worker``, at most a bounded number at a time; a message the worker
        returns with recipients still pending is saved with its ``next_attempt`` and offered again then."""

    def stop() -> "Deferred[None]":
        """Stop handing out messages; fires when attempts under way have finished and their state is saved."""
