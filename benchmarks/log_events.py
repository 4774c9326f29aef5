#!/usr/bin/env python3
"""What one log line costs: every `EventLog` event kind, from the Monitor call to the line written to a file.

In-process, no reactor: ``--count`` calls of each Monitor method that logs, through an `EventLog` whose logger's
observer is esmtpkit's text observer (twistd's lines) or its JSON observer (``--log-format json``), each writing
to a `twisted.python.logfile.LogFile` in a temporary folder under /tmp as twistd would (rotated at 1 MB). Prints
the CPU time per line for each kind and each format, and for the event alone (an observer that drops it): the median
of ``--rounds`` rounds of ``--count`` calls, the rounds of each kind one after the other.

    python benchmarks/log_events.py [--count 2000] [--rounds 15] [--checkout DIR]

``--checkout`` measures another copy of esmtpkit (a folder holding its ``esmtpkit`` package), e.g. an earlier
commit, with this same script.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="calls of each kind per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds, of which the median is shown (default 15)")
    parser.add_argument("--checkout", default=str(Path(__file__).resolve().parent.parent),
                        help="the folder holding the esmtpkit package to measure (default: this checkout)")
    return parser.parse_args()


def calls(monitor: Any) -> dict[str, Callable[[], None]]:
    """One call per event kind, with the values a busy server's events carry."""
    from twisted.internet.address import IPv4Address

    from esmtpkit.core.address import Address
    from esmtpkit.core.reply import Reply
    from esmtpkit.core.session import Envelope, Session

    session = Session(hostname="mx.example.org", peer=IPv4Address("TCP", "203.0.113.7", 40312),
                      host=IPv4Address("TCP", "192.0.2.2", 25), helo="client.example.net", tls=True,
                      tls_info={"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "bits": "256"},
                      authenticated="alice", id="06H0GEFXJATN0RZ1RM21", transactions=3,
                      envelope=Envelope(id="06H0GEFXJT2VB8H00DNC", sender=Address("alice@example.org"),
                                        recipients=[Address("bob@example.net"), Address("carol@example.net")]))
    envelope = session.envelope
    ok, busy = Reply.of(250, "2.0.0 Ok: queued"), Reply.of(421, "4.3.2 Too many connections, try again later")
    unknown, refused = Reply.of(550, "5.1.1 No such user here"), Reply.of(554, "5.7.1 Message refused by policy")
    return {
        "connection.opened": lambda: monitor.connection_opened(session),
        "connection.refused": lambda: monitor.connection_refused(session, busy),
        "connection.closed": lambda: monitor.connection_closed(session, 1.2345, "client sent QUIT"),
        "tls.established": lambda: monitor.tls_established(session),
        "tls.failed": lambda: monitor.tls_failed(session, "SSL routines: unexpected eof while reading"),
        "auth.succeeded": lambda: monitor.auth_succeeded(session, "PLAIN", "alice"),
        "auth.failed": lambda: monitor.auth_failed(session, "LOGIN", "mallory", Reply.of(535)),
        "auth.throttled": lambda: monitor.auth_throttled(session, "address", "mallory", 300.0),
        "reply.error": lambda: monitor.replied(session, "RCPT", unknown),
        "session.timeout": lambda: monitor.timed_out(session, "data"),
        "message.accepted": lambda: monitor.message_accepted(session, envelope, 3172, 0.0042, ok),
        "message.rejected": lambda: monitor.message_rejected(session, envelope, 3172, refused),
        "message.aborted": lambda: monitor.message_aborted(session, envelope, 0, "reset by RSET"),
    }


def measure(observer: Any, count: int, rounds: int) -> dict[str, float]:
    """CPU µs per call of each kind, ``observer`` behind the monitor's logger (the median round)."""
    from twisted.logger import Logger, LogLevel

    from esmtpkit.server.monitor import EventLog

    monitor = EventLog(Logger(namespace="esmtpkit.events", observer=observer), minimum=LogLevel.debug)
    figures = {}
    for kind, call in calls(monitor).items():
        times = []
        for _ in range(rounds):
            start = time.process_time()
            for _ in range(count):
                call()
            times.append(time.process_time() - start)
        figures[kind] = statistics.median(times) / count * 1e6
    return figures


def main() -> None:
    args = arguments()
    sys.path.insert(0, args.checkout)
    from twisted.python.logfile import LogFile

    from esmtpkit.ops import logformat

    columns: dict[str, dict[str, float]] = {"event only": measure(lambda event: None, args.count, args.rounds)}
    with tempfile.TemporaryDirectory(prefix="log-events-", dir="/tmp") as folder:
        for name, observer in (("text", logformat.text_lines_observer), ("json", logformat.json_lines_observer)):
            out = LogFile.fromFullPath(f"{folder}/{name}.log", maxRotatedFiles=2)
            try:
                columns[name] = measure(observer(out), args.count, args.rounds)  # type: ignore[arg-type]
            finally:
                out.close()
    print(f"esmtpkit from {logformat.__file__.rsplit('/esmtpkit/', 1)[0]}: CPU µs per line, the median of "
          f"{args.rounds} rounds of {args.count} calls of each kind\n")
    print("| event | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    kinds = list(columns["text"])
    for kind in kinds:
        print(f"| {kind} | " + " | ".join(f"{column[kind]:.1f}" for column in columns.values()) + " |")
    print("| **mean** | " + " | ".join(f"**{sum(column.values()) / len(kinds):.1f}**"
                                      for column in columns.values()) + " |")


if __name__ == "__main__":
    main()
