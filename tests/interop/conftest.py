"""Fixtures for the interop suite: a real ``twistd -n esmtpkit`` process delivering to a Maildir on 127.0.0.1.

Every test gets its own process and Maildir. `EsmtpkitProcess.wait_for` waits until N messages are in ``new/``
and gives back what the client sent: each stored file without the ``Return-Path:`` and ``Received:`` fields
(RFC 5321 §4.4) the Maildir handler writes in front of it. When a test ends the process is stopped and its log
and Maildir are checked: no traceback logged, nothing left behind in ``tmp/``.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

from ..support import TWISTD, terminate, wait_for_port


#: The name the server gives in its greeting and in ``Received: ... by <HOSTNAME>``.
HOSTNAME = "mx.test"

#: How long a client or a delivery may take before the test fails (a bound, not an expectation).
CLIENT_TIMEOUT = 60.0

# Maildir file names are <seconds>.M<micro>P<pid>Q<delivery>I<message id>.<host> (R<random> without an id); Q counts
# deliveries in one process, so it orders them (the microseconds are not zero-padded and do not sort as text).
_DELIVERY_NUMBER = re.compile(r"\.M\d+P\d+Q(\d+)[RI]")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the checkout on sys.path (only the installed package is found), plus ``extra``."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


@functools.lru_cache(maxsize=None)
def server_help() -> str:
    """What ``twistd esmtpkit --help`` prints (the options this installation knows)."""
    out = subprocess.run([str(TWISTD), "esmtpkit", "--help"], env=clean_env(), capture_output=True, text=True,
                         timeout=CLIENT_TIMEOUT, cwd="/")
    return out.stdout + out.stderr


def missing_options(*names: str) -> list[str]:
    """Those of ``names`` (e.g. ``--tls-cert``) that ``twistd esmtpkit --help`` does not list."""
    text = server_help()
    return [name for name in names if not re.search(rf"(?m)^\s+(?:-\w, )?{re.escape(name)}[=\s]", text)]


def split_trace(raw: bytes) -> tuple[bytes, bytes]:
    """Cut a stored file into the trace fields the Maildir handler wrote and the bytes the client sent.

    The trace is one ``Return-Path:`` line and one ``Received:`` field with its folded (whitespace-led) lines.
    """
    if not raw.startswith(b"Return-Path: "):
        raise AssertionError(f"stored message does not start with Return-Path: {raw[:200]!r}")
    pos = raw.index(b"\r\n") + 2
    if not raw.startswith(b"Received: ", pos):
        raise AssertionError(f"no Received: field after Return-Path: {raw[:400]!r}")
    pos = raw.index(b"\r\n", pos) + 2
    while raw[pos:pos + 1] in (b" ", b"\t"):
        pos = raw.index(b"\r\n", pos) + 2
    return raw[:pos], raw[pos:]


@dataclass(frozen=True)
class Delivery:
    """One file found in ``new/``: its name, the trace fields the server wrote, and the client's bytes."""

    name: str
    trace: bytes
    content: bytes

    @property
    def return_path(self) -> str:
        """The reverse-path in the ``Return-Path:`` field, without angle brackets (UTF-8 decoded)."""
        first = self.trace.split(b"\r\n", 1)[0].decode("utf-8")
        return first[len("Return-Path: "):].strip().removeprefix("<").removesuffix(">")

    @property
    def received(self) -> str:
        """The ``Received:`` field unfolded into one line, without its name."""
        field = self.trace.split(b"\r\n", 1)[1].decode("utf-8")
        return re.sub(r"\r\n[ \t]+", " ", field).strip()[len("Received: "):]


def _delivery_order(name: str) -> tuple[int, str]:
    match = _DELIVERY_NUMBER.search(name)
    return (int(match.group(1)) if match else -1, name)


class EsmtpkitProcess:
    """A ``twistd -n esmtpkit`` process listening on a free 127.0.0.1 port, delivering to ``maildir``."""

    def __init__(self, workdir: Path, options: Sequence[str] = ()) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.maildir = workdir / "Maildir"
        self.log = workdir / "twistd.log"
        self._output = open(workdir / "twistd.out", "wb")
        self.process = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", "--logfile", str(self.log), "esmtpkit",
             "--listen", "tcp:0:interface=127.0.0.1", "--hostname", HOSTNAME, "--maildir", str(self.maildir),
             *options],
            cwd=workdir, env=clean_env(), stdout=self._output, stderr=subprocess.STDOUT)
        try:
            self.port = self._wait_port()
        except BaseException:
            self.stop()
            raise

    @property
    def address(self) -> tuple[str, int]:
        """``("127.0.0.1", port)``."""
        return ("127.0.0.1", self.port)

    def log_text(self) -> str:
        """The twistd log and anything the process printed, so far."""
        parts = [path.read_text(errors="replace") for path in (self.log, self.workdir / "twistd.out")
                 if path.exists()]
        return "\n".join(parts)

    def _wait_port(self) -> int:
        return wait_for_port(self.process, self.log, self.log_text, CLIENT_TIMEOUT)

    def stored(self) -> list[str]:
        """Names of the files in ``new/``, in delivery order."""
        folder = self.maildir / "new"
        names = [n for n in os.listdir(folder) if not n.startswith(".")] if folder.is_dir() else []
        return sorted(names, key=_delivery_order)

    def deliveries(self, count: int, timeout: float = CLIENT_TIMEOUT) -> list[Delivery]:
        """Wait until exactly ``count`` messages are in ``new/``; return them in delivery order."""
        deadline = time.monotonic() + timeout
        while True:
            names = self.stored()
            if len(names) > count:
                raise AssertionError(f"expected {count} message(s) in new/, found {len(names)}: {names}")
            if len(names) == count:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} message(s) in new/, found {len(names)} after {timeout} s;"
                                     f" server log:\n{self.log_text()[-4000:]}")
            time.sleep(0.02)
        found = []
        for name in names:
            trace, content = split_trace((self.maildir / "new" / name).read_bytes())
            found.append(Delivery(name, trace, content))
        return found

    def wait_for(self, count: int, timeout: float = CLIENT_TIMEOUT) -> list[bytes]:
        """Wait until exactly ``count`` messages are in ``new/``; return their bytes without the trace fields."""
        return [d.content for d in self.deliveries(count, timeout)]

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after a bound) and close its output file."""
        terminate(self.process, CLIENT_TIMEOUT)
        self._output.close()

    def problems(self) -> list[str]:
        """What a stopped server should not show: tracebacks in its log, files left behind in ``tmp/``."""
        found = []
        log = self.log_text()
        if "Traceback (most recent call last)" in log or "Unhandled Error" in log:
            found.append(f"the server logged a traceback:\n{log[-6000:]}")
        tmp = self.maildir / "tmp"
        leftovers = sorted(os.listdir(tmp)) if tmp.is_dir() else []
        if leftovers:
            found.append(f"files left in {tmp}: {leftovers}")
        return found


@pytest.fixture
def start_esmtpkit(tmp_path: Path) -> Iterator[Callable[..., EsmtpkitProcess]]:
    """A function starting ``twistd esmtpkit`` with extra options; every process started is stopped and checked."""
    started: list[EsmtpkitProcess] = []

    def start(*options: str) -> EsmtpkitProcess:
        process = EsmtpkitProcess(tmp_path / f"server{len(started)}", options)
        started.append(process)
        return process

    yield start
    problems = []
    for process in started:
        process.stop()
        problems.extend(process.problems())
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def esmtpkit_process(start_esmtpkit: Callable[..., EsmtpkitProcess]) -> EsmtpkitProcess:
    """A ``twistd esmtpkit`` process with the default (Maildir) handler, for one test."""
    return start_esmtpkit()


@dataclass(frozen=True)
class SecuredServer:
    """A server offering STARTTLS (certificate made for this test) and AUTH for one user."""

    server: EsmtpkitProcess
    ca: Path
    user: str
    password: str


#: Options the STARTTLS/AUTH tests need from ``twistd esmtpkit``.
TLS_AUTH_OPTIONS = ("--tls-cert", "--tls-key", "--auth")


@pytest.fixture
def secured_server(start_esmtpkit: Callable[..., EsmtpkitProcess], tmp_path: Path) -> SecuredServer:
    """``twistd esmtpkit`` with ``--tls-cert/--tls-key`` (a throw-away CA) and ``--auth memory:alice:…``."""
    missing = missing_options(*TLS_AUTH_OPTIONS)
    if missing:
        pytest.skip(f"twistd esmtpkit --help does not list {', '.join(missing)} (STARTTLS/AUTH not wired yet)")
    from ..certs import make_tls_files

    files = make_tls_files(tmp_path / "tls")
    user, password = "alice", "s3cret-Pw"
    server = start_esmtpkit("--tls-cert", str(files.cert), "--tls-key", str(files.key),
                            "--auth", f"memory:{user}:{password}")
    return SecuredServer(server, files.ca, user, password)


@dataclass(frozen=True)
class Ran:
    """A finished client run: exit status and output."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """stdout and stderr together, for failure messages and transcript checks."""
        return self.stdout + self.stderr


@pytest.fixture
def run_client(tmp_path: Path) -> Callable[..., Ran]:
    """Run a client program with a private HOME (no user config files) and a bound on its time.

    ``check=True`` (the default) fails the test, showing the output, unless the program exits 0.
    """
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)

    def run(argv: Sequence[str], *, input: bytes | None = None, check: bool = True, **kwargs: Any) -> Ran:
        out = subprocess.run(list(argv), input=input, capture_output=True, timeout=CLIENT_TIMEOUT,
                             env=clean_env(HOME=str(home)), cwd=tmp_path, **kwargs)
        ran = Ran(out.returncode, out.stdout.decode("utf-8", "replace"), out.stderr.decode("utf-8", "replace"))
        if check and ran.returncode != 0:
            pytest.fail(f"{argv[0]} exited with {ran.returncode}:\n{ran.output}", pytrace=False)
        return ran

    return run
