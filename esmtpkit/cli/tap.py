"""``twistd esmtpkit``: command-line options turned into a service (listeners, policy, handler).

The plugin in ``twisted/plugins/esmtpkit_plugin.py`` only points here; everything testable lives in this module.
TLS (``--tls-cert``), AUTH (twistd's usual ``--auth``, from ``twisted.cred.strcred``) and the other extensions
become `Policy` fields; ``ssl:`` listeners without their own key serve the ``--tls-cert`` certificate.
"""

from __future__ import annotations

import inspect
import os
import re
import signal
import sys
import tempfile
from typing import Any, Callable

from twisted.application.service import IService, Service
from twisted.cred import strcred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger, LogLevel
from twisted.python import reflect, usage

from esmtpkit.cli.filter_options import FilterOptions, build_filters
from esmtpkit.cli.mailauth_options import MailAuthOptions, build_mail_auth, check_mail_auth, signing_kwargs
from esmtpkit.ops.backlog import sized_listeners
from esmtpkit.ops.listening import Listener, check_endpoint
from esmtpkit.server import sasl
from esmtpkit.server.authfile import PasswordFileError, password_files, replace_file_databases
from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.server.interfaces import IMessageHandler
from esmtpkit.server.monitor import EventLog, Monitor, Monitors, guarded
from esmtpkit.server.policy import Policy
from esmtpkit.server.proxy import DEFAULT_TIMEOUT as DEFAULT_PROXY_TIMEOUT
from esmtpkit.server.service import ESMTPService
from esmtpkit.server.tls import ServerTLS, TLSConfigError

__all__ = ["Options", "makeService", "DEFAULT_LISTEN", "DEFAULT_HANDLER", "USAGE_ERROR", "installed_version"]

DEFAULT_LISTEN = "tcp:2525:interface=127.0.0.1"
DEFAULT_HANDLER = "esmtpkit.handlers.maildir.Maildir"
#: Exit status of ``twistd esmtpkit`` when its command line is wrong (nothing was started).
USAGE_ERROR = 2


def installed_version() -> str:
    """The version of the installed esmtpkit distribution (the package's own when it is run uninstalled)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("esmtpkit")
    except PackageNotFoundError:
        from esmtpkit import __version__

        return f"{__version__} (not installed)"


def _positive_int(name: str) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise usage.UsageError(f"--{name} takes a whole number, not {value!r}") from None
        if number < 0:
            raise usage.UsageError(f"--{name} must not be negative, not {value!r}")
        return number

    return parse


def _not_negative(name: str) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise usage.UsageError(f"--{name} takes seconds, not {value!r}") from None
        if not number >= 0 or number == float("inf"):
            raise usage.UsageError(f"--{name} takes a finite number of seconds, 0 or more, not {value!r}")
        return number

    return parse


def _seconds(name: str) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise usage.UsageError(f"--{name} takes seconds, not {value!r}") from None
        if not number > 0:
            raise usage.UsageError(f"--{name} takes a number of seconds above 0, not {value!r}")
        return number

    return parse


class Options(MailAuthOptions, FilterOptions, strcred.AuthOptionMixin, usage.Options):
    """Options of ``twistd esmtpkit``."""

    synopsis = "[options]"
    longdesc = ("Run an ESMTP server whose every verb is decided by a handler class (default: deliver to a Maildir). "
                "--listen takes any Twisted endpoint string and may be repeated. --auth (repeatable) names the "
                "credential checkers for AUTH; --help-auth lists the kinds. A wrong option stops it with one line on "
                "stderr and exit status 2; an address it cannot listen on, with exit status 1.")
    #: What our SASL mechanisms produce; --auth accepts checkers for these (PLAIN/LOGIN, and CRAM-MD5).
    supportedInterfaces = sasl.SUPPORTED_INTERFACES

    optFlags = [
        ["require-tls", None, "MAIL before STARTTLS gets 530 5.7.0 (needs --tls-cert or an ssl: listener)."],
        ["auth-over-plaintext", None, "Offer and accept AUTH before TLS too (for a loopback or private network)."],
        ["require-auth", None, "MAIL before a successful AUTH gets 530 5.7.0 (a submission server; needs --auth)."],
        ["no-chunking", None, "Do not offer CHUNKING (BDAT) or BINARYMIME (RFC 3030)."],
        ["no-binarymime", None, "Offer CHUNKING without BINARYMIME."],
        ["dsn", None, "Offer DSN (RFC 3461): its parameters reach the handler, which must honour them."],
        ["lmtp", None, "Speak LMTP (RFC 2033) instead of SMTP: LHLO, one reply per recipient after the message."],
        ["proxy-protocol", None, "Every --listen endpoint expects a PROXY header (v1 or v2, as HAProxy sends) first."],
        ["reuse-port", None, "Bind tcp:/tcp6: listeners with SO_REUSEPORT, so other processes can bind the same port."],
        ["amqp-refuse-when-down", None, "AMQP handler: greet with 421 while the broker is unreachable."],
    ]

    optParameters = [
        ["handler", None, DEFAULT_HANDLER, "Handler class, as module.Class, providing IMessageHandler."],
        ["hostname", None, None, "Name the server gives in its greeting and trace headers (default: this host's FQDN)."],
        ["max-message-size", None, Policy.max_message_size, "Largest message in bytes (SIZE); 0 for no limit.",
         _positive_int("max-message-size")],
        ["max-recipients", None, Policy.max_recipients, "Most recipients per message.", _positive_int("max-recipients")],
        ["timeout", None, Policy.command_timeout, "Seconds to wait for a command before closing with 421.",
         _seconds("timeout")],
        ["data-timeout", None, Policy.data_timeout, "Seconds to wait for the next piece of a message.",
         _seconds("data-timeout")],
        ["error-limit", None, Policy.error_limit,
         "Client errors (5xx replies) after which the connection is closed; 0 for none.",
         _positive_int("error-limit")],
        ["bare-newline", None, Policy.bare_newline, "What a bare CR or LF in a message gets: reject or allow."],
        ["max-connections", None, Policy.max_connections, "Most simultaneous connections; 0 for no limit.",
         _positive_int("max-connections")],
        ["max-connections-per-client", None, Policy.max_connections_per_client,
         "Most simultaneous connections from one IP address; 0 for no limit.",
         _positive_int("max-connections-per-client")],
        ["max-transactions", None, Policy.max_transactions, "Most messages per connection; 0 for no limit.",
         _positive_int("max-transactions")],
        ["junk-command-limit", None, Policy.junk_command_limit,
         "NOOP/RSET/VRFY/EXPN/HELP/HELO/EHLO commands a session may send before each counts as an error; 0: none.",
         _positive_int("junk-command-limit")],
        ["max-line-length", None, Policy.max_line_length,
         "Longest header line in a message, CRLF included; 0 for no limit of its own.",
         _positive_int("max-line-length")],
        ["max-header-size", None, Policy.max_header_size, "Largest header section of a message in bytes; 0 for no "
         "limit.", _positive_int("max-header-size")],
        ["soft-error-limit", None, Policy.soft_error_limit, "Errors after which --error-delay applies.",
         _positive_int("soft-error-limit")],
        ["error-delay", None, Policy.error_delay, "Seconds of silence after each error beyond --soft-error-limit.",
         _not_negative("error-delay")],
        ["pregreet-delay", None, Policy.pregreet_delay,
         "Seconds to wait before the greeting; clients that talk first are refused. 0: off.",
         _not_negative("pregreet-delay")],
        ["shutdown-timeout", None, Policy.shutdown_timeout,
         "Seconds transactions in flight may take to finish when the server stops.", _not_negative("shutdown-timeout")],
        ["tls-cert", None, None, "PEM file with the server certificate (and chain) for STARTTLS and ssl: listeners."],
        ["tls-key", None, None, "PEM file with the certificate's private key (default: read from --tls-cert)."],
        ["auth-mechanisms", None, ",".join(sasl.DEFAULT_ORDER), "SASL mechanisms to offer, comma-separated, in order."],
        ["auth-failure-limit", None, Policy.auth_failure_limit,
         "Wrong passwords from one address (IPv6: /64) before AUTH from it gets 454 for --auth-cool-off; 0: none.",
         _positive_int("auth-failure-limit")],
        ["auth-user-failure-limit", None, Policy.auth_user_failure_limit,
         "Wrong passwords for one user name, from any address, before its cool-off; 0: none.",
         _positive_int("auth-user-failure-limit")],
        ["auth-cool-off", None, Policy.auth_cool_off,
         "Seconds AUTH is refused after a failure limit is reached; 0 turns password-guessing limits off.",
         _not_negative("auth-cool-off")],
        ["auth-failure-delay", None, Policy.auth_failure_delay,
         "Seconds the reply to a wrong password is held beyond --auth-delay-after failures (doubling); 0: none.",
         _not_negative("auth-failure-delay")],
        ["auth-delay-after", None, Policy.auth_delay_after,
         "Wrong passwords from one address or user name answered without delay.", _positive_int("auth-delay-after")],
        ["maildir", None, "Maildir", "Maildir folder for the Maildir handler (created if missing)."],
        ["workers", None, "1", "Worker processes sharing the listening sockets: a number, or auto for one per CPU."],
        ["proxy-timeout", None, DEFAULT_PROXY_TIMEOUT, "Seconds a connection may take to send its PROXY header.",
         _seconds("proxy-timeout")],
        ["amqp-url", None, None, "AMQP handler, or Queue handler on RabbitMQ: the broker, e.g. "
         "amqp://user:pass@127.0.0.1:5672/%2F."],
        ["amqp-queue", None, None, "AMQP handler: the (quorum) queue to publish to (default: mail); "
         "Queue handler: its queue on the broker (default: outbound)."],
        ["amqp-confirm-timeout", None, None, "AMQP handler: seconds to wait for the broker's confirm (default 30).",
         _seconds("amqp-confirm-timeout")],
        ["metrics", None, None, "Serve Prometheus metrics at /metrics on this endpoint, e.g. "
         "tcp:9101:interface=127.0.0.1 (off by default)."],
        ["log-events", None, "all", "Connection and message events to log: all, warn (refused connections and "
         "AUTH failures only) or none."],
        ["log-format", None, "text", "text (twistd's own log lines) or json (one JSON object per line, for log "
         "shippers), written where twistd's --logfile says."],
    ]

    def __init__(self) -> None:
        super().__init__()
        # Option docstrings keep their indentation on Python 3.11, which --help's wrapping would show as runs of
        # spaces where a docstring breaks its line.
        self.docs = {name: " ".join(doc.split()) if isinstance(doc, str) else doc for name, doc in self.docs.items()}
        self["listen"] = []
        self["handler-options"] = {}
        self["proxy-trusted"] = []
        self["extensions"] = []
        self["trusted-networks"] = []

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse, keeping the raw arguments (``self["argv"]``) so a supervisor can pass them on to workers.

        Run by twistd (as its ``esmtpkit`` command), a usage error ends the process with one line saying what is
        wrong and one pointing to ``--help``, on stderr, and exit status `USAGE_ERROR` (twistd would print the
        whole help first, on stdout). Called directly, it raises `usage.UsageError` as any `usage.Options` does.
        """
        self["argv"] = list(sys.argv[1:] if options is None else options)
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            sys.stderr.write(f"twistd esmtpkit: {_one_line(e)}\nsee twistd esmtpkit --help\n")
            raise SystemExit(USAGE_ERROR) from None

    def getSynopsis(self) -> str:
        """The usage line, and which esmtpkit (and Twisted) this is."""
        from twisted import version as twisted

        return f"{super().getSynopsis()}\nesmtpkit {installed_version()} (Twisted {twisted.short()})"

    def opt_version(self) -> None:
        """Show the esmtpkit, Twisted and Python versions, and exit."""
        import platform

        from twisted import version as twisted

        print(f"esmtpkit {installed_version()} (Twisted {twisted.short()}, Python {platform.python_version()})")
        sys.exit(0)

    def opt_auth(self, description: str) -> None:
        """A checker for AUTH, e.g. memory:user:password, file:PATH (user:password lines, re-read on SIGHUP) or
        unix; repeat for several. --help-auth lists the kinds, --help-auth-type KIND explains one."""
        kind, _, argument = description.partition(":")
        if kind == "file" and argument.strip():
            try:
                with open(argument, "rb"):
                    pass
            except OSError as e:
                raise usage.UsageError(f"--auth {description}: cannot read it: {(e.strerror or str(e)).lower()}"
                                       ) from None
        try:
            super().opt_auth(description)
        except usage.UsageError as e:
            raise usage.UsageError(f"--auth {description}: {e}") from None

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, e.g. tcp:25, ssl:465:privateKey=k.pem:certKey=c.pem, unix:/run/smtp.sock,
        systemd:domain=INET6:name=smtp. Repeat for several. Default: tcp:2525:interface=127.0.0.1."""
        self["listen"].append(description)

    def opt_proxy_trusted(self, network: str) -> None:
        """A proxy address or network allowed to send PROXY headers (repeatable; default 127.0.0.0/8 and ::1/128)."""
        import ipaddress

        try:
            ipaddress.ip_network(network)
        except ValueError as e:
            raise usage.UsageError(f"--proxy-trusted: {e}") from None
        self["proxy-trusted"].append(network)

    def opt_extension(self, name: str) -> None:
        """An ESMTP extension to offer beyond the standard ones (repeatable, in EHLO order): one of LIMITS,
        RRVS, DELIVERBY, MT-PRIORITY, REQUIRETLS, XCLIENT, XFORWARD, or module.Class providing IExtension."""
        from esmtpkit.server.extensions import ExtensionError, resolve

        try:
            self["extensions"].append(resolve(name))
        except ExtensionError as e:
            raise usage.UsageError(f"--extension {name}: {e}") from None

    def opt_trusted_network(self, network: str) -> None:
        """A client network (CIDR) trusted to use XCLIENT and XFORWARD (repeatable; none by default)."""
        import ipaddress

        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError as e:
            raise usage.UsageError(f"--trusted-network: {e}") from None
        self["trusted-networks"].append(network)

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
        from esmtpkit.ops._reuseport import check_reuse_port

        check_reuse_port(self)
        if self["workers"] > 1:
            from esmtpkit.ops.workers import shareable

            for description in self["listen"]:
                shareable(description)
        check_endpoints(self)
        check_proxy(self)
        if self["bare-newline"] not in ("reject", "allow"):
            raise usage.UsageError(f"--bare-newline takes reject or allow, not {self['bare-newline']!r}")
        check_log_format(self)
        self["tls"] = load_tls(self)
        self["portal"] = build_auth(self)
        check_mail_auth(self)
        self["mail-auth"] = build_mail_auth(self)
        self["filter-chain"] = build_filters(self)
        self["handler-class"] = load_handler(self["handler"])
        self["handler-factory"] = handler_factory(self["handler-class"], self)
        self["policy"] = build_policy(self)


#: How `getopt` words an unknown option or a missing value: "option --timeout requires argument".
_GETOPT_ERROR = re.compile(r"^option (-{1,2}\S+) (.*)$")


def _one_line(error: usage.UsageError) -> str:
    """A usage error as one line that starts with the option: "--timeout requires argument"."""
    text = " ".join(str(error).split())
    return _GETOPT_ERROR.sub(r"\1: \2", text)


def check_endpoints(options: usage.Options) -> None:
    """Every ``--listen`` string, and ``--metrics``, must be an endpoint Twisted can listen on (`check_endpoint`).

    An ``ssl:`` listener without a key of its own is TCP wrapped in the ``--tls-cert`` certificate, so it is
    checked as ``tcp:``.
    """
    from twisted.internet import reactor

    for description in options["listen"]:
        built = "tcp:" + description[len("ssl:"):] if _own_tls(description) else description
        check_endpoint(f"--listen {description}", built, reactor)
    if options["metrics"]:
        check_endpoint(f"--metrics {options['metrics']}", options["metrics"], reactor)


def check_log_format(options: usage.Options) -> None:
    """Have twistd log through esmtpkit's observers (its ``--logger``): `esmtpkit.ops.logformat.json_observer` for
    ``--log-format json``, and `text_observer` (the same lines as twistd's, cheaper) for text unless twistd was
    given ``--logger`` or ``--syslog``."""
    if options["log-format"] not in ("text", "json"):
        raise usage.UsageError(f"--log-format takes text or json, not {options['log-format']!r}")
    if options["log-events"] not in ("all", "warn", "none"):
        raise usage.UsageError(f"--log-events takes all, warn or none, not {options['log-events']!r}")
    twistd = getattr(options, "parent", None)
    if twistd is None:
        return
    if options["log-format"] == "text":
        # twistd's own text observer formats every line the general way (about 30 us); esmtpkit's writes the same
        # bytes for a third of that. Only where twistd would use its default observer on a file or stdout.
        if not (twistd.get("syslog") or twistd.get("logger")
                or (twistd.get("logfile") == "-" and not twistd.get("nodaemon"))):
            from esmtpkit.ops.logformat import use_text

            twistd["logger"] = use_text(twistd.get("logfile"), bool(twistd.get("nodaemon")))
        return
    if twistd.get("syslog"):
        raise usage.UsageError("--log-format json writes to twistd's --logfile; it cannot go with --syslog")
    if twistd.get("logger"):
        raise usage.UsageError("--log-format json chooses twistd's log observer; leave out --logger")
    if twistd.get("logfile") == "-" and not twistd.get("nodaemon"):
        raise usage.UsageError("a daemon cannot log to stdout: give --logfile PATH or -n")
    from esmtpkit.ops.logformat import use_json

    twistd["logger"] = use_json(twistd.get("logfile"), bool(twistd.get("nodaemon")))


def build_monitor(options: usage.Options) -> Monitor:
    """The factory's monitor: the event log (as ``--log-events`` says), plus Prometheus `Metrics` with ``--metrics``
    (or in a worker whose supervisor serves them: it sets ``ESMTPKIT_METRICS`` and ``PROMETHEUS_MULTIPROC_DIR``)."""
    import os

    chosen = options["log-events"]
    monitors: list[Monitor] = []
    if chosen != "none":
        monitors.append(EventLog(minimum=LogLevel.warn if chosen == "warn" else LogLevel.info))
    if options["metrics"] or os.environ.get("ESMTPKIT_METRICS"):
        from esmtpkit.ops.metrics import Metrics

        options["metrics-recorder"] = metrics = Metrics()
        monitors.append(metrics)
    if len(monitors) == 1:
        return monitors[0]
    return Monitors(monitors) if monitors else Monitor()


def check_proxy(options: usage.Options) -> None:
    """``--proxy-*`` options: trusted networks need --proxy-protocol; haproxy:/ssl: listeners cannot take it."""
    if not options["proxy-protocol"]:
        if options["proxy-trusted"]:
            raise usage.UsageError("--proxy-trusted needs --proxy-protocol")
        return
    for description in options["listen"]:
        if description.startswith("haproxy:"):
            raise usage.UsageError(f"--listen {description}: --proxy-protocol reads the header already; use tcp:")
        if description.startswith("ssl:"):
            raise usage.UsageError(f"--listen {description}: with --proxy-protocol the header comes before TLS; "
                                   "use tcp: (implicit TLS behind a proxy: terminate TLS at the proxy)")


def _own_tls(description: str) -> bool:
    """True for an ``ssl:`` listener that names no key of its own (it serves the ``--tls-cert`` certificate)."""
    return description.startswith("ssl:") and "privateKey=" not in description and "certKey=" not in description


def load_tls(options: usage.Options) -> ServerTLS | None:
    """``--tls-cert``/``--tls-key`` as a `ServerTLS` (None without them); unusable files are a usage error."""
    if options["tls-key"] and not options["tls-cert"]:
        raise usage.UsageError("--tls-key needs --tls-cert")
    bare = [d for d in options["listen"] if _own_tls(d)]
    if not options["tls-cert"]:
        if bare:
            raise usage.UsageError(f"--listen {bare[0]} names no privateKey=: give --tls-cert (and --tls-key)")
        if options["require-tls"] and not any(d.startswith("ssl:") for d in options["listen"]):
            raise usage.UsageError("--require-tls needs --tls-cert (or an ssl: listener)")
        return None
    try:
        return ServerTLS(options["tls-cert"], options["tls-key"])
    except TLSConfigError as e:
        given = f"--tls-cert {options['tls-cert']}" + (f" --tls-key {options['tls-key']}" if options["tls-key"] else "")
        raise usage.UsageError(f"{given}: {e}") from None


def build_auth(options: usage.Options) -> Any:
    """The Portal for ``--auth`` checkers (None without any), checked against ``--auth-mechanisms``."""
    checkers = options.get("credCheckers") or []
    if not checkers:
        for flag in ("require-auth", "auth-over-plaintext"):
            if options[flag]:
                raise usage.UsageError(f"--{flag} needs --auth")
        return None
    try:
        checkers = replace_file_databases(checkers)  # read once, re-read on SIGHUP (see ReloadOnHangup)
    except PasswordFileError as e:
        raise usage.UsageError(f"--auth file: {e}") from None
    portal = sasl.build_portal(checkers)
    names = [n.strip().upper() for n in options["auth-mechanisms"].split(",") if n.strip()]
    unknown = [n for n in names if n not in sasl.MECHANISMS]
    if unknown:
        raise usage.UsageError(f"--auth-mechanisms: unknown {', '.join(unknown)} (known: {', '.join(sasl.MECHANISMS)})")
    if not sasl.mechanisms_for(portal, names):
        raise usage.UsageError(f"no mechanism among {', '.join(names)} can be checked by the --auth checkers")
    return portal


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
        raise usage.UsageError(f"--handler {name}: cannot import it: {e} (twistd does not put the current folder "
                               "on the import path: if the module is there, run with PYTHONPATH=.)") from None
    except Exception as e:  # the module itself failed while it was imported
        raise usage.UsageError(f"--handler {name}: importing it failed: {_described(e)}") from None
    if isinstance(found, type) and IMessageHandler.implementedBy(found):
        return found
    if isinstance(found, type) or not callable(found):
        raise usage.UsageError(f"--handler {name}: does not provide {IMessageHandler.__name__}")
    return found


def _described(error: BaseException) -> str:
    """An exception as one line: its type and message."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def handler_factory(cls: Any, options: usage.Options) -> Callable[[], Any]:
    """A zero-argument callable making one handler per connection, with the options that handler accepts."""
    kwargs: dict[str, Any] = dict(options["handler-options"])
    accepts = _parameters(cls)
    named = {"path": options["maildir"], "url": options["amqp-url"], "queue": options["amqp-queue"],
             "amqp_url": options["amqp-url"], "amqp_queue": options["amqp-queue"],
             "confirm_timeout": options["amqp-confirm-timeout"],
             "refuse_when_down": True if options["amqp-refuse-when-down"] else None,
             "hostname": options["hostname"]}
    for key, value in named.items():
        if value is not None and accepts is not None and key in accepts and key not in kwargs:
            kwargs[key] = value
    for key, value in signing_kwargs(options).items():
        if accepts is not None and key not in accepts:
            option = {"dkim_sign": "--dkim-sign", "dkim_headers": "--dkim-headers",
                      "dkim_sign_from": "--dkim-sign-from"}.get(key, "--arc-seal")
            raise usage.UsageError(f"{option}: {options['handler']} does not send mail on (the Queue and Relay "
                                   "handlers do)")
        kwargs.setdefault(key, value)
    unknown = [k for k in kwargs if accepts is not None and k not in accepts]
    if unknown:
        raise usage.UsageError(f"--handler-option {', '.join(sorted(unknown))}: {options['handler']} takes no such "
                               "keyword")
    options["handler-kwargs"] = dict(kwargs)
    if "path" in kwargs and _is_maildir(cls):
        given = "--handler-option path=" if "path" in options["handler-options"] else "--maildir "
        check_maildir(f"{given}{kwargs['path']}", kwargs["path"])

    def make() -> Any:
        handler = cls(**kwargs)
        if not IMessageHandler.providedBy(handler):
            raise TypeError(f"{handler!r} does not provide IMessageHandler")
        return handler

    try:
        sample = make()
        close = getattr(sample, "close", None)
        if callable(close):
            close()
    except Exception as e:  # whatever the constructor raises: the server could not make a handler at all
        raise usage.UsageError(f"--handler {options['handler']}: cannot make one: {_described(e)}") from None
    return make


def _is_maildir(cls: Any) -> bool:
    """True for esmtpkit's Maildir handler and its subclasses (whose ``path`` is a Maildir)."""
    from esmtpkit.handlers.maildir import Maildir

    return isinstance(cls, type) and issubclass(cls, Maildir)


def check_maildir(option: str, path: str) -> None:
    """`usage.UsageError` starting with ``option`` unless mail can be delivered to the Maildir at ``path``: its
    ``tmp``, ``new`` and ``cur`` folders exist or can be made, and a file can be written in ``tmp`` (a probe,
    removed at once). Otherwise every message would get 451 4.3.0 and be deferred by its sender forever."""
    folder = os.path.abspath(os.path.expanduser(path))
    try:
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(folder, sub), mode=0o700, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=os.path.join(folder, "tmp"), prefix=".probe-") as probe:
            probe.write(b"\r\n")
            probe.flush()
    except OSError as e:
        reason = (e.strerror or str(e)).lower()
        where = f" ({e.filename})" if e.filename else ""
        raise usage.UsageError(f"{option}: not a usable Maildir: {reason}{where}") from None


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
        junk_command_limit=options["junk-command-limit"],
        max_line_length=options["max-line-length"],
        max_header_size=options["max-header-size"],
        soft_error_limit=options["soft-error-limit"],
        error_delay=options["error-delay"],
        pregreet_delay=options["pregreet-delay"],
        shutdown_timeout=options["shutdown-timeout"],
        chunking=not options["no-chunking"],
        binarymime=not options["no-binarymime"],
        dsn=bool(options["dsn"]),
        lmtp=bool(options["lmtp"]),
        tls_context=options["tls"],
        require_tls=bool(options["require-tls"]),
        portal=options["portal"],
        auth_mechanisms=options["auth-mechanisms"],
        auth_require_tls=not options["auth-over-plaintext"],
        require_auth=bool(options["require-auth"]),
        auth_failure_limit=options["auth-failure-limit"],
        auth_user_failure_limit=options["auth-user-failure-limit"],
        auth_cool_off=options["auth-cool-off"],
        auth_failure_delay=options["auth-failure-delay"],
        auth_delay_after=options["auth-delay-after"],
        extensions=tuple(options["extensions"]),
        trusted_networks=tuple(options["trusted-networks"]),
    )
    fronts: list[Any] = []
    if options.get("mail-auth") is not None:
        from esmtpkit.handlers.mailauth import mail_auth_front

        fronts.append(mail_auth_front(options["mail-auth"]))
    if options.get("filter-chain") is not None:
        from esmtpkit.handlers.filtering import filter_front

        fronts.append(filter_front(options["filter-chain"]))  # inside the checks: filters see their results
    if fronts:
        kwargs["fronts"] = tuple(fronts)
    if options["hostname"]:
        kwargs["hostname"] = options["hostname"]
    try:
        return Policy(**kwargs)
    except ValueError as e:  # the options check their own values first; this names the field as an option
        raise usage.UsageError(re.sub(r"\b([a-z]+(?:_[a-z]+)+)\b", _as_option, str(e))) from None


def _as_option(field: re.Match[str]) -> str:
    return "--" + field.group(1).replace("_", "-")


def makeService(options: usage.Options, reactor: Any = None) -> IService:
    """One listening service per ``--listen``, all serving the same factory (or a supervisor of N workers).

    Each is a `Listener`: an address it cannot bind stops twistd with one line and exit status 1.
    """
    if options["workers"] > 1:
        from esmtpkit.ops.workers import supervise

        return supervise(options, reactor=reactor, reload_tls=bool(reloadables(options)))
    if reactor is None:
        from twisted.internet import reactor as default

        reactor = default
    monitor = build_monitor(options)
    factory = ESMTPFactory(options["handler-factory"], policy=options["policy"], clock=reactor, monitor=monitor)
    if options.get("mail-auth") is not None:
        # the checks' verdicts go to the same log and metrics; guarded, so a failing monitor cannot fail a check
        options["mail-auth"].monitor = guarded(factory.monitor)
    if options.get("filter-chain") is not None:
        options["filter-chain"].monitor = guarded(factory.monitor)
    top = ESMTPService(factory)  # the ESMTPFactory itself: shutdown drains its connections
    if options["metrics"]:
        from esmtpkit.ops.metrics import metrics_site

        site = metrics_site(options["metrics-recorder"].registry)
        Listener("--metrics", serverFromString(reactor, options["metrics"]), site).setServiceParent(top)
    listening: Any = factory
    if options["proxy-protocol"]:
        from esmtpkit.server.proxy import DEFAULT_TRUSTED, ProxyProtocolFactory

        listening = ProxyProtocolFactory(factory, trusted=options["proxy-trusted"] or DEFAULT_TRUSTED,
                                         timeout=options["proxy-timeout"], clock=reactor)
    tls = options["tls"]
    for description in sized_listeners(options["listen"], options["policy"].max_connections):
        if options.get("reuse-port"):
            from esmtpkit.ops._reuseport import reuse_port_service

            svc = reuse_port_service(description, listening, reactor)
        elif tls is not None and _own_tls(description):
            svc = _tls_listener(description, tls, listening, reactor)
        else:
            svc = Listener("--listen", serverFromString(reactor, description), listening)
        svc.setServiceParent(top)
    parts = reloadables(options)
    if parts:
        ReloadOnHangup(parts, reactor).setServiceParent(top)
    attach_process_service(top, options)
    return top


def attach_process_service(top: Any, options: usage.Options) -> IService | None:
    """The handler class's per-process service, if it has one, started and stopped with ``top``.

    A handler class may define a classmethod ``process_service(**handler_kwargs)`` returning an `IService` (or
    None): the queue handler's delivery runner is one. With ``--metrics`` the service's own metrics, if ops knows
    it (`esmtpkit.ops.queue_metrics.watch`), go on the same registry as the server's. A `usage.UsageError` from
    the hook (a resource the service cannot use) ends twistd with that one line and exit status 1.
    """
    make = getattr(options.get("handler-class"), "process_service", None)
    if make is None:
        return None
    try:
        service = make(**options.get("handler-kwargs", {}))
    except usage.UsageError as e:  # e.g. a queue spool that cannot be written: one line, before anything listens
        sys.stderr.write(f"twistd esmtpkit: {_one_line(e)}\n")
        raise SystemExit(1) from None
    if service is None:
        return None
    recorder = options.get("metrics-recorder")
    if recorder is not None:
        from esmtpkit.ops.queue_metrics import watch

        watch(service, recorder.registry)
    service.setServiceParent(top)
    return service  # type: ignore[no-any-return]


def _tls_listener(description: str, tls: ServerTLS, factory: Any, reactor: Any) -> IService:
    """``ssl:PORT[:interface=...]`` without a key: TCP wrapped in TLS with the (reloadable) ``--tls-cert``."""
    from twisted.internet.endpoints import wrapServerTLS

    endpoint = wrapServerTLS(tls, serverFromString(reactor, "tcp:" + description[len("ssl:"):]), clock=reactor)
    return Listener("--listen", endpoint, factory)


def reloadables(options: usage.Options) -> list[Any]:
    """What ``kill -HUP`` re-reads for these options: the `ServerTLS`, then each `PasswordFile` of the portal."""
    found: list[Any] = [] if options.get("tls") is None else [options["tls"]]
    if options.get("portal") is not None:
        found.extend(password_files(options["portal"]))
    return found


class ReloadOnHangup(Service):
    """``kill -HUP``: re-read the ``--tls-cert``/``--tls-key`` files and ``--auth file:`` password files for new
    connections and logins (see `ServerTLS.reload`, `PasswordFile.reload`); sessions in progress keep theirs.

    ``reloadables`` is one object with a ``reload()`` method, or a list of them.
    """

    log = Logger()

    def __init__(self, reloadables: Any, reactor: Any = None) -> None:
        self.reloadables: list[Any] = [reloadables] if hasattr(reloadables, "reload") else list(reloadables)
        self.reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        if hasattr(signal, "SIGHUP"):
            try:
                self._previous = signal.signal(signal.SIGHUP, self._hangup)
            except ValueError:  # not the main thread (an embedding application): no signal, reload() still works
                self.log.warn("cannot handle SIGHUP outside the main thread; call reload() to re-read the files")

    def stopService(self) -> None:
        if hasattr(signal, "SIGHUP") and self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        return super().stopService()  # type: ignore[no-any-return]

    def _hangup(self, signum: int, frame: Any) -> None:
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor
        reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """Reload each part now; a part whose files are unusable is logged and keeps what it had."""
        for part in self.reloadables:
            try:
                part.reload()
            except TLSConfigError as e:
                self.log.error("TLS certificate not reloaded: {error}", error=str(e))
            except PasswordFileError as e:
                self.log.error("AUTH password file not reloaded: {error}", error=str(e))
            except Exception:
                self.log.failure("{part!r} not reloaded", part=part)


__all__ += ["check_log_format", "build_monitor"]
__all__ += ["attach_process_service"]
__all__ += ["load_handler", "handler_factory", "build_policy", "load_tls", "build_auth", "reloadables",
            "ReloadOnHangup"]
