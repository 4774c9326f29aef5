"""``twistd esmtpkit --workers N``: one supervisor process binds each listening socket once and runs N workers on it.

The supervisor never accepts a connection. It binds every ``--listen`` socket (or takes the one it inherited from
systemd) and starts N ``twistd esmtpkit`` worker processes with those sockets on fds 3, 4, …: all workers accept
from one shared queue, so a worker that dies loses only its own connections. It re-emits the workers' log events in
its own log, restarts a worker that exits (1 s back-off, doubling to 60 s), and when it stops (SIGTERM) it stops
restarting, sends SIGTERM to every worker (each finishes its transactions in flight, up to ``--shutdown-timeout``)
and kills what is left once that time and a grace period have passed. SIGHUP is passed on to every worker (they
re-read the ``--tls-cert`` files and ``--auth file:`` passwords); without either the supervisor ignores it rather
than stopping.

Workers get their sockets the way systemd passes them (``LISTEN_FDS``, ``LISTEN_FDNAMES``; `esmtpkit.ops._worker` sets
``LISTEN_PID``) and listen with Twisted's ``systemd:`` endpoint, so the code path is the same as under
``systemd`` socket activation. Processes are started with ``spawnProcess`` (fork and exec), never a bare fork.
"""

from __future__ import annotations

import getopt
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from twisted.application.service import IService, MultiService, Service
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import CannotListenError, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import ILogObserver, Logger, LogLevel, eventFromJSON, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure

__all__ = ["supervise", "Supervisor", "SharedSocket", "bind", "shareable", "worker_arguments", "RESTART_DELAY",
           "MAX_RESTART_DELAY", "STABLE_AFTER", "KILL_GRACE"]

#: Seconds before restarting a worker that exited; doubled on each quick exit, up to MAX_RESTART_DELAY.
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 60.0
#: A worker that ran at least this many seconds is restarted after RESTART_DELAY again.
STABLE_AFTER = 60.0
#: Seconds a stopping worker gets beyond its own shutdown timeout before it is killed with SIGKILL.
KILL_GRACE = 10.0
#: Longest line read from a worker's stdout or stderr; longer ones are passed on in pieces.
MAX_LINE = 65536
#: Prefix of the names the sockets carry in the workers' LISTEN_FDNAMES.
FD_NAME = "esmtpkit-listen-"

_DOMAINS = {socket.AF_INET: "INET", socket.AF_INET6: "INET6"}
_RECORD_SEPARATOR = b"\x1e"

log = Logger()


# ---- the shared sockets --------------------------------------------------------------------------------------------

@dataclass
class SharedSocket:
    """One bound, listening socket the workers share; ``description`` is the ``--listen`` string it came from."""

    description: str
    sock: socket.socket
    #: How a worker's --listen names it, around the systemd: endpoint (e.g. "haproxy:{}").
    wrapper: str = "{}"

    @property
    def domain(self) -> str:
        """The address family as Twisted's systemd: endpoint names it (INET, INET6)."""
        return _DOMAINS[self.sock.family]

    def worker_listen(self, index: int) -> str:
        """The ``--listen`` a worker gets for this socket, inherited as fd ``3 + index``."""
        return self.wrapper.format(f"systemd:domain={self.domain}:name={FD_NAME}{index}")

    def address(self) -> str:
        """Where it listens, for the log."""
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def close(self) -> None:
        """Close this process's copy; the socket stays open while workers hold theirs."""
        self.sock.close()


def split_description(description: str) -> tuple[list[str], dict[str, str]]:
    r"""Split an endpoint string as Twisted does: ``kind:arg:key=value``, with ``\:`` and ``\=`` escaped."""
    segments: list[list[str]] = [[""]]
    chars = iter(description)
    for char in chars:
        if char == "\\":
            segments[-1][-1] += next(chars, "")
        elif char == ":":
            segments.append([""])
        elif char == "=":
            segments[-1].append("")
        else:
            segments[-1][-1] += char
    args = [s[0] for s in segments if len(s) == 1]
    kwargs = {s[0]: s[1] for s in segments if len(s) > 1}
    return args, kwargs


def shareable(description: str) -> str:
    """The endpoint type under any ``haproxy:`` prefixes; `usage.UsageError` unless workers can share it."""
    kind = split_description(description)[0][:1]
    if kind == ["haproxy"]:
        return shareable(description.partition(":")[2])
    if kind and kind[0] in ("tcp", "tcp6", "systemd"):
        return kind[0]
    if kind == ["unix"]:
        raise usage.UsageError(f"--workers cannot share unix: listeners ({description!r}): a worker would reset the "
                               "socket's mode to 0666 and remove its path when it stops; listen on tcp: instead")
    raise usage.UsageError(f"--workers can share tcp:, tcp6: and systemd: listeners, not {description!r}")


def bind(description: str, reactor: Any = None) -> SharedSocket:
    """Bind and listen on one ``--listen`` endpoint string, for workers to share.

    ``tcp:`` and ``tcp6:`` take the same arguments as Twisted's endpoints of those names; ``systemd:`` takes the
    socket this process inherited; ``haproxy:`` wraps any of these. Raises `usage.UsageError` for an endpoint that
    cannot be shared (``ssl:``, ``unix:``) and `CannotListenError` when binding fails.
    """
    kind = shareable(description)
    if description.startswith("haproxy:"):
        inner = bind(description.partition(":")[2], reactor)
        inner.description, inner.wrapper = description, "haproxy:" + inner.wrapper
        return inner
    if kind == "systemd":
        return _inherited(description, reactor)
    args, kwargs = split_description(description)
    try:
        return _bind_tcp(description, kind, *args[1:], **kwargs)
    except (TypeError, ValueError):
        raise usage.UsageError(f"--listen {description!r}: not a valid {kind}: endpoint") from None


def _bind_tcp(description: str, kind: str, port: str, interface: str | None = None, backlog: str = "50"
              ) -> SharedSocket:
    if interface is None:
        interface = "::" if kind == "tcp6" else ""
    family = socket.AF_INET6 if kind == "tcp6" or isIPv6Address(interface) else socket.AF_INET
    number, queue = int(port), int(backlog)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As Twisted's own TCP ports do: rebind at once after a restart, despite connections in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((interface, number))
        sock.listen(queue)
    except OSError as e:
        sock.close()
        raise CannotListenError(interface, number, e) from None
    sock.setblocking(False)
    return SharedSocket(description, sock)


def _inherited(description: str, reactor: Any) -> SharedSocket:
    """The socket systemd passed to this process, found by Twisted's own parser of ``systemd:`` strings."""
    from twisted.internet.endpoints import serverFromString

    try:
        endpoint = serverFromString(reactor, description)
        fileno, family = endpoint.fileno, endpoint.addressFamily
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise usage.UsageError(f"--listen {description!r}: no such socket was passed to this process ({e!r})"
                               ) from None
    if family not in _DOMAINS:
        raise usage.UsageError(f"--workers can share inherited INET and INET6 sockets, not {description!r}")
    sock = socket.socket(family, socket.SOCK_STREAM, fileno=fileno)
    sock.setblocking(False)
    return SharedSocket(description, sock)


class SharedSockets(Service):
    """Binds the sockets before privileges are dropped (port 25 needs root); closes this process's copies on stop."""

    def __init__(self, descriptions: Sequence[str], reactor: Any = None) -> None:
        self.descriptions = list(descriptions)
        self.reactor = reactor
        self.sockets: list[SharedSocket] = []

    def privilegedStartService(self) -> None:
        """Bind every socket; one that cannot be bound stops twistd in one line (`esmtpkit.ops.listening.ListenFailed`)."""
        from esmtpkit.ops.listening import listen_failed

        super().privilegedStartService()
        if self.sockets:
            return
        try:
            for description in self.descriptions:
                shared = bind(description, self.reactor)
                self.sockets.append(shared)
                log.info("{description}: listening on {address} for the workers", description=description,
                         address=shared.address())
        except CannotListenError as e:
            self._close()
            raise listen_failed("--listen", e) from None
        except BaseException:
            self._close()
            raise

    def startService(self) -> None:
        self.privilegedStartService()
        super().startService()

    def stopService(self) -> None:
        super().stopService()
        self._close()

    def _close(self) -> None:
        sockets, self.sockets = self.sockets, []
        for shared in sockets:
            shared.close()


# ---- the workers ---------------------------------------------------------------------------------------------------

def worker_arguments(options: usage.Options) -> list[str]:
    """The esmtpkit arguments the supervisor was given, without ``--workers``, ``--listen``, ``--metrics`` and
    ``--log-format`` (however spelled): workers log through the supervisor, which also serves their metrics."""
    pairs, rest = getopt.getopt(options["argv"], options.shortOpt, options.longOpt)
    kept: list[str] = []
    for opt, value in pairs:
        name = opt.lstrip("-")
        canonical = options.synonyms.get(name, options.synonyms.get(name.replace("-", "_"), name))
        if canonical in ("workers", "listen", "metrics", "log-format"):  # the supervisor's own business
            continue
        takes_value = (name + "=" in options.longOpt) if opt.startswith("--") else (name + ":" in options.shortOpt)
        kept.extend([opt, value] if takes_value else [opt])
    return kept + rest


def reactor_name(reactor: Any) -> str | None:
    """The ``twistd --reactor`` name of the running reactor, so workers use the same one; None if unknown."""
    from twisted.application.reactors import getReactorTypes

    module = type(reactor).__module__
    for installer in getReactorTypes():
        if installer.moduleName == module:
            return str(installer.shortName)
    return None


class WorkerProtocol(ProcessProtocol):
    """One worker process: its stdout/stderr lines re-emitted in this process's log, its end reported."""

    def __init__(self, index: int, on_end: Callable[["WorkerProtocol", Failure], None],
                 publish: ILogObserver = globalLogPublisher) -> None:
        self.index = index
        self.pid: int | None = None
        self.started_at = 0.0
        self._on_end = on_end
        self._publish = publish
        self._partial = {1: b"", 2: b""}
        self.ended: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffer = self._partial.get(childFD, b"") + data
        *lines, buffer = buffer.split(b"\n")
        while len(buffer) > MAX_LINE:
            lines.append(buffer[:MAX_LINE])
            buffer = buffer[MAX_LINE:]
        self._partial[childFD] = buffer
        for line in lines:
            self.line_received(childFD, line)

    def line_received(self, fd: int, line: bytes) -> None:
        """A JSON log record from the worker's logger becomes a log event here; any other line is logged as text."""
        if fd == 1 and line.startswith(_RECORD_SEPARATOR):
            try:
                event = eventFromJSON(line[1:].decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                pass
            else:
                self._republish(event)
                return
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        if text:
            self._republish({"log_format": "{line}", "line": text, "log_namespace": __name__,
                             "log_level": LogLevel.info if fd == 1 else LogLevel.warn})

    def _republish(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        origin = event.get("log_system") or \
            f"{event.get('log_namespace', '-')}#{getattr(level, 'name', level) or 'info'}"
        event["log_system"] = f"worker {self.pid} {origin}"
        event["worker_pid"] = self.pid
        event.setdefault("log_time", time.time())
        self._publish(event)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self.line_received(fd, rest)
        self._partial = {1: b"", 2: b""}
        self._on_end(self, reason)
        self.ended.callback(None)


class Supervisor(MultiService):
    """Shares the listening sockets among ``count`` worker processes and keeps that many running.

    ``arguments`` are the esmtpkit arguments for every worker (without --listen); ``stop_timeout`` is how long a
    stopping worker may take before it is killed; ``reload_tls`` says whether workers have files to reload on SIGHUP (certificates, passwords).
    """

    def __init__(self, descriptions: Sequence[str], count: int, arguments: Sequence[str], reactor: Any,
                 stop_timeout: float, python: str = sys.executable,
                 publish: ILogObserver = globalLogPublisher, reload_tls: bool = False,
                 metrics: Any = None) -> None:
        super().__init__()
        self.reload_tls = reload_tls
        self._previous_hangup: Any = None
        self.sockets = SharedSockets(descriptions, reactor)
        self.sockets.setServiceParent(self)
        self.count = count
        self.arguments = list(arguments)
        self.reactor = reactor
        self.stop_timeout = stop_timeout
        self.python = python
        self.publish = publish
        self.workers: dict[int, WorkerProtocol] = {}
        self._delays = [RESTART_DELAY] * count
        self._restarts: dict[int, IDelayedCall] = {}
        #: `esmtpkit.ops.metrics.WorkerMetrics` with --metrics: the workers record, this process serves the sum.
        self.metrics = metrics
        if metrics is not None:
            metrics.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        if hasattr(signal, "SIGHUP"):
            try:
                self._previous_hangup = signal.signal(signal.SIGHUP, self._on_hangup)
            except ValueError:  # not the main thread: hangup() can still be called
                log.warn("cannot handle SIGHUP outside the main thread; call hangup() to pass it to the workers")
        self.reactor.callWhenRunning(self._start_all)

    def _on_hangup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.hangup)

    def hangup(self) -> None:
        """``kill -HUP`` of the supervisor: pass SIGHUP on to every worker, which re-reads its TLS and password files."""
        if not self.reload_tls:
            log.info("SIGHUP ignored: without --tls-cert or --auth file: the workers have nothing to reload")
            return
        workers = list(self.workers.values())
        log.info("SIGHUP: passing it on to {count} worker(s)", count=len(workers))
        for worker in workers:
            _signal(worker, "HUP")

    def _start_all(self) -> None:
        for index in range(self.count):
            if self.running and index not in self.workers and index not in self._restarts:
                self.start_worker(index)

    def command(self) -> list[str]:
        """The worker command line: twistd, through `esmtpkit.ops._worker`, serving the inherited sockets."""
        twistd = ["-n", "--pidfile=", "--logger=esmtpkit.ops._worker.log_observer"]
        name = reactor_name(self.reactor)
        if name is not None:
            twistd.append(f"--reactor={name}")
        listen = [arg for i, shared in enumerate(self.sockets.sockets) for arg in ("--listen", shared.worker_listen(i))]
        return [self.python, "-m", "esmtpkit.ops._worker", *twistd, "esmtpkit", *self.arguments, *listen]

    def environment(self) -> dict[str, str]:
        """This process's environment, with the sockets described as systemd would (LISTEN_PID is the worker's own)."""
        env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
        env["LISTEN_FDS"] = str(len(self.sockets.sockets))
        env["LISTEN_FDNAMES"] = ":".join(f"{FD_NAME}{i}" for i in range(len(self.sockets.sockets)))
        if self.metrics is not None:
            env.update(self.metrics.environment)
        return env

    def start_worker(self, index: int) -> None:
        """Start worker ``index``; if that fails, try again later, as if it had exited at once."""
        self._restarts.pop(index, None)
        worker = WorkerProtocol(index, self._ended, self.publish)
        fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        fds.update({3 + i: shared.sock.fileno() for i, shared in enumerate(self.sockets.sockets)})
        worker.started_at = self.reactor.seconds()
        try:
            self.reactor.spawnProcess(worker, self.python, self.command(), env=self.environment(), childFDs=fds)
        except OSError as e:
            log.error("cannot start worker {index}: {error}", index=index, error=e)
            self._schedule_restart(index, ran_for=0.0)
            return
        self.workers[index] = worker
        log.info("worker {index} started: pid {pid}", index=index, pid=worker.pid)

    def _ended(self, worker: WorkerProtocol, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.metrics is not None and worker.pid is not None:
            self.metrics.worker_ended(worker.pid)
        how = _exit_status(reason)
        if not self.running:
            log.info("worker {index} (pid {pid}) stopped: {how}", index=worker.index, pid=worker.pid, how=how)
            return
        log.warn("worker {index} (pid {pid}) {how}", index=worker.index, pid=worker.pid, how=how)
        self._schedule_restart(worker.index, ran_for=self.reactor.seconds() - worker.started_at)

    def _schedule_restart(self, index: int, ran_for: float) -> None:
        if ran_for >= STABLE_AFTER:
            self._delays[index] = RESTART_DELAY
        delay = self._delays[index]
        self._delays[index] = min(delay * 2, MAX_RESTART_DELAY)
        log.info("restarting worker {index} in {delay:g} s", index=index, delay=delay)
        self._restarts[index] = self.reactor.callLater(delay, self.start_worker, index)

    def stopService(self) -> "Deferred[Any]":
        """Stop restarting, close this process's sockets, SIGTERM every worker, SIGKILL those left at the deadline."""
        if hasattr(signal, "SIGHUP") and self._previous_hangup is not None:
            signal.signal(signal.SIGHUP, self._previous_hangup)
            self._previous_hangup = None
        restarts, self._restarts = self._restarts, {}
        for call in restarts.values():
            if call.active():
                call.cancel()
        stopped = super().stopService()
        workers = list(self.workers.values())
        for worker in workers:
            _signal(worker, "TERM")
        if not workers:
            return stopped
        deadline = self.reactor.callLater(self.stop_timeout, self._kill, workers)

        def done(result: Any) -> Any:
            if deadline.active():
                deadline.cancel()
            return result

        ended = DeferredList([w.ended for w in workers] + [stopped], consumeErrors=True)
        return ended.addBoth(done)

    def _kill(self, workers: list[WorkerProtocol]) -> None:
        for worker in workers:
            if not worker.ended.called:
                log.warn("worker {index} (pid {pid}) still running {timeout:g} s after SIGTERM: SIGKILL",
                         index=worker.index, pid=worker.pid, timeout=self.stop_timeout)
                _signal(worker, "KILL")


def _exit_status(reason: Failure) -> str:
    """How a process ended, for the log: "exited with status 1", "ended by SIGTERM"."""
    code, number = getattr(reason.value, "exitCode", None), getattr(reason.value, "signal", None)
    if number is None:
        return f"exited with status {code}"
    try:
        return f"ended by {signal.Signals(number).name}"
    except ValueError:
        return f"ended by signal {number}"


def _signal(worker: WorkerProtocol, name: str) -> None:
    try:
        worker.transport.signalProcess(name)  # type: ignore[union-attr]
    except (ProcessExitedAlready, OSError):
        pass


def supervise(options: usage.Options, reactor: Any = None, reload_tls: bool = False) -> IService:
    """The service of ``twistd esmtpkit --workers N``: a `Supervisor` for the parsed options; ``reload_tls`` says
    whether ``kill -HUP`` has files to re-read (the workers are told to re-read them)."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    for description in options["listen"]:
        shareable(description)
    from esmtpkit.ops.backlog import sized_listeners

    metrics = None
    if options["metrics"]:
        from esmtpkit.ops.metrics import WorkerMetrics

        metrics = WorkerMetrics(options["metrics"], reactor)
    listen = sized_listeners(options["listen"], options["policy"].max_connections)
    return Supervisor(listen, options["workers"], worker_arguments(options), reactor,
                      stop_timeout=options["policy"].shutdown_timeout + KILL_GRACE,
                      reload_tls=reload_tls, metrics=metrics)
