"""Where ``twistd esmtpkit`` listens: endpoint strings checked as the options are read, and `Listener`, a service
that binds one endpoint and ends twistd with one line when it cannot.

An endpoint string goes through Twisted's own `serverFromString`, which builds the endpoint without listening, so
an unknown type, a bad argument or a ``systemd:`` socket this process did not inherit is a usage error before
anything starts. A port outside 0..65535 is refused here as well: Twisted would only find out when binding.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from esmtpkit.ops.workers import split_description

__all__ = ["check_endpoint", "Listener", "ListenFailed", "listen_failed"]

#: Endpoint types whose first positional argument (or ``port=``) is a TCP port.
_TCP_KINDS = ("tcp", "tcp6", "ssl")
#: The message of the TypeError a Twisted endpoint parser raises for an argument it does not take.
_BAD_ARGUMENT = re.compile(r"^\w+\(\) (.*)$")

log = Logger()


def check_endpoint(option: str, description: str, reactor: Any) -> None:
    """`usage.UsageError` starting with ``option`` unless Twisted can listen on ``description``: a known endpoint type
    with arguments its parser takes, a TCP port in 0..65535, a ``systemd:`` socket that was passed to this process."""
    _check_port(option, description)
    try:
        serverFromString(reactor, description)
    except (KeyError, IndexError):
        raise usage.UsageError(f"{option}: no such socket was passed to this process") from None
    except TypeError as e:
        detail = _BAD_ARGUMENT.sub(r"\1", str(e))
        raise usage.UsageError(f"{option}: not a valid endpoint string ({detail})") from None
    except OSError as e:
        raise usage.UsageError(f"{option}: cannot read {e.filename or 'a file it names'}: {e.strerror or e}") from None
    except Exception as e:  # a parser's ValueError ("Unknown endpoint type"), or TLS files it cannot load
        raise usage.UsageError(f"{option}: {e}") from None


def _check_port(option: str, description: str) -> None:
    """The port of a ``tcp:``, ``tcp6:`` or ``ssl:`` string (also under ``haproxy:``) must be a number in 0..65535."""
    args, kwargs = split_description(description)
    while args[:1] == ["haproxy"]:
        description = description.partition(":")[2]
        args, kwargs = split_description(description)
    if not args or args[0] not in _TCP_KINDS:
        return
    port = kwargs.get("port", args[1] if len(args) > 1 else "")
    if not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise usage.UsageError(f"{option}: the port must be a number from 0 to 65535, not {port!r}")


class ListenFailed(SystemExit, Exception):
    """An address that cannot be bound: ``twistd esmtpkit`` stops with exit status 1 (`listen_failed` logs why).

    Both bases on purpose. twistd treats an `Exception` from starting the services as a failed start: it removes
    its pid file and, running as a daemon, passes this message to the parent process waiting for the start (which
    would otherwise wait forever), then raises it again. As a `SystemExit` it then ends the process with its
    status, without a traceback.
    """

    def __init__(self, option: str, error: BaseException) -> None:
        super().__init__(1)
        self.option = option
        self.error = error
        where = _where(error)
        self.message = f"cannot listen{' on ' if where else ''}{where} ({option}): {_why(error)}"

    def __str__(self) -> str:
        return self.message


def listen_failed(option: str, error: BaseException) -> ListenFailed:
    """The `ListenFailed` for ``error``, its message logged (one line, in twistd's log) before it is raised."""
    failed = ListenFailed(option, error)
    log.critical("{line}", line=failed.message, option=option)
    return failed


def _where(error: BaseException) -> str:
    """The address of a `CannotListenError`: ``host:port``, ``[v6]:port``, or a Unix socket's path ('' if unknown)."""
    if not isinstance(error, CannotListenError):
        return ""
    if error.interface is None:
        return str(error.port)
    host = error.interface or "0.0.0.0"
    return f"[{host}]:{error.port}" if ":" in host else f"{host}:{error.port}"


def _why(error: BaseException) -> str:
    """What went wrong, as the system says it, in lower case: "address already in use", "permission denied"."""
    reason = getattr(error, "socketError", error)
    text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return text[:1].lower() + text[1:]


class Listener(Service):
    """Listens on ``endpoint`` with ``factory`` while running; ``option`` names what asked for it (``--listen``).

    It binds in `privilegedStartService`, before twistd gives up root (``--uid``), so privileged ports work. An
    endpoint that fails at once raises `ListenFailed` (and logs why); one that fails later (an endpoint that binds
    asynchronously) is logged.
    """

    def __init__(self, option: str, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        self.option = option
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None
        self._listening: Deferred[Any] | None = None
        self._starting = False
        self._failure: Failure | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self._listening is not None:
            return
        self._starting = True
        try:
            self._listening = self.endpoint.listen(self.factory).addCallbacks(self._listened, self._not_listening)
        finally:
            self._starting = False
        failure, self._failure = self._failure, None
        if failure is not None:
            self._listening = None
            raise listen_failed(self.option, failure.value)

    def startService(self) -> None:
        """Listen, unless `privilegedStartService` did already (a service started outside twistd)."""
        super().startService()
        if self._listening is None:
            self.privilegedStartService()

    def stopService(self) -> Deferred[None] | None:
        """Stop listening (or stop trying to); fires when the port is closed."""
        super().stopService()
        listening, self._listening = self._listening, None
        if listening is None:
            return None
        listening.cancel()
        return listening.addCallback(lambda _: self._close())

    def _listened(self, port: IListeningPort) -> None:
        self.port = port

    def _not_listening(self, failure: Failure) -> None:
        if self._starting:
            self._failure = failure
        elif not failure.check(CancelledError):
            log.failure("{option}: cannot listen", failure, option=self.option)

    def _close(self) -> Deferred[None] | None:
        port, self.port = self.port, None
        return None if port is None else port.stopListening()  # type: ignore[return-value]
