"""Prometheus metrics: `Metrics`, a monitor that counts what happens on connections, and the HTTP site serving them.

``twistd esmtpkit --metrics tcp:9101:interface=127.0.0.1`` serves ``/metrics`` with prometheus_client's Twisted
``MetricsResource``. Under ``--workers N`` each worker records into prometheus_client's multiprocess files and the
supervisor serves their sum on the one endpoint (see `multiprocess_registry`), so Prometheus scrapes one target
whatever the number of workers. docs/operating.md lists every metric.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from twisted.application import strports
from twisted.application.service import MultiService

from esmtpkit.core.reply import Reply
from esmtpkit.core.session import Envelope, Session
from esmtpkit.server.monitor import Monitor

__all__ = ["Metrics", "WorkerMetrics", "metrics_site", "multiprocess_registry", "SIZE_BUCKETS", "LATENCY_BUCKETS"]

#: Message size buckets, in bytes: 1 KiB to 64 MiB by factors of four.
SIZE_BUCKETS = tuple(float(1024 * 4 ** i) for i in range(9))
#: Handler latency buckets, in seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_REFUSALS = {
    "4.3.2": "limit",  # too many connections, or shutting down (told apart by the text)
    "4.7.0": "client_limit",
}


def _refusal_reason(reply: Reply) -> str:
    if "shutting down" in reply.text:
        return "shutdown"
    return _REFUSALS.get(reply.enhanced or "", "other")


class Metrics(Monitor):
    """Counts connections, replies, messages, bytes, TLS, AUTH and timeouts into ``registry`` (a new one by default).

    Labelled children are cached, so a reply costs one dictionary lookup and one increment.
    """

    timing = True

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Counter("esmtpkit_connections", "Connections admitted.", registry=r)
        self.connections_current = Gauge("esmtpkit_connections_current", "Connections open now.", registry=r,
                                         multiprocess_mode="livesum")
        self.connections_refused = Counter("esmtpkit_connections_refused",
                                           "Connections answered 421 and closed at once, by reason.", ["reason"],
                                           registry=r)
        self.replies = Counter("esmtpkit_replies", "Replies sent, by the verb they answer and their class (2xx...).",
                               ["verb", "class"], registry=r)
        self.messages = Counter("esmtpkit_messages", "Transactions ended, by outcome (accepted, rejected, aborted).",
                                ["outcome"], registry=r)
        self.received_bytes = Counter("esmtpkit_received_bytes",
                                      "Message content octets received (accepted and rejected messages).", registry=r)
        self.message_size = Histogram("esmtpkit_message_size_bytes", "Size of accepted messages.",
                                      buckets=SIZE_BUCKETS, registry=r)
        self.handler_seconds = Histogram("esmtpkit_handler_seconds",
                                         "Time the handler took to answer, by handler method.", ["verb"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.tls = Counter("esmtpkit_tls_handshakes", "TLS handshakes, by result (ok, failed).", ["result"],
                           registry=r)
        self.auth = Counter("esmtpkit_auth", "AUTH attempts, by mechanism and result (ok, failed).",
                            ["mechanism", "result"], registry=r)
        self.auth_cool_offs = Counter("esmtpkit_auth_throttled",
                                      "Cool-offs begun: a client address or user name reached its AUTH failure limit.",
                                      ["scope"], registry=r)
        self.timeouts = Counter("esmtpkit_timeouts", "Connections closed because the client was silent too long.",
                                registry=r)
        self.mailauth = Counter("esmtpkit_mailauth_verdicts",
                                "Mail-authentication verdicts, by method (spf.mailfrom, spf.helo, dkim, arc, dmarc)"
                                " and result (pass, fail, ...).", ["method", "result"], registry=r)
        self.mailauth_seconds = Histogram("esmtpkit_mailauth_seconds",
                                          "Time a mail-authentication check took, DNS included, by method.",
                                          ["method"], registry=r)
        self.filters = Counter("esmtpkit_filter_verdicts",
                               "Filter verdicts, by filter, stage (connect, helo, mail, rcpt, message) and action "
                               "(continue, accept, reject, tempfail, discard, quarantine).",
                               ["filter", "stage", "action"], registry=r)
        self.filter_seconds = Histogram("esmtpkit_filter_seconds", "Time a filter took to answer, by filter.",
                                        ["filter"], registry=r)
        self._children: dict[Any, Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def connection_opened(self, session: Session) -> None:
        self.connections.inc()
        self.connections_current.inc()

    def connection_refused(self, session: Session, reply: Reply) -> None:
        self._child(self.connections_refused, _refusal_reason(reply)).inc()

    def connection_closed(self, session: Session, duration: float, reason: str) -> None:
        self.connections_current.dec()

    def tls_established(self, session: Session) -> None:
        self._child(self.tls, "ok").inc()

    def tls_failed(self, session: Session, reason: str) -> None:
        self._child(self.tls, "failed").inc()

    def replied(self, session: Session, verb: str, reply: Reply) -> None:
        self._child(self.replies, verb, f"{reply.code // 100}xx").inc()

    def handled(self, verb: str, seconds: float) -> None:
        self._child(self.handler_seconds, verb).observe(seconds)

    def auth_succeeded(self, session: Session, mechanism: str, user: str) -> None:
        self._child(self.auth, mechanism, "ok").inc()

    def auth_failed(self, session: Session, mechanism: str, user: str | None, reply: Reply) -> None:
        self._child(self.auth, mechanism, "failed").inc()

    def auth_throttled(self, session: Session, scope: str, user: str | None, seconds: float) -> None:
        self._child(self.auth_cool_offs, scope).inc()

    def timed_out(self, session: Session, phase: str) -> None:
        self.timeouts.inc()

    def message_accepted(self, session: Session, envelope: Envelope, size: int, seconds: float,
                         reply: Reply) -> None:
        self._child(self.messages, "accepted").inc()
        self.received_bytes.inc(size)
        self.message_size.observe(size)

    def message_rejected(self, session: Session, envelope: Envelope, size: int, reply: Reply) -> None:
        self._child(self.messages, "rejected").inc()
        self.received_bytes.inc(size)

    def message_aborted(self, session: Session, envelope: Envelope, size: int, reason: str) -> None:
        self._child(self.messages, "aborted").inc()

    def checked(self, session: Session, method: str, result: str, domain: str, seconds: float) -> None:
        self._child(self.mailauth, method, result).inc()
        self._child(self.mailauth_seconds, method).observe(seconds)

    def filtered(self, session: Session, name: str, stage: str, action: str, seconds: float,
                 reason: str = "") -> None:
        self._child(self.filters, name, stage, action).inc()
        self._child(self.filter_seconds, name).observe(seconds)


def metrics_site(registry: CollectorRegistry) -> Any:
    """A twisted.web Site serving ``registry`` at ``/metrics`` (prometheus_client's Twisted ``MetricsResource``)."""
    from prometheus_client.twisted import MetricsResource
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    site = Site(root)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # a scrape every few seconds is no news
    return site


def multiprocess_registry(path: str) -> CollectorRegistry:
    """A registry that sums the metrics worker processes wrote into ``path`` (PROMETHEUS_MULTIPROC_DIR)."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return registry


class WorkerMetrics(MultiService):
    """``--metrics`` under ``--workers N``: a private folder for the workers' metric files, and the endpoint that
    serves their sum.

    prometheus_client's multiprocess mode was chosen over one port per worker: Prometheus scrapes one target, the
    figures are the server's whatever the number of workers, and counters survive a worker's restart (its files
    stay; `worker_ended` only drops its live gauges). Workers get `environment` and record with `Metrics`.
    """

    def __init__(self, endpoint: str, reactor: Any = None) -> None:
        super().__init__()
        self.path = ""
        self.registry = CollectorRegistry()
        strports.service(endpoint, metrics_site(self.registry), reactor=reactor).setServiceParent(self)

    def startService(self) -> None:
        # Made here, after twistd has dropped privileges (--uid/--gid), so the workers can write into it.
        from prometheus_client import multiprocess

        self.path = tempfile.mkdtemp(prefix="esmtpkit-metrics-")
        multiprocess.MultiProcessCollector(self.registry, path=self.path)
        super().startService()

    @property
    def environment(self) -> dict[str, str]:
        """What a worker's environment needs to record into this folder."""
        return {"PROMETHEUS_MULTIPROC_DIR": self.path, "ESMTPKIT_METRICS": "1"}

    def worker_ended(self, pid: int) -> None:
        """A worker exited: its live gauges (open connections) stop counting."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self.path)

    def stopService(self) -> Any:
        stopped = super().stopService()
        if self.path:
            shutil.rmtree(self.path, ignore_errors=True)
        return stopped
