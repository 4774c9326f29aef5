"""`QueueService`: one process's queue (store, deliverer, runner) as a Twisted service, and its configuration.

``twistd esmtpkit --handler esmtpkit.handlers.Queue`` attaches it under the server's top service (see
`esmtpkit.handlers.queue.Queue.process_service`), so it starts and stops with the server: starting it begins
delivering what is in the store, mail queued before a restart included; stopping it waits for the attempts under
way (at most ``stop_timeout`` seconds; one cut short is simply made again later). Every handler of the process
with the same `QueueConfig` shares one service (`QueueService.shared`).
"""

from __future__ import annotations

import functools
import re
import socket
from dataclasses import dataclass, field
from typing import Any, ClassVar

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from esmtpkit.core.schedule import Schedule
from esmtpkit.queue.interfaces import IQueueStore
from esmtpkit.queue.runner import Monitors, QueueMonitor, QueueRunner

__all__ = ["QueueConfig", "QueueService", "parse_relayhost", "parse_servers", "parse_seconds", "TLS_MODES",
           "BACKENDS", "DEFAULT_AMQP_URL", "DEFAULT_AMQP_QUEUE"]

#: How the client uses TLS with the next hop ("implicit", TLS from the first octet, only with a relay host).
TLS_MODES = ("none", "opportunistic", "required", "implicit")
BACKENDS = ("spool", "amqp")
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_AMQP_QUEUE = "outbound"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)\s*", re.IGNORECASE)


@functools.lru_cache(maxsize=1)
def _this_host() -> str:
    """This host's FQDN, looked up once (the lookup may block on DNS)."""
    return socket.getfqdn()


def parse_seconds(name: str, value: float | str) -> float:
    """A duration above zero: a number of seconds, or text such as ``300``, ``30m``, ``4h``, ``5d`` (Postfix's
    units); ValueError naming ``name`` otherwise."""
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match is None:
            raise ValueError(f"{name} takes a duration such as 300, 30m, 4h or 5d, not {value!r}")
        number = float(match.group(1)) * _UNITS[match.group(2).lower() or "s"]
    else:
        number = float(value)
    if not 0 < number < float("inf"):
        raise ValueError(f"{name} must be a duration above 0, not {value!r}")
    return number


def _flag(name: str, value: bool | str) -> bool:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered not in _TRUE + _FALSE:
            raise ValueError(f"{name} takes yes or no, not {value!r}")
        return lowered in _TRUE
    return bool(value)


def _port(name: str, value: int | str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} takes a port number, not {value!r}") from None
    if not 0 < number < 65536:
        raise ValueError(f"{name} takes a port number from 1 to 65535, not {value!r}")
    return number


def _host_port(name: str, text: str, default: int | None) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[host]``, ``[host]:port`` (an IPv6 address in brackets, or bare without a port)."""
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{name}: expected [host]:port, not {text!r}")
        port = _port(name, rest[1:]) if rest else default
    elif text.count(":") == 1:
        host, _, given = text.partition(":")
        port = _port(name, given)
    else:
        host, port = text, default
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ValueError(f"{name}: no host name or address in {text!r}")
    return host, port


def parse_relayhost(text: str) -> tuple[str, int | None]:
    """``relayhost``: ``host``, ``host:port`` or ``[host]:port``; the port is None when not given. As in
    Postfix, a bare name is looked up as a mail domain (its MX records), ``[name]`` as a host (A/AAAA only)."""
    return _host_port("relayhost", text, None)


def parse_servers(text: str) -> tuple[tuple[str, int], ...]:
    """``dns``: name servers as ``127.0.0.1:5353,[::1]:53,192.0.2.53`` (port 53 unless given)."""
    servers = tuple((host, port or 53) for host, port in
                    (_host_port("dns", item, 53) for item in re.split(r"[,\s]+", text) if item.strip()))
    if not servers:
        raise ValueError(f"dns names no server: {text!r}")
    return servers


@dataclass(frozen=True)
class QueueConfig:
    """Everything that makes one queue: where it stores (``backend`` spool in ``spool``, or amqp at
    ``amqp_url``/``amqp_queue``), how it delivers (to ``relayhost`` or by MX to ``port``, asking the name servers
    ``dns`` or the system's), the client's TLS and login, the retry ``schedule``, how many messages at once
    (``concurrency``), whether this process delivers at all (``runner``) and the name it gives (``hostname``).
    """

    spool: str = "queue"
    backend: str = "spool"
    amqp_url: str = DEFAULT_AMQP_URL
    amqp_queue: str = DEFAULT_AMQP_QUEUE
    relayhost: str | None = None
    port: int = 25
    dns: tuple[tuple[str, int], ...] | None = None
    tls: str = "opportunistic"
    verify: bool = False
    ca_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    schedule: Schedule = field(default_factory=Schedule)
    concurrency: int = 20
    runner: bool = True
    hostname: str = ""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend takes {' or '.join(BACKENDS)}, not {self.backend!r}")
        if self.tls not in TLS_MODES:
            raise ValueError(f"tls takes one of {', '.join(TLS_MODES)}, not {self.tls!r}")
        if self.tls == "implicit" and self.relayhost is None:
            raise ValueError("tls=implicit needs a relayhost (MX hosts are reached on port 25 with STARTTLS)")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {self.concurrency}")
        if self.relayhost is not None:
            parse_relayhost(self.relayhost)
        if not self.hostname or any(c.isspace() for c in self.hostname) or not self.hostname.isprintable():
            raise ValueError(f"hostname must be a host name without spaces, not {self.hostname!r}")
        if bool(self.username) != bool(self.password):
            raise ValueError("username and password go together")
        if self.username and self.relayhost is None:
            raise ValueError("username and password need a relayhost (they are never sent to MX hosts)")
        if self.username and self.tls == "none":
            raise ValueError("username and password need tls (credentials are never sent in clear)")
        if self.backend == "spool" and not self.spool:
            raise ValueError("spool must name a folder")

    @classmethod
    def from_options(cls, *, spool: str = "queue", backend: str = "spool", amqp_url: str | None = None,
                     amqp_queue: str | None = None, relayhost: str | None = None, port: int | str = 25,
                     dns: str | None = None, tls: str = "opportunistic", verify: bool | str = False,
                     ca_file: str | None = None, username: str | None = None, password: str | None = None,
                     min_backoff: float | str | None = None, max_backoff: float | str | None = None,
                     lifetime: float | str | None = None, bounce_lifetime: float | str | None = None,
                     delay_warning: float | str | None = None, concurrency: int | str = 20,
                     runner: bool | str = True, hostname: str | None = None) -> "QueueConfig":
        """A configuration from settings given as text (``--handler-option key=value``) or as values;
        ValueError naming the setting when one is wrong."""
        defaults = Schedule()
        changes: dict[str, float | None] = {}
        for name, value in (("min_backoff", min_backoff), ("max_backoff", max_backoff), ("lifetime", lifetime),
                            ("bounce_lifetime", bounce_lifetime)):
            if value is not None and value != "":
                changes[name] = parse_seconds(name, value)
        if delay_warning is not None and str(delay_warning).strip().lower() not in ("", "0", "none", "no", "off"):
            changes["delay_warning"] = parse_seconds("delay_warning", delay_warning)
        low = changes.get("min_backoff", defaults.min_backoff)
        high = changes.get("max_backoff", defaults.max_backoff)
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_backoff ({low:g} s) must not be above max_backoff ({high:g} s)")
        try:
            workers = int(concurrency)
        except (TypeError, ValueError):
            raise ValueError(f"concurrency takes a whole number, not {concurrency!r}") from None
        return cls(
            spool=str(spool), backend=str(backend).strip().lower(), amqp_url=amqp_url or DEFAULT_AMQP_URL,
            amqp_queue=amqp_queue or DEFAULT_AMQP_QUEUE, relayhost=relayhost.strip() if relayhost else None, port=_port("port", port),
            dns=parse_servers(dns) if dns else None, tls=str(tls).strip().lower(), verify=_flag("verify", verify),
            ca_file=ca_file or None, username=username or None, password=password or None,
            schedule=Schedule(**changes), concurrency=workers, runner=_flag("runner", runner),  # type: ignore[arg-type]
            hostname=hostname or _this_host(),
        )


class QueueService(MultiService):
    """The queue of one process for one `QueueConfig`: it owns the store, the deliverer and the runner.

    `store` is made on first use (the handler needs it to accept mail even where no runner runs). `startService`
    starts the runner unless ``config.runner`` is false; `stopService` waits for the attempts under way, at most
    ``stop_timeout`` seconds. ``store``, ``deliverer`` and ``monitor`` replace what the configuration would build
    (tests, embedding applications).
    """

    log = Logger()
    _shared: ClassVar[dict[QueueConfig, "QueueService"]] = {}

    def __init__(self, config: QueueConfig, *, reactor: Any = None, store: IQueueStore | None = None,
                 deliverer: Any = None, monitor: QueueMonitor | None = None, stop_timeout: float = 60.0) -> None:
        super().__init__()
        self.config = config
        self.stop_timeout = stop_timeout
        self.monitor = Monitors([monitor] if monitor is not None else [])
        self._reactor = reactor
        self._store = store
        self._deliverer = deliverer
        self._runner: QueueRunner | None = None

    @classmethod
    def shared(cls, config: QueueConfig, reactor: Any = None) -> "QueueService":
        """The process's service for ``config``, made on first use (a stopped one is replaced)."""
        found = cls._shared.get(config)
        if found is None:
            found = cls._shared[config] = cls(config, reactor=reactor)
        return found

    @property
    def reactor(self) -> Any:
        """The reactor for connections and timers (the global one unless given)."""
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    @property
    def store(self) -> IQueueStore:
        """The queue's store, made on first use from the configuration."""
        if self._store is None:
            self._store = self._make_store()
        return self._store

    @property
    def deliverer(self) -> Any:
        """The deliverer, made on first use: to the relay host, or by MX."""
        if self._deliverer is None:
            self._deliverer = self._make_deliverer()
        return self._deliverer

    @property
    def runner(self) -> QueueRunner:
        """The runner that delivers what the store offers."""
        if self._runner is None:
            self._runner = QueueRunner(self.store, self.deliverer, reactor=self.reactor,
                                       schedule=self.config.schedule, hostname=self.config.hostname,
                                       monitor=self.monitor)
        return self._runner

    def _make_store(self) -> IQueueStore:
        config = self.config
        if config.backend == "amqp":
            from esmtpkit.queue.amqp import AMQPStore

            return AMQPStore(config.amqp_url, config.amqp_queue, reactor=self.reactor,  # type: ignore[no-any-return]
                             schedule=config.schedule, concurrency=config.concurrency)
        from esmtpkit.queue.spool import SpoolStore

        return SpoolStore(config.spool, reactor=self.reactor,  # type: ignore[no-any-return]
                          concurrency=config.concurrency)

    def _make_deliverer(self) -> Any:
        from esmtpkit.client.delivery import Deliverer
        from esmtpkit.client.mx import MXRouter, Smarthost
        from esmtpkit.client.options import ClientOptions

        config = self.config
        options = ClientOptions(helo=config.hostname, tls=config.tls, verify=config.verify,
                                ca_file=config.ca_file, username=config.username, password=config.password)
        router: Any
        if config.relayhost is not None:
            resolver = MXRouter(self.reactor, servers=config.dns) if config.dns else None
            router = Smarthost(config.relayhost, 25, resolver_router=resolver, reactor=self.reactor)
        else:
            router = MXRouter(self.reactor, servers=config.dns, port=config.port,
                              local_names=(config.hostname,))
        return Deliverer(self.reactor, router, options)

    def startService(self) -> None:
        """Start delivering (unless ``config.runner`` is false): what is already queued is offered at once."""
        super().startService()
        if not self.config.runner:
            self.log.info("queue {where}: accepting only; no runner in this process", where=self._where())
            return
        self.runner.start()
        self.log.info("queue {where}: delivering {how}, {concurrency} message(s) at a time", where=self._where(),
                      how=self._how(), concurrency=self.config.concurrency)

    def stopService(self) -> "Deferred[None]":
        """Stop the store (and the runner); fires once the attempts under way are saved, or after
        ``stop_timeout``."""
        if self._shared.get(self.config) is self:
            del self._shared[self.config]
        super().stopService()
        if self._store is None:
            return succeed(None)
        stopping = self._runner.stop() if self._runner is not None else self._store.stop()
        done: Deferred[None] = Deferred()

        def give_up() -> None:
            if not done.called:
                self.log.warn("queue {where}: attempts still under way after {timeout:g} s; they are made again "
                              "at the next start", where=self._where(), timeout=self.stop_timeout)
                done.callback(None)

        timer = self.reactor.callLater(self.stop_timeout, give_up)

        def stopped(result: object) -> None:
            if isinstance(result, Failure):
                self.log.failure("queue {where}: stopping failed", result, where=self._where())
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        stopping.addBoth(stopped)
        return done

    def _where(self) -> str:
        config = self.config
        return config.spool if config.backend == "spool" else f"{config.amqp_queue} (AMQP)"

    def _how(self) -> str:
        config = self.config
        if config.relayhost is not None:
            return f"to relay host {config.relayhost}"
        return f"by MX, port {config.port}"
