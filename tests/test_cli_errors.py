"""Mistakes on the ``twistd esmtpkit`` command line, each against a real twistd process run from a temporary folder:
one line naming the option and what is wrong, a non-zero exit, never a traceback or the whole ``--help``."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from .support import run_twistd

HINT = "see twistd esmtpkit --help"

#: A handler module of the reader's own whose constructor fails (a database that is down, say).
RAISING_HANDLER = '''
from esmtpkit.handlers.base import MessageHandler


class Raising(MessageHandler):
    def __init__(self):
        raise RuntimeError("the database is down")
'''

#: (arguments, the option the error line must name)
MISTAKES = [
    (["--listen", "tcp:notaport"], "--listen tcp:notaport"),
    (["--listen", "nosuchtype:1"], "--listen nosuchtype:1"),
    (["--listen", "tcp:70000"], "--listen tcp:70000"),
    (["--listen", "haproxy:tcp:99999"], "--listen haproxy:tcp:99999"),
    (["--listen", "tcp:25:colour=blue"], "--listen tcp:25:colour=blue"),
    (["--listen", "systemd:domain=INET:name=smtp"], "--listen systemd:domain=INET:name=smtp"),
    (["--metrics", "tcp:x"], "--metrics tcp:x"),
    (["--max-message-size", "-1"], "--max-message-size"),
    (["--timeout", "x"], "--timeout"),
    (["--error-delay", "soon"], "--error-delay"),
    (["--workers", "0"], "--workers"),
    (["--bare-newline", "maybe"], "--bare-newline"),
    (["--log-events", "some"], "--log-events"),
    (["--handler", "nosuch.Class"], "--handler nosuch.Class"),
    (["--handler", "esmtpkit.NotAClass"], "--handler esmtpkit.NotAClass"),
    (["--handler", "esmtpkit.server.policy.Policy"], "--handler esmtpkit.server.policy.Policy"),
    (["--handler", "raising.Raising"], "--handler raising.Raising"),
    (["--handler-option", "colour=blue"], "--handler-option colour"),
    (["--nosuch"], "--nosuch"),
    (["--timeout"], "--timeout"),
    (["--maildir", "a-file"], "--maildir a-file"),
    (["--auth", "nosuch:x"], "--auth nosuch:x"),
    (["--auth", "file:missing"], "--auth file:missing"),
    (["--tls-cert", "missing.pem"], "--tls-cert missing.pem"),
    (["--listen", "tcp:2525", "--workers", "2", "--listen", "unix:smtp.sock"], "--workers"),
]


def output_lines(run: subprocess.CompletedProcess[str]) -> list[str]:
    """Everything the process printed, stdout then stderr, line by line."""
    return (run.stdout + run.stderr).splitlines()


@pytest.mark.parametrize("args, option", MISTAKES, ids=[" ".join(args) for args, _ in MISTAKES])
def test_usage_error(tmp_path: Path, args: list[str], option: str) -> None:
    """One line on stderr naming the option, then the hint; nothing on stdout; exit status 2; nothing started."""
    (tmp_path / "raising.py").write_text(RAISING_HANDLER)
    (tmp_path / "a-file").write_text("not a folder\n")
    run = run_twistd(tmp_path, *args, pythonpath=tmp_path)
    assert run.returncode == 2, output_lines(run)
    assert run.stdout == ""
    assert "Traceback" not in run.stderr
    error, hint = run.stderr.splitlines()
    assert error.startswith(f"twistd esmtpkit: {option}"), error
    assert hint == HINT


def test_handler_constructor_error_is_named(tmp_path: Path) -> None:
    """Whatever a handler's constructor raises is reported with its type and message."""
    (tmp_path / "raising.py").write_text(RAISING_HANDLER)
    run = run_twistd(tmp_path, "--handler", "raising.Raising", pythonpath=tmp_path)
    assert run.stderr.splitlines()[0] == ("twistd esmtpkit: --handler raising.Raising: cannot make one: RuntimeError: "
                                          "the database is down")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_unusable_maildir(tmp_path: Path) -> None:
    """A Maildir that cannot be made is refused at start, not answered 451 for every message."""
    run = run_twistd(tmp_path, "--maildir", "/proc/nope")
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "twistd esmtpkit: --maildir /proc/nope: not a usable Maildir: no such file or directory (/proc/nope)", HINT]


def test_documented_examples(tmp_path: Path) -> None:
    """The mistakes shown in docs/running.md print what the page says they print."""
    page = (Path(__file__).parent.parent / "docs" / "running.md").read_text()
    section = page.split("## Mistakes and exit statuses", 1)[1]
    (block,) = re.findall(r"```text\n(\$ twistd .*?)```", section, re.S)
    shown = re.split(r"^\$ ", block, flags=re.M)[1:]
    assert len(shown) == 2
    for example in shown:
        command, *printed = example.splitlines()
        args = command.split()
        assert args[:4] == ["twistd", "-n", "--pidfile=", "esmtpkit"]
        run = run_twistd(tmp_path, *args[4:])
        assert (run.returncode, run.stdout, run.stderr.splitlines()) == (2, "", printed)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A 127.0.0.1 port another socket is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("extra", [[], ["--workers", "2"], ["--reuse-port"]],
                         ids=["one process", "workers", "reuse-port"])
def test_port_in_use(tmp_path: Path, taken_port: int, extra: list[str]) -> None:
    """An address in use: exit status 1 and one line after twistd's two start-up lines, no traceback."""
    run = run_twistd(tmp_path, "--listen", f"tcp:{taken_port}:interface=127.0.0.1", *extra)
    lines = output_lines(run)
    assert run.returncode == 1, lines
    assert len(lines) <= 3, lines
    assert not any("Traceback" in line for line in lines)
    assert lines[-1].endswith(f" cannot listen on 127.0.0.1:{taken_port} (--listen): address already in use")


def test_metrics_port_in_use(tmp_path: Path, taken_port: int) -> None:
    """The --metrics endpoint is named when it is the one that cannot listen."""
    run = run_twistd(tmp_path, "--listen", "tcp:0:interface=127.0.0.1",
                     "--metrics", f"tcp:{taken_port}:interface=127.0.0.1")
    lines = output_lines(run)
    assert run.returncode == 1, lines
    assert len(lines) <= 3, lines
    assert lines[-1].endswith(f" cannot listen on 127.0.0.1:{taken_port} (--metrics): address already in use")


def test_port_in_use_as_a_daemon(tmp_path: Path, taken_port: int) -> None:
    """Without -n: twistd's waiting parent prints the reason and exits 1; no pid file is left; the log says why."""
    run = run_twistd(tmp_path, "--listen", f"tcp:{taken_port}:interface=127.0.0.1", daemon=True)
    pidfile = tmp_path / "twistd.pid"
    if run.returncode == 0 and pidfile.exists():  # it started after all: do not leave a daemon behind
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
    assert run.returncode == 1
    assert f"cannot listen on 127.0.0.1:{taken_port} (--listen): address" in run.stderr
    assert not pidfile.exists()
    log = (tmp_path / "twistd.log").read_text()
    assert f"[esmtpkit.ops.listening#critical] cannot listen on 127.0.0.1:{taken_port}" in log
    assert "Traceback" not in log
