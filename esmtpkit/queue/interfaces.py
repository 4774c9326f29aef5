"""What a queue backend promises, so the spool directory and RabbitMQ are interchangeable under one runner.

A backend stores messages durably and hands due ones to a worker; the worker (`esmtpkit.queue.runner`) decides
what became of each recipient, queues any bounce through the same backend, and returns the message with its new
state. The backend then saves that state, or forgets the message once it is `finished` (no recipient pending and
no notice owed), before it takes the message as done.
"""

from __future__ import annotations

from typing import IO, Callable

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from esmtpkit.core.outbound import Message, Status

__all__ = ["IQueueEntry", "IQueueStore", "ICheckpoint", "Worker", "OpenContent", "MessageTooBig", "finished",
           "final_notice", "owes_notices"]

#: Opens a fresh, readable binary file of a queued message's content, positioned at its start.
OpenContent = Callable[[], IO[bytes]]

#: Given a due message and a way to read its content, attempts delivery and fires with the message's new state.
Worker = Callable[[Message, OpenContent], "Deferred[Message]"]


# ---- when a message is done with ---------------------------------------------------------------------------------
# A message leaves the store once every recipient is final (delivered or failed) and every notice owed for a final
# recipient has been queued: a recipient whose failure notice could not be queued yet (a full disk, a broker that
# refused it) keeps the message, so that the next attempt queues the notice instead of the bounce being lost.

def final_notice(message: Message, index: int) -> str | None:
    """The notice recipient ``index`` is owed for its final status and has not had: ``"failed"`` (RFC 3461
    §4.1 NOTIFY=FAILURE, the default), ``"relayed"`` (NOTIFY=SUCCESS to a next hop that did not take over the
    reporting, RFC 3461 §5.2.2), or None. A notice itself (sender "") is never reported on (RFC 3461 §6.2)."""
    if message.sender == "":
        return None
    recipient = message.recipients[index]
    if recipient.reported:
        return None
    if recipient.status is Status.FAILED and recipient.wants("FAILURE"):
        return "failed"
    if recipient.status is Status.DELIVERED and recipient.wants("SUCCESS"):
        outcome = recipient.outcome
        return None if outcome is not None and outcome.dsn else "relayed"
    return None


def owes_notices(message: Message) -> bool:
    """True when some final recipient still waits for its notice to be queued."""
    return any(final_notice(message, i) is not None for i in range(len(message.recipients)))


def finished(message: Message) -> bool:
    """True when the store may forget ``message``: no recipient pending and no notice owed."""
    return message.done and not owes_notices(message)


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

    Optional parts, looked for by name (not part of the required interface):

    - ``max_size`` (octets): the largest message the store can hold; the Queue handler then refuses a larger
      ``MAIL FROM ... SIZE=`` at once.
    - ``attempt_timeout`` (seconds): how long one attempt may take before the store would lose hold of the
      message (RabbitMQ's consumer timeout); the runner ends an attempt by then, deferring what is still open.
    - ``watch_counts(listener)``: the store calls ``listener({"queued": n, "held": n, "active": n})`` now and then
      (each spool scan, or every minute), for the queue-size metrics; the call must not block.
    - `ICheckpoint`: progress saved in the middle of an attempt.

    A message leaves the store once `finished` says so: no recipient pending and no notice
    owed.
    """

    name = Attribute("Short name of the backend for logs and metrics: 'spool' or 'amqp'.")

    def open_entry() -> IQueueEntry:
        """A new entry to write one message into."""

    def enqueue(message: Message, content: bytes) -> "Deferred[None]":
        """Store a message made here (a bounce or a delay notice) whole; fires once it is durable."""

    def start(worker: Worker) -> None:
        """Begin handing due messages to ``worker``, at most a bounded number at a time; a message the worker
        returns unfinished (recipients pending, or notices owed) is saved with its ``next_attempt`` and offered
        again then; if that state cannot be saved, the message is not offered again before a long pause."""

    def stop() -> "Deferred[None]":
        """Stop handing out messages; fires when attempts under way have finished and their state is saved."""


class ICheckpoint(Interface):
    """A store that can save a message's state in the middle of an attempt (after each domain), so that a process
    killed while one domain hangs does not deliver the finished domains again."""

    def checkpoint(message: Message) -> "Deferred[None]":
        """Save ``message`` (being attempted here, by this store's worker) as its state so far, keeping it this
        worker's; fires once saved. The worker waits for its checkpoints before it returns the message."""
