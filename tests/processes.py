"""Shared handling of the real servers the tests start and talk to.

- `terminate`: stop a real server process as twistd expects; `wait_for_port`: the port a starting twistd took.
- `Twistd`: a ``twistd -n esmtpkit`` process listening on a free 127.0.0.1 port.
- `run_twistd`: a ``twistd esmtpkit`` run to its end (one that should refuse to start), with what it printed.
- `RecordingNextHop`: an in-process SMTP server on loopback that records every octet a relay sends it.
- `RawClient`: a blocking SMTP client that sends exactly the bytes it is given (for use in a thread).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol


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


#: The ``twistd`` console script installed beside this interpreter, as a user would run it.
TWISTD = Path(sys.executable).parent / "twistd"


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
    return subprocess.run([str(TWISTD), *twistd, "esmtpkit", *args], cwd=cwd, env=env, capture_output=True,
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
                [str(TWISTD), "-n", "--pidfile=", "--logfile", str(self.log), "esmtpkit",
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
