"""`QueueRunner`: the worker a queue store hands due messages to; it delivers, decides and reports.

For one message it delivers the pending recipients, one domain at a time per delivery and all domains in
parallel, records each recipient's outcome, fails the recipients still pending once the message has outlived
the schedule's lifetime (RFC 3463 4.4.7), and queues the delivery status notifications (RFC 3464) the
recipients asked for through the same store *before* it returns the message's new state. A notice the store
refuses stays owed, and the store keeps the message until it is queued (`esmtpkit.queue.interfaces.finished`): a later
attempt only queues the notices. While some domains are still under way, the progress of those that ended is
saved (`ICheckpoint`), so a process killed mid-attempt does not deliver them again. A message with BY (RFC 2852)
mode R is returned (5.4.7) once its deadline has passed, and its retries are never scheduled beyond it; in mode N
a late message gets a delay notice and goes on. The notices about a REQUIRETLS message are REQUIRETLS too (RFC
8689 §5). Every recipient outcome is a
structured log event in the namespace ``esmtpkit.queue`` (see docs/queue.md) and a call on its `QueueMonitor`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

from twisted.internet.defer import Deferred, DeferredLock, gatherResults, maybeDeferred
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from esmtpkit.core import bounce
from esmtpkit.core.client import by_expired
from esmtpkit.core.escape import escape
from esmtpkit.core.ids import new_id
from esmtpkit.core.outbound import Message, Outcome, Status
from esmtpkit.core.schedule import Schedule
from esmtpkit.queue.interfaces import ICheckpoint, IQueueStore, OpenContent, final_notice, finished

__all__ = ["QueueRunner", "QueueMonitor", "Monitors", "EVENTS", "NAMESPACE", "DELIVERER_FAILED", "NO_OUTCOME",
           "ATTEMPT_TIMED_OUT", "expired"]

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
    "queue.attempt_cut": LogLevel.warn,
}

#: The outcome for recipients whose delivery failed unexpectedly (a fault here, not a reply): tried again later.
DELIVERER_FAILED = Outcome.local(451, "4.3.0", "Internal error while delivering, will try again")
#: The outcome for a recipient the deliverer gave no answer for.
NO_OUTCOME = Outcome.local(451, "4.3.0", "No delivery outcome for this recipient, will try again")
#: The outcome for recipients whose domain was still under way when the attempt ran out of time (the store's
#: ``attempt_timeout``): tried again later.
ATTEMPT_TIMED_OUT = Outcome.local(451, "4.4.2", "Delivery attempt took too long, will try again")


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
        """A delivery status notification (``action``: failed, delayed, relayed) was queued."""

    def queue_counts(self, counts: Mapping[str, int]) -> None:
        """The store counted its messages: ``queued`` (not held, those being attempted included), ``held``, and
        ``active`` (being attempted by this process)."""


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

    def queue_counts(self, counts: Mapping[str, int]) -> None:
        self._each("queue_counts", counts)


class QueueRunner:
    """Delivers the messages ``store`` offers through ``deliverer`` (``deliver(message, indexes, open_content)``
    for the recipients of one domain, firing with ``{index: Outcome}``), retrying on ``schedule``.

    ``hostname`` names this host in the notices (Reporting-MTA). ``signer`` (an `esmtpkit.mailauth.signing.Signer`)
    ARC-seals each message before an attempt, and DKIM-signs those accepted from this server's own users
    (`Message.sign`, decided by the handler) and the notices it writes. `start` hands the runner to the store as
    its worker; `stop` waits for the attempts under way.
    """

    def __init__(self, store: IQueueStore, deliverer: Any, *, reactor: Any, schedule: Schedule, hostname: str,
                 monitor: QueueMonitor | None = None, signer: Any = None) -> None:
        self.log = Logger(namespace=NAMESPACE, source=self)
        self.store = store
        self.deliverer = deliverer
        self.reactor = reactor
        self.schedule = schedule
        self.hostname = hostname
        self.monitor: QueueMonitor = Monitors([monitor]) if monitor is not None else QueueMonitor()
        self.signer = signer

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
        if self.signer is not None and message.pending and self.signer.acts_on(sign=message.sign):
            try:
                open_content = await self.signer.prepare(open_content, binary=message.body == "BINARYMIME",
                                                         sign=message.sign)
            except Exception:
                self.log.failure("message {queue_id}: cannot read it to sign it", queue_id=message.id)
        try:
            await self._deliver_all(message, open_content)
        finally:
            self.monitor.attempt_finished(message, self.reactor.seconds() - started)
        return message

    async def _deliver_all(self, message: Message, open_content: OpenContent) -> None:
        """Deliver what is pending (nothing when only notices are owed), expire, report, schedule."""
        touched: list[int] = []
        by = message.deliver_by
        if by is not None and by.mode == "R" and message.pending and message.by_expired(self.reactor.seconds()):
            touched = self._return_late(message)
        groups = message.by_domain()
        if groups:
            await self._deliver_domains(message, groups, open_content)
            touched += [index for indexes in groups.values() for index in indexes]
            message.attempts += 1
        now = self.reactor.seconds()
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
        if not finished(message):
            message.next_attempt = now + self.schedule.delay(message.attempts)
            if by is not None and by.mode == "R" and message.pending:
                message.next_attempt = max(now, min(message.next_attempt, by.deadline(message.arrived)))

    @staticmethod
    def _return_late(message: Message) -> list[int]:
        """BY with mode R, its deadline passed (RFC 2852 §4.1): the pending recipients fail with 5.4.7, so the
        message is returned rather than attempted; the indexes failed."""
        assert message.deliver_by is not None
        outcome = by_expired(f"not delivered within the BY time of {message.deliver_by.seconds} seconds")
        failed = message.pending
        for index in failed:
            recipient = message.recipients[index]
            recipient.outcome = outcome
            recipient.status = Status.FAILED
        return failed

    async def _deliver_domains(self, message: Message, groups: Mapping[str, Sequence[int]],
                               open_content: OpenContent) -> None:
        """Deliver every domain at once, recording each one's outcomes as it ends; while other domains are still
        under way, save that progress (`ICheckpoint`). Past the store's ``attempt_timeout`` the domains still
        open are given up for this attempt (`ATTEMPT_TIMED_OUT`)."""
        saver = ICheckpoint(self.store, None)
        saving = DeferredLock()
        remaining = len(groups)

        def ended(outcomes: Mapping[int, Outcome], indexes: Sequence[int]) -> None:
            nonlocal remaining
            remaining -= 1
            self._record(message, indexes, outcomes)
            if saver is not None and remaining:
                saving.run(self._checkpoint, saver, message.copy())

        waits, cuts = [], []
        for domain, indexes in groups.items():
            done, cut = self._deliver(message, domain, indexes, open_content)
            waits.append(done.addCallback(ended, indexes))
            cuts.append(cut)
        timeout = self._attempt_timeout()
        timer = self.reactor.callLater(timeout, self._cut, message, cuts, timeout) if timeout else None
        try:
            await gatherResults(waits)
        finally:
            if timer is not None and timer.active():
                timer.cancel()
        await saving.acquire()  # every checkpoint has ended: none can land after the store saves the result
        saving.release()

    def _attempt_timeout(self) -> float | None:
        """The store's ``attempt_timeout`` (seconds), if it has one."""
        timeout = getattr(self.store, "attempt_timeout", None)
        return float(timeout) if isinstance(timeout, (int, float)) and timeout > 0 else None

    def _cut(self, message: Message, cuts: Sequence[Callable[[], bool]], timeout: float) -> None:
        """The attempt ran out of time: the domains still open are deferred now (their sessions are cancelled)."""
        cut = sum(1 for give_up in cuts if give_up())
        self.log.emit(EVENTS["queue.attempt_cut"],
                      "{queue_id}: attempt still under way after {timeout:g} s; {count} domain(s) deferred",
                      event="queue.attempt_cut", queue_id=message.id, timeout=timeout, count=cut)

    def _checkpoint(self, saver: ICheckpoint, snapshot: Message) -> "Deferred[None]":
        def failed(failure: Failure) -> None:
            self.log.failure("{queue_id}: cannot save the attempt's progress (saved at its end instead)", failure,
                             queue_id=snapshot.id)

        return maybeDeferred(saver.checkpoint, snapshot).addErrback(failed)

    def _deliver(self, message: Message, domain: str, indexes: Sequence[int],
                 open_content: OpenContent) -> "tuple[Deferred[dict[int, Outcome]], Callable[[], bool]]":
        """The outcomes for one domain's recipients (a deliverer that fails defers them all with 4.3.0), and a
        function that gives up waiting for them (`ATTEMPT_TIMED_OUT`; True if it did)."""
        attempt = maybeDeferred(lambda: self.deliverer.deliver(message, list(indexes), open_content))
        result: Deferred[dict[int, Outcome]] = Deferred()
        given_up = False

        def checked(outcomes: Any) -> dict[int, Outcome]:
            if not isinstance(outcomes, Mapping):
                raise TypeError(f"the deliverer gave {type(outcomes).__name__}, not a mapping of outcomes")
            return {i: outcomes[i] for i in indexes if isinstance(outcomes.get(i), Outcome)}

        def failed(failure: Failure) -> dict[int, Outcome] | None:
            if given_up:
                return None
            self.log.emit(EVENTS["queue.deliverer_failed"],
                          "{queue_id}: delivery to {domain} failed unexpectedly, deferring {count} recipient(s): "
                          "{error}", event="queue.deliverer_failed", queue_id=message.id, domain=escape(domain),
                          count=len(indexes), error=escape(failure.getErrorMessage()), log_failure=failure)
            return {i: DELIVERER_FAILED for i in indexes}

        def answer(outcomes: dict[int, Outcome] | None) -> None:
            if not result.called and outcomes is not None:
                result.callback(outcomes)

        def give_up() -> bool:
            nonlocal given_up
            if result.called:
                return False
            given_up = True
            result.callback({i: ATTEMPT_TIMED_OUT for i in indexes})
            attempt.cancel()
            return True

        attempt.addCallback(checked).addErrback(failed).addCallback(answer)
        return result, give_up

    def _record(self, message: Message, indexes: Sequence[int], outcomes: Mapping[int, Outcome]) -> None:
        """Put each outcome of one domain on its recipient."""
        for index in indexes:
            outcome = outcomes.get(index, NO_OUTCOME)
            recipient = message.recipients[index]
            recipient.outcome = outcome
            if outcome.delivered:
                recipient.status = Status.DELIVERED
            elif outcome.permanent:
                recipient.status = Status.FAILED

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
        owed: dict[str, list[int]] = {"failed": [], "relayed": []}
        for index in range(len(recipients)):
            action = final_notice(message, index)
            if action is not None:
                owed[action].append(index)
        delayed: list[int] = []
        pending = message.pending
        if pending and (self.schedule.warn_due(message, now) or self._by_late(message, now)):
            delayed = [i for i in pending if not recipients[i].delay_reported and recipients[i].wants("DELAY")]
        return [(action, indexes) for action, indexes in
                (("failed", owed["failed"]), ("delayed", delayed), ("relayed", owed["relayed"])) if indexes]

    @staticmethod
    def _by_late(message: Message, now: float) -> bool:
        """BY with mode N, its deadline passed and recipients still pending: a delay notice is owed (RFC 2852
        §4.2), once per recipient as for the schedule's warning."""
        by = message.deliver_by
        return by is not None and by.mode == "N" and message.by_expired(now)

    async def _notify(self, message: Message, open_content: OpenContent, now: float) -> None:
        """Queue the notices owed. One the store refuses stays owed: the message is kept for it (`finished`) and
        the next attempt queues it; one that cannot even be written (a fault here) is logged and given up."""
        wanted = self._notices(message, now)
        if not wanted:
            return
        content = self._original_start(message, open_content)
        for action, indexes in wanted:
            try:
                notice, data = bounce.report(message, indexes, action, reporting_mta=self.hostname,
                                             content=content, new_id=new_id(now), now=now,
                                             retry_until=message.arrived + self.schedule.lifetime)
            except Exception:
                self.log.failure("{queue_id}: cannot write the {action} notice for {count} recipient(s): not sent",
                                 level=EVENTS["queue.notice_failed"], event="queue.notice_failed",
                                 queue_id=message.id, action=action, count=len(indexes), later="not sent")
                self._mark_reported(message, indexes, action)
                continue
            if not notice.arrived:
                notice.arrived = now
            notice.requiretls = notice.requiretls or message.requiretls  # RFC 8689 §5: the notice keeps it
            notice.sign = True  # written here: this server's own mail
            try:
                await self.store.enqueue(notice, data)
            except Exception:
                later = "tried again at the next attempt"
                self.log.failure("{queue_id}: cannot queue the {action} notice for {count} recipient(s): {later}",
                                 level=EVENTS["queue.notice_failed"], event="queue.notice_failed",
                                 queue_id=message.id, action=action, count=len(indexes), later=later)
                continue
            self._mark_reported(message, indexes, action)
            self.log.emit(EVENTS["queue.notice"], "{queue_id}: {action} notice {notice_id} queued for <{to}> "
                          "({count} recipient(s))", event="queue.notice", queue_id=message.id, action=action,
                          notice_id=notice.id, to=escape(message.sender), count=len(indexes))
            self.monitor.notice_queued(notice, action)
            self.monitor.message_queued(notice, "notice")

    @staticmethod
    def _mark_reported(message: Message, indexes: Sequence[int], action: str) -> None:
        for index in indexes:
            if action == "delayed":
                message.recipients[index].delay_reported = True
            else:
                message.recipients[index].reported = True

    def _original_start(self, message: Message, open_content: OpenContent) -> bytes:
        """The first BOUNCE_SIZE_LIMIT + 1 octets of the content (for the notice's third part), b"" if unreadable."""
        try:
            with open_content() as f:
                return f.read(bounce.BOUNCE_SIZE_LIMIT + 1)
        except Exception:
            self.log.failure("{queue_id}: cannot read the message content for its notice", queue_id=message.id)
            return b""
