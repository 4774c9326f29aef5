"""`Queue`: accept mail for delivery elsewhere into a durable queue, answering 250 only once it is stored.

The message (our ``Received:`` field first, then the content exactly as received) streams into the queue's store
while it arrives; at the end of the data the envelope is committed with it, and only when the store says both
are durable does the client get ``250 2.0.0 Ok: queued as <id>``. A process-wide `QueueService` (see
`esmtpkit.queue.service`) then delivers it, to a relay host or by MX, with retries and delivery status
notifications. Who may send through it is Relay's rule (`esmtpkit.handlers.access`). A message that has already
passed more than `HOP_LIMIT` hosts (``Received:`` fields) is refused as a mail loop; one declared ``BODY=8BITMIME``
whose content is all ASCII is queued as 7BIT, so that it can go to any next hop.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable, Mapping

from twisted.application.service import IService
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from esmtpkit.core.address import Address
from esmtpkit.core.content import ContentMode
from esmtpkit.core.deliverby import By
from esmtpkit.core.escape import escape
from esmtpkit.core.ids import new_id
from esmtpkit.core.outbound import Message, Recipient
from esmtpkit.core.reply import Reply, SMTPReply
from esmtpkit.core.rrvs import ValidSince
from esmtpkit.core.session import Session
from esmtpkit.core.trace import received_header
from esmtpkit.handlers.access import DEFAULT_NETWORKS, may_relay, parse_networks
from esmtpkit.handlers.base import MessageHandler
from esmtpkit.mailauth.signing import parse_sign_from
from esmtpkit.queue.interfaces import IQueueEntry, IQueueStore, MessageTooBig
from esmtpkit.queue.service import QueueConfig, QueueService

__all__ = ["Queue", "STORAGE_FAILED", "TOO_BIG", "TOO_MANY_HOPS", "HOP_LIMIT", "HeaderScan", "queued_reply",
           "to_message"]

#: The reply when the message could not be made durable: the client keeps it and tries again (RFC 5321 §4.2.5).
STORAGE_FAILED = Reply(451, ("Requested action aborted: error in queue storage, try again later",), "4.3.0")
#: The reply when the store can never hold the message (`MessageTooBig`, or a declared SIZE over the store's
#: ``max_size``): permanent, RFC 1870 §6 and RFC 3463's 5.3.4 "message too big for system".
TOO_BIG = Reply(552, ("Message size exceeds the message queue's limit",), "5.3.4")
#: The most ``Received:`` fields a message may arrive with (Postfix's ``hopcount_limit``): more is a mail loop.
HOP_LIMIT = 50
#: The reply to a message with more than `HOP_LIMIT` ``Received:`` fields (RFC 5321 §6.3, RFC 3463 5.4.6).
TOO_MANY_HOPS = Reply(554, ("Too many hops",), "5.4.6")

# What a HELO name may show in Received-From-MTA: a domain or an address literal, nothing that reads as structure.
_NOT_DOMAINISH = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


class HeaderScan:
    """Watches content as it streams: counts the ``Received:`` fields of the header section (lines that start
    with ``Received:``, in any case, before the first empty line) and notes whether every octet is ASCII."""

    _NAME = b"received:"

    def __init__(self) -> None:
        self.received = 0
        self.ascii = True
        self._in_header = True
        self._start = b""  # the first octets of the line being read (enough to know its field name)
        self._length = 0  # the length of the line being read so far

    def feed(self, chunk: bytes, header: bool = True) -> None:
        """Look at the next ``chunk``; with ``header`` false only its octets count (our own trace field)."""
        if self.ascii and not chunk.isascii():
            self.ascii = False
        if not header or not self._in_header:
            return
        keep = len(self._NAME)
        position = 0
        while self._in_header:
            end = chunk.find(b"\n", position)
            piece = chunk[position:] if end < 0 else chunk[position:end]
            if len(self._start) < keep:
                self._start += piece[:keep - len(self._start)]
            self._length += len(piece)
            if end < 0:
                return
            if self._length == 0 or (self._length == 1 and self._start == b"\r"):
                self._in_header = False
            elif self._start.lower() == self._NAME:
                self.received += 1
            self._start, self._length = b"", 0
            position = end + 1


def queued_reply(message_id: str) -> Reply:
    """``250 2.0.0 Ok: queued as <id>``, Postfix's words."""
    return Reply(250, (f"Ok: queued as {message_id}",), "2.0.0")


def received_from(session: Session) -> str:
    """The client as RFC 3464's Received-From-MTA names it: ``dns; client.example (192.0.2.7)``."""
    helo = _NOT_DOMAINISH.sub("?", session.helo) if session.helo else ""
    ip = session.peer_ip
    if helo and ip:
        return f"dns; {helo} ({ip})"
    if ip:
        return f"dns; [{ip}]"
    return f"dns; {helo}" if helo else ""


def _words(value: Any) -> tuple[str, ...]:
    """NOTIFY as the server parsed it (a `Notify`, whose text is ``NEVER`` or ``SUCCESS,FAILURE``...) as words."""
    return tuple(word for word in str(value).upper().split(",") if word)


def to_message(session: Session, message_id: str, size: int, arrived: float) -> Message:
    """The queued form of the session's envelope: sender, recipients with NOTIFY and ORCPT (RFC 3461), SIZE's
    actual value, BODY, SMTPUTF8, RET and ENVID, REQUIRETLS (RFC 8689), MT-PRIORITY (RFC 6710), BY (RFC 2852),
    each recipient's RRVS (RFC 7293), and who sent it."""
    envelope = session.envelope
    params: Mapping[str, Any] = envelope.mail_params
    rcpt_params = list(envelope.rcpt_params) + [{}] * (len(envelope.recipients) - len(envelope.rcpt_params))
    recipients = []
    for address, rcpt in zip(envelope.recipients, rcpt_params):
        notify = rcpt.get("NOTIFY")
        orcpt = rcpt.get("ORCPT")
        rrvs = rcpt.get("RRVS")
        recipients.append(Recipient(str(address), _words(notify) if notify is not None else None,
                                    str(orcpt) if orcpt is not None else None,
                                    rrvs=rrvs if isinstance(rrvs, ValidSince) else None))
    body = params.get("BODY")
    ret = params.get("RET")
    envid = params.get("ENVID")
    priority = params.get("MT-PRIORITY")
    by = params.get("BY")
    return Message(
        id=message_id, sender=str(envelope.sender or ""), recipients=recipients, size=size,
        body=str(body).upper() if body and str(body).upper() != "7BIT" else None,
        smtputf8=bool(params.get("SMTPUTF8")), ret=str(ret).upper() if ret is not None else None,
        envid=str(envid) if envid is not None else None, arrived=arrived, next_attempt=arrived,
        received_from=received_from(session), requiretls=bool(params.get("REQUIRETLS")),
        priority=priority if isinstance(priority, int) and not isinstance(priority, bool) else None,
        deliver_by=by if isinstance(by, By) else None,
    )


def _declared_size(params: Mapping[str, Any]) -> int:
    """MAIL's SIZE parameter as a number (0 when absent; the server has checked its syntax)."""
    try:
        return int(params.get("SIZE") or 0)
    except (TypeError, ValueError):
        return 0


def _config(**settings: Any) -> QueueConfig:
    """`QueueConfig.from_options`, parsed once per distinct set of settings (a handler is made per connection)."""
    try:
        return _parsed(tuple(sorted(settings.items())))
    except TypeError:  # a value that cannot be hashed: parse it every time
        return QueueConfig.from_options(**settings)


@functools.lru_cache(maxsize=32)
def _parsed(settings: tuple[tuple[str, Any], ...]) -> QueueConfig:
    return QueueConfig.from_options(**dict(settings))


class Queue(MessageHandler):
    """Queue every accepted message for delivery to other hosts; 250 only once the queue has stored it.

    Who may send: an authenticated session, or a client inside ``networks`` (default: loopback only); every other
    RCPT gets ``554 5.7.1 Relay access denied``. A store with a ``max_size`` (RabbitMQ's) refuses a larger
    message with ``552 5.3.4``: at MAIL when SIZE declares it, else at the end of the data. SMTPUTF8 and
    BINARYMIME are accepted (the queue's client passes them on to a next hop that offers them, and bounces the
    message where none does). The other settings describe the queue (`QueueConfig.from_options`): ``spool`` or
    ``backend=amqp`` with ``amqp_url`` and ``amqp_queue``; ``relayhost`` or MX delivery to ``port`` asking the
    name servers ``dns``; ``tls``, ``verify``, ``ca_file``, ``username``, ``password``; ``min_backoff``,
    ``max_backoff``, ``lifetime``, ``bounce_lifetime``, ``delay_warning``; ``concurrency``; ``runner=no`` to
    accept only (another process delivers, such as ``esmtpkit-queue run``); ``hostname``; ``local_addresses``
    (this host's addresses, never delivered to by MX); ``attempt_timeout`` (AMQP). A message that arrives with
    more than `HOP_LIMIT` ``Received:`` fields gets `TOO_MANY_HOPS`. With ``dkim_sign`` keys, only the mail of
    this server's own users is DKIM-signed: from an authenticated session or a client inside ``dkim_sign_from``
    (IPs and CIDRs; default this host, ``none``: authenticated sessions only), judged when the message is accepted
    and kept with it (`Message.sign`).
    ``store`` (tests: a `esmtpkit.queue.memory.MemoryStore`) or ``service`` replace the shared service's.
    """

    content_mode = ContentMode.RAW
    log = Logger()

    def __init__(self, spool: str = "queue", relayhost: str | None = None, port: int | str = 25,
                 dns: str | None = None, tls: str | None = None, verify: bool | str = False,
                 ca_file: str | None = None, username: str | None = None, password: str | None = None,
                 networks: str | Iterable[str] = DEFAULT_NETWORKS, min_backoff: float | str | None = None,
                 max_backoff: float | str | None = None, lifetime: float | str | None = None,
                 bounce_lifetime: float | str | None = None, delay_warning: float | str | None = None,
                 concurrency: int | str = 20, runner: bool | str = True, backend: str | None = None,
                 amqp_url: str | None = None, amqp_queue: str | None = None, hostname: str | None = None,
                 local_addresses: str | None = None, attempt_timeout: float | str | None = None,
                 dkim_sign: str | None = None, dkim_headers: str | None = None, arc_seal: str | None = None,
                 authserv_id: str | None = None, dkim_sign_from: str | Iterable[str] | None = None,
                 reactor: Any = None, store: IQueueStore | None = None,
                 service: QueueService | None = None) -> None:
        try:
            self.networks = parse_networks(networks)
        except ValueError as e:
            raise ValueError(f"networks: {e}") from None
        self.config = _config(
            spool=spool, backend=backend, amqp_url=amqp_url, amqp_queue=amqp_queue, relayhost=relayhost,
            port=port, dns=dns, tls=tls, verify=verify, ca_file=ca_file, username=username, password=password,
            min_backoff=min_backoff, max_backoff=max_backoff, lifetime=lifetime, bounce_lifetime=bounce_lifetime,
            delay_warning=delay_warning, concurrency=concurrency, runner=runner, hostname=hostname,
            local_addresses=local_addresses, attempt_timeout=attempt_timeout, dkim_sign=dkim_sign,
            dkim_headers=dkim_headers, arc_seal=arc_seal, authserv_id=authserv_id, dkim_sign_from=dkim_sign_from)
        self.sign_from = parse_sign_from(self.config.dkim_sign_from)
        self.reactor = reactor
        if service is None:
            if store is not None:
                service = QueueService(self.config, reactor=reactor, store=store)
            else:
                service = QueueService.shared(self.config, reactor=reactor)
        self.service = service
        self._entry: IQueueEntry | None = None
        self._size = 0
        self._scan = HeaderScan()
        self.message_id = ""

    @classmethod
    def process_service(cls, **options: Any) -> IService | None:
        """The queue service the handlers made with ``options`` share: ``twistd esmtpkit`` starts and stops it
        with the server (see `esmtpkit.cli.tap.makeService`). A spool that cannot be used is a
        `usage.UsageError` here, before anything listens."""
        service = cls(**options).service
        try:
            service.check()
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        return service

    # ---- who may send, and how much ---------------------------------------------------------------------------

    def mail(self, sender: Address, params: Mapping[str, Any]) -> Any:
        """``552 5.3.4`` when the declared SIZE (RFC 1870) is over the store's ``max_size``; else the default."""
        limit = self.max_size()
        if limit and _declared_size(params) > limit:
            return TOO_BIG
        return super().mail(sender, params)

    @property
    def quarantines(self) -> bool:  # type: ignore[override]
        """Whether a message a filter quarantined can be kept apart: queued held, when the store can hold."""
        try:
            return hasattr(self.service.store, "hold")
        except Exception:  # the store cannot be made: DATA says so with 451
            return False

    def max_size(self) -> int:
        """The largest message the store can hold (its ``max_size``, in octets), or 0 when it sets no limit."""
        try:
            limit = getattr(self.service.store, "max_size", None)
        except Exception:  # the store cannot be made: DATA says so with 451
            return 0
        return int(limit) if isinstance(limit, int) and limit > 0 else 0

    def may_relay(self) -> bool:
        """True when the session is authenticated or the client's IP is inside one of ``networks``."""
        return may_relay(self.session, self.networks)

    def rcpt(self, recipient: Address, params: Mapping[str, Any]) -> Any:
        """``554 5.7.1 Relay access denied`` unless `may_relay`; a recipient without a domain (``<Postmaster>``)
        has no host to go to: ``550 5.1.1``. Otherwise the default 250."""
        if not self.may_relay():
            return Reply(554, (f"<{recipient}>: Relay access denied",), "5.7.1")
        if "@" not in str(recipient):
            return Reply(550, (f"<{recipient}>: no mailboxes here; give an address with a domain",), "5.1.1")
        return super().rcpt(recipient, params)

    # ---- the message ------------------------------------------------------------------------------------------

    def data(self) -> Any:
        """Open a queue entry and write our ``Received:`` field (RFC 5321 §4.4) first."""
        self._discard()
        session = self.session
        self.message_id = (session.envelope.id if session is not None else "") or new_id(self._now())
        self._size = 0
        self._scan = HeaderScan()
        try:
            self._entry = self.service.store.open_entry()
            if session is not None:
                trace = received_header(session, id=self.message_id, show_user=False)
                self._scan.feed(trace, header=False)
                self._write(trace)
        except SMTPReply as e:
            return e.reply
        except Exception:
            self.log.failure("cannot open a queue entry for message {id}", id=self.message_id)
            self._discard()
            return STORAGE_FAILED
        return super().data()

    def body(self, chunk: bytes) -> None:
        """Append to the entry (the store keeps memory bounded); a storage error answers 451 4.3.0."""
        if self._entry is None:
            raise SMTPReply(STORAGE_FAILED)
        self._scan.feed(chunk)
        self._write(chunk)

    def _write(self, data: bytes) -> None:
        assert self._entry is not None
        try:
            self._entry.write(data)
        except Exception:
            self.log.failure("cannot write message {id} into the queue", id=self.message_id)
            self._discard()
            raise SMTPReply(STORAGE_FAILED) from None
        self._size += len(data)

    def eom(self) -> "Deferred[Reply] | Reply":
        """Commit the envelope with the content; 250 once the store made both durable, 552 5.3.4 when it can never
        hold the message (`MessageTooBig`), 451 4.3.0 on any other failure; 554 5.4.6 (and nothing queued) for a
        message with more than `HOP_LIMIT` ``Received:`` fields. 8BITMIME content that is all ASCII is queued
        as 7BIT. A message a filter quarantined (``envelope.quarantine``) is queued held."""
        if self._scan.received > HOP_LIMIT:
            self.log.warn("message {queue_id} refused: {count} Received: fields, a mail loop",
                          queue_id=self.message_id, count=self._scan.received)
            self._discard()
            return TOO_MANY_HOPS
        entry, self._entry = self._entry, None
        session = self.session
        if entry is None or session is None:
            return STORAGE_FAILED
        message = to_message(session, self.message_id, self._size, self._now())
        if message.body == "8BITMIME" and self._scan.ascii:
            message.body = None
        message.sign = may_relay(session, self.sign_from)
        if session.envelope.quarantine:
            if hasattr(self.service.store, "hold"):
                message.held = True  # kept in the queue until released (esmtpkit-queue release ID)
                self.log.warn("{queue_id}: held: quarantined by a filter: {reason}", queue_id=message.id,
                              reason=escape(session.envelope.quarantine))
            else:
                self.log.warn("{queue_id}: quarantined by a filter ({reason}), but this store cannot hold "
                              "messages: queued as any other", queue_id=message.id,
                              reason=escape(session.envelope.quarantine))
        if not message.sign and self.service.config.dkim_sign:
            self.log.info("{queue_id}: not DKIM-signed: client {client} neither authenticated nor in "
                          "dkim_sign_from", queue_id=message.id, client=escape(session.peer_ip) or "unknown")
        try:
            committing = entry.commit(message)
        except Exception:
            committing = fail()

        def queued(_: object) -> Reply:
            self.log.info("{queue_id}: from=<{sender}>, size={size}, nrcpt={count} (queued)",
                          queue_id=message.id, sender=escape(message.sender), size=message.size,
                          count=len(message.recipients))
            self.service.monitor.message_queued(message, "smtp")
            return queued_reply(message.id)

        def failed(failure: Failure) -> Reply:
            if failure.check(MessageTooBig):
                self.log.warn("message {queue_id} not queued: {error}", queue_id=message.id, error=failure.value)
                return TOO_BIG
            self.log.failure("message {queue_id} not queued", failure, queue_id=message.id)
            return STORAGE_FAILED

        return committing.addCallbacks(queued, failed)

    def abort(self, reason: str) -> None:
        """Forget the content written so far: nothing is queued for an unfinished message."""
        self._discard()

    def _discard(self) -> None:
        entry, self._entry = self._entry, None
        if entry is not None:
            try:
                entry.discard()
            except Exception:
                self.log.failure("cannot discard a queue entry")

    def _now(self) -> float:
        if self.reactor is None:
            from twisted.internet import reactor

            self.reactor = reactor
        return float(self.reactor.seconds())
