"""``esmtpkit-queue``, the installed console script, run as a user would: list, hold, release, flush, delete, run
(a runner on its own, delivering to scripted mail exchangers until SIGTERM), the same on RabbitMQ where it can,
and one clear line with status 1 for every mistake."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import task, threads
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from esmtpkit.core.outbound import Message, Outcome, Recipient, Status
from esmtpkit.core.reply import Reply
from esmtpkit.queue.spool import HELD_MTIME, SpoolStore
from esmtpkit.server.factory import ESMTPFactory

from .mailnet import PrivateDNS, ScriptedHandler, ScriptedMX, listen_all, stop_all, until
from .rabbitmq import RabbitMQ, find_server

SCRIPT = Path(sys.executable).parent / "esmtpkit-queue"
#: Fixed times, so that ``list`` prints the same text on every run (shown in UTC).
ARRIVED = 1_767_225_600.0  # Thu Jan  1 00:00:00 2026
RETRY = ARRIVED + 330.0


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TZ="UTC")
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def queue(spool: Path, *, sender: str = "sender@example.org", recipients: list[Recipient] | None = None,
          **fields: Any) -> str:
    """Put one message into ``spool`` as the server would; its id."""
    clock = Clock()
    clock.advance(time.time())
    store = SpoolStore(str(spool), reactor=clock)
    entry = store.open_entry()
    entry.write(b"Subject: test\r\n\r\nhello\r\n")
    message = Message(id=entry.id, sender=sender, recipients=recipients or [Recipient("rcpt@example.net")],
                      arrived=ARRIVED, **fields)
    results: list[Any] = []
    entry.commit(message).addBoth(results.append)
    assert results == [None]
    return entry.id


def stored(spool: Path, id: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads((spool / "messages" / f"{id}.json").read_text())
    return value


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    """An empty spool, laid out as a server's store leaves it."""
    path = tmp_path / "queue"
    SpoolStore(str(path), reactor=Clock()).paths.prepare()
    return path


def test_the_script_is_installed() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("list", "flush", "hold", "release", "delete", "run"):
        assert command in result.stdout


def test_list_an_empty_queue(spool: Path) -> None:
    result = run("--spool", str(spool), "list")
    assert (result.returncode, result.stdout, result.stderr) == (0, "Mail queue is empty\n", "")


def test_list_shows_each_message_like_mailq(spool: Path) -> None:
    recipients = [Recipient("bob@example.net", outcome=Outcome(451, "4.4.1", "Connection refused", "")),
                  Recipient("carol@example.org", status=Status.DELIVERED,
                            outcome=Outcome(250, "2.0.0", "Ok", "mx.example.org[192.0.2.2]"))]
    id = queue(spool, recipients=recipients, size=1234, attempts=2, next_attempt=RETRY)
    result = run("--spool", str(spool), "list")
    assert result.returncode == 0, result.stderr
    indent = " " * 53
    assert result.stdout == (
        "-Queue ID-            --Size-- ----Arrival Time----  -Sender/Recipient-------\n"
        f"{id}      1234 Thu Jan  1 00:00:00   sender@example.org\n"
        f"{indent}2 attempts, next attempt Thu Jan  1 00:05:30\n"
        f"{indent}bob@example.net  pending\n"
        f"{indent}  451 4.4.1 Connection refused\n"
        f"{indent}carol@example.org  delivered\n"
        f"{indent}  250 2.0.0 Ok (mx.example.org[192.0.2.2])\n"
        "\n"
        "-- 2 Kbytes in 1 Request.\n")


def test_list_json_gives_one_object_per_message(spool: Path) -> None:
    ids = sorted([queue(spool), queue(spool, sender="")])
    result = run("--spool", str(spool), "list", "--json")
    assert result.returncode == 0, result.stderr
    listed = sorted((json.loads(line) for line in result.stdout.splitlines()), key=lambda m: m["id"])
    assert [m["id"] for m in listed] == ids
    assert [Message.from_json(m).sender for m in listed] == [stored(spool, id)["sender"] for id in ids]


def test_list_escapes_what_a_remote_server_said(spool: Path) -> None:
    queue(spool, sender="", recipients=[Recipient("a@example.net", outcome=Outcome(550, "5.1.1", "no\x1b[2J", ""))])
    result = run("--spool", str(spool), "list")
    assert "\x1b" not in result.stdout
    assert "550 5.1.1 no\\x1b[2J" in result.stdout
    assert "  <>\n" in result.stdout


def test_hold_and_release(spool: Path) -> None:
    id = queue(spool, next_attempt=RETRY)
    result = run("--spool", str(spool), "hold", id)
    assert (result.returncode, result.stdout) == (0, f"held: {id}\n")
    assert stored(spool, id)["held"] is True
    assert (spool / "messages" / f"{id}.json").stat().st_mtime == HELD_MTIME
    listing = run("--spool", str(spool), "list").stdout
    assert f"{id}!" in listing and "2 attempts" not in listing and "0 attempts, held" in listing
    result = run("release", "--spool", str(spool), id)
    assert (result.returncode, result.stdout) == (0, f"released: {id}\n")
    assert stored(spool, id)["held"] is False
    assert (spool / "messages" / f"{id}.json").stat().st_mtime == RETRY


def test_hold_and_release_say_when_there_is_nothing_to_do(spool: Path) -> None:
    id = queue(spool, next_attempt=RETRY)
    result = run("--spool", str(spool), "release", id)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"not held: {id}\n", "")
    run("--spool", str(spool), "hold", id)
    result = run("--spool", str(spool), "hold", id)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"already held: {id}\n", "")
    assert stored(spool, id)["held"] is True


def test_flush_of_a_held_message_says_so(spool: Path) -> None:
    later = time.time() + 3600
    held, due = queue(spool, held=True), queue(spool, next_attempt=later)
    result = run("--spool", str(spool), "flush", held, due)
    assert (result.returncode, result.stdout, result.stderr) == (
        1, f"due now: {due}\n", f"esmtpkit-queue: message is held, release it first: {held}\n")
    assert (spool / "messages" / f"{held}.json").stat().st_mtime == HELD_MTIME
    assert stored(spool, held)["held"] is True


def test_a_folder_that_is_not_a_spool_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not mail\n")
    for args in (["list"], ["list", "--json"], ["flush"], ["hold", "X"], ["delete", "ALL"]):
        result = run("--spool", str(other), *args)
        assert (result.returncode, result.stdout, result.stderr) == (
            1, "", f"esmtpkit-queue: not a spool directory: {other}\n"), args
    assert os.listdir(other) == ["notes.txt"]


def test_flush_makes_messages_due_now(spool: Path) -> None:
    later = time.time() + 3600
    one, two = queue(spool, next_attempt=later), queue(spool, next_attempt=later)
    held = queue(spool, held=True)
    result = run("--spool", str(spool), "flush", one)
    assert (result.returncode, result.stdout) == (0, f"due now: {one}\n")
    assert (spool / "messages" / f"{one}.json").stat().st_mtime < later
    assert (spool / "messages" / f"{two}.json").stat().st_mtime == pytest.approx(later, abs=1e-3)
    assert (spool / "flush").exists()
    result = run("--spool", str(spool), "flush")
    assert (result.returncode, result.stdout) == (0, "2 messages due now\n")
    assert (spool / "messages" / f"{held}.json").stat().st_mtime == HELD_MTIME


def test_delete_one_and_all(spool: Path) -> None:
    ids = [queue(spool) for _ in range(3)]
    result = run("--spool", str(spool), "delete", ids[0])
    assert (result.returncode, result.stdout) == (0, f"deleted: {ids[0]}\n")
    assert sorted(os.listdir(spool / "messages")) == sorted(f"{id}.{kind}" for id in ids[1:] for kind in
                                                            ("eml", "json"))
    result = run("--spool", str(spool), "delete", "ALL")
    assert (result.returncode, result.stdout) == (0, "deleted 2 messages\n")
    assert os.listdir(spool / "messages") == []


def test_an_unknown_id_is_one_line_and_status_1(spool: Path) -> None:
    id = queue(spool)
    for command in ("hold", "release", "delete", "flush"):
        result = run("--spool", str(spool), command, "06H4J9X5NA02JXRKWCQK")
        assert (result.returncode, result.stderr) == (1, "esmtpkit-queue: no such message: 06H4J9X5NA02JXRKWCQK\n")
    result = run("--spool", str(spool), "hold", "nonsense/../x", id)
    assert (result.returncode, result.stdout, result.stderr) == (
        1, f"held: {id}\n", "esmtpkit-queue: no such message: nonsense/../x\n")


@pytest.mark.parametrize("args, error", [
    (["list"], "no spool directory: {missing}"),
    ([], "the following arguments are required: COMMAND"),
    (["frob"], "argument COMMAND: invalid choice: 'frob'"),
    (["hold"], "the following arguments are required: ID"),
    (["delete", "ALL", "X"], "ALL stands alone: delete ALL"),
    (["list", "--bogus"], "unrecognized arguments: --bogus"),
    (["run"], "no spool directory: {missing}"),
    (["run", "--tls", "maybe"], "tls takes one of none, opportunistic, required, implicit, not 'maybe'"),
    (["run", "--min-backoff", "2h", "--max-backoff", "1h"], "min-backoff (7200 s) must not be above max-backoff"),
    (["run", "--port", "70000"], "port takes a port number from 1 to 65535"),
    (["run", "--username", "u", "--password", "p"], "username and password need a relayhost"),
    (["run", "--concurrency", "many"], "concurrency takes a whole number"),
    (["run", "--stop-timeout", "soon"], "argument --stop-timeout: not a duration above 0: 'soon'"),
    (["run", "--relayhost", "[::1"], "relayhost: expected [host]:port"),
    (["run", "--relayhost", ""], "relayhost is empty: name a host, or leave relayhost out to deliver by MX"),
    (["run", "--dns", "notanip"], "dns takes IP addresses with an optional port"),
    (["run", "--tls", "required", "--verify", "--ca-file", "/nonexistent"], "ca-file: no such file: /nonexistent"),
    (["run", "--backend", "sqlite"], "argument --backend: invalid choice: 'sqlite'"),
    (["--backend", "amqp", "hold", "X"], "hold needs the spool backend"),
    (["--backend", "amqp", "release", "X"], "release needs the spool backend"),
    (["--backend", "amqp", "delete", "ALL"], "delete needs the spool backend"),
    (["--backend", "amqp", "flush", "X"], "flush ID needs the spool backend"),
    (["--backend", "amqp", "--amqp-url", "http://broker.test", "list"], "not an amqp:// or amqps:// URL"),
])
def test_mistakes_are_one_line_and_status_1(tmp_path: Path, args: list[str], error: str) -> None:
    missing = tmp_path / "missing"
    result = run("--spool", str(missing), *args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("esmtpkit-queue: " + error.format(missing=missing))


def test_an_unreadable_envelope_is_reported(spool: Path) -> None:
    good, bad = queue(spool), queue(spool)
    (spool / "messages" / f"{bad}.json").write_text("{")
    result = run("--spool", str(spool), "list")
    assert result.returncode == 1
    assert good in result.stdout and bad not in result.stdout
    assert result.stderr.startswith(f"esmtpkit-queue: skipped {bad}: unreadable envelope")


def test_a_password_file_is_read_and_never_with_a_password(tmp_path: Path, spool: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    result = run("--spool", str(spool), "run", "--username", "u", "--password-file", str(secret))
    assert (result.returncode, result.stderr) == (1, "esmtpkit-queue: username and password need a relayhost (they "
                                                     "are never sent to MX hosts)\n")
    result = run("--spool", str(spool), "run", "--password", "p", "--password-file", str(secret))
    assert result.returncode == 1 and result.stderr.startswith("esmtpkit-queue: give --password or --password-file")
    missing = tmp_path / "nonexistent"
    result = run("--spool", str(spool), "run", "--relayhost", "[127.0.0.1]", "--username", "u",
                 "--password-file", str(missing))
    assert (result.returncode, result.stderr) == (
        1, f"esmtpkit-queue: --password-file {missing}: no such file or directory\n")


# ---- run: a runner on its own -------------------------------------------------------------------------------------

#: Bounds on waiting for what should happen within moments (a slow machine gets the whole bound).
WAIT = 60.0



class Runner:
    """``esmtpkit-queue run`` in its own process (and process group), its output in a file."""

    def __init__(self, log: Path, *args: str) -> None:
        self.log = log
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        with open(log, "wb") as output:
            self.process = subprocess.Popen([str(SCRIPT), *args], stdout=output, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def exited(self) -> int:
        await until(lambda: self.process.poll() is not None, f"the runner to exit:\n{self.text()}")
        return self.process.returncode

    def kill(self) -> None:
        """Leave no process behind, whatever happened."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(WAIT)


def queued(spool: Path) -> list[str]:
    return sorted(name[:-5] for name in os.listdir(spool / "messages") if name.endswith(".json"))


@pytest_twisted.ensureDeferred
async def test_run_delivers_by_mx_until_sigterm(spool: Path, tmp_path: Path) -> None:
    """A message queued before the runner starts goes to the domain's MX; SIGTERM then stops it with status 0."""
    id = queue(spool, recipients=[Recipient("bob@example.net")])
    dns = PrivateDNS({"example.net": {"MX": [(10, "mx1.example.net")]}, "mx1.example.net": {"A": ["127.0.0.2"]}})
    dns.start()
    mx = ScriptedMX("127.0.0.2", name="mx1.example.net")
    port = listen_all([mx])
    runner = Runner(tmp_path / "runner.log", "--spool", str(spool), "run", "--dns", f"127.0.0.1:{dns.port}",
                    "--port", str(port), "--tls", "none", "--hostname", "runner.test", "--concurrency", "2")
    try:
        await until(lambda: mx.messages, f"the delivery to the MX:\n{runner.text()}")
        await until(lambda: not queued(spool), f"the spool to empty:\n{runner.text()}")
        [message] = mx.messages
        assert (message.helo, message.sender, message.recipients) == ("runner.test", "sender@example.org",
                                                                      ["bob@example.net"])
        assert message.content == b"Subject: test\r\n\r\nhello\r\n"
        assert runner.process.poll() is None  # it keeps running, waiting for more
        runner.process.send_signal(signal.SIGTERM)
        assert await runner.exited() == 0, runner.text()
        text = runner.text()
        assert f"{id}: to=<bob@example.net>, relay=mx1.example.net[127.0.0.2]" in text
        assert "stopped" in text and "Traceback" not in text
    finally:
        runner.kill()
        await stop_all([mx])
        await dns.stop()


class AnswerLater(ScriptedHandler):
    """Takes the content, then answers the end of the data only when the test fires the Deferred it keeps."""

    mx: "AnswerLaterMX"

    def eom(self) -> Any:
        waiting: Deferred[Any] = Deferred()
        self.mx.waiting.append(waiting)
        return waiting


class AnswerLaterMX(ScriptedMX):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waiting: list[Deferred[Any]] = []
        self.factory = ESMTPFactory(lambda: AnswerLater(self), policy=self.policy, clock=self.reactor)


@pytest_twisted.ensureDeferred
async def test_run_lays_out_an_empty_folder_as_a_spool(tmp_path: Path) -> None:
    """``run`` in an empty folder makes the spool's layout, after which the other commands take the folder."""
    folder = tmp_path / "fresh"
    folder.mkdir()
    assert run("--spool", str(folder), "list").stderr == f"esmtpkit-queue: not a spool directory: {folder}\n"
    runner = Runner(tmp_path / "runner.log", "--spool", str(folder), "run", "--relayhost", "[127.0.0.1]:9",
                    "--tls", "none", "--hostname", "runner.test")
    try:
        await until(lambda: (folder / "messages").is_dir(), f"the spool layout:\n{runner.text()}")
        runner.process.send_signal(signal.SIGTERM)
        assert await runner.exited() == 0, runner.text()
    finally:
        runner.kill()
    result = run("--spool", str(folder), "list")
    assert (result.returncode, result.stdout) == (0, "Mail queue is empty\n")


@pytest_twisted.ensureDeferred
async def test_sigterm_waits_for_the_attempt_under_way_and_saves_it(spool: Path, tmp_path: Path) -> None:
    """Stopped mid-DATA, the runner finishes the attempt: the MX's 250 is recorded (the message is gone from the
    spool, never to be sent again) before the process exits with status 0."""
    queue(spool)
    mx = AnswerLaterMX("127.0.0.2", name="relay.test")
    port = listen_all([mx])
    runner = Runner(tmp_path / "runner.log", "run", "--spool", str(spool), "--relayhost", f"[127.0.0.2]:{port}",
                    "--tls", "none", "--hostname", "runner.test")
    try:
        await until(lambda: mx.waiting, f"the end of the data at the relay host:\n{runner.text()}")
        runner.process.send_signal(signal.SIGTERM)
        await until(lambda: "stopping" in runner.text(), "the runner to start stopping")
        assert runner.process.poll() is None and queued(spool)  # waiting for the answer, the message still queued
        mx.waiting[0].callback(Reply(250, ("Ok: queued",), "2.0.0"))
        assert await runner.exited() == 0, runner.text()
        assert queued(spool) == [] and "Traceback" not in runner.text()
    finally:
        runner.kill()
        await stop_all([mx])


# ---- RabbitMQ -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def broker() -> Iterator[RabbitMQ]:
    if find_server() is None:
        pytest.skip("Debian's rabbitmq-server is not installed (apt-get install rabbitmq-server)")
    if importlib.util.find_spec("pika") is None:
        pytest.skip("pika is not installed (pip install 'esmtpkit[amqp]')")
    node = RabbitMQ()
    try:
        node.start()
        yield node
    finally:
        node.stop()


def counts(broker: RabbitMQ, *args: str) -> dict[str, int]:
    result = run("--backend", "amqp", "--amqp-url", broker.url, "--amqp-queue", "mail", "list", "--json", *args)
    assert result.returncode == 0, result.stderr
    value: dict[str, int] = json.loads(result.stdout)
    return value


def test_list_and_flush_on_rabbitmq(broker: RabbitMQ) -> None:
    """``list`` counts the messages in each queue; ``flush`` moves those waiting for a retry to the main queue."""
    schedule = ["--min-backoff", "60", "--max-backoff", "60"]
    assert counts(broker, *schedule) == {"mail": 0, "mail.delay.60": 0, "mail.unreadable": 0}
    connection = broker.connection()
    try:
        channel = connection.channel()
        for n in range(2):
            channel.basic_publish("", "mail.delay.60", f'{{"id":"M{n}"}}\n'.encode())
    finally:
        connection.close()
    deadline = time.monotonic() + WAIT
    while counts(broker, *schedule)["mail.delay.60"] != 2:
        assert time.monotonic() < deadline, "the two messages never showed in the delay queue"
        time.sleep(0.1)
    listing = run("--backend", "amqp", "--amqp-url", broker.url, "--amqp-queue", "mail", "list", *schedule)
    assert (listing.returncode, listing.stderr) == (0, "")
    assert "       2  mail.delay.60\n" in listing.stdout
    assert listing.stdout.endswith("-- 2 messages waiting (those being delivered are not counted).\n")
    flushed = run("flush", "--backend", "amqp", "--amqp-url", broker.url, "--amqp-queue", "mail", *schedule)
    assert (flushed.returncode, flushed.stdout, flushed.stderr) == (0, "2 messages due now\n", "")
    while counts(broker, *schedule) != {"mail": 2, "mail.delay.60": 0, "mail.unreadable": 0}:
        assert time.monotonic() < deadline, counts(broker, *schedule)
        time.sleep(0.1)


def test_an_unreachable_broker_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        result = run("--backend", "amqp", "--amqp-url", f"amqp://guest:secret@127.0.0.1:{port}/%2F", "list")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"esmtpkit-queue: RabbitMQ at amqp://guest:***@127.0.0.1:{port}/%2F: broker "
                                    "unavailable")


@pytest_twisted.ensureDeferred
async def test_run_on_rabbitmq_delivers_acks_and_stops(broker: RabbitMQ, tmp_path: Path) -> None:
    """``run --backend amqp`` consumes the main queue, delivers, and acknowledges before a clean exit."""
    from twisted.internet import reactor

    from esmtpkit.queue.amqp import encode

    where = ["--backend", "amqp", "--amqp-url", broker.url, "--amqp-queue", "runq", "--min-backoff", "60",
             "--max-backoff", "60"]

    def ready() -> dict[str, int]:
        result = run(*where[:6], "list", "--json", *where[6:])
        assert result.returncode == 0, result.stderr
        value: dict[str, int] = json.loads(result.stdout)
        return value

    def publish(body: bytes) -> None:
        connection = broker.connection()
        try:
            connection.channel().basic_publish("", "runq", body)
        finally:
            connection.close()

    assert await threads.deferToThread(ready) == {"runq": 0, "runq.delay.60": 0, "runq.unreadable": 0}
    message = Message(id="06H4J9X5NA02JXRKWCQK", sender="alice@example.org",
                      recipients=[Recipient("bob@example.net")], arrived=time.time())
    await threads.deferToThread(publish, encode(message, b"Subject: hop\r\n\r\nvia RabbitMQ\r\n"))
    mx = ScriptedMX("127.0.0.2", name="relay.test")
    port = listen_all([mx])
    runner = Runner(tmp_path / "runner.log", *where[:6], "run", *where[6:], "--relayhost", f"[127.0.0.2]:{port}",
                    "--tls", "none", "--hostname", "runner.test")
    try:
        await until(lambda: mx.messages, f"the delivery to the relay host:\n{runner.text()}")
        [delivered] = mx.messages
        assert (delivered.sender, delivered.recipients) == ("alice@example.org", ["bob@example.net"])
        assert delivered.content == b"Subject: hop\r\n\r\nvia RabbitMQ\r\n"
        await until(lambda: "status=delivered" in runner.text(), "the runner to record the delivery")
        runner.process.send_signal(signal.SIGTERM)
        assert await runner.exited() == 0, runner.text()
        assert "Traceback" not in runner.text()
        deadline = time.monotonic() + WAIT
        while (counts_now := await threads.deferToThread(ready)) != {"runq": 0, "runq.delay.60": 0,
                                                                      "runq.unreadable": 0}:
            assert time.monotonic() < deadline, f"acknowledged and gone, not {counts_now}"
            await task.deferLater(reactor, 0.1, lambda: None)
    finally:
        runner.kill()
        await stop_all([mx])
