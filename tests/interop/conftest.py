"""Fixtures for the interop suite: a real ``twistd -n esmtpkit`` process delivering to a Maildir on 127.0.0.1, and
private Postfix instances (`start_postfix`).

Every test gets its own process and Maildir. `EsmtpkitProcess.wait_for` waits until N messages are in ``new/``
and gives back what the client sent: each stored file without the ``Return-Path:`` and ``Received:`` fields
(RFC 5321 §4.4) the Maildir handler writes in front of it. When a test ends the process is stopped and its log
and Maildir are checked: no traceback logged, nothing left behind in ``tmp/``. A Postfix instance lives in a
temporary directory with its own configuration, queue and log (the system's Postfix is never touched), and its
processes must all be gone when the test ends.
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

from ..daemons import free_port
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


# ---- a private Postfix instance ---------------------------------------------------------------------------------

POSTFIX = shutil.which("postfix", path="/usr/sbin:/usr/bin:/sbin:/bin")
SENDMAIL = shutil.which("sendmail", path="/usr/sbin:/usr/lib:/usr/bin")
POSTQUEUE = shutil.which("postqueue", path="/usr/sbin:/usr/bin")
MASTER_CF = Path("/etc/postfix/master.cf")
#: How long a Postfix command or delivery may take before the test fails (a bound, not an expectation).
POSTFIX_TIMEOUT = 60


def postfix_missing() -> str | None:
    """Why a private Postfix instance cannot run here (None when it can)."""
    if not (POSTFIX and SENDMAIL and POSTQUEUE and MASTER_CF.exists()):
        return "Postfix is not installed (apt-get install postfix: postfix, sendmail, postqueue, master.cf)"
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root (its master runs daemons as user postfix)"
    try:
        pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")
    except KeyError:
        return "the postfix user or the postdrop group does not exist"
    return None


def private_master_cf(text: str, smtpd_port: int | None = None) -> str:
    """master.cf with every ``inet`` service (and its ``-o`` lines) commented out and chroot off everywhere.

    Without a listener the instance takes mail only through sendmail/postdrop; without chroot it needs no
    copies of /etc files under its queue directory. A ``postlog`` service (Postfix >= 3.4) is added if missing.
    With ``smtpd_port``, one smtpd listens on 127.0.0.1 at that port.
    """
    out: list[str] = []
    in_inet = False
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            out.append(line)  # comments and blank lines neither start nor end a logical line
            continue
        if line[:1] in (" ", "\t"):
            out.append("#" + line if in_inet else line)  # continues the service above
            continue
        if len(fields) < 8:
            raise ValueError(f"unexpected master.cf line: {line!r}")
        in_inet = fields[1] == "inet"
        if in_inet:
            out.append("#" + line)
        else:
            fields[4] = "n"
            out.append(" ".join(fields))
    if not any(line.split()[:2] == ["postlog", "unix-dgram"] for line in out if line.strip()):
        out.append("postlog unix-dgram n - n - 1 postlogd")
    if smtpd_port is not None:
        out.append(f"127.0.0.1:{smtpd_port} inet n - n - - smtpd")
    return "\n".join(out) + "\n"


def _instance_processes(config_dir: Path) -> list[int]:
    """Live (not zombie) processes whose environment says MAIL_CONFIG=<config_dir>: this instance's daemons."""
    marker = b"MAIL_CONFIG=" + os.fsencode(config_dir)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in (b"Z", b"X"):
            found.append(int(entry))
    return found


class PrivatePostfix:
    """A Postfix instance under ``base``: ``etc/`` (config), ``spool/`` (queue), ``data/``, ``maillog``.

    ``relay_port``: everything is relayed to ``[127.0.0.1]:relay_port``. ``smtpd_port``: an smtpd listens on
    127.0.0.1 at that port. ``virtual_domains``: mail for these domains is delivered by virtual(8) into one
    Maildir, ``mailbox`` (each file says whom it was for in ``X-Original-To:`` and ``Delivered-To:``).
    ``settings`` add to or replace main.cf parameters.
    """

    def __init__(self, base: Path, relay_port: int | None = None, *, smtpd_port: int | None = None,
                 virtual_domains: Sequence[str] = (), settings: dict[str, str] | None = None) -> None:
        self.base = base
        self.etc = base / "etc"
        self.spool = base / "spool"
        self.maillog = base / "maillog"
        self.mailbox = base / "mail" / "box"
        self.smtpd_port = smtpd_port
        self.env = dict(os.environ, MAIL_CONFIG=str(self.etc))
        self.etc.mkdir(mode=0o755)
        self.spool.mkdir(mode=0o755)
        (self.etc / "master.cf").write_text(private_master_cf(MASTER_CF.read_text(), smtpd_port))
        config = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.spool),
            "data_directory": str(base / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "myhostname": "test.local",
            "mydomain": "test.local",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "smtp_tls_security_level": "none",
            "smtp_dns_support_level": "disabled",
            "maillog_file_prefixes": f"/var, /dev/stdout, {base}",
            "maillog_file": str(self.maillog),
            "biff": "no",
        }
        if relay_port is not None:
            config["relayhost"] = f"[127.0.0.1]:{relay_port}"
        if virtual_domains:
            owner = pwd.getpwnam("postfix")
            (base / "mail").mkdir(mode=0o755)
            os.chown(base / "mail", owner.pw_uid, owner.pw_gid)
            config.update({
                "virtual_mailbox_domains": ", ".join(virtual_domains),
                "virtual_mailbox_base": str(base / "mail"),
                "virtual_mailbox_maps": "static:box/",
                "virtual_uid_maps": f"static:{owner.pw_uid}",
                "virtual_gid_maps": f"static:{owner.pw_gid}",
                "virtual_minimum_uid": "1",
            })
        config.update(settings or {})
        (self.etc / "main.cf").write_text("".join(f"{name} = {value}\n" for name, value in config.items()))

    def run(self, *argv: str, input: bytes | None = None) -> str:
        """Run a Postfix command for this instance; fail the test with its output unless it exits 0."""
        out = subprocess.run(list(argv), input=input, capture_output=True, env=self.env, timeout=POSTFIX_TIMEOUT)
        text = (out.stdout + out.stderr).decode("utf-8", "replace")
        if out.returncode != 0:
            pytest.fail(f"{' '.join(argv)} exited with {out.returncode}:\n{text}\n{self.log()}", pytrace=False)
        return text

    def log(self) -> str:
        """The instance's mail log so far."""
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def wait_log(self, pattern: str, count: int = 1, timeout: float = POSTFIX_TIMEOUT) -> str:
        """The log, once ``pattern`` (a regular expression) occurs in it ``count`` times: Postfix logs a delivery
        a moment after the other side has it."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if len(re.findall(pattern, log)) >= count:
                return log
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not {count} time(s) in the log after {timeout} s:\n{log}")
            time.sleep(0.05)

    def start(self) -> None:
        """Check the configuration and start the instance; with an smtpd, wait until it takes connections."""
        self.run(POSTFIX or "postfix", "-c", str(self.etc), "check")
        self.run(POSTFIX or "postfix", "-c", str(self.etc), "start")
        if self.smtpd_port is None:
            return
        deadline = time.monotonic() + POSTFIX_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.smtpd_port), timeout=POSTFIX_TIMEOUT).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"Postfix's smtpd does not listen on {self.smtpd_port}:\n{self.log()}")
                time.sleep(0.05)

    def submit(self, sender: str, recipients: list[str], message: bytes) -> None:
        """Queue a message as a local user would (``sendmail -i``: a lone "." line is content, not the end)."""
        self.run(SENDMAIL or "sendmail", "-C", str(self.etc), "-i", "-f", sender, *recipients, input=message)

    def flush(self) -> None:
        """Ask the queue manager to deliver now (``postqueue -f``)."""
        self.run(POSTQUEUE or "postqueue", "-c", str(self.etc), "-f")

    def delivered(self, count: int, timeout: float = POSTFIX_TIMEOUT) -> list[bytes]:
        """Wait until exactly ``count`` messages are in ``mailbox/new``; return them, oldest first."""
        folder = self.mailbox / "new"
        deadline = time.monotonic() + timeout
        while True:
            names = sorted(os.listdir(folder)) if folder.is_dir() else []
            if len(names) > count:
                raise AssertionError(f"expected {count} message(s), found {len(names)}:\n{self.log()}")
            if len(names) == count:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} message(s), found {len(names)} after {timeout} s:\n"
                                     f"{self.log()}")
            time.sleep(0.05)
        files = [folder / name for name in names]
        return [path.read_bytes() for path in sorted(files, key=lambda path: path.stat().st_mtime_ns)]

    def stop(self) -> list[str]:
        """Stop the instance and wait until its processes are gone; return what went wrong (killed leftovers)."""
        problems = []
        if (self.spool / "pid" / "master.pid").exists():
            out = subprocess.run([POSTFIX or "postfix", "-c", str(self.etc), "stop"], capture_output=True,
                                 env=self.env, timeout=POSTFIX_TIMEOUT)
            if out.returncode != 0:
                problems.append(f"postfix stop exited with {out.returncode}: {out.stdout!r} {out.stderr!r}")
        deadline = time.monotonic() + 20
        while _instance_processes(self.etc) and time.monotonic() < deadline:
            time.sleep(0.1)
        leftovers = _instance_processes(self.etc)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if leftovers:
            problems.append(f"Postfix processes still running after stop (killed): {leftovers}")
        return problems


@pytest.fixture
def start_postfix() -> Iterator[Callable[..., PrivatePostfix]]:
    """A function starting a private Postfix instance (`PrivatePostfix`'s arguments but ``base``); each one is
    stopped and removed when the test ends, and the test fails if any of its processes had to be killed."""
    started: list[PrivatePostfix] = []

    def start(*args: Any, **kwargs: Any) -> PrivatePostfix:
        # A short path (UNIX socket names are limited to about 100 bytes) that the postfix user may traverse.
        base = Path(tempfile.mkdtemp(prefix="esmtpkit-postfix-"))
        base.chmod(0o755)
        try:
            instance = PrivatePostfix(base, *args, **kwargs)
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            raise
        started.append(instance)
        instance.start()
        return instance

    yield start
    problems = []
    for instance in started:
        found = instance.stop()
        if found:
            problems.extend(found + [instance.log()])
        shutil.rmtree(instance.base, ignore_errors=True)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# ---- OpenDKIM (tests/opendkimd.py) ----------------------------------------------------------------------------------

@pytest.fixture
def opendkim(tmp_path: Path) -> Any:
    """OpenDKIM's files (keys, configurations) in a folder of the test's; its daemons are started by the tests."""
    from tests.opendkimd import OpenDKIM

    return OpenDKIM(tmp_path / "opendkim")


@pytest.fixture
def opendkim_zones(opendkim: Any) -> Iterator[Any]:
    """The test world's zones plus OpenDKIM's key for good.test (selector ``sel``), on a private name server."""
    from tests.opendkimd import opendkim_dns

    with opendkim_dns(opendkim) as server:
        yield server

