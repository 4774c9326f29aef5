"""``twistd esmtpkit``: command-line options turned into a service (listeners, policy, handler).

The plugin in ``twisted/plugins/esmtpkit_plugin.py`` only points here; everything testable lives in this module.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from twisted.application import strports
from twisted.application.service import IService
from twisted.python import reflect, usage

from .factory import ESMTPFactory
from .interfaces import IMessageHandler
from .policy import Policy
from .service import ESMTPService

__all__ = ["Options", "makeService", "DEFAULT_LISTEN", "DEFAULT_HANDLER"]

DEFAULT_LISTEN = "tcp:2525:interface=127.0.0.1"
DEFAULT_HANDLER = "esmtpkit.handlers.maildir.Maildir"


def _positive_int(name: str) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise usage.UsageError(f"--{name} takes a whole number, not {value!r}") from None
        if number < 0:
            raise usage.UsageError(f"--{name} must not be negative")
        return number

    return parse


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise usage.UsageError(f"a timeout takes seconds, not {value!r}") from None
    if number <= 0:
        raise usage.UsageError("a timeout must be positive")
    return number


class Options(usage.Options):
    """Options of ``twistd esmtpkit``."""

    synopsis = "[options]"
    longdesc = ("Run an ESMTP server whose every verb is decided by a handler class (default: deliver to a Maildir). "
                "--listen takes any Twisted endpoint string and may be repeated.")

    optParameters = [
        ["handler", None, DEFAULT_HANDLER, "Handler class, as module.Class, providing IMessageHandler."],
        ["hostname", None, None, "Name the server gives in its greeting and trace headers (default: this host's FQDN)."],
        ["max-message-size", None, Policy.max_message_size, "Largest message in bytes (SIZE); 0 for no limit.",
         _positive_int("max-message-size")],
        ["max-recipients", None, Policy.max_recipients, "Most recipients per message.", _positive_int("max-recipients")],
        ["timeout", None, Policy.command_timeout, "Seconds to wait for a command before closing with 421.", _seconds],
        ["data-timeout", None, Policy.data_timeout, "Seconds to wait for the next piece of a message.", _seconds],
        ["error-limit", None, Policy.error_limit, "Errors after which the connection is closed; 0 for none.",
         _positive_int("error-limit")],
        ["bare-newline", None, Policy.bare_newline, "What a bare CR or LF in a message gets: reject or allow."],
        ["max-connections", None, Policy.max_connections, "Most simultaneous connections; 0 for no limit.",
         _positive_int("max-connections")],
        ["max-connections-per-client", None, Policy.max_connections_per_client,
         "Most simultaneous connections from one IP address; 0 for no limit.",
         _positive_int("max-connections-per-client")],
        ["max-transactions", None, Policy.max_transactions, "Most messages per connection; 0 for no limit.",
         _positive_int("max-transactions")],
        ["soft-error-limit", None, Policy.soft_error_limit, "Errors after which --error-delay applies.",
         _positive_int("soft-error-limit")],
        ["error-delay", None, Policy.error_delay, "Seconds of silence after each error beyond --soft-error-limit.",
         float],
        ["pregreet-delay", None, Policy.pregreet_delay,
         "Seconds to wait before the greeting; clients that talk first are refused. 0: off.", float],
        ["shutdown-timeout", None, Policy.shutdown_timeout,
         "Seconds transactions in flight may take to finish when the server stops.", float],
        ["maildir", None, "Maildir", "Maildir folder for the Maildir handler (created if missing)."],
        ["workers", None, "1", "Worker processes sharing the listening sockets: a number, or auto for one per CPU."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["handler-options"] = {}

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse, keeping the raw arguments (``self["argv"]``) so a supervisor can pass them on to workers."""
        import sys

        self["argv"] = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, e.g. tcp:25, ssl:465:privateKey=k.pem:certKey=c.pem, unix:/run/smtp.sock,
        systemd:domain=INET6:name=smtp. Repeat for several. Default: tcp:2525:interface=127.0.0.1."""
        self["listen"].append(description)

    def opt_handler_option(self, pair: str) -> None:
        """A keyword argument for the handler class, as key=value (repeatable)."""
        key, eq, value = pair.partition("=")
        if not eq or not key.isidentifier():
            raise usage.UsageError(f"--handler-option takes key=value, not {pair!r}")
        self["handler-options"][key] = value

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        self["workers"] = parse_workers(self["workers"])
        if self["bare-newline"] not in ("reject", "allow"):
            raise usage.UsageError("--bare-newline takes reject or allow")
        self["handler-class"] = load_handler(self["handler"])
        self["handler-factory"] = handler_factory(self["handler-class"], self)
        self["policy"] = build_policy(self)


def parse_workers(value: str) -> int:
    """``--workers``: a positive number, or ``auto`` for the number of CPUs this process may use."""
    if value == "auto":
        import os

        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        number = int(value)
    except ValueError:
        raise usage.UsageError(f"--workers takes a number or auto, not {value!r}") from None
    if number < 1:
        raise usage.UsageError("--workers must be at least 1")
    return number


def load_handler(name: str) -> Any:
    """Import ``module.Class`` and check that it makes IMessageHandler providers; UsageError otherwise."""
    if "." not in name:
        raise usage.UsageError(f"--handler takes module.Class, not {name!r}")
    try:
        found = reflect.namedAny(name)
    except (reflect.ModuleNotFound, reflect.ObjectNotFound, reflect.InvalidName, AttributeError, ImportError) as e:
        raise usage.UsageError(f"cannot import handler {name!r}: {e}") from None
    if isinstance(found, type) and IMessageHandler.implementedBy(found):
        return found
    if isinstance(found, type) or not callable(found):
        raise usage.UsageError(f"handler {name!r} does not provide {IMessageHandler.__name__}")
    return found


def handler_factory(cls: Any, options: usage.Options) -> Callable[[], Any]:
    """A zero-argument callable making one handler per connection, with the options that handler accepts."""
    kwargs: dict[str, Any] = dict(options["handler-options"])
    accepts = _parameters(cls)
    if "path" in accepts and "path" not in kwargs:
        kwargs["path"] = options["maildir"]
    unknown = [k for k in kwargs if accepts is not None and k not in accepts]
    if unknown:
        raise usage.UsageError(f"handler {options['handler']} takes no option(s) {', '.join(sorted(unknown))}")

    def make() -> Any:
        handler = cls(**kwargs)
        if not IMessageHandler.providedBy(handler):
            raise TypeError(f"{handler!r} does not provide IMessageHandler")
        return handler

    try:
        sample = make()
    except TypeError as e:
        raise usage.UsageError(f"cannot build handler {options['handler']}: {e}") from None
    close = getattr(sample, "close", None)
    if callable(close):
        close()
    return make


def _parameters(cls: Any) -> set[str] | None:
    """Keyword parameters a handler class takes; None when it takes any (**kwargs) or cannot be inspected."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return {name for name, p in signature.parameters.items()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def build_policy(options: usage.Options) -> Policy:
    """The Policy described by the options."""
    kwargs: dict[str, Any] = dict(
        max_message_size=options["max-message-size"],
        max_recipients=options["max-recipients"],
        command_timeout=options["timeout"],
        data_timeout=options["data-timeout"],
        error_limit=options["error-limit"],
        bare_newline=options["bare-newline"],
        max_connections=options["max-connections"],
        max_connections_per_client=options["max-connections-per-client"],
        max_transactions=options["max-transactions"],
        soft_error_limit=options["soft-error-limit"],
        error_delay=options["error-delay"],
        pregreet_delay=options["pregreet-delay"],
        shutdown_timeout=options["shutdown-timeout"],
    )
    if options["hostname"]:
        kwargs["hostname"] = options["hostname"]
    try:
        return Policy(**kwargs)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


def makeService(options: usage.Options, reactor: Any = None) -> IService:
    """One listening service per ``--listen``, all serving the same factory (or a supervisor of N workers)."""
    if options["workers"] > 1:
        from .workers import supervise

        return supervise(options, reactor=reactor)
    factory = ESMTPFactory(options["handler-factory"], policy=options["policy"], clock=reactor)
    top = ESMTPService(factory)
    for description in options["listen"]:
        svc = strports.service(description, factory, reactor=reactor)
        svc.setServiceParent(top)
    return top


__all__ += ["load_handler", "handler_factory", "build_policy"]
