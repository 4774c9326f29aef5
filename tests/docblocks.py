"""The code blocks of README.md and docs/*.md, and a reader who follows a page from an empty folder.

Shared by the docs tests. A page marks a block with an HTML comment on the line before its opening fence (the
comment shows neither on GitHub nor in the built docs):

- ``<!-- not run: REASON -->``: an illustration that cannot run as written on a test machine (it needs root, a
  certificate, another host, a broker ...); REASON says what it needs.
- ``<!-- file: PATH -->``: the page asks the reader to save the block as PATH (relative to the reader's folder).
- ``<!-- continues the block above -->``: Python run in the same session as the Python block before it.

Every other ``python`` and ``sh`` block is run by `Reader`, in page order, in one folder that starts empty, with
the environment running the tests as the reader's: its ``bin`` folder first on ``PATH``, ``.venv/bin/`` in a
command standing for that folder, and no ``PYTHONPATH`` (only the installed package is found). What a reader does
that the test environment has already done, creating the virtual environment and installing into it
(`INSTALL_STEPS`), is left out. A Python block runs as ``python -`` from the folder, as if typed into ``python``
there.

A server (``twistd -n ...``, or a Python program calling ``reactor.run()``) must listen on 127.0.0.1 as written
(``interface=127.0.0.1``, or ``twistd esmtpkit``'s default ``--listen``). It is started in the background and
stopped with SIGTERM (where the page says Ctrl-C) when the next server starts or the page ends; it must not have
exited before, nor logged a traceback. It listens on a free port instead of the one the page names: every
``tcp:PORT`` endpoint of the command and of the files the page saved becomes ``tcp:0:interface=127.0.0.1`` (a
``twistd esmtpkit`` without ``--listen`` gets that ``--listen``), the port it got is read from its output
(``... starting on PORT``), and in the blocks after it the page's port number is replaced by that port.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
#: Every page whose code blocks a reader may run.
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted(DOCS.glob("filters/*.md"))]
#: The languages a block may be written in; of those, RUNNABLE blocks are run unless marked ``not run``.
LANGUAGES = frozenset({"python", "sh", "text", "json", "yaml", "promql", "", "{eval-rst}", "{toctree}"})
RUNNABLE = frozenset({"python", "sh"})
#: The folder holding this environment's ``python``, ``twistd`` and ``pytest``.
BIN = Path(sys.executable).parent
#: Commands creating the reader's virtual environment and installing esmtpkit into it: already done here.
INSTALL_STEPS = (
    re.compile(r"python3? -m venv \.venv"),
    re.compile(r"\. \.venv/bin/activate"),
    re.compile(r"(\.venv/bin/)?pip install .+"),
)
#: Programs a page may use that a test machine need not have: a command using one is left out without it.
OPTIONAL_PROGRAMS = frozenset({"swaks"})
#: Bounds, not expectations: how long a command may run, a server may take to start or to stop.
TIMEOUT = 120.0

_FENCE = re.compile(r"(?P<indent> *)(?P<fence>`{3,})(?P<language>[^`\s]*)\s*")
_MARKER = re.compile(r"<!--\s*(?P<text>.*?)\s*-->")
_TCP = re.compile(r"\btcp:(?P<port>[1-9]\d*)(?P<options>(?::[A-Za-z]+=[^\s:'\"]*)*)")
_LISTENING = re.compile(r"starting on (\d+)|listening on (?:port |127\.0\.0\.1:)(\d+)")
_SERVES = "reactor.run()"


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its language, its text (a final newline included), its marker comment."""

    page: Path
    line: int
    language: str
    text: str
    marker: str = ""

    @property
    def where(self) -> str:
        """``page:line`` of the opening fence, for messages."""
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def not_run(self) -> str | None:
        """Why the block is not run, if it is marked so."""
        match = re.fullmatch(r"not run:\s*(.*)", self.marker)
        return match.group(1) if match else None

    @property
    def file(self) -> str | None:
        """The path the reader saves the block as, if the page says so."""
        match = re.fullmatch(r"file:\s*(\S+)", self.marker)
        return match.group(1) if match else None

    @property
    def continues(self) -> bool:
        """Whether the block runs in the Python session of the Python block before it."""
        return self.marker == "continues the block above"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of ``page``, in order, each with the marker comment on the line before it, if any."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.fullmatch(lines[index])
        if opening is None:
            index += 1
            continue
        indent = len(opening["indent"])
        closing = re.compile(rf" *{opening['fence']}`*\s*")
        end = index + 1
        while end < len(lines) and not closing.fullmatch(lines[end]):
            end += 1
        body = [line[indent:] if not line[:indent].strip() else line.lstrip() for line in lines[index + 1:end]]
        before = next((line.strip() for line in reversed(lines[:index]) if line.strip()), "")
        marker = _MARKER.fullmatch(before)
        found.append(Block(page, index + 1, opening["language"], "".join(line + "\n" for line in body),
                           marker["text"] if marker else ""))
        index = end + 1
    return found


def fenced(page: Path, language: str) -> list[str]:
    """The texts of the ``language`` blocks of ``page``, in order."""
    return [block.text for block in blocks(page) if block.language == language]


def filter_values(page: Path) -> list[str]:
    """The ``--filter`` values of the ``sh`` command lines of ``page``, in page order."""
    found = []
    for block in blocks(page):
        if block.language == "sh":
            words = shlex.split(block.text.replace("\\\n", " "))
            found += [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--filter"]
    return found


def run_python(text: str, folder: Path) -> subprocess.CompletedProcess[str]:
    """``text`` run as a reader runs a page's Python block: ``python -`` in ``folder``, only the installed package
    found (`reader_environment`); its output as text."""
    return subprocess.run([sys.executable, "-"], input=text, capture_output=True, text=True, cwd=folder,
                          env=reader_environment(), timeout=TIMEOUT)


def example_output(page: Path, folder: Path) -> str:
    """What the one Python block of ``page`` prints, run by `run_python` in ``folder``; it must exit with 0."""
    (block,) = [b for b in blocks(page) if b.language == "python"]
    ran = run_python(block.text, folder)
    assert ran.returncode == 0, ran.stderr
    return ran.stdout


def said_printed(page: Path) -> str:
    """What ``page`` says its example prints: the text in backquotes after ``It prints``."""
    said = re.search(r"It prints `([^`]+)`", page.read_text())
    assert said is not None, f"{page} does not say what its example prints"
    return said.group(1)


def commands(text: str) -> list[str]:
    """The command lines of an ``sh`` block: continuation lines joined, blank and comment-only lines left out."""
    lines = text.replace("\\\n", " ").splitlines()
    return [re.sub(r"\s+", " ", line).strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def install_steps(command: str) -> tuple[list[str], str]:
    """Split ``command`` into its leading install steps (joined by ``&&``) and the rest ("" if nothing is left)."""
    parts = [part.strip() for part in command.split("&&")]
    steps = []
    while parts and any(step.fullmatch(parts[0]) for step in INSTALL_STEPS):
        steps.append(parts.pop(0))
    return steps, " && ".join(parts)


def reader_environment() -> dict[str, str]:
    """The environment of a reader who activated the virtual environment the tests run in."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = sys.prefix
    env["PYTHONUNBUFFERED"] = "1"  # so the test reads a program's output as it is written
    return env


def loopback(text: str) -> tuple[str, list[int]]:
    """``text`` with every ``tcp:PORT`` endpoint made ``tcp:0:interface=127.0.0.1``, and those ports in order.

    Each endpoint must already say ``interface=127.0.0.1``: a server a reader runs as written listens on loopback.
    """
    ports: list[int] = []

    def free(match: re.Match[str]) -> str:
        assert ":interface=127.0.0.1" in match["options"], f"{match[0]} listens beyond 127.0.0.1"
        ports.append(int(match["port"]))
        options = [o for o in match["options"].split(":") if o and not o.startswith("interface=")]
        return ":".join(["tcp", "0", *options, "interface=127.0.0.1"])

    return _TCP.sub(free, text), ports


@dataclass
class Step:
    """What the reader ran for one block (a command line, a Python block, a saved file) and what it printed."""

    block: Block
    action: str
    output: str = ""


class Server:
    """A server a page started, running in its own process group; ``ports`` maps the page's ports to real ones."""

    def __init__(self, block: Block, args: list[str], program: str | None, wanted: list[int], cwd: Path,
                 log: Path, env: dict[str, str]) -> None:
        self.block = block
        self.log = log
        self.checked = False
        with open(log, "wb") as output:
            self.process = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=output,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        assert self.process.stdin is not None
        if program is not None:
            self.process.stdin.write(program.encode())
        self.process.stdin.close()
        try:
            got = self._wait_ports(max(1, len(wanted)))
        except BaseException:
            self.stop()
            raise
        self.ports = dict(zip(wanted, got))

    def text(self) -> str:
        """Everything the server printed so far."""
        return self.log.read_text(errors="replace")

    def _wait_ports(self, count: int) -> list[int]:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            found = [int(a or b) for a, b in _LISTENING.findall(self.text())]
            if len(found) >= count:
                return found[:count]
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.block.where}: the server did not start listening:\n{self.text()}")

    def stop(self) -> int:
        """Stop the server as Ctrl-C would (SIGTERM to its process group); its exit status."""
        for kill in (signal.SIGTERM, signal.SIGKILL):
            if self.process.poll() is not None:
                break
            try:
                os.killpg(self.process.pid, kill)
                self.process.wait(TIMEOUT)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        return self.process.wait()

    def check_stopped(self) -> None:
        """Fail unless the server ran until it was stopped and logged no traceback."""
        self.checked = True
        code = self.stop()
        text = self.text()
        assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM), f"{self.block.where}: exit status {code}:\n{text}"
        assert "Traceback" not in text and "Unhandled" not in text, f"{self.block.where}:\n{text}"


@dataclass
class Reader:
    """Follows pages in ``folder`` (made empty), writing server output into ``logs``; stops its servers on exit."""

    folder: Path
    logs: Path
    steps: list[Step] = field(default_factory=list)
    servers: list[Server] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = reader_environment()
        self._python = ""
        self._listens: dict[str, list[int]] = {}

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for server in self.servers:
            if kind is not None:
                server.stop()
            elif not server.checked:
                server.check_stopped()

    @property
    def server(self) -> Server | None:
        """The server started last, if it is running."""
        return self.servers[-1] if self.servers and self.servers[-1].process.poll() is None else None

    def follow(self, page_blocks: list[Block]) -> None:
        """Do what each block says, in order."""
        for block in page_blocks:
            self.take(block)

    def take(self, block: Block) -> None:
        """Do what one block says: save it, run it, or nothing for illustrations and output."""
        if block.language not in RUNNABLE or block.not_run is not None:
            return
        if block.file is not None:
            self._save(block, block.file)
        elif block.language == "python":
            self._run_python(block)
        else:
            for command in commands(block.text):
                self._run_command(block, command)

    def output(self, block: Block) -> str:
        """What the runs of ``block`` printed."""
        return "".join(step.output for step in self.steps if step.block == block)

    def _served(self, text: str) -> str:
        """``text`` with the page's port numbers replaced by those the running server got."""
        server = self.server
        for wanted, got in (server.ports.items() if server else ()):
            text = re.sub(rf"(?<![\w.]){wanted}(?![\w.])", str(got), text)
        return text

    def _save(self, block: Block, name: str) -> None:
        path = self.folder / name
        assert not Path(name).is_absolute() and ".." not in Path(name).parts, f"{block.where}: {name}"
        assert path.parent.is_dir(), f"{block.where}: the page saves {name} before making {path.parent.name}/"
        text, ports = loopback(block.text)
        self._listens[name] = ports
        path.write_text(self._served(text))
        self.steps.append(Step(block, f"saved {name}"))

    def _run_python(self, block: Block) -> None:
        session = (self._python if block.continues else "") + block.text
        assert not block.continues or self._python, f"{block.where}: no Python block above to continue"
        self._python = session
        python = str(BIN / "python")
        if _SERVES in session:
            program, ports = loopback(session)
            self._start(block, [python, "-"], self._served(program), ports)
            return
        run = subprocess.run([python, "-"], input=self._served(session), cwd=self.folder, env=self.env,
                             capture_output=True, text=True, timeout=TIMEOUT)
        self.steps.append(Step(block, "python -", run.stdout + run.stderr))
        assert run.returncode == 0, f"{block.where}: exit status {run.returncode}:\n{run.stdout}{run.stderr}"

    def _run_command(self, block: Block, line: str) -> None:
        steps, command = install_steps(line)
        self.steps.extend(Step(block, f"done by the test environment: {step}") for step in steps)
        if not command:
            return
        command = command.replace(".venv/bin/", f"{BIN}/")
        words = shlex.split(command)
        program = next((w for w in words if not re.fullmatch(r"\w+=.*", w)), "")
        if shutil.which(program, path=self.env["PATH"]) is None and Path(program).name in OPTIONAL_PROGRAMS:
            self.steps.append(Step(block, f"left out, {program} is not installed: {command}"))
            return
        served = self._server_command(words, program)
        if served is not None:
            self._start(block, ["bash", "-c", self._served(served[0])], None, served[1])
            return
        command = self._served(command)
        run = self.shell(command)
        self.steps.append(Step(block, command, run.stdout + run.stderr))
        assert run.returncode == 0, f"{block.where}: {command}\nexit status {run.returncode}:\n{run.stdout}{run.stderr}"

    def shell(self, command: str) -> subprocess.CompletedProcess[str]:
        """Run ``command`` with bash in the reader's folder and environment; what it printed and its exit status."""
        return subprocess.run(["bash", "-c", command], cwd=self.folder, env=self.env, capture_output=True, text=True,
                              timeout=TIMEOUT)

    def _server_command(self, words: list[str], program: str) -> tuple[str, list[int]] | None:
        """For a command that serves until stopped: the command to run instead, and the ports it asks for."""
        args = words[words.index(program) + 1:]
        name = Path(program).name
        if name in ("python", "python3") and args and (self.folder / args[0]).is_file():
            return (shlex.join(words), self._listens.get(args[0], [])) if \
                _SERVES in (self.folder / args[0]).read_text() else None
        if name != "twistd" or not {"-n", "--nodaemon"} & set(args):
            return None
        if "-y" in args:
            return shlex.join(words), self._listens.get(args[args.index("-y") + 1], [])
        wanted: list[int] = []
        out: list[str] = []
        for word in words:
            option, _, value = word.partition("=")
            if out and out[-1] == "--listen" or option == "--listen" and value:
                endpoint, ports = loopback(value if option == "--listen" else word)
                assert ports, f"{word}: only tcp: endpoints can be moved to a free loopback port"
                wanted += ports
                word = f"--listen={endpoint}" if option == "--listen" else endpoint
            out.append(word)
        if not wanted:
            out += ["--listen", "tcp:0:interface=127.0.0.1"]
            wanted = [2525]
        return shlex.join(out), wanted

    def _start(self, block: Block, args: list[str], program: str | None, wanted: list[int]) -> None:
        for earlier in self.servers:
            if not earlier.checked:
                earlier.check_stopped()
        log = self.logs / f"server-{len(self.servers)}.log"
        server = Server(block, args, program, wanted, self.folder, log, self.env)
        self.servers.append(server)
        self.steps.append(Step(block, f"started {shlex.join(args)}"))
