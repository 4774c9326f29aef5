"""``esmtpkit-queue``: look into and manage the outbound queue, as Postfix's ``mailq``, ``postqueue -f`` and
``postsuper`` do, and run a queue runner on its own (``run``).

Each subcommand is a function adding its parser to the subparsers (`SUBCOMMANDS`); the parser it adds names the
function that runs it (``run=``), which returns the exit status. Errors are one line on stderr, status 1.

The spool backend (``--spool DIR``) supports every subcommand. With ``--backend amqp`` the queue is in RabbitMQ,
where a message cannot be found or changed in place: ``list`` shows how many messages wait in each queue,
``flush`` moves every waiting retry to the main queue, and ``hold``, ``release`` and ``delete`` are refused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, NoReturn, Sequence, TextIO

from twisted.logger import Logger

from esmtpkit.core.escape import escape
from esmtpkit.core.outbound import Message
from esmtpkit.queue.service import (BACKENDS, DEFAULT_AMQP_QUEUE, DEFAULT_AMQP_URL, TLS_MODES, QueueConfig,
                                    parse_seconds)
from esmtpkit.queue.spool import NoSuchMessage, SpoolError
from esmtpkit.queue.spool_admin import SpoolAdmin

__all__ = ["main", "build_parser", "SUBCOMMANDS", "PROG", "DEFAULT_SPOOL", "open_store", "queue_config",
           "CommandError"]

PROG = "esmtpkit-queue"
#: The spool directory when ``--spool`` is not given: the Queue handler's default, relative to where it runs.
DEFAULT_SPOOL = "queue"
#: Where the text of ``list`` starts its sender and recipient column.
_INDENT = " " * 53
#: Settings whose option is spelt with a hyphen (``--min-backoff``), as errors name them.
_HYPHENATED = re.compile(r"\b(min|max|bounce|delay|ca|amqp)_(backoff|lifetime|warning|file|url|queue)\b")

_log = Logger()


class UsageError(Exception):
    """The command line could not be understood."""


class CommandError(Exception):
    """The command could not do what was asked; the text says why in one line."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes become one line and status 1, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def open_store(args: argparse.Namespace) -> SpoolAdmin:
    """The management calls on the spool ``--spool`` names; SpoolError if there is no such directory, or if it
    lacks a spool's ``messages`` folder (another folder named by mistake, which would look like an empty queue)."""
    if not os.path.isdir(args.spool):
        raise SpoolError(f"no spool directory: {args.spool}")
    store = SpoolAdmin(args.spool)
    if not os.path.isdir(store.paths.messages):
        raise SpoolError(f"not a spool directory: {args.spool}")
    return store


def queue_config(args: argparse.Namespace) -> QueueConfig:
    """The `QueueConfig` the options describe, exactly as the Queue handler's settings would; ValueError naming
    the option when one is wrong."""
    try:
        return QueueConfig.from_options(
            spool=args.spool, backend=args.backend, amqp_url=args.amqp_url, amqp_queue=args.amqp_queue,
            relayhost=getattr(args, "relayhost", None), port=getattr(args, "port", 25), dns=getattr(args, "dns", None),
            tls=getattr(args, "tls", None), verify=getattr(args, "verify", False),
            ca_file=getattr(args, "ca_file", None), username=getattr(args, "username", None),
            password=getattr(args, "password", None), min_backoff=args.min_backoff, max_backoff=args.max_backoff,
            lifetime=getattr(args, "lifetime", None), bounce_lifetime=getattr(args, "bounce_lifetime", None),
            delay_warning=getattr(args, "delay_warning", None), concurrency=getattr(args, "concurrency", 20),
            hostname=getattr(args, "hostname", "localhost"),  # only run names this host (EHLO, notices)
            local_addresses=getattr(args, "local_addresses", None),
            attempt_timeout=getattr(args, "attempt_timeout", None))
    except ValueError as e:
        raise ValueError(_HYPHENATED.sub(r"\1-\2", str(e))) from None


# ---- list ---------------------------------------------------------------------------------------------------------

def _when(seconds: float) -> str:
    return time.strftime("%a %b %e %H:%M:%S", time.localtime(seconds))


def _show(message: Message, out: TextIO) -> None:
    """One message as ``mailq`` shows it: id (``!`` when held), size, arrival, sender; then each recipient."""
    mark = "!" if message.held else " "
    sender = escape(message.sender) if message.sender else "<>"
    out.write(f"{message.id:>20}{mark} {message.size:>8} {_when(message.arrived):<20}  {sender}\n")
    attempts = f"{message.attempts} attempt{'s' if message.attempts != 1 else ''}"
    state = "held" if message.held else f"next attempt {_when(message.next_attempt)}"
    out.write(f"{_INDENT}{attempts}, {state}\n")
    for recipient in message.recipients:
        out.write(f"{_INDENT}{escape(recipient.address)}  {recipient.status.value}\n")
        outcome = recipient.outcome
        if outcome is not None:
            remote = f" ({escape(outcome.remote)})" if outcome.remote else ""
            out.write(f"{_INDENT}  {escape(str(outcome))}{remote}\n")


def _list(args: argparse.Namespace) -> int:
    if args.backend == "amqp":
        return _list_amqp(args)
    store = open_store(args)
    out = sys.stdout
    count = size = status = 0

    def skipped(id: str, error: ValueError) -> None:
        nonlocal status
        _error(f"skipped {id}: {error}")
        status = 1

    for message in store.list(skipped):
        if args.json:
            out.write(json.dumps(message.to_json()) + "\n")
            continue
        if not count:
            out.write(f"{'-Queue ID-':<21} {'--Size--':>8} {'----Arrival Time----':<20}  -Sender/Recipient-------\n")
        _show(message, out)
        out.write("\n")
        count += 1
        size += message.size
    if not args.json:
        if count:
            plural = "s" if count != 1 else ""
            out.write(f"-- {math.ceil(size / 1024)} Kbytes in {count} Request{plural}.\n")
        else:
            out.write("Mail queue is empty\n")
    return status


def _list_amqp(args: argparse.Namespace) -> int:
    counts: dict[str, int] = _with_amqp_store(args, lambda store: store.counts())
    if args.json:
        print(json.dumps(counts))
        return 0
    for name, count in counts.items():
        print(f"{count:>8}  {name}")
    total = sum(counts.values())
    print(f"-- {total} message{'s' if total != 1 else ''} waiting (those being delivered are not counted).")
    return 0


# ---- flush, hold, release, delete ---------------------------------------------------------------------------------

def _each(args: argparse.Namespace, action: Callable[[SpoolAdmin, str], Any], done: str,
          unchanged: str = "") -> int:
    """Run ``action`` on every id given, reporting each (with ``unchanged`` when it returns False: nothing to
    do); status 1 if any failed."""
    store = open_store(args)
    status = 0
    for id in args.ids:
        try:
            changed = action(store, id)
        except (SpoolError, OSError, ValueError) as e:
            _error(str(e))
            status = 1
        else:
            print(f"{unchanged if changed is False and unchanged else done}: {id}")
    return status


def _needs_spool(args: argparse.Namespace, what: str) -> None:
    if args.backend != "spool":
        raise CommandError(f"{what} needs the spool backend: RabbitMQ cannot find or change one message in place")


def _flush(args: argparse.Namespace) -> int:
    if args.backend == "amqp" and not args.ids:
        moved: int = _with_amqp_store(args, lambda store: store.flush())
        print(f"{moved} message{'s' if moved != 1 else ''} due now")
        return 0
    _needs_spool(args, "flush ID")
    if not args.ids:
        count = open_store(args).flush()
        print(f"{count} message{'s' if count != 1 else ''} due now")
        return 0

    def one(store: SpoolAdmin, id: str) -> None:
        if not store.flush([id]) and store.get(id).held:
            raise SpoolError(f"message is held, release it first: {id}")

    return _each(args, one, "due now")


def _hold(args: argparse.Namespace) -> int:
    _needs_spool(args, "hold")
    return _each(args, SpoolAdmin.hold, "held", "already held")


def _release(args: argparse.Namespace) -> int:
    _needs_spool(args, "release")
    return _each(args, SpoolAdmin.release, "released", "not held")


def _delete(args: argparse.Namespace) -> int:
    _needs_spool(args, "delete")
    if args.ids != ["ALL"]:
        if "ALL" in args.ids:
            raise UsageError("ALL stands alone: delete ALL")
        return _each(args, SpoolAdmin.delete, "deleted")
    store = open_store(args)
    status = count = 0
    for id in store.ids():
        try:
            store.delete(id)
        except NoSuchMessage:
            continue  # delivered or deleted meanwhile
        except (SpoolError, OSError) as e:
            _error(str(e))
            status = 1
        else:
            count += 1
    print(f"deleted {count} message{'s' if count != 1 else ''}")
    return status


# ---- RabbitMQ -----------------------------------------------------------------------------------------------------

def _with_amqp_store(args: argparse.Namespace, work: Callable[[Any], Any]) -> Any:
    """Run ``work(store)`` (a Deferred) on the RabbitMQ queue the options name, in the reactor; its result.
    CommandError when the broker cannot be reached or refuses."""
    from twisted.internet import reactor
    from twisted.internet.defer import maybeDeferred
    from twisted.python.failure import Failure

    from esmtpkit.queue.amqp import AMQPStore, NotQueued, safe_url

    config = queue_config(args)
    store = AMQPStore(config.amqp_url, config.amqp_queue, reactor=reactor, schedule=config.schedule,
                      connect_timeout=args.timeout, confirm_timeout=args.timeout)
    results: list[Any] = []

    def go() -> None:
        done = maybeDeferred(work, store)
        done.addBoth(lambda result: results.append(result) or store.stop())
        done.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()  # type: ignore[attr-defined]
    if not results:
        raise KeyboardInterrupt
    result = results[0]
    if isinstance(result, Failure):
        if result.check(NotQueued):
            raise CommandError(f"RabbitMQ at {safe_url(config.amqp_url)}: {result.value}")
        result.raiseException()
    return result


# ---- run ----------------------------------------------------------------------------------------------------------

def _run(args: argparse.Namespace) -> int:
    """Deliver from the queue until SIGTERM or SIGINT, then stop once the attempts under way are saved."""
    _password(args)
    config = queue_config(args)
    if config.backend == "spool" and not os.path.isdir(config.spool):
        raise SpoolError(f"no spool directory: {config.spool}")
    from twisted.internet import reactor
    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner,
                                textFileLogObserver)

    from esmtpkit.queue.service import QueueService

    observer = FilteringLogObserver(textFileLogObserver(sys.stdout), [LogLevelFilterPredicate(LogLevel.info)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    service = QueueService(config, reactor=reactor, stop_timeout=args.stop_timeout)
    status = 0

    def start() -> None:
        nonlocal status
        try:
            service.startService()
        except Exception as e:
            _error(f"cannot start the queue: {e}")
            status = 1
            reactor.stop()  # type: ignore[attr-defined]
            return
        reactor.addSystemEventTrigger("before", "shutdown", stop)  # type: ignore[attr-defined]

    def stop() -> Any:
        _log.info("stopping: waiting for the attempts under way (at most {timeout:g} s)", timeout=args.stop_timeout)
        return service.stopService().addCallback(lambda _: _log.info("stopped"))

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return status


def _password(args: argparse.Namespace) -> None:
    """Read ``--password-file`` into ``args.password`` (its first line), so that no password shows in ``ps``."""
    if args.password_file is None:
        return
    if args.password is not None:
        raise UsageError("give --password or --password-file, not both")
    try:
        with open(args.password_file, encoding="utf-8") as file:
            args.password = file.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror.lower() if isinstance(e, OSError) and e.strerror else str(e)
        raise CommandError(f"--password-file {args.password_file}: {reason}") from None


# ---- the command line ---------------------------------------------------------------------------------------------

def _add_list(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("list", parents=[common, _schedule_options(False)], help="show the queue (mailq)",
                                 description="Show every queued message: id (! when held), size, arrival time, "
                                             "sender, and each recipient with its status and last outcome. With "
                                             "--backend amqp: how many messages wait in each queue.")
    parser.add_argument("--json", action="store_true", help="one JSON object per message and line")
    parser.set_defaults(run=_list)


def _add_flush(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("flush", parents=[common, _schedule_options(False)],
                                 help="make messages due now (postqueue -f / -i)",
                                 description="Make the messages named (default: all but held ones) due now; a "
                                             "running queue picks them up within a second. With --backend amqp: "
                                             "move every message waiting for a retry to the main queue.")
    parser.add_argument("ids", nargs="*", metavar="ID")
    parser.set_defaults(run=_flush)


def _add_hold(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("hold", parents=[common], help="keep messages from delivery (postsuper -h)",
                                 description="Keep the messages named from delivery until they are released.")
    parser.add_argument("ids", nargs="+", metavar="ID")
    parser.set_defaults(run=_hold)


def _add_release(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("release", parents=[common], help="release held messages (postsuper -H)",
                                 description="Let held messages go again, at their next attempt time.")
    parser.add_argument("ids", nargs="+", metavar="ID")
    parser.set_defaults(run=_release)


def _add_delete(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("delete", parents=[common], help="remove messages, no bounce (postsuper -d)",
                                 description="Remove the messages named, or every message with ALL, without "
                                             "telling their senders.")
    parser.add_argument("ids", nargs="+", metavar="ID|ALL")
    parser.set_defaults(run=_delete)


def _add_run(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "run", parents=[common, _schedule_options(True)], help="deliver from the queue until stopped",
        description="Deliver the queued messages, as the Queue handler's runner does, with no SMTP listener: "
                    "until SIGTERM or Ctrl-C, after which it waits for the attempts under way. Other processes "
                    "(servers with runner=no, or other runners) may share the queue.")
    route = parser.add_argument_group("where messages go")
    route.add_argument("--relayhost", metavar="HOST", help="send everything to one host: host, [host], host:port, "
                                                           "[host]:port (default: each domain's MX hosts)")
    route.add_argument("--port", default="25", help="the port of the MX hosts (default: 25)")
    route.add_argument("--dns", metavar="SERVERS", help="name servers to ask, 127.0.0.1:5353,[::1]:53 (default: "
                                                        "the system's)")
    route.add_argument("--tls", metavar="MODE",
                       help=f"TLS with the next hop: {', '.join(TLS_MODES)} (default: opportunistic; required "
                            "with --verify)")
    route.add_argument("--verify", action="store_true",
                       help="check the next hop's certificate and name (needs --tls required or implicit)")
    route.add_argument("--ca-file", metavar="FILE", help="PEM file of the authorities to trust with --verify")
    route.add_argument("--username", help="log in to the relay host (over TLS only)")
    route.add_argument("--password", help="the password for --username (other users see it in ps: prefer "
                                          "--password-file)")
    route.add_argument("--password-file", metavar="FILE", help="read the password from the first line of FILE")
    route.add_argument("--hostname", help="the name given in EHLO and in notices (default: this host's name)")
    route.add_argument("--local-addresses", metavar="ADDRESSES",
                       help="this host's own IP addresses, never delivered to by MX (a loop): 192.0.2.1,2001:db8::1")
    parser.add_argument("--attempt-timeout", metavar="DURATION",
                        help="with --backend amqp: the longest one attempt may take, below RabbitMQ's "
                             "consumer_timeout (default: 20m)")
    parser.add_argument("--concurrency", default="20", metavar="N", help="messages delivered at once (default: 20)")
    parser.add_argument("--stop-timeout", default=60.0, type=_seconds, metavar="SECONDS",
                        help="how long a stop waits for the attempts under way (default: 60)")
    parser.set_defaults(run=_run)


def _seconds(text: str) -> float:
    """A number of seconds above zero, for argparse."""
    try:
        return parse_seconds("it", text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration above 0: {text!r}") from None


def _schedule_options(full: bool) -> argparse.ArgumentParser:
    """The retry settings: ``--min-backoff`` and ``--max-backoff`` (which also name RabbitMQ's delay queues),
    and with ``full`` the lifetimes and the delay warning."""
    parser = _Parser(add_help=False)
    group = parser.add_argument_group("retries")
    group.add_argument("--min-backoff", metavar="DURATION",
                       help="wait after the first failed attempt, doubled after each (default: 300; 30m, 4h ...)")
    group.add_argument("--max-backoff", metavar="DURATION", help="the longest wait between attempts (default: 4000)")
    if full:
        group.add_argument("--lifetime", metavar="DURATION", help="retry a message this long (default: 5d)")
        group.add_argument("--bounce-lifetime", metavar="DURATION",
                           help="retry a notice this long (default: 5d)")
        group.add_argument("--delay-warning", metavar="DURATION",
                           help="send a delay notice once a message is this old (default: none)")
    return parser


#: Each adds one subcommand: ``add(subparsers, common)``, where ``common`` is a parent parser with the options
#: every subcommand also takes after its name (``--spool``, ``--backend`` ...).
SUBCOMMANDS: list[Callable[[Any, argparse.ArgumentParser], None]] = [
    _add_list, _add_flush, _add_hold, _add_release, _add_delete, _add_run,
]


def _where_options(parser: argparse.ArgumentParser, default: Callable[[Any], Any]) -> None:
    """The options saying where the queue is, with ``default(value)`` as each one's default."""
    parser.add_argument("--spool", default=default(DEFAULT_SPOOL), metavar="DIR",
                        help=f"the spool directory (default: {DEFAULT_SPOOL})")
    parser.add_argument("--backend", default=default("spool"), choices=BACKENDS,
                        help="where the queue is: spool (a directory) or amqp (RabbitMQ) (default: spool)")
    parser.add_argument("--amqp-url", default=default(DEFAULT_AMQP_URL), metavar="URL",
                        help="the broker with --backend amqp (default: amqp://guest:guest@127.0.0.1:5672/%%2F)")
    parser.add_argument("--amqp-queue", default=default(DEFAULT_AMQP_QUEUE), metavar="NAME",
                        help=f"the queue with --backend amqp (default: {DEFAULT_AMQP_QUEUE})")
    parser.add_argument("--timeout", default=default(30.0), type=_seconds, metavar="SECONDS",
                        help="how long list and flush wait for RabbitMQ with --backend amqp (default: 30)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the whole command line, with every subcommand of `SUBCOMMANDS`."""
    parser = _Parser(prog=PROG, description="Look into and manage the outbound queue, or deliver from it (run).")
    _where_options(parser, lambda value: value)
    common = _Parser(add_help=False)
    _where_options(common, lambda value: argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(commands, common)
    return parser


def _error(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``esmtpkit-queue`` with ``argv`` (default: the process's arguments); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.run(args))
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        _error(f"{e} (try {PROG} --help)")
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the reader went away (| head): nothing more to say
    except (CommandError, SpoolError, OSError, ValueError) as e:
        _error(str(e))
    except KeyboardInterrupt:
        return 130
    return 1
