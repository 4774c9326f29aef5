"""Run docs/tutorial.md and the guides beside it (embedding.md, coming-from-elsewhere.md) as a reader would.

Every ``sh`` command of the tutorial is either run here (``twistd`` servers, ``twistd esmtpkit --help``, the
pytest command) or is one of the install steps the test environment has already done. Servers run as real
``twistd`` processes in a scratch project folder holding a copy of examples/, on a free loopback port instead of
2525; the Python block that talks to each server runs against it. Blocks that need no server run as they are.
Complete programs (those that run a reactor) run as subprocesses, and a client checks what they print.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from .processes import terminate

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "tutorial.md"
EMBEDDING = ROOT / "docs" / "embedding.md"
ELSEWHERE = ROOT / "docs" / "coming-from-elsewhere.md"


def fenced(page: Path, language: str) -> list[str]:
    """The contents of the ``language`` code blocks of ``page``, in order."""
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S)


TEXT = DOC.read_text()
PYTHON = fenced(DOC, "python")
SH = fenced(DOC, "sh")
#: The tutorial's files, shown in full on the page.
FILES = [ROOT / "examples" / "rejecting_handler.py", ROOT / "examples" / "test_rejecting_handler.py"]
#: Install steps, done by the environment the tests run in (``pip install -e '.[test]'``).
INSTALL_STEPS = {"python3 -m venv .venv", ". .venv/bin/activate", "pip install '/path/to/esmtpkit[test]'"}
#: Bounds, not expectations: how long a server may take to start, a client to finish, pytest to run.
TIMEOUT = 60.0
TWISTD = Path(sys.executable).parent / "twistd"


def commands(blocks: list[str] = SH) -> list[str]:
    """Every command line of ``sh`` blocks (the tutorial's by default), continuation lines joined."""
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [re.sub(r"\s+", " ", line).strip() for line in lines if line.strip()]


def server_commands() -> list[str]:
    return [c for c in commands() if re.search(r"(^|\s)twistd -n\b", c)]


def client_blocks() -> list[str]:
    """The Python blocks that talk to the server started just before them."""
    return [b for b in PYTHON if "2525" in b]


def plain_blocks() -> list[str]:
    return [b for b in PYTHON if b not in client_blocks() and not any(b == f.read_text() for f in FILES)]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A reader's project folder: a copy of the tutorial's examples package, and the current directory."""
    (tmp_path / "examples").mkdir()
    for name in ("__init__.py", "rejecting_handler.py", "test_rejecting_handler.py"):
        shutil.copy(ROOT / "examples" / name, tmp_path / "examples" / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


class Server:
    """A documented command, run in ``cwd``; ``ports`` are where it listens once it does.

    A ``twistd`` command has its ``--listen`` options replaced by one free 127.0.0.1 port (``listen=True``) or is
    run as it is (its endpoints already edited to ``tcp:0``); a ``python`` command runs this interpreter.
    """

    def __init__(self, command: str, cwd: Path, listen: bool = True, ports: int = 1) -> None:
        words = shlex.split(command)
        env = dict(os.environ)
        while "=" in words[0]:
            name, _, value = words.pop(0).partition("=")
            env[name] = value
        self.log = cwd / "server.log"
        self.output = open(cwd / "server.out", "wb")
        if words[0] == "twistd":
            args = [str(TWISTD), "--logfile", str(self.log)]
            rest = iter(words[1:])
            for word in rest:
                if listen and word == "--listen":
                    next(rest)
                elif not (listen and word.startswith("--listen=")):
                    args.append(word)
            if listen:
                args += ["--listen", "tcp:0:interface=127.0.0.1"]
            pattern = r"starting on (\d+)"
        else:
            assert words[0] == "python", command
            args = [sys.executable, "-u", *words[1:]]
            pattern = r"listening on (?:port |127\.0\.0\.1:)(\d+)"
        self.process = subprocess.Popen(args, cwd=cwd, env=env, stdout=self.output, stderr=subprocess.STDOUT)
        self.ports = self._wait_ports(pattern, ports)
        self.port = self.ports[0]

    def _wait_ports(self, pattern: str, count: int) -> list[int]:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            found = [int(p) for p in re.findall(pattern, self.text())]
            if len(found) >= count:
                return found[:count]
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"the server did not start listening: {self.text()}")

    def text(self) -> str:
        log = self.log.read_text() if self.log.exists() else ""
        return log + Path(self.output.name).read_text(errors="replace")

    def stop(self) -> int:
        code = terminate(self.process, TIMEOUT)
        if not self.output.closed:
            self.output.close()
        return code


@pytest.fixture
def servers(project: Path) -> Iterator[list[Server]]:
    """Servers started by a test, stopped (and checked for logged errors) when it ends."""
    started: list[Server] = []
    yield started
    for server in started:
        code = server.stop()
        assert code in (0, -signal.SIGTERM), server.text()  # twistd ends by the signal it was stopped with
        assert "Traceback" not in server.text(), server.text()


def test_tutorial_files_are_the_examples() -> None:
    """The handler and the test module are shown in full, exactly as examples/ has them."""
    for path in FILES:
        assert path.read_text() in PYTHON, f"{path.relative_to(ROOT)} differs from its block in {DOC.name}"


def test_every_command_is_run_or_an_install_step() -> None:
    """A new command in the tutorial must be run by this module (or be an install step)."""
    known = set(server_commands()) | INSTALL_STEPS | {"twistd esmtpkit --help",
                                                      "python -m pytest examples/test_rejecting_handler.py"}
    assert set(commands()) <= known, set(commands()) - known
    assert INSTALL_STEPS <= set(commands())
    assert len(server_commands()) == len(client_blocks()) == 2


def test_plugin_help_lists_the_options(project: Path) -> None:
    """``twistd esmtpkit --help`` lists the options the tutorial uses."""
    run = subprocess.run([str(TWISTD), "esmtpkit", "--help"], capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stdout + run.stderr
    for option in ("--handler=", "--listen=", "--maildir=", "--handler-option="):
        assert option in run.stdout


def test_in_memory_example_runs(project: Path) -> None:
    """The Conversation example runs against the handler copied into the reader's project."""
    (block,) = plain_blocks()
    assert "Conversation(" in block
    exec(compile(block, str(DOC), "exec"), {})


@pytest.mark.parametrize("step", [0, 1], ids=["stock-server", "rejecting-handler"])
def test_server_and_client(step: int, project: Path, servers: list[Server]) -> None:
    """Each documented ``twistd`` command serves, and the client block after it gets what the page says."""
    server = Server(server_commands()[step], project)
    servers.append(server)
    block = client_blocks()[step].replace("2525", str(server.port))
    exec(compile(block, str(DOC), "exec"), {})
    delivered = list((project / "Maildir" / "new").iterdir())
    assert len(delivered) == 1
    assert list((project / "Maildir" / "tmp").iterdir()) == []


def test_rejecting_handler_under_twistd_stores_only_known_recipients(project: Path, servers: list[Server]) -> None:
    """Under twistd, the tutorial's handler stores Alice's copy and nothing for the refused recipient."""
    server = Server(server_commands()[1], project)
    servers.append(server)
    block = client_blocks()[1].replace("2525", str(server.port))
    exec(compile(block, str(DOC), "exec"), {})
    (stored,) = (project / "Maildir" / "new").iterdir()
    content = stored.read_bytes()
    assert b"for <alice@example.com>" in content
    assert content.endswith(b"Subject: hi\r\n\r\nHello Alice.\r\n")


def test_example_tests_pass(project: Path) -> None:
    """The documented pytest command passes the tutorial's tests in the reader's project folder."""
    (command,) = [c for c in commands() if c.startswith("python -m pytest ")]
    words = shlex.split(command)
    run = subprocess.run([sys.executable, *words[1:], "-q", "-p", "no:cacheprovider"], cwd=project,
                         capture_output=True, text=True, timeout=TIMEOUT * 2)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"^3 passed", run.stdout, re.M), run.stdout


def send(port: int, recipients: list[str]) -> dict:
    """Send one small message with smtplib; what ``sendmail`` returns (the refused recipients)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        return client.sendmail("alice@example.org", recipients, b"Subject: hi\r\n\r\nhello\r\n")


def is_program(block: str) -> bool:
    """A complete program: it runs the reactor itself, so it runs in its own process."""
    return "reactor.run()" in block or "task.react(" in block


def test_embedding_program_prints_what_the_page_shows(tmp_path: Path) -> None:
    """The self-contained program of embedding.md ends by itself and prints the page's output."""
    program = fenced(EMBEDDING, "python")[0]
    assert is_program(program)
    (tmp_path / "program.py").write_text(program)
    run = subprocess.run([sys.executable, "program.py"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert run.returncode == 0, run.stdout + run.stderr
    (shown,) = fenced(EMBEDDING, "text")
    expected = re.escape(shown).replace(r"41287", r"\d+")
    assert re.fullmatch(expected, run.stdout), (shown, run.stdout)


def test_embedding_application_runs_under_twistd(project: Path, servers: list[Server]) -> None:
    """mail_service.py and mail.tac, saved as the page says, serve both endpoints under the documented command."""
    service, tac = fenced(EMBEDDING, "python")[1:3]
    (project / "mail_service.py").write_text(service)
    (project / "mail.tac").write_text(re.sub(r"tcp:25\d\d", "tcp:0", tac))
    (command,) = commands(fenced(EMBEDDING, "sh"))
    server = Server(command, project, listen=False, ports=2)
    servers.append(server)
    for port in server.ports:
        assert send(port, ["bob@example.com"]) == {}
    assert "0 messages so far" in server.text()


def test_embedding_has_no_other_examples() -> None:
    assert len(fenced(EMBEDDING, "python")) == 3
    assert len(commands(fenced(EMBEDDING, "sh"))) == 1


def test_coming_from_elsewhere_examples_run(capsys: pytest.CaptureFixture[str]) -> None:
    """Each example that is not a server program runs and passes its own assertions."""
    blocks = [b for b in fenced(ELSEWHERE, "python") if not is_program(b)]
    assert len(blocks) == 4
    for block in blocks:
        exec(compile(block, str(ELSEWHERE), "exec"), {})
    out = capsys.readouterr().out
    assert "Message from alice@example.org to bob@example.com: 22 bytes" in out
    assert "for <console@example.com>" in out


def test_net_smtp_server_synopsis_serves(tmp_path: Path, servers: list[Server]) -> None:
    """The Net::SMTP::Server port serves and prints FROM, TO and MSG for each message."""
    (program,) = [b for b in fenced(ELSEWHERE, "python") if is_program(b)]
    (tmp_path / "synopsis.py").write_text(program.replace("tcp:2525", "tcp:0"))
    server = Server("python synopsis.py", tmp_path)
    servers.append(server)
    assert send(server.port, ["bob@example.com", "carol@example.com"]) == {}
    deadline = time.monotonic() + TIMEOUT
    line = "FROM alice@example.org TO bob@example.com, carol@example.com MSG 22 bytes"
    while line not in server.text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert line in server.text()
