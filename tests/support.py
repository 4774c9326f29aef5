"""Support code the tests share: one module, so that no test module imports another.

- Scratch paths for trial-style tests: `ScratchPaths`, `ScratchWorkingDirectory`.
- Credential checkers for AUTH: `LateChecker`, `BrokenChecker`.
- Protocol conversations over a StringTransport: `ServerMixin`, `policy`, `replay`, `calls`, `split`, the usual
  replies (`GREETING`, `EHLO_REPLY`, `GO_AHEAD`, `ACCEPTED`) and a pipelined `SCENARIO` with what it should give.
- STARTTLS without a handshake: `TLSMixin` over a `TLSStringTransport` that records the `CONTEXT` it was given.
- Handler tests: `HandlerTestCase`, whose conversations are hung up and checked for timers when the test ends.
- Monitor calls: `Recorder`; one event of each kind from an `EventLog`: `every_event`.
- The client: `Client` (one session in memory over a `Wire`, the test playing the next hop `PEER_HOST`, which
  greets with `PEER_GREETING`), `make_message` (whose content is `CLIENT_CONTENT`); over loopback, `collecting`
  (esmtpkit's server keeping what it takes) and `deliver` (one attempt to it).
- The queue: `Queue` (a runner over a `RecordingStore`, a `ScriptedDeliverer` and a `RecordingMonitor` on a
  Clock; content `QUEUE_CONTENT`, delivered as `OK`) and `report` (a notice read back); for the spool queue,
  `Worker` (a delivery the test answers) and `commit` (one message of `SPOOL_CONTENT` committed).
- Real servers: `Twistd`, `Server`, `Supervised` (``twistd esmtpkit`` processes), `run_twistd`, `terminate`,
  `wait_for_port`, `wait_for`; `RecordingNextHop` (a next hop that records what a relay sends) and `RawClient`; the
  /proc probes `greeting_pid`, `listening_inodes`, `holds_socket`, `alive`.
- Mail over loopback by smtplib: `smtp_send` (one message), `smtp_client` and `smtp_transaction` (a client kept
  open); a Relay, signing if asked, in front of a sink that keeps what it takes: `relay_to_sink`.
- The ``twistd esmtpkit`` command line: `tap_options` (parsed), `tap_mistake` (the one-line error it makes).

Test certificates are in `tests.certs`; the private RabbitMQ node is in `tests.rabbitmq`; the code blocks of the
documentation are read by `tests.docblocks`.
"""

from __future__ import annotations

import email
import email.policy
import io
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.message import Message as EmailMessage
from pathlib import Path
from typing import IO, Any, AsyncIterator, Callable, Sequence

import pytest
from hypothesis import settings, strategies as st
from OpenSSL import SSL
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IListeningPort, ITLSTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from esmtpkit.client.options import ClientOptions
from esmtpkit.client.protocol import ClientProtocol
from esmtpkit.client.session import Attempt, send
from esmtpkit.core.outbound import Message, Outcome, Recipient, Status
from esmtpkit.core.reply import Reply
from esmtpkit.core.schedule import Schedule
from esmtpkit.handlers.collecting import Collecting, MessageStore
from esmtpkit.handlers.relay import Relay
from esmtpkit.mailauth.signing import signer_for
from esmtpkit.queue.interfaces import OpenContent
from esmtpkit.queue.memory import MemoryStore
from esmtpkit.queue.runner import QueueMonitor, QueueRunner
from esmtpkit.queue.spool import SpoolStore
from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.server.monitor import EventLog, Monitor
from esmtpkit.server.policy import Policy
from esmtpkit.server.protocol import ESMTPProtocol
from esmtpkit.testing import Conversation, LoopbackServer, RecordingHandler, serve


# ---- scratch paths for trial-style tests --------------------------------------------------------------------------

class ScratchPaths:
    """Mix in before a trial ``TestCase``: ``mktemp()`` names a path in a temporary directory of its own."""

    def mktemp(self) -> str:
        """An absolute path that does not exist yet, in a new directory removed after the test (file or folder)."""
        directory = tempfile.mkdtemp(prefix="esmtpkit-test-")
        self.addCleanup(shutil.rmtree, directory, True)  # type: ignore[attr-defined]
        return os.path.join(directory, "temp")


class ScratchWorkingDirectory(ScratchPaths):
    """Mix in before a trial ``TestCase``: each test runs from a new temporary directory, the previous one restored."""

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        here = os.getcwd()
        scratch = self.mktemp()
        os.mkdir(scratch)
        os.chdir(scratch)
        self.addCleanup(os.chdir, here)  # type: ignore[attr-defined]


# ---- credential checkers for AUTH ---------------------------------------------------------------------------------

@implementer(ICredentialsChecker)
class LateChecker:
    """A checker whose answers the test gives, to pin the order of replies around a slow password database.

    ``pending`` holds ``(deferred, credentials)`` for every check still waiting for its answer.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.pending: list[tuple[Deferred[Any], Any]] = []

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((d, credentials))
        return d


@implementer(ICredentialsChecker)
class BrokenChecker:
    """A checker whose password database is never reachable."""

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials: Any) -> Any:
        raise OSError("password database unreachable")


# ---- protocol conversations over a StringTransport ----------------------------------------------------------------

HOST = "mx.test"
GREETING = b"220 mx.test ESMTP Mail Server\r\n"
EHLO_REPLY = (b"250-mx.test client.test, pleased to meet you\r\n250-HELP\r\n250-PIPELINING\r\n250-SIZE 33554432\r\n"
              b"250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250 BINARYMIME\r\n")
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None)


def policy(**changes: Any) -> Policy:
    """The policy tests use: hostname mx.test, other limits as given."""
    return Policy(hostname=HOST, **changes)


class ServerMixin:
    """Start conversations that are hung up, and checked for leftover timers, when the test ends."""

    def connect(self, handler: Any = None, **changes: Any) -> Conversation:
        talk = Conversation(handler if handler is not None else RecordingHandler(), policy(**changes))
        self.addCleanup(self._hang_up, talk)  # type: ignore[attr-defined]
        return talk

    def _hang_up(self, talk: Conversation) -> None:
        talk.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(talk.clock.getDelayedCalls(), [])  # type: ignore[attr-defined]

    def assert_closed_cleanly(self, talk: Conversation) -> None:
        """The server closed, the connection ended (the client took the last replies), and no timer is left: the
        deadline for handing over the last replies went with the connection."""
        self.assertTrue(talk.closed)  # type: ignore[attr-defined]
        self.assertEqual(talk.clock.getDelayedCalls(), [])  # type: ignore[attr-defined]

    def exchange(self, talk: Conversation, data: bytes) -> bytes:
        """Write ``data``; return exactly the bytes the server wrote in response."""
        before = len(talk.transport.value())
        talk.write(data)
        return talk.transport.value()[before:]

    def ehlo(self, handler: Any = None, **changes: Any) -> Conversation:
        talk = self.connect(handler, **changes)
        self.assertEqual(self.exchange(talk, b"EHLO client.test\r\n")[-30:], EHLO_REPLY[-30:])
        return talk


def calls(handler: RecordingHandler, merge_body: bool = True) -> list[tuple[Any, ...]]:
    """The handler's calls as comparable tuples: the session object left out, adjacent body chunks joined."""
    out: list[tuple[Any, ...]] = []
    for call in handler.calls:
        if call.verb == "connect":
            out.append(("connect",))
        elif call.verb == "body" and merge_body and out and out[-1][0] == "body":
            out[-1] = ("body", out[-1][1] + call.args[0])
        else:
            out.append((call.verb, *call.args))
    return out


def replay(pieces: list[bytes], chunk_mode: bool | None = None, chunk_size: int = 65536,
           **changes: Any) -> tuple[bytes, RecordingHandler]:
    """Feed ``pieces`` to a fresh server one write at a time; return the wire bytes and the handler."""
    handler = RecordingHandler()
    handler.chunk_mode = chunk_mode
    handler.chunk_size = chunk_size
    talk = Conversation(handler, policy(**changes))
    for piece in pieces:
        talk.write(piece)
    wire = talk.transport.value()
    talk.protocol.connectionLost(Failure(ConnectionDone()))
    assert talk.clock.getDelayedCalls() == []
    return wire, handler


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets."""
    points = sorted(min(c, len(data)) for c in cuts)
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    return pieces + [data[last:]]


SCENARIO = (
    b"EHLO client.test\r\n"
    b"MAIL FROM:<alice@example.org> SIZE=300\r\n"
    b"RCPT TO:<bob@example.net>\r\n"
    b"RCPT TO:<Postmaster>\r\n"
    b"DATA\r\n"
    b"From: alice@example.org\r\n"
    b"Subject: a folded\r\n"
    b"\tsubject line\r\n"
    b"..Dotted: header\r\n"
    b"\r\n"
    b"Body line 1\r\n"
    b"..leading dot\r\n"
    b"...\r\n"
    b"\r\n"
    b"last line\r\n"
    b".\r\n"
    b"MAIL FROM:<>\r\n"
    b"RCPT TO:<bob@example.net>\r\n"
    b"DATA\r\n"
    b"X-First: 1\r\n"
    b"This line is not a header\r\n"
    b"X-Second: 2\r\n"
    b".\r\n"
    b"MAIL FROM:<carol@example.org>\r\n"
    b"RCPT TO:<bob@example.net>\r\n"
    b"DATA\r\n"
    b".\r\n"
    b"QUIT\r\n"
)
GO_AHEAD = b"354 Enter mail, end with \".\" on a line by itself\r\n"
ACCEPTED = b"250 2.0.0 Message accepted for delivery\r\n"
SCENARIO_WIRE = (
    GREETING + EHLO_REPLY
    + b"250 2.1.0 <alice@example.org>, sender ok\r\n250 2.1.5 <bob@example.net>, recipient ok\r\n"
    + b"250 2.1.5 <Postmaster>, recipient ok\r\n" + GO_AHEAD + ACCEPTED
    + b"250 2.1.0 <>, sender ok\r\n250 2.1.5 <bob@example.net>, recipient ok\r\n" + GO_AHEAD + ACCEPTED
    + b"250 2.1.0 <carol@example.org>, sender ok\r\n250 2.1.5 <bob@example.net>, recipient ok\r\n" + GO_AHEAD
    + ACCEPTED + b"221 2.0.0 Closing connection\r\n"
)
BODY_1 = b"Body line 1\r\n.leading dot\r\n..\r\n\r\nlast line\r\n"
BODY_2 = b"This line is not a header\r\nX-Second: 2\r\n"
SCENARIO_CALLS = [
    ("connect",), ("ehlo", "client.test"), ("mail", "alice@example.org", {"SIZE": 300}),
    ("rcpt", "bob@example.net", {}), ("rcpt", "Postmaster", {}), ("data",),
    ("header", "From", "alice@example.org"), ("header", "Subject", "a folded\tsubject line"),
    ("header", ".Dotted", "header"), ("eoh",), ("body", BODY_1), ("eom",),
    ("mail", "", {}), ("rcpt", "bob@example.net", {}), ("data",),
    ("header", "X-First", "1"), ("eoh",), ("body", BODY_2), ("eom",),
    ("mail", "carol@example.org", {}), ("rcpt", "bob@example.net", {}), ("data",), ("eoh",), ("eom",),
    ("quit",),
]


#: Pieces of client input that exercise every path: commands, content, stray line ends, dots, long runs.
TOKENS = st.sampled_from([
    b"EHLO c\r\n", b"HELO c\r\n", b"MAIL FROM:<a@b>\r\n", b"MAIL FROM:<>\r\n", b"RCPT TO:<c@d>\r\n", b"DATA\r\n",
    b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"VRFY x\r\n", b"FROB\r\n", b"\r\n", b"\r", b"\n", b".", b"..",
    b".\r\n", b"Subject: x\r\n", b" folded\r\n", b"body", b"\x00", b"\xff", b"x" * 700, b"y" * 1100,
    b"MAIL FROM:<a@b> SIZE=99999999999\r\n", b"RCPT TO:<>\r\n", b"\r\n.\r\n",
])


# ---- STARTTLS without a handshake ---------------------------------------------------------------------------------

CONTEXT = object()  # what the policy hands to startTLS; the fake transport only records it


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that records ``startTLS`` and, once given a handshaken OpenSSL connection, shows it
    through ``getHandle`` as Twisted's TLS transports do.
    """

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000),
                         hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
        self.tls_context: Any = None
        self.tls_started_at: int | None = None
        self.connection: SSL.Connection | None = None

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        assert self.tls_context is None, "startTLS called twice"
        self.tls_context = contextFactory
        self.tls_started_at = len(self.value())

    def getHandle(self) -> Any:
        return self.connection if self.connection is not None else object()


class TLSMixin:
    """Mix in before a trial ``TestCase``: `connect` gives a protocol offering STARTTLS on a `TLSStringTransport`,
    hung up and checked for leftover timers when the test ends."""

    def connect(self, handler: Any = None, transport: StringTransport | None = None,
                **changes: Any) -> tuple[ESMTPProtocol, Any]:
        changes.setdefault("tls_context", CONTEXT)
        protocol = ESMTPProtocol(handler if handler is not None else RecordingHandler(),
                                 Policy(hostname="mx.test", **changes), Clock())
        transport = transport if transport is not None else TLSStringTransport()
        protocol.makeConnection(transport)
        self.addCleanup(self._hang_up, protocol)  # type: ignore[attr-defined]
        return protocol, transport

    def _hang_up(self, protocol: ESMTPProtocol) -> None:
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(protocol.clock.getDelayedCalls(), [])  # type: ignore[attr-defined, union-attr]

    def exchange(self, protocol: ESMTPProtocol, data: bytes) -> bytes:
        before = len(protocol.transport.value())  # type: ignore[attr-defined]
        protocol.dataReceived(data)
        return protocol.transport.value()[before:]  # type: ignore[attr-defined, no-any-return]


# ---- handler tests ------------------------------------------------------------------------------------------------

class HandlerTestCase(SynchronousTestCase):
    """A trial TestCase for handler tests: `conversation` talks to a handler, as ``mx.test`` unless a policy is
    given; every conversation is hung up when the test ends, and none may leave a timer behind.
    """

    def setUp(self) -> None:
        self.talks: list[Conversation] = []

    def conversation(self, handler: Any, policy: Policy | None = None, **options: Any) -> Conversation:
        """A `Conversation` with ``handler``; ``options`` go to it as they are (``clock``, ``peer``)."""
        talk = Conversation(handler, policy or Policy(hostname="mx.test"), **options)
        self.talks.append(talk)
        return talk

    def tearDown(self) -> None:
        for talk in self.talks:
            talk.protocol.connectionLost(Failure(ConnectionDone()))
        for talk in self.talks:
            self.assertEqual(talk.clock.getDelayedCalls(), [])


# ---- monitor calls ------------------------------------------------------------------------------------------------

class Recorder(Monitor):
    """Keeps every call as (name, args) with the session replaced by its id."""

    def __init__(self, timing: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.timing = timing

    def __getattribute__(self, name: str) -> Any:
        if name in ("calls", "timing") or name.startswith("_"):
            return object.__getattribute__(self, name)
        if not hasattr(Monitor, name):
            return object.__getattribute__(self, name)

        def record(*args: Any) -> None:
            self.calls.append((name, *args))

        return record

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def called(self, name: str) -> list[tuple[Any, ...]]:
        return [c[1:] for c in self.calls if c[0] == name]


# ---- real servers and clients on 127.0.0.1 ------------------------------------------------------------------------

def terminate(process: subprocess.Popen, timeout: float) -> int:
    """Stop a process as twistd expects (SIGTERM: graceful shutdown), killing it if it outlives ``timeout``.

    Closes its stdout pipe, if any, and returns its exit status.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout:
        process.stdout.close()
    return process.returncode


def wait_for_port(process: subprocess.Popen, log: Path, log_text: Any, timeout: float) -> int:
    """The port a starting twistd listens on, read from its ``log`` ("... starting on PORT").

    Fails the test, showing ``log_text()``, if the process exits first or no port shows within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"starting on (\d+)", log.read_text(errors="replace")) if log.exists() else None
        if match:
            return int(match.group(1))
        if process.poll() is not None:
            raise AssertionError(f"twistd exited with {process.returncode}:\n{log_text()}")
        time.sleep(0.02)
    raise AssertionError(f"twistd did not start listening:\n{log_text()}")


#: The ``twistd`` console script installed beside this interpreter, as a user would run it (a string, so that it
#: goes as it is into command lines and texts).
TWISTD = str(Path(sys.executable).parent / "twistd")


def run_twistd(cwd: Path, *args: str, daemon: bool = False, pythonpath: Path | None = None,
               timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``twistd -n --pidfile= esmtpkit *args`` (``daemon=True``: ``twistd --pidfile=twistd.pid --logfile=twistd.log
    esmtpkit *args``) run in ``cwd`` until it exits, with stdout and stderr kept apart.

    The environment has no PYTHONPATH (only the installed esmtpkit is found) unless ``pythonpath`` is given, as a
    user would set it for a handler module of their own.
    """
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    twistd = ["--pidfile=twistd.pid", "--logfile=twistd.log"] if daemon else ["-n", "--pidfile="]
    return subprocess.run([TWISTD, *twistd, "esmtpkit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


class Twistd:
    """``twistd -n esmtpkit --listen tcp:0:interface=127.0.0.1 *options`` run in ``workdir``, logging to a file.

    ``port`` is known once the log says the listener started; `stop` ends the process (SIGTERM).
    """

    def __init__(self, workdir: Path, *options: str, timeout: float = 60.0) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "twistd.log"
        self._output = workdir / "twistd.out"
        with open(self._output, "wb") as output:
            self.process = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "--logfile", str(self.log), "esmtpkit",
                 "--listen", "tcp:0:interface=127.0.0.1", *options],
                cwd=workdir, stdout=output, stderr=subprocess.STDOUT)
        try:
            self.port = self._wait_port(timeout)
        except BaseException:
            self.stop()
            raise

    def log_text(self) -> str:
        """The twistd log and anything the process printed, so far."""
        return "\n".join(path.read_text(errors="replace") for path in (self.log, self._output) if path.exists())

    def _wait_port(self, timeout: float) -> int:
        return wait_for_port(self.process, self.log, self.log_text, timeout)

    def stop(self) -> int:
        """Stop the process; its exit status."""
        return terminate(self.process, 60)


@dataclass(frozen=True)
class HopMessage:
    """One message as the next hop took it: the envelope, and the data octets before the end-of-data line."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes


#: The dot line that ends DATA for a strict reader (RFC 5321 §4.1.1.4) and for a lenient one that takes a bare CR
#: or LF as a line end, as next hops open to SMTP smuggling do. The line end before the dot is content.
_STRICT_END = re.compile(rb"(?:^|(?<=\r\n))\.\r\n")
_LENIENT_END = re.compile(rb"(?:^|(?<=\r)|(?<=\n))\.(?:\r\n|\r|\n)")


class _NextHopProtocol(Protocol):
    """One connection to the next hop: commands end at LF (a trailing CR is dropped), DATA ends as the factory says."""

    factory: "RecordingNextHop"

    def connectionMade(self) -> None:
        self.raw = bytearray()
        self.factory.sessions.append(self.raw)
        self._buffer = b""
        self._in_data = False
        self._sender = ""
        self._recipients: list[str] = []
        self.transport.write(b"220 next.test ESMTP recording\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        self._buffer += data
        while self._buffer and self.transport is not None and not self.transport.disconnecting:
            if self._in_data:
                end = (_LENIENT_END if self.factory.lenient else _STRICT_END).search(self._buffer)
                if end is None:
                    return
                content, self._buffer = self._buffer[:end.start()], self._buffer[end.end():]
                self._in_data = False
                self.factory.messages.append(HopMessage(self._sender, tuple(self._recipients), content))
                self.transport.write(b"250 2.0.0 Ok: queued as %d\r\n" % len(self.factory.messages))
            else:
                line, lf, rest = self._buffer.partition(b"\n")
                if not lf:
                    return
                self._buffer = rest
                self._command(line.removesuffix(b"\r"))

    def _command(self, line: bytes) -> None:
        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
        path = line[line.find(b"<") + 1:line.find(b">")].decode("ascii", "replace") if b"<" in line else ""
        if verb == b"EHLO":
            self.transport.write(b"250-next.test\r\n250 8BITMIME\r\n")  # no CHUNKING, no BINARYMIME
        elif verb == b"MAIL":
            self._sender, self._recipients = path, []
            self.transport.write(b"250 2.1.0 Ok\r\n")
        elif verb == b"RCPT":
            self._recipients.append(path)
            self.transport.write(b"250 2.1.5 Ok\r\n")
        elif verb == b"DATA":
            self._in_data = True
            self.transport.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb in (b"HELO", b"RSET", b"NOOP"):
            self.transport.write(b"250 2.0.0 Ok\r\n")
        elif verb == b"QUIT":
            self.transport.write(b"221 2.0.0 Bye\r\n")
            self.transport.loseConnection()
        else:
            self.transport.write(b"500 5.5.2 Error: command not recognized\r\n")


class RecordingNextHop(Factory):
    """A next hop offering only 8BITMIME that records what it is sent: ``sessions`` (each connection's raw octets)
    and ``messages`` (one `HopMessage` per end of data it saw).

    ``lenient=True`` reads DATA as next hops open to SMTP smuggling do: a dot line between any mix of CR, LF and
    CRLF ends it, and the rest is read as commands; ``lenient=False`` ends DATA only at CRLF.CRLF.
    """

    protocol = _NextHopProtocol
    noisy = False

    def __init__(self, lenient: bool = True) -> None:
        self.lenient = lenient
        self.sessions: list[bytearray] = []
        self.messages: list[HopMessage] = []
        self.listening: IListeningPort | None = None

    @property
    def port(self) -> int:
        """The loopback port it listens on."""
        assert self.listening is not None
        return int(self.listening.getHost().port)

    def listen(self, reactor: Any) -> "Deferred[RecordingNextHop]":
        """Listen on a free 127.0.0.1 port; fires with this factory."""
        from twisted.internet.endpoints import TCP4ServerEndpoint

        def listening(port: IListeningPort) -> "RecordingNextHop":
            self.listening = port
            return self

        return TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self).addCallback(listening)

    def stop(self) -> "Deferred[None]":
        """Stop listening."""
        assert self.listening is not None
        return self.listening.stopListening()  # type: ignore[return-value]


class RawClient:
    """A blocking SMTP client on ``address`` that writes exactly the octets given; `greeting` is the first reply."""

    def __init__(self, address: tuple[str, int], timeout: float = 60.0) -> None:
        self._sock = socket.create_connection(address, timeout=timeout)
        self._buffer = b""
        self.greeting = self.replies(1)[0]

    def send(self, data: bytes, replies: int = 1) -> list[bytes]:
        """Write ``data`` as it is, then read ``replies`` complete replies (each with its CRLFs)."""
        self._sock.sendall(data)
        return self.replies(replies)

    def replies(self, count: int) -> list[bytes]:
        """Read ``count`` complete replies; a multi-line reply is one item."""
        out: list[bytes] = []
        while len(out) < count:
            match = re.search(rb"(?:^|\r\n)\d{3} [^\r\n]*\r\n", self._buffer)
            if match is None:
                data = self._sock.recv(65536)
                if not data:
                    raise AssertionError(f"connection closed; unanswered: {self._buffer!r}")
                self._buffer += data
                continue
            end = match.end()
            out.append(self._buffer[:end])
            self._buffer = self._buffer[end:]
        return out

    def close(self) -> None:
        """QUIT and close."""
        try:
            self.send(b"QUIT\r\n")
        finally:
            self._sock.close()


#: The checkout: `_env` puts it on sys.path, so that twistd finds ``tests.pid_handler`` and the like.
ROOT = Path(__file__).resolve().parent.parent

needs_proc = pytest.mark.skipif(not Path("/proc/net/tcp").exists(),
                                reason="needs Linux /proc to see processes and listening sockets")


def _env() -> dict[str, str]:
    """The environment with the checkout on sys.path, so the test handler module is found."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Poll until ``predicate()`` is truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Supervised:
    """A ``twistd -n esmtpkit --workers N`` process on a free loopback port, logging to a file."""

    def __init__(self, cwd: Path, count: int, *args: str) -> None:
        self.log = cwd / "twistd.log"
        self.maildir = cwd / "Maildir"
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "--logfile", str(self.log), "esmtpkit", "--workers", str(count),
             "--handler", "tests.pid_handler.PidMaildir", "--maildir", str(self.maildir), "--hostname", "mx.test",
             "--listen", "tcp:0:interface=127.0.0.1", *args],
            cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.port = int(wait_for(lambda: self._find(r"listening on 127\.0\.0\.1:(\d+) for the workers"), "the port"))
        wait_for(lambda: len(self.started()) >= count, f"{count} workers")
        wait_for(lambda: len(self.listening()) >= count, f"{count} workers listening")

    def _find(self, pattern: str) -> str | None:
        if self.process.poll() is not None:
            raise AssertionError(f"twistd exited: {self.text()}")
        match = re.search(pattern, self.text())
        return match.group(1) if match else None

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def started(self) -> list[int]:
        """Worker pids in the order the supervisor started them."""
        return [int(pid) for pid in re.findall(r"worker \d+ started: pid (\d+)", self.text())]

    def listening(self) -> list[int]:
        """Pids of the workers that logged that they serve the shared port."""
        return [int(pid) for pid in re.findall(rf"\[worker (\d+) [^]]*\] ESMTPFactory starting on {self.port}\n",
                                               self.text())]

    def stop(self) -> None:
        terminate(self.process, 60)
        for pid in self.started():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def read_reply(sock: socket.socket) -> bytes:
    """Read one whole (possibly multi-line) SMTP reply."""
    data = b""
    while not re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n$", data):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def greeting_pid(port: int) -> int:
    """Connect, read the 220 (which names the serving process), QUIT."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        greeting = read_reply(sock)
        match = re.fullmatch(rb"220 mx\.test pid=(\d+)\r\n", greeting)
        assert match, greeting
        sock.sendall(b"QUIT\r\n")
        assert read_reply(sock).startswith(b"221 ")
        return int(match.group(1))


def listening_inodes(port: int) -> list[str]:
    """Socket inodes in LISTEN state on 127.0.0.1:port, from /proc/net/tcp."""
    wanted = f"0100007F:{port:04X}"
    inodes = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted and fields[3] == "0A":
            inodes.append(fields[9])
    return inodes


def holds_socket(pid: int, inode: str) -> bool:
    """Whether process ``pid`` has socket ``inode`` among its open files."""
    fd_dir = Path(f"/proc/{pid}/fd")
    return any(os.readlink(fd_dir / fd) == f"socket:[{inode}]" for fd in os.listdir(fd_dir))


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody has reaped yet counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


#: The console script installed beside this interpreter, as a user would run it.
TWISTD_N = [str(Path(sys.executable).parent / "twistd")]


def _clean_env() -> dict[str, str]:
    """The environment without the checkout on sys.path, so only the installed package is found."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


class Server:
    """A `twistd -n esmtpkit` process on a free loopback port; its log goes to a file."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.log = cwd / "twistd.log"
        self.process = subprocess.Popen(
            TWISTD_N + ["-n", "--pidfile=", "--logfile", str(self.log), "esmtpkit",
                        "--listen", "tcp:0:interface=127.0.0.1", "--hostname", "mx.test", *args],
            cwd=cwd, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.port = self._wait_port()

    def _wait_port(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.log.exists():
                match = re.search(r"starting on (\d+)", self.log.read_text())
                if match:
                    return int(match.group(1))
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited: {self.process.stdout.read() if self.process.stdout else ''}")
            time.sleep(0.05)
        raise AssertionError("twistd did not start listening")

    def stop(self) -> None:
        terminate(self.process, 60)


# ---- server events ------------------------------------------------------------------------------------------------

def every_event(text: str = "") -> list[dict[str, Any]]:
    """One event of each kind from an `EventLog`, with ``text`` wherever a client may choose text."""
    from twisted.internet.address import IPv4Address

    from esmtpkit.core.address import Address
    from esmtpkit.core.session import Envelope, Session

    events: list[dict[str, Any]] = []
    monitor = EventLog(Logger(namespace="esmtpkit.events", observer=events.append))
    session = Session(hostname="mx.test", peer=IPv4Address("TCP", "192.0.2.1" + text, 1),
                      host=IPv4Address("TCP", "192.0.2.2", 25), helo="c" + text, authenticated="u" + text,
                      envelope=Envelope(id="M1", sender=Address("s" + text + "@example.org"),
                                        recipients=[Address("r@example.org")]))
    envelope = session.envelope
    monitor.connection_opened(session)
    monitor.connection_refused(session, Reply.of(421, "4.3.2 busy" + text))
    monitor.tls_established(session)
    monitor.tls_failed(session, "alert" + text)
    monitor.auth_succeeded(session, "PLAIN", "u" + text)
    monitor.auth_failed(session, "PLAIN", None, Reply.of(535))
    monitor.auth_throttled(session, "user", "u" + text, 300.0)
    monitor.replied(session, "RCPT", Reply.of(550, "5.1.1 unknown" + text))
    monitor.replied(session, "AUTH", Reply.of(535, "5.7.8 no"))
    monitor.timed_out(session, "greeted")
    monitor.message_accepted(session, envelope, 1, 0.5, Reply.of(250, "ok"))
    monitor.message_rejected(session, envelope, 1, Reply.of(554, "5.7.1 no" + text))
    monitor.message_aborted(session, envelope, 1, "reset by RSET")
    monitor.connection_closed(session, 1.0, "QUIT" + text)
    monitor.client_replaced(session, "XCLIENT", "192.0.2.9" + text)
    monitor.checked(session, "dkim", "fail", "example.org" + text, 0.25)
    monitor.filtered(session, "rspamd" + text, "message", "reject", 0.5, "Gtube pattern" + text)
    return events


# ---- one client session in memory, and deliveries over loopback ---------------------------------------------------

#: The next hop as a client session names it in its outcomes, and the greeting it sends.
PEER_HOST = "mx.test[127.0.0.1]"
PEER_GREETING = b"220 mx.test ESMTP\r\n"
#: The content of `make_message` (34 octets, one line to dot-stuff).
CLIENT_CONTENT = b"Subject: test\r\n\r\n.dot line\r\nbody\r\n"


def make_message(*addresses: str, **changes: Any) -> Message:
    recipients = [Recipient(a) for a in (addresses or ("b@example.net", "c@example.net"))]
    fields: dict[str, Any] = {"id": "Q1", "sender": "a@example.org", "recipients": recipients,
                              "size": len(CLIENT_CONTENT)}
    fields.update(changes)
    return Message(**fields)


@implementer(ITLSTransport)
class Wire(StringTransport):
    """The client's side of the connection: its writes one by one, STARTTLS recorded (no handshake), the
    connection ending as soon as the client closes it. With ``pause``, every write fills the buffer."""

    def __init__(self, pause: bool = False) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.tls: Any = None
        self.pause = pause
        self.aborted = False
        self.protocol: Any = None

    def write(self, data: bytes) -> None:
        super().write(data)
        self.writes.append(data)
        if self.pause and self.producer is not None:
            self.producer.pauseProducing()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def startTLS(self, contextFactory: Any) -> None:
        self.tls = contextFactory

    def loseConnection(self) -> None:
        if not self.disconnecting:
            super().loseConnection()
            self.protocol.connectionLost(Failure(ConnectionAborted() if self.aborted else ConnectionDone()))

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


class Client:
    """A ClientProtocol talking to the test, which plays the server: `said` feeds it the server's bytes."""

    def __init__(self, message: Message | None = None, content: bytes = CLIENT_CONTENT, *, wire: Wire | None = None,
                 indexes: list[int] | None = None, creator: Any = "tls settings", opener: Any = None,
                 **options: Any) -> None:
        options.setdefault("tls", "none")
        options.setdefault("helo", "client.test")
        self.clock = Clock()
        self.message = message if message is not None else make_message()
        self.opened: list[io.BytesIO] = []

        def open_content() -> IO[bytes]:
            self.opened.append(io.BytesIO(content))
            return self.opened[-1]

        self.protocol = ClientProtocol(self.message, opener or open_content, ClientOptions(**options),
                                       self.message.pending if indexes is None else indexes, clock=self.clock,
                                       host=PEER_HOST, tls_creator=creator)
        self.wire = wire if wire is not None else Wire()
        self.wire.protocol = self.protocol
        self.protocol.makeConnection(self.wire)

    def said(self, data: bytes) -> bytes:
        """The server sends ``data``; what the client wrote in response."""
        before = len(self.wire.value())
        self.protocol.dataReceived(data)
        return self.wire.value()[before:]

    def result(self) -> dict[int, Outcome]:
        """The outcomes, once the session has ended and left no timer behind."""
        assert self.protocol.finished.called, "the session has not ended"
        assert self.clock.getDelayedCalls() == []
        return self.protocol.outcomes

    def codes(self) -> dict[int, tuple[int, str]]:
        return {i: (o.code, o.enhanced) for i, o in self.result().items()}

    @property
    def failed(self) -> bool:
        return self.protocol.session_failed


def reactor_() -> Any:
    from twisted.internet import reactor

    return reactor


def collecting(store: MessageStore, **policy: Any) -> ESMTPFactory:
    return ESMTPFactory(Collecting.factory(store), policy=Policy(hostname="mx.test", **policy), clock=reactor_())


def deliver(server: LoopbackServer, message: Message, content: bytes | Callable[[], IO[bytes]],
            host: str = "localhost[127.0.0.1]", **options: Any) -> "Deferred[Attempt]":
    options.setdefault("helo", "client.test")
    reactor = reactor_()
    opener = content if callable(content) else (lambda: io.BytesIO(content))
    return send(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", server.port), message, opener,
                ClientOptions(**options), host=host)


# ---- the queue runner on a Clock ----------------------------------------------------------------------------------

QUEUE_CONTENT = b"From: alice@example.org\r\nSubject: hello\r\nMessage-ID: <m1@example.org>\r\n\r\nHello there.\r\n"
OK = Outcome(250, "2.0.0", "Ok: queued as X1", "mx.example.net[192.0.2.1]")
SCHEDULE = Schedule(min_backoff=300.0, max_backoff=1200.0, lifetime=10000.0)


@dataclass
class Call:
    """One deliver() call: when, which message, which recipients."""

    time: float
    message_id: str
    addresses: tuple[str, ...]
    open_content: OpenContent


class ScriptedDeliverer:
    """Answers each recipient from ``script`` (address -> outcomes, one per attempt, the last repeated; default
    250). With ``hold``, returns unfired Deferreds kept in ``held`` for the test to fire."""

    def __init__(self, clock: Clock, script: dict[str, Sequence[Outcome]] | None = None, hold: bool = False) -> None:
        self.clock = clock
        self.script = dict(script or {})
        self.hold = hold
        self.calls: list[Call] = []
        self.held: list[tuple[Deferred[dict[int, Outcome]], dict[int, Outcome]]] = []
        self.tries: dict[str, int] = {}

    def deliver(self, message: Message, indexes: Sequence[int], open_content: OpenContent) -> Any:
        addresses = tuple(message.recipients[i].address for i in indexes)
        self.calls.append(Call(self.clock.seconds(), message.id, addresses, open_content))
        outcomes = {}
        for i, address in zip(indexes, addresses):
            answers = self.script.get(address, [OK])
            n = self.tries.get(address, 0)
            self.tries[address] = n + 1
            outcomes[i] = answers[min(n, len(answers) - 1)]
        if self.hold:
            d: Deferred[dict[int, Outcome]] = Deferred()
            self.held.append((d, outcomes))
            return d
        return succeed(outcomes)

    def release(self) -> None:
        held, self.held = self.held, []
        for d, outcomes in held:
            d.callback(outcomes)


class RecordingMonitor(QueueMonitor):
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def message_queued(self, message: Message, origin: str) -> None:
        self.calls.append(("queued", message.sender, origin))

    def attempt_started(self, message: Message) -> None:
        self.calls.append(("started", message.id))

    def attempt_finished(self, message: Message, seconds: float) -> None:
        self.calls.append(("finished", message.id, seconds))

    def recipient_done(self, message: Message, index: int, result: str) -> None:
        self.calls.append(("recipient", message.recipients[index].address, result))

    def notice_queued(self, notice: Message, action: str) -> None:
        self.calls.append(("notice", action, notice.recipients[0].address))


class RecordingStore(MemoryStore):
    """A MemoryStore that keeps a copy of every message enqueued whole (the notices), even once delivered."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.enqueued: list[tuple[Message, bytes]] = []

    def enqueue(self, message: Message, content: bytes) -> Deferred[None]:
        done = super().enqueue(message, content)
        if self.failing is None:
            self.enqueued.append((message.copy(), content))
        return done


class Queue:
    """A store, a deliverer and a runner on one Clock, with the runner's log events kept in ``events``."""

    def __init__(self, script: dict[str, Sequence[Outcome]] | None = None, schedule: Schedule = SCHEDULE,
                 hold: bool = False, deliverer: Any = None) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = RecordingStore(reactor=self.clock)
        self.deliverer = deliverer if deliverer is not None else ScriptedDeliverer(self.clock, script, hold)
        self.monitor = RecordingMonitor()
        self.runner = QueueRunner(self.store, self.deliverer, reactor=self.clock, schedule=schedule,
                                  hostname="mx.test", monitor=self.monitor)
        self.events: list[dict[str, Any]] = []
        self.runner.log = Logger(namespace="esmtpkit.queue", observer=self.events.append)
        self.runner.start()

    def add(self, *recipients: Recipient | str, sender: str = "alice@example.org", id: str = "M1",
            **fields: Any) -> Message:
        message = Message(id, sender, [r if isinstance(r, Recipient) else Recipient(r) for r in recipients],
                          size=len(QUEUE_CONTENT), arrived=self.clock.seconds(), next_attempt=self.clock.seconds(),
                          received_from="dns; client.example (192.0.2.7)", **fields)
        self.store.enqueue(message, QUEUE_CONTENT)
        self.clock.advance(0)
        return message

    def run_for(self, seconds: float) -> None:
        """Let ``seconds`` pass, stopping at each timer on the way (as real time would)."""
        end = self.clock.seconds() + seconds
        while True:
            due = [c.getTime() for c in self.clock.getDelayedCalls() if c.getTime() <= end]
            if not due:
                break
            self.clock.advance(max(0.0, min(due) - self.clock.seconds()))
        self.clock.advance(end - self.clock.seconds())

    def notices(self) -> list[tuple[Message, bytes]]:
        return [(m, data) for m, data in self.store.enqueued if m.sender == ""]

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    def finish(self) -> None:
        stopped = self.runner.stop()
        assert stopped.called
        assert self.clock.getDelayedCalls() == []


def report(data: bytes) -> tuple[EmailMessage, EmailMessage, list[EmailMessage]]:
    """A notice read back: the whole message, its per-message status fields, and its per-recipient blocks."""
    notice = email.message_from_bytes(data, policy=email.policy.compat32)
    assert notice.get_content_type() == "multipart/report"
    assert notice.get_param("report-type") == "delivery-status"
    status = notice.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    return notice, blocks[0], blocks[1:]


# ---- the spool queue ----------------------------------------------------------------------------------------------

SPOOL_CONTENT = b"Received: from client.example\r\nSubject: hi\r\n\r\nbody\r\n"


class Worker:
    """Records each message it is handed (with its content) and answers when the test fires its Deferred."""

    def __init__(self) -> None:
        self.calls: list[tuple[Message, bytes, Deferred[Message]]] = []

    def __call__(self, message: Message, open_content: Callable[[], Any]) -> Deferred[Message]:
        with open_content() as file:
            content = file.read()
        d: Deferred[Message] = Deferred()
        self.calls.append((message, content, d))
        return d

    @property
    def ids(self) -> list[str]:
        return [message.id for message, _, _ in self.calls]

    def deliver(self, index: int = -1) -> None:
        """The attempt delivered every recipient."""
        message, _, d = self.calls[index]
        for recipient in message.recipients:
            recipient.status = Status.DELIVERED
            recipient.outcome = Outcome(250, "2.0.0", "Ok", "mx.example.net[192.0.2.1]")
        d.callback(message)

    def defer(self, index: int, next_attempt: float) -> None:
        """The attempt failed for now: try again at ``next_attempt``."""
        message, _, d = self.calls[index]
        message.attempts += 1
        message.next_attempt = next_attempt
        for recipient in message.recipients:
            recipient.outcome = Outcome(451, "4.4.1", "Connection refused", "")
        d.callback(message)


def envelope(id: str, clock: Clock, **fields: Any) -> Message:
    fields.setdefault("recipients", [Recipient("rcpt@example.net")])
    return Message(id=id, sender="sender@example.org", arrived=clock.seconds(), **fields)


def commit(store: SpoolStore, clock: Clock, content: bytes = SPOOL_CONTENT, **fields: Any) -> str:
    """Commit one message through an entry (inline file work); its id."""
    entry = store.open_entry()
    entry.write(content)
    results: list[Any] = []
    entry.commit(envelope(entry.id, clock, **fields)).addBoth(results.append)
    assert results == [None]
    return entry.id


# ---- mail over loopback: smtplib, and a signing Relay in front of a sink ------------------------------------------

def smtp_client(port: int, helo: str = "helo.good.test", timeout: float = 60.0) -> smtplib.SMTP:
    """An smtplib client on ``127.0.0.1:port`` that has said EHLO ``helo`` (blocking: use it in a thread)."""
    client = smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=timeout)
    client.ehlo()
    return client


def smtp_transaction(client: smtplib.SMTP, sender: str, content: bytes,
                     recipients: Sequence[str] = ("bob@example.test",)) -> tuple[int, bytes]:
    """MAIL, RCPT for each recipient, DATA: the first reply that is not a success, else the end of data's."""
    code, text = client.mail(sender)
    if code != 250:
        return code, text
    for recipient in recipients:
        code, text = client.rcpt(recipient)
        if code != 250:
            return code, text
    try:
        return client.data(content)
    except smtplib.SMTPDataError as refused:
        return refused.smtp_code, refused.smtp_error


def smtp_send(port: int, sender: str, content: bytes, recipients: Sequence[str] = ("bob@example.test",),
              helo: str = "helo.good.test", timeout: float = 60.0) -> tuple[int, bytes]:
    """One message to ``127.0.0.1:port`` by smtplib, then QUIT: `smtp_transaction`'s reply (blocking)."""
    with smtp_client(port, helo, timeout) as client:
        return smtp_transaction(client, sender, content, recipients)


@dataclass
class RelayToSink:
    """A `Relay` listening on ``port`` (127.0.0.1) that relays to a sink server keeping what it takes in ``store``."""

    port: int
    store: MessageStore


@asynccontextmanager
async def relay_to_sink(policy: Policy | None = None, **relay: Any) -> AsyncIterator[RelayToSink]:
    """A Relay (its keywords ``relay``; ``policy``: its server's, hostname relay.test by default) in front of a
    collecting sink (up.test), both on loopback; on leaving, both stop and the `signer_for` the Relay's signing
    settings is closed, so that no signing thread outlives the test."""
    from twisted.internet import reactor

    store = MessageStore()
    upstream = await serve(Collecting.factory(store), reactor=reactor, policy=Policy(hostname="up.test"))
    try:
        server = await serve(lambda: Relay(port=upstream.port, timeout=10, **relay), reactor=reactor,
                             policy=policy if policy is not None else Policy(hostname="relay.test"))
        try:
            yield RelayToSink(server.port, store)
        finally:
            await server.stop()
    finally:
        await upstream.stop()
        signer = signer_for(relay.get("dkim_sign"), relay.get("arc_seal"), relay.get("authserv_id"),
                            headers=relay.get("dkim_headers"))
        if signer is not None:
            signer.close()


# ---- a filter server that misbehaves --------------------------------------------------------------------------------

class BrokenPeer:
    """A TCP server on 127.0.0.1 that plays a filter gone wrong, on a thread of its own: it accepts, reads what it is
    sent, and never answers (``mode="silent"``) or closes the connection once it has read ``after`` octets
    (``mode="hang-up"``: a filter stopped mid-message). ``received`` counts what it read."""

    def __init__(self, mode: str = "silent", after: int = 1) -> None:
        import threading

        self.mode = mode
        self.after = after
        self.received = 0
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import selectors

        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        while not self._stop.is_set():
            for key, _ in selector.select(0.2):
                if key.fileobj is self._listener:
                    conn, _ = self._listener.accept()
                    self.connections += 1
                    selector.register(conn, selectors.EVENT_READ)
                    continue
                conn = key.fileobj  # type: ignore[assignment]
                try:
                    data = conn.recv(65536)  # type: ignore[union-attr]
                except ConnectionError:
                    data = b""  # the server gave up on it (its filter timed out): the same as a close
                self.received += len(data)
                if not data or (self.mode == "hang-up" and self.received >= self.after):
                    selector.unregister(conn)
                    conn.close()  # type: ignore[union-attr]
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()

    def stop(self) -> None:
        """Stop serving; the port then refuses connections (a filter that is down)."""
        self._stop.set()
        self._thread.join(5)
        self._listener.close()


# ---- the twistd esmtpkit command line ------------------------------------------------------------------------------

def tap_options(*argv: str) -> Any:
    """``twistd esmtpkit`` options (`esmtpkit.cli.tap.Options`) parsed from ``argv``."""
    from esmtpkit.cli import tap

    options = tap.Options()
    options.parseOptions(list(argv))
    return options


def tap_mistake(*argv: str) -> str:
    """The usage error ``argv`` makes on the ``twistd esmtpkit`` command line, which must be one stripped line."""
    from twisted.python import usage

    with pytest.raises(usage.UsageError) as caught:
        tap_options(*argv)
    text = str(caught.value)
    assert "\n" not in text and text == text.strip(), repr(text)
    return text
