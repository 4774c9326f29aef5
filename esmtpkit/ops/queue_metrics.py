"""Prometheus metrics of the outbound queue: messages queued, the queue's size, recipient outcomes, notices,
attempt latency.

``twistd esmtpkit --handler esmtpkit.handlers.Queue --metrics ...`` registers them on the same registry as the
server's own metrics (`esmtpkit.ops.metrics.Metrics`), so one scrape shows both; docs/queue.md lists them.
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from esmtpkit.core.outbound import Message
from esmtpkit.queue.runner import QueueMonitor
from esmtpkit.queue.service import QueueService

__all__ = ["QueueMetrics", "watch", "ATTEMPT_BUCKETS"]

#: Delivery attempt latency buckets, in seconds: a quick local relay to a slow remote MX near its timeouts.
ATTEMPT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

_RESULTS = ("delivered", "deferred", "bounced")
#: Where queued messages come from, and the kinds of notice: shown at 0 from the start, as the results are.
_ORIGINS = ("smtp", "notice")
_ACTIONS = ("failed", "delayed", "relayed")
#: The states the queue-size gauge shows (the store's counts; attempts under way are `attempts_active`).
_STATES = ("queued", "held")

_by_registry: "weakref.WeakKeyDictionary[CollectorRegistry, QueueMetrics]" = weakref.WeakKeyDictionary()


class QueueMetrics(QueueMonitor):
    """Counts what the queue does into ``registry`` (a new one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queued = Counter("esmtpkit_queue_messages_queued",
                              "Messages stored in the queue, by origin (smtp: accepted from a client; notice: a "
                              "delivery status notification made here).", ["origin"], registry=r)
        self.active = Gauge("esmtpkit_queue_attempts_active", "Delivery attempts under way.", registry=r,
                            multiprocess_mode="livesum")
        self.attempts = Counter("esmtpkit_queue_attempts", "Delivery attempts finished (one per message tried).",
                                registry=r)
        self.recipients = Counter("esmtpkit_queue_recipients",
                                  "Recipient outcomes of delivery attempts, by result (delivered, deferred, "
                                  "bounced).", ["result"], registry=r)
        self.notices = Counter("esmtpkit_queue_notices",
                               "Delivery status notifications queued, by action (failed, delayed, relayed).",
                               ["action"], registry=r)
        self.messages = Gauge("esmtpkit_queue_messages",
                              "Messages in the queue as its store last counted them, by state (queued: not held, "
                              "those being delivered included; held).", ["state"], registry=r,
                              multiprocess_mode="livemax")
        self.attempt_seconds = Histogram("esmtpkit_queue_attempt_seconds",
                                         "Time a delivery attempt took (every domain of one message).",
                                         buckets=ATTEMPT_BUCKETS, registry=r)
        self._results = {result: self.recipients.labels(result) for result in _RESULTS}
        self._origins = {origin: self.queued.labels(origin) for origin in _ORIGINS}
        self._actions = {action: self.notices.labels(action) for action in _ACTIONS}
        self._states = {state: self.messages.labels(state) for state in _STATES}

    def message_queued(self, message: Message, origin: str) -> None:
        child = self._origins.get(origin)
        (child if child is not None else self.queued.labels(origin)).inc()

    def attempt_started(self, message: Message) -> None:
        self.active.inc()

    def attempt_finished(self, message: Message, seconds: float) -> None:
        self.active.dec()
        self.attempts.inc()
        self.attempt_seconds.observe(seconds)

    def recipient_done(self, message: Message, index: int, result: str) -> None:
        child = self._results.get(result)
        (child if child is not None else self.recipients.labels(result)).inc()

    def notice_queued(self, notice: Message, action: str) -> None:
        child = self._actions.get(action)
        (child if child is not None else self.notices.labels(action)).inc()

    def queue_counts(self, counts: Mapping[str, int]) -> None:
        for state, gauge in self._states.items():
            if state in counts:
                gauge.set(counts[state])


def watch(service: Any, registry: CollectorRegistry) -> bool:
    """Record ``service``'s queue metrics into ``registry`` if it is a `QueueService` (True then).

    Several queues of one process share one set of metrics per registry.
    """
    if not isinstance(service, QueueService):
        return False
    metrics = _by_registry.get(registry)
    if metrics is None:
        metrics = _by_registry[registry] = QueueMetrics(registry)
    if metrics not in service.monitor.monitors:
        service.monitor.add(metrics)
    return True
