"""`QueueRunner`: the worker a queue store hands due messages to; it delivers, decides and reports.

For one message it delivers the pending recipients, one domain at a time per delivery and all domains in
parallel, records each recipient's outcome, fails the recipients still pending once the message has outlived
the schedule's lifetime (RFC 3463 4.4.7), and queues the delivery status notifications (RFC 3464) the
recipients asked for through the same store *before* it returns the message's new state: once the store has
saved that state, no notice can be lost. Every recipient outcome is a structured log event in the namespace
``esmtpkit.queue`` (see docs/queue.md) and a call on its `QueueMonitor` (metrics).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from esmtpkit.core import bounce
from esmtpkit.core.escape import escape
from esmtpkit.core.ids import new_id
from esmtpkit.core.outbound import Message, Outcome, Status
from esmtpkit.core.schedule import Schedule
from esmtpkit.queue.interfaces import IQueueStore, OpenContent

__all__ = ["QueueRunner", "QueueMonitor", "Monitors", "EVENTS", "NAMESPACE", "DELIVERER_FAILED", "NO_OUTCOME", "expired"]

#: The log namespace of the runner's events.
NAMESPACE = "esmtpkit.queue"

#: Every event the runner logs (the ``event`` field), with its level.
EVENTS: Mapping[str, LogLevel] = {
    "queue.delivered": LogLevel.info,
    "queue.deferred": LogLevel.info,
    "queue.bounced": LogLevel.warn,
    "queue.notice": LogLevel.info,
    "queue.notice_failed": LogLevel.error,
    "queue.deliverer_failed": LogLevel.error,
}

#: The outcome for recipients whose delivery failed unexpectedly (a fault here, not a reply): tried again later.
DELIVERER_FAILED = Outcome.local(451, "4.3.0", "Internal error while delivering, will try again")
#: The outcome for a recipient the deliverer gave no answer for.
NO_OUTCOME = Outcome.local(451, "4.3.0", "No delivery outcome for this recipient, will try again")


def expired(last: Outcome | None, lifetime: float) -> Outcome:
    """The permanent outcome of a recipient still pending when its message expires: ``554 4.4.7``, as Postfix
    reports it (RFC 3463 §3.5: delivery time expired; Action ``failed``), with the last attempt's answer.
    """
    days = lifetime / 86400
    age = f"{days:g} day{'s' if days != 1 else ''}" if days >= 1 else f"{lifetime:g} seconds"
    text = f"Message expired: not delivered within {age}"
    if last is not None:
        where = f" from {last.remote}" if last.remote else ""
        text += f"; last attempt{where}: {last}"
    return Outcome.local(554, "4.4.7", text)


class QueueMonitor:
    """Told what the queue does, for metrics; every method does nothing here. Calls come from the reactor thread
    and must return quickly."""

    def message_queued(self, message: Message, origin: str) -> None:
        """A message was stored: ``origin`` is ``"smtp"`` (accepted from a client) or ``"notice"`` (a DSN)."""

    def attempt_started(self, message: Message) -> None:
        """A delivery attempt for ``message`` began."""

    def attempt_finished(self, message: Message, seconds: float) -> None:
        """The attempt ended after ``seconds``; ``message`` is its new state."""

    def recipient_done(self, message: Message, index: int, result: str) -> None:
        """Recipient ``index`` was ``"delivered"``, ``"deferred"`` or ``"bounced"`` by this attempt."""

    def notice_queued(self, notice: Message, action: str) -> None:
        """A delivery status notification (``action``: failed, delayed, delivered) was queued."""


class Monitors(QueueMonitor):
    """Passes every call to each of several monitors; one that raises is logged and the others still hear."""

    def __init__(self, monitors: Iterable[QueueMonitor] = ()) -> None:
        self.log = Logger(namespace=NAMESPACE, source=self)
        self.monitors = list(monitors)

    def add(self, monitor: QueueMonitor) -> None:
        """Tell ``monitor`` too from now on."""
        self.monitors.append(monitor)

    def _each(self, name: str, *args: Any) -> None:
        for monitor in self.monitors:
            try:
                getattr(monitor, name)(*args)
            except Exception:
                self.log.failure("queue monitor {monitor!r} failed in {name}", monitor=monitor, name=name)

    def message_queued(self, message: Message, origin: str) -> None:
        self._each("message_queued", message, origin)

    def attempt_started(self, message: Message) -> None:
        self._each("attempt_started", message)

    def attempt_finished(self, message: Message, seconds: float) -> None:
        self._each("attempt_finished", message, seconds)

    def recipient_done(self, message: Message, index: int, result: str) -> None:
        self._each("recipient_done", message, index, result)

    def notice_queued(self, notice: Message, action: str) -> None:
        self._each("notice_queued", notice, action)


class QueueRunner:
    """Delivers the messages ``store`` offers through ``deliverer`` (``deliver(message, indexes, open_content)``
    for the recipients of one domain, firing with ``{index: Outcome}``), retrying on ``schedule``.

    ``hostname`` names this host in the notices (Reporting-MTA). `start` hands the runner to the store as its
    worker; `stop` waits for the attempts under way.
    """

    def __init__(self, store: IQueueStore, deliverer: Any, *, reactor: Any, schedule: Schedule, hostname: str,
                 monitor: QueueMonitor | None = None) -> None:
        self.log = Logger(namespace=NAMESPACE, source=self)
        self.store = store
        self.deliverer = deliverer
        self.reactor = reactor
        self.schedule = schedule
        self.hostname = hostname
        self.monitor: QueueMonitor = Monitors([monitor]) if monitor is not None else QueueMonitor()

    def start(self) -> None:
        """Have the store offer due messages to this runner."""
        self.store.start(self)

    def stop(self) -> "Deferred[None]":
        """Have the store offer no more; fires once the attempts under way have ended and their state is saved."""
        return self.store.stop()

    def __call__(self, message: Message, open_content: OpenContent) -> "Deferred[Message]":
        """One attempt at ``message``: fires with its new state (never fails for a delivery problem)."""
        return Deferred.fromCoroutine(self._attempt(message.copy(), open_content))

    # ---- one attempt ------------------------------------------------------------------------------------------

    async def _attempt(self, message: Message, open_content: OpenContent) -> Message:
        started = self.reactor.seconds()
        self.monitor.attempt_started(message)
        try:
            await self._deliver_all(message, open_content)
        finally:
            self.monitor.attempt_finished(message, self.reactor.seconds() - started)
        return message

    async def _deliver_all(self, message: Message, open_content: OpenContent) -> None:
        groups = message.by_domain()
        results: list[dict[int, Outcome]] = []
        if groups:
            results = await gatherResults([self._deliver(message, domain, indexes, open_content)
                                           for domain, indexes in groups.items()])
        now = self.reactor.seconds()
        touched = self._record(message, groups, results)
        message.attempts += 1
        if message.pending and self.schedule.expired(message, now):
            lifetime = self.schedule.bounce_lifetime if message.sender == "" else self.schedule.lifetime
            for index in message.pending:
                recipient = message.recipients[index]
                recipient.outcome = expired(recipient.outcome, lifetime)
                recipient.status = Status.FAILED
                if index not in touched:
                    touched.append(index)
        for index in touched:
            self._log_outcome(message, index, now)
        await self._notify(message, open_content, now)
        if not message.done:
            message.next_attempt = now + self.schedule.delay(message.attempts)

    def _deliver(self, message: Message, domain: str, indexes: list[int],
                 open_content: OpenContent) -> "Deferred[dict[int, Outcome]]":
        """The outcomes for one domain's recipients; a deliverer that fails defers them all with 4.3.0."""
        attempt = maybeDeferred(lambda: self.deliverer.deliver(message, list(indexes), open_content))

        def checked(outcomes: Any) -> dict[int, Outcome]:
            if not isinstance(outcomes, Mapping):
                raise TypeError(f"the deliverer gave {type(outcomes).__name__}, not a mapping of outcomes")
            return {i: outcomes[i] for i in indexes if isinstance(outcomes.get(i), Outcome)}

        def failed(failure: Failure) -> dict[int, Outcome]:
            self.log.emit(EVENTS["queue.deliverer_failed"],
                          "{queue_id}: delivery to {domain} failed unexpectedly, deferring {count} recipient(s): "
                          "{error}", event="queue.deliverer_failed", queue_id=message.id, domain=escape(domain),
                          count=len(indexes), error=escape(failure.getErrorMessage()), log_failure=failure)
            return {i: DELIVERER_FAILED for i in indexes}

        return attempt.addCallback(checked).addErrback(failed)

    def _record(self, message: Message, groups: Mapping[str, Sequence[int]],
                results: Sequence[Mapping[int, Outcome]]) -> list[int]:
        """Put each outcome on its recipient; the indexes this attempt tried, in order."""
        touched: list[int] = []
        for indexes, outcomes in zip(groups.values(), results):
            for index in indexes:
                outcome = outcomes.get(index, NO_OUTCOME)
                recipient = message.recipients[index]
                recipient.outcome = outcome
                if outcome.delivered:
                    recipient.status = Status.DELIVERED
                elif outcome.permanent:
                    recipient.status = Status.FAILED
                touched.append(index)
        return touched

    def _log_outcome(self, message: Message, index: int, now: float) -> None:
        recipient = message.recipients[index]
        outcome = recipient.outcome or NO_OUTCOME
        result = {Status.DELIVERED: "delivered", Status.FAILED: "bounced"}.get(recipient.status, "deferred")
        event = f"queue.{result}"
        self.log.emit(EVENTS[event],
                      "{queue_id}: to=<{recipient}>, relay={remote}, delay={delay:.1f}, attempts={attempts}, "
                      "status={result} ({code} {status} {text})",
                      event=event, queue_id=message.id, recipient=escape(recipient.address),
                      sender=escape(message.sender), remote=escape(outcome.remote) or "none", result=result,
                      code=outcome.code, status=outcome.enhanced, text=escape(outcome.text),
                      delay=max(0.0, now - message.arrived), attempts=message.attempts)
        self.monitor.recipient_done(message, index, result)

    # ---- delivery status notifications ------------------------------------------------------------------------

    def _notices(self, message: Message, now: float) -> list[tuple[str, list[int]]]:
        """The notices this state calls for: (action, recipient indexes), each recipient at most once."""
        if message.sender == "":
            return []  # RFC 3461 §6.2, RFC 5321 §4.5.5: never report on a notice
        recipients = message.recipients
        failed = [i for i, r in enumerate(recipients)
                  if r.status is Status.FAILED and not r.reported and r.wants("FAILURE")]
        delivered = [i for i, r in enumerate(recipients)
                     if r.status is Status.DELIVERED and not r.reported and r.wants("SUCCESS")]
        delayed: list[int] = []
        pending = message.pending
        if pending and self.schedule.warn_due(message, now):
            delayed = [i for i in pending if not recipients[i].delay_reported and recipients[i].wants("DELAY")]
        return [(action, indexes) for action, indexes in
                (("failed", failed), ("delayed", delayed), ("delivered", delivered)) if indexes]

    async def _notify(self, message: Message, open_content: OpenContent, now: float) -> None:
        wanted = self._notices(message, now)
        if not wanted:
            return
        content = self._original_start(message, open_content)
        for action, indexes in wanted:
            try:
                notice, data = bounce.report(message, indexes, action, reporting_mta=self.hostname,
                                             content=content, new_id=new_id(now), now=now,
                                             retry_until=message.arrived + self.schedule.lifetime)
                if not notice.arrived:
                    notice.arrived = now
                await self.store.enqueue(notice, data)
            except Exception:
                later = "tried again after the next attempt" if message.pending else "not sent"
                self.log.failure("{queue_id}: cannot queue the {action} notice for {count} recipient(s): {later}",
                                 level=EVENTS["queue.notice_failed"], event="queue.notice_failed",
                                 queue_id=message.id, action=action, count=len(indexes), later=later)
                continue
            for index in indexes:
                if action == "delayed":
                    message.recipients[index].delay_reported = True
                else:
                    message.recipients[index].reported = True
            self.log.emit(EVENTS["queue.notice"], "{queue_id}: {action} notice {notice_id} queued for <{to}> "
                          "({count} recipient(s))", event="queue.notice", queue_id=message.id, action=action,
                          notice_id=notice.id, to=escape(message.sender), count=len(indexes))
            self.monitor.notice_queued(notice, action)
            self.monitor.message_queued(notice, "notice")

    def _original_start(self, message: Message, open_content: OpenContent) -> bytes:
        """The first BOUNCE_SIZE_LIMIT + 1 octets of the content (for the notice's third part), b"" if unreadable."""
        try:
            with open_content() as f:
                return f.read(bounce.BOUNCE_SIZE_LIMIT + 1)
        except Exception:
            self.log.failure("{queue_id}: cannot read the message content for its notice", queue_id=message.id)
            return b""
