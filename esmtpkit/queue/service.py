"""`QueueService`: one process's queue (store, deliverer, runner) as a Twisted service, and its configuration.

``twistd esmtpkit --handler esmtpkit.handlers.Queue`` attaches it under the server's top service (see
`esmtpkit.handlers.queue.Queue.process_service`), so it starts and stops with the server: starting it begins
delivering what is in the store, mail queued before a restart included; stopping it waits for the attempts under
way (at most ``stop_timeout`` seconds; one cut short is simply made again later). Every handler of the process
with the same `QueueConfig` shares one service (`QueueService.shared`). `QueueService.check` finds an unusable
spool before the server starts; the store's counts go to the monitors (queue-size metrics).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
import tempfile
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Iterator

from twisted.application.service import IServiceCollection, MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from esmtpkit.core.schedule import Schedule
from esmtpkit.queue.interfaces import IQueueStore
from esmtpkit.mailauth.signing import DEFAULT_SIGN_FROM, parse_headers, parse_keys, parse_sign_from, signer_for
from esmtpkit.queue.runner import Monitors, QueueMonitor, QueueRunner
from esmtpkit.queue.shared import DefaultReactor

__all__ = ["QueueConfig", "QueueService", "parse_relayhost", "parse_servers", "parse_seconds",
           "parse_addresses", "listening_addresses", "TLS_MODES", "BACKENDS", "DEFAULT_AMQP_URL",
           "DEFAULT_AMQP_QUEUE", "DEFAULT_ATTEMPT_TIMEOUT"]

#: How the client uses TLS with the next hop ("implicit", TLS from the first octet, only with a relay host).
TLS_MODES = ("none", "opportunistic", "required", "implicit")
BACKENDS = ("spool", "amqp")
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_AMQP_QUEUE = "outbound"
#: How long one attempt may take with the AMQP backend (seconds): below RabbitMQ's 30-minute consumer timeout.
DEFAULT_ATTEMPT_TIMEOUT = 1200.0

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
    """``dns``: name servers as ``127.0.0.1:5353,[::1]:53,192.0.2.53`` (port 53 unless given); each is an IP
    address (a host name would need a name server to be found)."""
    servers = []
    for item in re.split(r"[,\s]+", text):
        if not item.strip():
            continue
        host, port = _host_port("dns", item, 53)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"dns takes IP addresses with an optional port (127.0.0.1:5353, [::1]:53), "
                             f"not {item!r}") from None
        servers.append((host, port or 53))
    if not servers:
        raise ValueError(f"dns names no server: {text!r}")
    return tuple(servers)


def _readable_file(name: str, path: str) -> str:
    """``path`` when it is a file this process can read; ValueError naming the setting ``name`` otherwise."""
    if not os.path.exists(path):
        raise ValueError(f"{name}: no such file: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"{name}: not a file: {path}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{name}: cannot read {path}")
    return path


def _relayhost(text: str | None) -> str | None:
    """``relayhost`` stripped; None when not given. Given but empty is refused: leaving it out means MX delivery,
    which an empty value must not turn on by mistake."""
    if text is None:
        return None
    if not str(text).strip():
        raise ValueError("relayhost is empty: name a host, or leave relayhost out to deliver by MX")
    return str(text).strip()


def parse_addresses(text: str) -> tuple[str, ...]:
    """``local_addresses``: IP addresses as ``192.0.2.1,2001:db8::1`` (commas or spaces); ValueError otherwise."""
    found = []
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        try:
            found.append(str(ipaddress.ip_address(item.strip("[]"))))
        except ValueError:
            raise ValueError(f"local_addresses takes IP addresses, not {item!r}") from None
    return tuple(found)


def listening_addresses(services: Any, port: int) -> tuple[str, ...]:
    """The concrete addresses (not 0.0.0.0 or ::) the listening ports among ``services`` (a service collection,
    looked into recursively) are bound to on ``port``: where this server itself would receive mail sent there."""
    found: list[str] = []

    def walk(collection: Any, depth: int) -> Iterator[Any]:
        for service in collection:
            yield service
            if depth < 3 and IServiceCollection.providedBy(service):
                yield from walk(service, depth + 1)

    if not IServiceCollection.providedBy(services):
        return ()
    for service in walk(services, 0):
        listening = getattr(service, "port", None)
        if not IListeningPort.providedBy(listening):
            continue
        host = listening.getHost()
        address, bound = getattr(host, "host", None), getattr(host, "port", None)
        if not isinstance(address, str) or bound != port:
            continue
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])
        except ValueError:
            continue
        if not ip.is_unspecified and str(ip) not in found:
            found.append(str(ip))
    return tuple(found)


@dataclass(frozen=True)
class QueueConfig:
    """Everything that makes one queue: where it stores (``backend`` spool in ``spool``, or amqp at
    ``amqp_url``/``amqp_queue``), how it delivers (to ``relayhost`` or by MX to ``port``, asking the name servers
    ``dns`` or the system's), the client's TLS and login, the retry ``schedule``, how many messages at once
    (``concurrency``), whether this process delivers at all (``runner``) and the name it gives (``hostname``).
    ``local_addresses`` are this host's own addresses, never delivered to by MX (a mail loop, RFC 5321 §5.1);
    None: the addresses the server listens on, on ``port``, when they are concrete. ``attempt_timeout`` bounds one
    attempt with the AMQP backend. ``verify`` needs ``tls`` required or implicit: opportunistic TLS would fall
    back to plaintext when the check fails. ``dkim_sign_from``: the clients (IPs and CIDRs, or ``none``) whose
    mail is DKIM-signed without authenticating; the handler judges it when it accepts a message, so it is no part
    of what makes the queue (handlers that differ only in it share one).
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
    local_addresses: tuple[str, ...] | None = None
    attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT
    dkim_sign: str = ""
    dkim_headers: str = ""
    arc_seal: str = ""
    authserv_id: str = ""
    dkim_sign_from: str = field(default=DEFAULT_SIGN_FROM, compare=False)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend takes {' or '.join(BACKENDS)}, not {self.backend!r}")
        if self.tls not in TLS_MODES:
            raise ValueError(f"tls takes one of {', '.join(TLS_MODES)}, not {self.tls!r}")
        if self.verify and self.tls in ("none", "opportunistic"):
            raise ValueError(f"verify=yes needs tls=required or tls=implicit, not tls={self.tls} (opportunistic TLS "
                             "would send in plaintext to a next hop whose certificate fails the check)")
        if not self.attempt_timeout > 0:
            raise ValueError(f"attempt_timeout must be a duration above 0, not {self.attempt_timeout!r}")
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
        for name in ("dkim_sign", "arc_seal"):
            if getattr(self, name):
                try:
                    keys = parse_keys(getattr(self, name))
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
                if name == "arc_seal" and len(keys) != 1:
                    raise ValueError("arc_seal takes one DOMAIN:SELECTOR:KEYFILE")
        try:
            parse_headers(self.dkim_headers)
        except ValueError as e:
            raise ValueError(f"dkim_headers: {e}") from None
        try:
            parse_sign_from(self.dkim_sign_from)
        except ValueError as e:
            raise ValueError(f"dkim_sign_from: {e}") from None
        if self.arc_seal and not self.authserv_id:
            raise ValueError("arc_seal needs authserv_id (the name in this server's Authentication-Results)")

    @classmethod
    def from_options(cls, *, spool: str = "queue", backend: str | None = None, amqp_url: str | None = None,
                     amqp_queue: str | None = None, relayhost: str | None = None, port: int | str = 25,
                     dns: str | None = None, tls: str | None = None, verify: bool | str = False,
                     ca_file: str | None = None, username: str | None = None, password: str | None = None,
                     min_backoff: float | str | None = None, max_backoff: float | str | None = None,
                     lifetime: float | str | None = None, bounce_lifetime: float | str | None = None,
                     delay_warning: float | str | None = None, concurrency: int | str = 20,
                     runner: bool | str = True, hostname: str | None = None,
                     local_addresses: str | None = None,
                     attempt_timeout: float | str | None = None, dkim_sign: str | None = None,
                     dkim_headers: str | None = None, arc_seal: str | None = None,
                     authserv_id: str | None = None,
                     dkim_sign_from: str | Iterable[str] | None = None) -> "QueueConfig":
        """A configuration from settings given as text (``--handler-option key=value``) or as values;
        ValueError naming the setting when one is wrong. Without ``backend``, it is amqp when ``amqp_url`` is
        given, else spool; without ``tls``, required with ``verify``, else opportunistic."""
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
        checked = _flag("verify", verify)
        if not backend:
            backend = "amqp" if amqp_url else "spool"
        if not tls:
            tls = "required" if checked else "opportunistic"
        return cls(
            spool=str(spool), backend=str(backend).strip().lower(), amqp_url=amqp_url or DEFAULT_AMQP_URL,
            amqp_queue=amqp_queue or DEFAULT_AMQP_QUEUE, relayhost=_relayhost(relayhost),
            port=_port("port", port), dns=parse_servers(dns) if dns else None, tls=str(tls).strip().lower(),
            verify=checked, ca_file=_readable_file("ca_file", ca_file) if ca_file else None,
            username=username or None, password=password or None,
            schedule=Schedule(**changes), concurrency=workers, runner=_flag("runner", runner),  # type: ignore[arg-type]
            hostname=hostname or _this_host(),
            local_addresses=parse_addresses(local_addresses) if local_addresses is not None else None,
            attempt_timeout=(parse_seconds("attempt_timeout", attempt_timeout) if attempt_timeout not in (None, "")
                             else DEFAULT_ATTEMPT_TIMEOUT),
            dkim_sign=dkim_sign or "", dkim_headers=dkim_headers or "", arc_seal=arc_seal or "",
            authserv_id=authserv_id or "",
            dkim_sign_from=(DEFAULT_SIGN_FROM if dkim_sign_from is None else dkim_sign_from
                            if isinstance(dkim_sign_from, str) else ",".join(dkim_sign_from)),
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

    #: The reactor for connections and timers (the global one unless given).
    reactor = DefaultReactor()

    def __init__(self, config: QueueConfig, *, reactor: Any = None, store: IQueueStore | None = None,
                 deliverer: Any = None, monitor: QueueMonitor | None = None, stop_timeout: float = 60.0) -> None:
        super().__init__()
        self.config = config
        self.stop_timeout = stop_timeout
        self.monitor = Monitors([monitor] if monitor is not None else [])
        self.reactor = reactor
        self._store = store
        self._own_store = store is None
        self._deliverer = deliverer
        self._runner: QueueRunner | None = None
        self._listening: tuple[str, ...] = ()

    @classmethod
    def shared(cls, config: QueueConfig, reactor: Any = None) -> "QueueService":
        """The process's service for ``config``, made on first use (a stopped one is replaced)."""
        found = cls._shared.get(config)
        if found is None:
            found = cls._shared[config] = cls(config, reactor=reactor)
        return found

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
            config = self.config
            self._runner = QueueRunner(self.store, self.deliverer, reactor=self.reactor,
                                       schedule=config.schedule, hostname=config.hostname, monitor=self.monitor,
                                       signer=signer_for(config.dkim_sign, config.arc_seal, config.authserv_id,
                                                         self.reactor, headers=config.dkim_headers))
        return self._runner

    def _make_store(self) -> IQueueStore:
        config = self.config
        if config.backend == "amqp":
            from esmtpkit.queue.amqp import AMQPStore

            return AMQPStore(config.amqp_url, config.amqp_queue, reactor=self.reactor,  # type: ignore[no-any-return]
                             schedule=config.schedule, concurrency=config.concurrency,
                             attempt_timeout=config.attempt_timeout)
        from esmtpkit.queue.spool import SpoolStore

        return SpoolStore(config.spool, reactor=self.reactor,  # type: ignore[no-any-return]
                          concurrency=config.concurrency, save_failed_delay=config.schedule.max_backoff,
                          wake_others=not config.runner)

    def check(self) -> None:
        """ValueError, one line saying why, unless the store this configuration makes can work: for a spool, its
        folders exist or can be made and a file can be written in each (else every message would get 451)."""
        if self.config.backend != "spool" or not self._own_store:
            return
        folder = os.path.abspath(os.path.expanduser(self.config.spool))
        try:
            for sub in ("incoming", "messages"):
                path = os.path.join(folder, sub)
                os.makedirs(path, mode=0o700, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
                    pass
        except OSError as e:
            reason = (e.strerror or str(e)).lower()
            where = f" ({e.filename})" if e.filename else ""
            raise ValueError(f"queue spool {folder}: not usable: {reason}{where}") from None

    def local_addresses(self) -> tuple[str, ...]:
        """This host's own addresses for MX routing: ``config.local_addresses``, else those the server listens on
        (learned when the service starts)."""
        given = self.config.local_addresses
        return given if given is not None else self._listening

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
                              local_names=(config.hostname,), local_addresses=self.local_addresses())
        return Deliverer(self.reactor, router, options)

    def startService(self) -> None:
        """Start delivering (unless ``config.runner`` is false): what is already queued is offered at once."""
        super().startService()
        if not self.config.runner:
            self.log.info("queue {where}: accepting only; no runner in this process", where=self._where())
            return
        if self.parent is not None:
            self._listening = listening_addresses(self.parent, self.config.port)
        watch = getattr(self.store, "watch_counts", None)
        if callable(watch):
            watch(self.monitor.queue_counts)
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
