"""`AMQP`: hand each accepted message to RabbitMQ, answering 250 only once the broker has confirmed it.

One `Publisher` per process (per URL and queue) keeps an AMQP connection with a channel in publisher-confirm mode,
opened with pika's Twisted adapter and shared by every SMTP connection: a `esmtpkit.queue.broker.Broker`, the
connection the RabbitMQ queue backend keeps too. Messages are published persistent, with
``mandatory`` set, to a durable quorum queue through the default exchange; the envelope travels in the AMQP
headers, the message bytes (after our ``Received:`` field) as the body. The broker's ``basic.ack`` is what turns
the end of DATA into ``250``; a nack, a returned (unroutable) message, a lost connection or no answer in time turn
it into ``451 4.3.0`` and the client keeps the message and retries. Delivery is therefore at least once: a message
the broker stored but could not confirm before a failure comes again on the client's retry.
"""

from __future__ import annotations

import secrets
import tempfile
from typing import Any, Callable, Mapping

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from esmtpkit.core.address import Address
from esmtpkit.core.content import ContentMode
from esmtpkit.core.reply import Reply, SMTPReply
from esmtpkit.core.session import Session
from esmtpkit.core.trace import received_header
from esmtpkit.handlers.base import MessageHandler
from esmtpkit.handlers.settings import flag
from esmtpkit.queue.broker import (BROKER_MAX_SIZE, DEFAULT_URL, QUORUM, Broker, Link, NotQueued, State, Unroutable,
                                   check_url, positive)
from esmtpkit.queue.shared import PerProcess

__all__ = ["AMQP", "Publisher", "State", "NotQueued", "Unroutable", "stop_publishers",
           "DEFAULT_URL", "DEFAULT_QUEUE", "BROKER_MAX_SIZE"]

DEFAULT_QUEUE = "mail"
#: Queue arguments the publisher declares with: a replicated, durable quorum queue.
QUEUE_ARGUMENTS: Mapping[str, Any] = QUORUM
#: The AMQP ``content_type`` of a published message: the message as received, our ``Received:`` field first.
CONTENT_TYPE = "message/rfc822"

#: The greeting that turns clients away while the broker is unreachable (RFC 5321 §3.1: 421, try later).
BROKER_DOWN = Reply(421, ("Service not available: message queue unreachable, try again later",), "4.3.0")
TOO_BIG = Reply(552, ("Message size exceeds the message queue's limit",), "5.3.4")
SPOOL_FAILED = Reply(451, ("Requested action aborted: error in local storage, try again later",), "4.3.0")


def not_queued_reply(reason: str) -> Reply:
    """``451 4.3.0``: the broker did not confirm the message, so the client keeps it and tries again later."""
    return Reply(451, (f"Message not queued ({reason}), try again later",), "4.3.0")


# ---- the shared connection -----------------------------------------------------------------------------------


class Publisher(Broker):
    """One AMQP connection and confirm-mode channel shared by every handler of a process; reconnects with back-off.

    `publish` fires once the broker has acknowledged the message, or fails with `NotQueued` on a nack, a returned
    message, a lost connection or when ``timeout`` passes. After a failed attempt or a lost connection the next
    attempt waits ``retry_min`` seconds, doubling up to ``retry_max``. ``opener`` (tests) replaces the pika link.
    """

    _shared: PerProcess[tuple[str, str, str | None], "Publisher"] = PerProcess()

    def __init__(self, url: str = DEFAULT_URL, queue: str = DEFAULT_QUEUE, *, reactor: Any = None,
                 connect_timeout: float = 10.0, retry_min: float = 0.5, retry_max: float = 30.0,
                 ca_file: str | None = None, opener: Callable[[], "Deferred[Link]"] | None = None) -> None:
        super().__init__(url, topology={queue: QUEUE_ARGUMENTS}, reactor=reactor, connect_timeout=connect_timeout,
                         retry_min=retry_min, retry_max=retry_max, ca_file=ca_file, opener=opener)
        self.queue = queue
        self._pending: set[Deferred[None]] = set()

    @classmethod
    def shared(cls, url: str = DEFAULT_URL, queue: str = DEFAULT_QUEUE, ca_file: str | None = None,
               reactor: Any = None) -> "Publisher":
        """The process's publisher for ``url`` and ``queue``, made on first use (a stopped one is replaced)."""
        return cls._shared.get((url, queue, ca_file), lambda: cls(url, queue, ca_file=ca_file, reactor=reactor),
                               lambda found: found.state is not State.STOPPED)

    def wait_ready(self, timeout: float) -> "Deferred[bool]":
        """Fire True once connected, False when the attempt under way fails or ``timeout`` seconds pass."""
        return self.when_ready(timeout).addCallbacks(lambda _: True, lambda _: False)

    def stop(self) -> "Deferred[None]":
        """Stop for good: fail publishes awaiting confirmation, cancel retries, close the connection."""
        self._shared.forget((self.url, self.queue, self.ca_file), self)
        return super().stop()

    def publish(self, body: bytes, message_id: str, headers: Mapping[str, Any], timeout: float) -> "Deferred[None]":
        """Publish ``body`` to the queue; fire once the broker confirmed it, or fail with `NotQueued`.

        The ``timeout`` covers everything: waiting for a connection under way, sending, and the confirmation.
        """
        properties = {"content_type": CONTENT_TYPE, "message_id": message_id, "headers": dict(headers)}
        outcome = self.send(self.queue, body, properties, timeout)
        if not outcome.called:
            self._pending.add(outcome)
            outcome.addBoth(self._settled, outcome)
        return outcome

    def _settled(self, result: object, outcome: "Deferred[None]") -> object:
        self._pending.discard(outcome)
        return result

    @property
    def pending(self) -> int:
        """Publishes awaiting the broker's confirmation (or a connection)."""
        return len(self._pending)


def stop_publishers() -> "Deferred[None]":
    """Stop every shared publisher of this process (tests; an embedding application shutting down)."""
    stopping = [publisher.stop() for publisher in Publisher._shared.values()]
    return gatherResults(stopping).addCallback(lambda _: None)


# ---- the handler --------------------------------------------------------------------------------------------


def new_message_id() -> str:
    """An id for a message whose session has none (a handler driven outside the protocol): 96 random bits, hex.

    Under the protocol the AMQP message_id, the trace id and the id in the 250 reply are the transaction's
    ``session.envelope.id``, the id every log event about the message carries.
    """
    return secrets.token_hex(12).upper()


class AMQP(MessageHandler):
    """Publish every accepted message to the RabbitMQ queue ``queue`` at ``url``; 250 only after the broker's ack.

    The content streams into a spool file while it arrives (memory up to ``spool_max`` bytes) and is published
    whole at the end of DATA, so it must fit the broker's ``max_message_size``: ``max_size`` (default 16 MiB,
    RabbitMQ 4's default) refuses bigger messages with 552 5.3.4. ``confirm_timeout`` bounds the wait for the
    broker; ``refuse_when_down`` greets with 421 4.3.0 while the broker is unreachable. ``trace`` writes our
    ``Received:`` field first. ``ca_file`` is the authority trusted for ``amqps://``. ``publisher`` (tests,
    embedders) replaces the process-wide shared `Publisher`.
    """

    content_mode = ContentMode.RAW
    log = Logger()

    def __init__(self, url: str = DEFAULT_URL, queue: str = DEFAULT_QUEUE, confirm_timeout: float | str = 30.0,
                 refuse_when_down: bool | str = False, max_size: int | str = BROKER_MAX_SIZE,
                 spool_max: int | str = 1024 * 1024, trace: bool | str = True, ca_file: str | None = None,
                 reactor: Any = None, publisher: Publisher | None = None) -> None:
        self.url = check_url(str(url))
        self.queue = str(queue)
        if not self.queue:
            raise ValueError("queue must be named")
        self.confirm_timeout = positive("confirm_timeout", confirm_timeout)
        self.refuse_when_down = flag(refuse_when_down)
        self.max_size = int(max_size)
        self.spool_max = max(1, int(spool_max))  # SpooledTemporaryFile reads 0 as "never roll over"
        self.trace = flag(trace)
        self.ca_file = ca_file or None
        self.reactor = reactor
        self.publisher = publisher
        if publisher is None:
            _require_pika()
        self._spool: Any = None
        self._size = 0
        self._too_big = False
        self.message_id = ""

    def _publisher(self) -> Publisher:
        if self.publisher is None:
            self.publisher = Publisher.shared(self.url, self.queue, ca_file=self.ca_file, reactor=self.reactor)
        return self.publisher

    def connect(self, session: Session) -> Any:
        """Greet (and start the shared connection); with ``refuse_when_down``, 421 4.3.0 while the broker is away."""
        greeting = super().connect(session)
        publisher = self._publisher()
        publisher.start()
        if not self.refuse_when_down:
            return greeting
        wait = min(self.confirm_timeout, publisher.connect_timeout)
        return publisher.wait_ready(wait).addCallback(lambda ready: greeting if ready else BROKER_DOWN)

    def mail(self, sender: Address, params: Mapping[str, Any]) -> Any:
        """552 5.3.4 when the declared SIZE (RFC 1870) cannot fit one broker message; else the default."""
        if self.max_size and int(params.get("SIZE") or 0) > self.max_size:
            return TOO_BIG
        return super().mail(sender, params)

    def data(self) -> Any:
        """Open the spool, choose the message id, and write our ``Received:`` field (RFC 5321 §4.4) first."""
        self._discard()
        envelope_id = self.session.envelope.id if self.session is not None else ""
        self.message_id = envelope_id or new_message_id()
        self._spool = tempfile.SpooledTemporaryFile(max_size=self.spool_max)
        self._size = 0
        self._too_big = False
        session = self.session
        if self.trace and session is not None:
            self._write(received_header(session, id=self.message_id, show_user=False))
        return super().data()

    def body(self, chunk: bytes) -> None:
        """Append to the spool; past ``max_size`` the content is dropped and the end of DATA answers 552."""
        if self._too_big or self._spool is None:
            return
        self._write(chunk)

    def _write(self, data: bytes) -> None:
        self._size += len(data)
        if self.max_size and self._size > self.max_size:
            self._too_big = True
            self._discard(keep_id=True)
            return
        try:
            self._spool.write(data)
        except OSError as e:
            self.log.error("cannot spool message {id}: {error}", id=self.message_id, error=e)
            self._discard()
            raise SMTPReply(SPOOL_FAILED) from None

    def eom(self) -> Any:
        """Publish the spooled message; the Deferred fires 250 on the broker's ack, 451 4.3.0 on anything else."""
        session = self.session
        spool, self._spool = self._spool, None
        message_id = self.message_id
        if self._too_big:
            self._too_big = False
            self.log.warn("message {id} refused: over {limit} bytes", id=message_id, limit=self.max_size)
            return TOO_BIG
        if spool is None or session is None:
            return SPOOL_FAILED
        try:
            spool.seek(0)
            body = spool.read()
        except OSError as e:
            self.log.error("cannot read back message {id}: {error}", id=message_id, error=e)
            return SPOOL_FAILED
        finally:
            spool.close()
        confirmed = self._publisher().publish(body, message_id, envelope_headers(session), self.confirm_timeout)

        def queued(_: None) -> Reply:
            return Reply(250, (f"Ok: queued as {message_id}",), "2.0.0")

        def refused(failure: Failure) -> Reply:
            if not failure.check(NotQueued):
                self.log.failure("publishing message {id} failed", failure, id=message_id)
                return not_queued_reply("internal error")
            self.log.warn("message {id} not queued: {why}", id=message_id, why=str(failure.value))
            return not_queued_reply(failure.value.reason)

        return confirmed.addCallbacks(queued, refused)

    def abort(self, reason: str) -> None:
        """Drop the spooled content: nothing is published for an unfinished message."""
        self._discard()

    def _discard(self, keep_id: bool = False) -> None:
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()
        if not keep_id:
            self.message_id = ""
            self._too_big = False


def envelope_headers(session: Session) -> dict[str, Any]:
    """The AMQP headers that carry the envelope and the client's identity (all text, recipients a list)."""
    envelope = session.envelope
    headers: dict[str, Any] = {
        "sender": str(envelope.sender or ""),
        "recipients": [str(r) for r in envelope.recipients],
        "client-ip": session.peer_ip,
        "client-helo": session.helo or "",
        "protocol": session.with_protocol,
        "received-by": session.hostname,
    }
    if session.authenticated:
        headers["authenticated"] = session.authenticated
    if envelope.mail_params.get("SMTPUTF8"):
        headers["smtputf8"] = True
    body_type = envelope.mail_params.get("BODY")
    if body_type:
        headers["body-type"] = str(body_type)
    return headers


def _require_pika() -> None:
    import importlib.util

    if importlib.util.find_spec("pika") is None:
        raise ImportError("the AMQP handler needs pika: pip install 'esmtpkit[amqp]'")
