#!/usr/bin/env python3
"""Profile esmtpkit's protocol in-process: the bytes of a benchmark scenario fed to one `ESMTPProtocol`.

No sockets and no reactor: a `StringTransport` and a `Clock`, so the profile shows only esmtpkit's own work
(parsing, the step queue, replies, the DATA decoder) and Twisted's LineReceiver, not epoll or the kernel.

    python benchmarks/profile_protocol.py one-session|per-connection|pipelined|big [--count N] [--top 25] [--sort tottime]

Run it with the interpreter esmtpkit is installed in (e.g. /tmp/venv/bin/python).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout first

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from esmtpkit.handlers.null import Null  # noqa: E402
from esmtpkit.server.policy import Policy  # noqa: E402
from esmtpkit.server.protocol import ESMTPProtocol  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import MIB, RECIPIENT, SENDER, body_block, message_1k  # noqa: E402


class Sink(StringTransport):
    """A transport that counts reply bytes instead of keeping them."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
                         hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
        self.written = 0
        self.replies250 = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.replies250 += data.count(b"\r\n250 ")
        if data.startswith(b"250 "):
            self.replies250 += 1


def connect(policy: Policy) -> tuple[ESMTPProtocol, Sink]:
    proto = ESMTPProtocol(Null(), policy, Clock())
    transport = Sink()
    proto.makeConnection(transport)
    return proto, transport


def one_session(proto: ESMTPProtocol, count: int) -> None:
    """Lock-step, as smtp-source -d sends: one read per command, the content and its dot in one read."""
    feed = proto.dataReceived
    feed(b"HELO localhost\r\n")
    mail, rcpt = f"MAIL FROM:<{SENDER}>\r\n".encode(), f"RCPT TO:<{RECIPIENT}>\r\n".encode()
    content = message_1k() + b".\r\n"
    for _ in range(count):
        feed(mail)
        feed(rcpt)
        feed(b"DATA\r\n")
        feed(content)
    feed(b"QUIT\r\n")


def per_connection(_: ESMTPProtocol, count: int) -> None:
    """One message per connection, as smtp-source without -d: each built by the factory, greeted, closed."""
    from twisted.internet.error import ConnectionDone
    from twisted.logger import LogLevel
    from twisted.python.failure import Failure

    from esmtpkit.server.factory import ESMTPFactory
    from esmtpkit.server.monitor import EventLog

    # as the benchmark runs the server: --log-events warn
    factory = ESMTPFactory(Null, Policy(hostname="localhost", max_message_size=0), Clock(),
                           EventLog(minimum=LogLevel.warn))
    mail, rcpt = f"MAIL FROM:<{SENDER}>\r\n".encode(), f"RCPT TO:<{RECIPIENT}>\r\n".encode()
    content = message_1k() + b".\r\n"
    done = Failure(ConnectionDone())
    global LAST_TRANSPORT
    LAST_TRANSPORT = total = Sink()
    for _ in range(count):
        transport = Sink()
        proto = factory.buildProtocol(transport.getPeer())
        proto.makeConnection(transport)
        feed = proto.dataReceived
        feed(b"HELO localhost\r\n")
        feed(mail)
        feed(rcpt)
        feed(b"DATA\r\n")
        feed(content)
        feed(b"QUIT\r\n")
        proto.connectionLost(done)
        total.written += transport.written
        total.replies250 += transport.replies250


LAST_TRANSPORT: Sink | None = None


def pipelined(proto: ESMTPProtocol, count: int) -> None:
    """Everything written at once, arriving in 64 KiB reads."""
    proto.dataReceived(b"EHLO bench.example\r\n")
    payload = ((f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode() + message_1k() + b".\r\n")
               * count + b"QUIT\r\n")
    for i in range(0, len(payload), 65536):
        proto.dataReceived(payload[i:i + 65536])


def big(proto: ESMTPProtocol, count: int) -> None:
    """One message of ``count`` MiB in 64 KiB reads."""
    feed = proto.dataReceived
    feed(b"EHLO bench.example\r\n")
    feed(f"MAIL FROM:<{SENDER}>\r\n".encode())
    feed(f"RCPT TO:<{RECIPIENT}>\r\n".encode())
    feed(b"DATA\r\n")
    feed(b"Subject: big\r\n\r\n")
    block = body_block()
    for _ in range(count * MIB // len(block)):
        feed(block)
    feed(b".\r\n")
    feed(b"QUIT\r\n")


SCENARIOS = {"one-session": (one_session, 2000, "msg"), "pipelined": (pipelined, 1000, "msg"),
             "per-connection": (per_connection, 2000, "msg"),
             "big": (big, 100, "MiB")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--count", type=int, help="messages (or MiB for big)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", default="tottime", help="pstats sort key (tottime, cumulative, ...)")
    parser.add_argument("--no-profile", action="store_true", help="only time it (no profiler overhead)")
    args = parser.parse_args()
    run, default, unit = SCENARIOS[args.scenario]
    count = args.count or default
    policy = Policy(hostname="localhost", max_message_size=0)
    proto, transport = connect(policy)
    profiler = None if args.no_profile else cProfile.Profile()
    start = time.process_time()
    if profiler is not None:
        profiler.enable()
    run(proto, count)
    if profiler is not None:
        profiler.disable()
    spent = time.process_time() - start
    if LAST_TRANSPORT is not None:  # per-connection: the replies of all the connections
        transport = LAST_TRANSPORT
    messages = count if unit == "msg" else 1
    print(f"{args.scenario}: {count} {unit}, {spent * 1e6 / count:.1f} µs/{unit} of CPU"
          f"{' (with profiler overhead)' if profiler else ''}; {transport.replies250} replies 250, "
          f"{transport.written} bytes written")
    wanted = 3 * messages + (messages if args.scenario == "per-connection" else 1)  # HELO/EHLO, MAIL, RCPT, end
    if transport.replies250 != wanted:
        print(f"warning: expected {wanted} replies 250", file=sys.stderr)
    if profiler is not None:
        stats = pstats.Stats(profiler)
        stats.sort_stats(args.sort).print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
