"""The queue from one end to the other, on loopback, against each backend: an SMTP client, the Queue handler, the
runners, a private DNS server and scripted mail exchangers (`tests.mailnet`).

Every test runs twice (``backend``):

- ``spool``: the Queue handler and its runner in this process, as one server runs them; the tests with two
  runners make the handler accept only (``runner=no``) and run two ``esmtpkit-queue run --spool`` processes on its
  spool directory;
- ``amqp``: a private RabbitMQ node for the module (`tests.rabbitmq`); the handler accepts only, and two
  ``esmtpkit-queue run --backend amqp`` processes deliver. Skipped, saying why, without RabbitMQ or pika.

What is checked: delivery to the best MX with content and envelope (DSN parameters included) intact; the next MX
after a refused connection and after a 421 greeting; a recipient refused with 5xx bounces alone, in an RFC 3464
report sent to the sender's domain's MX, and a message from the null sender is never reported on; a temporary
failure is retried, and a message past its lifetime bounces with 4.4.7; 60 messages over two runners reach each
recipient once; ``kill -9`` of one runner while the MX holds the end-of-data reply loses nothing and repeats only
what docs/queue.md and docs/queue-amqp.md allow. Last, ``twistd esmtpkit`` (server and runner in one process)
killed the same way and restarted delivers every message with no new connection.
"""

from __future__ import annotations

import email
import email.policy
import importlib.util
import os
import re
import signal
import smtplib
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import pytest
import pytest_twisted
from twisted.internet import task, threads
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import globalLogPublisher

from esmtpkit.core.dsn import Notify, OriginalRecipient, Ret
from esmtpkit.handlers import Queue
from esmtpkit.queue.service import QueueConfig, QueueService
from esmtpkit.queue.spool_admin import SpoolAdmin
from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.server.policy import Policy

from .mailnet import HoldingMX, PrivateDNS, ScriptedMX, listen_all, stop_all, until
from .rabbitmq import RabbitMQ, find_server
from .support import Twistd, terminate

ZONES = {
    "example.net": {"MX": [(10, "mx1.example.net"), (20, "mx2.example.net")]},
    "mx1.example.net": {"A": ["127.0.0.2"]},
    "mx2.example.net": {"A": ["127.0.0.3"]},
    "example.org": {"MX": [(10, "mx.example.org")]},
    "mx.example.org": {"A": ["127.0.0.4"]},
    "example.com": {"MX": [(10, "mx1.example.com"), (20, "mx2.example.com")]},
    "mx1.example.com": {"A": ["127.0.0.5"]},
    "mx2.example.com": {"A": ["127.0.0.6"]},
}
#: Bounds on waiting for something that should happen within moments (a slow machine gets the whole bound).
WAIT = 60.0
#: The ``esmtpkit-queue`` console script installed beside this interpreter, as a user runs it.
QUEUE_COMMAND = str(Path(sys.executable).parent / "esmtpkit-queue")
#: The names (EHLO, Reporting-MTA) of the runner processes; the in-process runner is the server's, queue.test.
RUNNER_NAMES = ("runner1.test", "runner2.test")
NO_PIKA = None if importlib.util.find_spec("pika") else "pika is not installed (pip install 'esmtpkit[amqp]')"



@dataclass
class Mail:
    """One message to submit."""

    sender: str
    recipients: Sequence[str]
    content: bytes
    mail_options: Sequence[str] = ()
    #: Options for every RCPT, or for each recipient by address.
    rcpt_options: Sequence[str] | Mapping[str, Sequence[str]] = ()


def send_all(port: int, mails: Sequence[Mail]) -> list[str]:
    """Submit every mail over one SMTP session with smtplib (call it in a thread); the queue id each got."""
    ids = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        for mail in mails:
            code, reply = client.mail(mail.sender, list(mail.mail_options))
            assert code == 250, reply
            for recipient in mail.recipients:
                options = mail.rcpt_options
                code, reply = client.rcpt(recipient, list(options.get(recipient, ()) if isinstance(options, Mapping)
                                                          else options))
                assert code == 250, reply
            code, reply = client.data(mail.content)
            assert code == 250 and reply.startswith(b"2.0.0 Ok: queued as "), reply
            ids.append(reply.split()[-1].decode())
    return ids


def queued(spool: Path) -> list[str]:
    """Ids of the messages in the spool directory (their envelopes)."""
    folder = spool / "messages"
    return sorted(name[:-5] for name in os.listdir(folder) if name.endswith(".json")) if folder.exists() else []


def subject(content: bytes) -> str:
    """The ``Subject:`` of a message, which the tests make unique."""
    match = re.search(rb"^Subject: (.+)\r$", content, re.MULTILINE)
    assert match, content[:300]
    return match.group(1).decode()


def report(content: bytes) -> tuple[Any, Any, list[Any]]:
    """A delivery status notification parsed: the whole, its per-message fields, its per-recipient blocks."""
    notice = email.message_from_bytes(content, policy=email.policy.compat32)
    assert notice.get_content_type() == "multipart/report", content[:500]
    assert notice.get_param("report-type") == "delivery-status"
    status = notice.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status"
    per_message, *blocks = status.get_payload()
    return notice, per_message, blocks


# ---- the backends ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker() -> Iterator[RabbitMQ]:
    """A private RabbitMQ node for this module's amqp tests, removed afterwards."""
    if find_server() is None:
        pytest.skip("RabbitMQ is not installed (Debian's rabbitmq-server, with epmd): amqp backend not tested")
    if NO_PIKA:
        pytest.skip(f"{NO_PIKA}: amqp backend not tested")
    node = RabbitMQ()
    try:
        node.start()
        yield node
    finally:
        node.stop()


@dataclass
class Backend:
    """Where the queue under test keeps its messages: a spool directory in ``folder``, or ``amqp_queue`` on
    ``broker``; ``folder`` also holds the runner processes' logs."""

    name: str
    folder: Path
    broker: RabbitMQ | None = None
    amqp_queue: str = ""


@pytest.fixture(params=["spool", "amqp"])
def backend(request: pytest.FixtureRequest, workdir: Path) -> Backend:
    """Each test once with a spool directory, once with a queue of its own on the module's RabbitMQ node."""
    if request.param == "spool":
        return Backend("spool", workdir)
    return Backend("amqp", workdir, request.getfixturevalue("broker"), f"e2e-{request.function.__name__[5:40]}")


class RunnerProcess:
    """``esmtpkit-queue run`` in a process of its own, named ``name`` (EHLO, notices), its log in ``folder``."""

    def __init__(self, name: str, folder: Path, options: Sequence[str]) -> None:
        self.name = name
        self.log = folder / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        with open(self.log, "wb") as output:
            self.process = subprocess.Popen([QUEUE_COMMAND, "run", "--hostname", name, "--stop-timeout", "10",
                                             *options], cwd=folder, env=env, stdin=subprocess.DEVNULL,
                                            stdout=output, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> int:
        """``kill -9`` (a stopped process dies as it is, without running again); its exit status."""
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait(WAIT)

    def stop(self) -> int:
        """SIGTERM (the runner waits for the attempts under way), killed if it takes too long; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
        return terminate(self.process, WAIT)


class OutboundQueue:
    """The queue under test: the Queue handler on 127.0.0.1 in this process, delivering by MX to ``mx_port`` as
    the private DNS says, retrying after 1 then 2 seconds.

    With the spool backend and no ``runners`` the handler's runner delivers, in this process. Otherwise the handler
    only accepts (``runner=no``) and ``runners`` (at least two with amqp) ``esmtpkit-queue run`` processes deliver.
    ``names`` are the names the runners give (EHLO, Reporting-MTA).
    """

    def __init__(self, backend: Backend, dns: PrivateDNS, mx_port: int, *, runners: int = 0,
                 lifetime: str | None = None, concurrency: int = 20) -> None:
        if backend.name == "amqp":
            runners = max(runners, 2)
        self.backend = backend
        self.spool = backend.folder / "queue"
        self.settings = {"dns": f"127.0.0.1:{dns.port}", "port": str(mx_port), "min_backoff": "1",
                         "max_backoff": "2", "lifetime": lifetime, "concurrency": str(concurrency)}
        where: dict[str, Any] = {"spool": str(self.spool)}
        if backend.broker is not None:
            where = {"backend": "amqp", "amqp_url": backend.broker.url, "amqp_queue": backend.amqp_queue}
        self.where = where
        config = QueueConfig.from_options(**where, **self.settings, hostname="queue.test", runner=not runners)
        self.service = QueueService(config)
        self.factory = ESMTPFactory(lambda: Queue(service=self.service),
                                    policy=Policy(hostname="queue.test", dsn=True))
        self.runner_count = runners
        self.runners: list[RunnerProcess] = []
        self.names = RUNNER_NAMES[:runners] if runners else ("queue.test",)
        self.port: Any = None
        self._events: list[tuple[str, str]] = []

    @property
    def amqp(self) -> bool:
        return self.backend.broker is not None

    async def start(self) -> int:
        """Listen for SMTP and start the runners; the port."""
        from twisted.internet import reactor

        globalLogPublisher.addObserver(self._observe)
        self.service.startService()
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.factory)
        if self.runner_count:
            self.spool.mkdir(exist_ok=True)
            await self._start_runners()
        return int(self.port.getHost().port)

    async def _start_runners(self) -> None:
        options = []
        for key, value in {**self.where, **self.settings}.items():
            if value is not None and key != "backend":
                options += [f"--{key.replace('_', '-')}", value]
        if self.amqp:
            options += ["--backend", "amqp"]
        self.runners = [RunnerProcess(name, self.backend.folder, options) for name in self.names]
        if self.amqp:
            broker = self.backend.broker
            assert broker is not None
            deadline = time.monotonic() + WAIT
            while (found := await threads.deferToThread(_consumers, broker, self.backend.amqp_queue)) \
                    != len(self.runners):
                assert time.monotonic() < deadline and not self._dead(), f"{found} consumers\n{self.logs()}"
                await task.deferLater(_reactor(), 0.1, lambda: None)
        else:
            await until(lambda: self._dead() or all("delivering by MX" in r.text() for r in self.runners),
                        self.logs)
            assert not self._dead(), self.logs()

    def _dead(self) -> list[RunnerProcess]:
        return [runner for runner in self.runners if runner.process.poll() is not None]

    def logs(self) -> str:
        return "\n".join(f"--- {runner.name}\n{runner.text()}" for runner in self.runners)

    def runner(self, name: str) -> RunnerProcess:
        [found] = [runner for runner in self.runners if runner.name == name]
        return found

    async def submit(self, port: int, mails: Sequence[Mail]) -> list[str]:
        """Submit ``mails``; their queue ids. Runner processes on a spool are told to look (a flush), as they
        otherwise would at their next scan, a minute later."""
        ids = await threads.deferToThread(send_all, port, mails)
        await self.look()
        return ids

    async def look(self) -> None:
        """Have runner processes on a spool look for due messages now (``esmtpkit-queue flush``'s trigger)."""
        if self.runners and not self.amqp:
            await threads.deferToThread(SpoolAdmin(str(self.spool)).flush)

    async def retry_due(self) -> None:
        """Let the retries happen once they are due: RabbitMQ's delay queues do that themselves; a spool is scanned
        once a minute, so the messages are flushed as soon as their next attempt has come."""
        if self.amqp:
            return
        admin = SpoolAdmin(str(self.spool))

        def waiting() -> bool:
            return any(m.attempts == 0 or m.next_attempt > time.time() for m in admin.list() if not m.held)

        await until(lambda: not waiting(), "the retry to be due")
        await threads.deferToThread(admin.flush)

    async def counts(self) -> dict[str, int]:
        """The messages ready in each of the queue's RabbitMQ queues."""
        return dict(await self.service.store.counts())  # type: ignore[attr-defined]

    async def drained(self) -> None:
        """Wait until the queue holds nothing, then stop the runner processes (each waits for the attempts under
        way) and check that it still holds nothing: no message nor notice is left, and none is being attempted."""
        if self.amqp:
            deadline = time.monotonic() + WAIT
            while any((counts := await self.counts()).values()):
                assert time.monotonic() < deadline, f"the queue still holds {counts}\n{self.logs()}"
                await task.deferLater(_reactor(), 0.1, lambda: None)
        else:
            await until(lambda: not queued(self.spool), lambda: f"the spool to empty\n{self.logs()}")
        for runner in self.runners:
            if runner.process.poll() is None:
                status = await threads.deferToThread(runner.stop)
                assert status == 0, runner.text()
            assert "Traceback" not in runner.text(), runner.text()
        if self.amqp:
            assert not any((counts := await self.counts()).values()), counts
        else:
            assert queued(self.spool) == []

    def notices(self) -> list[tuple[str, str]]:
        """``(queue id, action)`` of every delivery status notification the runners queued."""
        found = list(self._events)
        for runner in self.runners:
            found += re.findall(r"\] (\S+): (\w+) notice \S+ queued for <", runner.text())
        return found

    def _observe(self, event: dict[str, Any]) -> None:
        if event.get("event") == "queue.notice":
            self._events.append((event["queue_id"], event["action"]))

    async def recorded(self, id: str, in_flight: int) -> None:
        """Wait until the delivery of message ``id`` is recorded: its spool files are gone, or the broker has its
        acknowledgement (``in_flight`` messages are still unacknowledged)."""
        if not self.amqp:
            await until(lambda: id not in queued(self.spool), f"{id} to leave the spool")
            return
        broker = self.backend.broker
        assert broker is not None
        deadline = time.monotonic() + WAIT
        while (found := await threads.deferToThread(_unacknowledged, broker, self.backend.amqp_queue)) != in_flight:
            assert time.monotonic() < deadline, f"{found} unacknowledged, not {in_flight}"
            await task.deferLater(_reactor(), 0.1, lambda: None)

    async def stop(self) -> None:
        """Stop everything, killing runners still running."""
        for runner in self.runners:
            if runner.process.poll() is None:
                await threads.deferToThread(runner.stop)
        if self.port is not None:
            await self.port.stopListening()
        await self.factory.shutdown(timeout=0)
        await self.service.stopService()
        globalLogPublisher.removeObserver(self._observe)


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _consumers(broker: RabbitMQ, queue: str) -> int:
    """How many consumers ``queue`` has (0 while it does not exist); blocking, for a thread."""
    import pika.exceptions

    connection = broker.connection()
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.consumer_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        connection.close()


def _unacknowledged(broker: RabbitMQ, queue: str) -> int:
    """How many messages of ``queue`` runners hold unacknowledged, as the broker counts them (rabbitmqctl)."""
    script = find_server()
    assert script is not None
    result = subprocess.run([str(script.parent / "rabbitmqctl"), "-q", "list_queues", "--no-table-headers", "name",
                             "messages_unacknowledged"], env=broker.env, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    counts = dict(line.split() for line in result.stdout.splitlines() if line.strip())
    return int(counts.get(queue, 0))


@pytest.fixture
def dns() -> Iterator[PrivateDNS]:
    """The private DNS serving `ZONES`."""
    server = PrivateDNS(ZONES).start()
    yield server
    pytest_twisted.blockon(server.stop())


# ---- delivery -------------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_accepted_mail_goes_to_the_best_mx_intact(backend: Backend, dns: PrivateDNS) -> None:
    """Content octet for octet (8-bit, a leading dot), our Received: field first; SIZE, BODY, RET, ENVID, NOTIFY
    and ORCPT passed on to a next hop offering DSN, which then owes the success notice (none from here). A next hop
    without DSN gets none of them, and the recipient who asked for NOTIFY=SUCCESS gets a "relayed" notice."""
    best = ScriptedMX("127.0.0.2", name="mx1.example.net", policy=Policy(hostname="mx1.example.net", dsn=True))
    second = ScriptedMX("127.0.0.3", name="mx2.example.net")
    plain = ScriptedMX("127.0.0.5", name="mx1.example.com")
    sender_mx = ScriptedMX("127.0.0.4", name="mx.example.org")
    servers = [best, second, plain, sender_mx]
    queue = OutboundQueue(backend, dns, listen_all(servers))
    content = (b"From: alice@example.org\r\nSubject: outbound\r\n\r\n.a line with a dot\r\n"
               b"caf\xc3\xa9 \xff\r\nbye\r\n")
    try:
        port = await queue.start()
        [queue_id] = await queue.submit(port, [Mail(
            "alice@example.org", ["bob@example.net", "dave@example.com"], content,
            ["BODY=8BITMIME", "RET=HDRS", "ENVID=QQ+2B314"],
            {"bob@example.net": ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob@example.net"],
             "dave@example.com": ["NOTIFY=SUCCESS"]})])
        await until(lambda: best.messages and plain.messages and sender_mx.messages, "the deliveries and the notice")
        await queue.drained()
    finally:
        await queue.stop()
        await stop_all(servers)
    [message] = best.messages
    assert (message.sender, message.recipients) == ("alice@example.org", ["bob@example.net"])
    assert message.helo in queue.names
    assert message.content.startswith(b"Received: from client.test")
    assert f"id {queue_id}".encode() in message.content.split(b"\r\n\r\n")[0]
    assert message.content.endswith(b"\r\n" + content)
    assert message.mail_params == {"SIZE": len(message.content), "BODY": "8BITMIME", "RET": Ret.HDRS,
                                   "ENVID": "QQ+314"}
    assert message.rcpt_params == {"bob@example.net": {"NOTIFY": Notify(success=True, failure=True),
                                                       "ORCPT": OriginalRecipient("rfc822", "Bob@example.net")}}
    [other] = plain.messages
    assert (other.sender, other.recipients, other.content) == ("alice@example.org", ["dave@example.com"],
                                                               message.content)
    assert other.mail_params == {"SIZE": len(message.content), "BODY": "8BITMIME"}
    assert other.rcpt_params == {"dave@example.com": {}}
    assert len(best.transactions) == len(plain.transactions) == 1 and second.connections == 0
    [relayed] = sender_mx.messages
    assert (relayed.sender, relayed.recipients) == ("", ["alice@example.org"])
    notice, per_message, [block] = report(relayed.content)
    assert per_message["Original-Envelope-Id"] == "QQ+314"
    assert block["Final-Recipient"] == "rfc822; dave@example.com"
    assert (block["Action"], block["Status"]) == ("relayed", "2.0.0")
    assert block["Remote-MTA"] == "dns; mx1.example.com"
    assert notice.get_payload()[2].get_content_type() == "text/rfc822-headers"  # RET=HDRS
    assert queue.notices() == [(queue_id, "relayed")]


@pytest_twisted.ensureDeferred
async def test_next_mx_after_a_refused_connection_or_a_4xx_greeting(backend: Backend, dns: PrivateDNS) -> None:
    """example.net's best MX refuses the connection, example.com's greets with 421: each domain's second MX gets
    the message, once."""
    net_second = ScriptedMX("127.0.0.3", name="mx2.example.net")
    com_best = ScriptedMX("127.0.0.5", name="mx1.example.com", greeting=(421, "4.3.2 too busy, try later"))
    com_second = ScriptedMX("127.0.0.6", name="mx2.example.com")
    servers = [net_second, com_best, com_second]
    queue = OutboundQueue(backend, dns, listen_all(servers, also_free=["127.0.0.2"]))
    content = b"From: alice@example.org\r\nSubject: two domains\r\n\r\nHi\r\n"
    try:
        port = await queue.start()
        await queue.submit(port, [Mail("alice@example.org", ["bob@example.net", "dave@example.com"], content)])
        await until(lambda: net_second.messages and com_second.messages, "the deliveries to the second MXes")
        await queue.drained()
    finally:
        await queue.stop()
        await stop_all(servers)
    assert [(m.recipients, m.content.endswith(b"\r\n" + content)) for m in net_second.messages] == [
        (["bob@example.net"], True)]
    assert [(m.recipients, m.content.endswith(b"\r\n" + content)) for m in com_second.messages] == [
        (["dave@example.com"], True)]
    assert com_best.connections >= 1 and com_best.transactions == []
    assert queue.notices() == []


@pytest_twisted.ensureDeferred
async def test_a_refused_recipient_bounces_alone_to_the_senders_mx(backend: Backend, dns: PrivateDNS) -> None:
    """bob is delivered, carol refused with 550: one failed notice (multipart/report) for carol only reaches
    example.org's MX. The same refusal for a message from the null sender is reported to nobody."""
    recipient_mx = ScriptedMX("127.0.0.2", name="mx1.example.net",
                              rcpt={"carol@example.net": (550, "5.1.1 <carol@example.net>: no such user")})
    sender_mx = ScriptedMX("127.0.0.4", name="mx.example.org")
    queue = OutboundQueue(backend, dns, listen_all([recipient_mx, sender_mx]))
    content = b"From: alice@example.org\r\nSubject: two recipients\r\nMessage-ID: <x1@example.org>\r\n\r\nHi\r\n"
    notice_content = b"From: MAILER-DAEMON@example.org\r\nSubject: from nobody\r\n\r\nA notice\r\n"
    try:
        port = await queue.start()
        [first, _] = await queue.submit(port, [
            Mail("alice@example.org", ["bob@example.net", "carol@example.net"], content, ["ENVID=E1"],
                 ["NOTIFY=FAILURE"]),
            Mail("", ["carol@example.net", "bob@example.net"], notice_content)])
        await until(lambda: sender_mx.messages and len(recipient_mx.messages) == 2, "the deliveries and the bounce")
        await queue.drained()
    finally:
        await queue.stop()
        await stop_all([recipient_mx, sender_mx])
    by_subject = {subject(m.content): m for m in recipient_mx.messages}
    assert sorted(by_subject) == ["from nobody", "two recipients"]
    for transaction in by_subject.values():
        assert transaction.recipients == ["bob@example.net"] and transaction.refused == ["carol@example.net"]
    assert by_subject["from nobody"].sender == ""
    [bounce] = sender_mx.messages
    assert (bounce.sender, bounce.recipients) == ("", ["alice@example.org"])
    notice, per_message, blocks = report(bounce.content)
    assert notice["To"] == "<alice@example.org>"
    assert per_message["Reporting-MTA"] in [f"dns; {name}" for name in queue.names]
    assert per_message["Original-Envelope-Id"] == "E1"
    assert per_message["Received-From-MTA"] == "dns; client.test (127.0.0.1)"
    [block] = blocks
    assert block["Final-Recipient"] == "rfc822; carol@example.net"
    assert (block["Action"], block["Status"]) == ("failed", "5.1.1")
    assert block["Remote-MTA"] == "dns; mx1.example.net"
    assert block["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    returned = notice.get_payload()[2]
    assert returned.get_content_type() == "message/rfc822"
    assert b"Message-ID: <x1@example.org>" in returned.as_bytes()
    assert queue.notices() == [(first, "failed")]  # none for the null sender's message


@pytest_twisted.ensureDeferred
async def test_a_temporary_failure_is_retried_then_delivered(backend: Backend, dns: PrivateDNS) -> None:
    """The MX answers the first end of data with 451; the retry (a second later) is accepted. No notice."""
    replies = [(451, "4.3.0 try again later")]
    mx = ScriptedMX("127.0.0.2", name="mx1.example.net", eom=lambda: replies.pop() if replies else 250)
    sender_mx = ScriptedMX("127.0.0.4", name="mx.example.org")
    queue = OutboundQueue(backend, dns, listen_all([mx, sender_mx]))
    content = b"From: alice@example.org\r\nSubject: retried\r\n\r\nAgain\r\n"
    try:
        port = await queue.start()
        await queue.submit(port, [Mail("alice@example.org", ["bob@example.net"], content)])
        await until(lambda: mx.transactions and mx.transactions[0].reply, "the first attempt")
        await queue.retry_due()
        await until(lambda: mx.messages, "the retry")
        await queue.drained()
    finally:
        await queue.stop()
        await stop_all([mx, sender_mx])
    assert [t.reply.code if t.reply else None for t in mx.transactions] == [451, 250]
    assert mx.transactions[0].content == mx.transactions[1].content
    assert mx.messages[0].content.endswith(b"\r\n" + content)
    assert sender_mx.connections == 0 and queue.notices() == []


@pytest_twisted.ensureDeferred
async def test_a_message_past_its_lifetime_bounces_with_4_4_7(backend: Backend, dns: PrivateDNS) -> None:
    """The MX keeps answering 450 to RCPT; with a 1-second lifetime the next attempt fails the recipient: a notice
    with Status 4.4.7 quoting the last answer goes to the sender's MX."""
    mx = ScriptedMX("127.0.0.2", name="mx1.example.net", rcpt_default=(450, "4.2.1 mailbox busy"))
    sender_mx = ScriptedMX("127.0.0.4", name="mx.example.org")
    queue = OutboundQueue(backend, dns, listen_all([mx, sender_mx]), lifetime="1")
    content = b"From: alice@example.org\r\nSubject: too late\r\n\r\nStale\r\n"
    try:
        port = await queue.start()
        [queue_id] = await queue.submit(port, [Mail("alice@example.org", ["bob@example.net"], content)])
        await until(lambda: mx.transactions, "the first attempt")
        await queue.retry_due()
        await until(lambda: sender_mx.messages, "the bounce")
        await queue.drained()
    finally:
        await queue.stop()
        await stop_all([mx, sender_mx])
    assert mx.messages == [] and all(t.refused == ["bob@example.net"] for t in mx.transactions)
    [bounce] = sender_mx.messages
    assert (bounce.sender, bounce.recipients) == ("", ["alice@example.org"])
    _, _, [block] = report(bounce.content)
    assert block["Final-Recipient"] == "rfc822; bob@example.net"
    assert (block["Action"], block["Status"]) == ("failed", "4.4.7")
    assert "4.2.1 mailbox busy" in " ".join(block["Diagnostic-Code"].split())
    assert queue.notices() == [(queue_id, "failed")]


# ---- two runners ----------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_many_messages_over_two_runners_reach_each_recipient_once(backend: Backend, dns: PrivateDNS) -> None:
    """60 messages, each to two domains. example.net's MX holds its answers until both runners are delivering at
    once, then answers everything: every recipient has exactly one copy, and both runners did part of the work."""
    count = 60
    net = HoldingMX("127.0.0.2", name="mx1.example.net")
    org = ScriptedMX("127.0.0.4", name="mx.example.org")
    queue = OutboundQueue(backend, dns, listen_all([net, org]), runners=2)
    mails = [Mail("alice@example.org", [f"u{n}@example.net", f"u{n}@example.org"],
                  f"From: alice@example.org\r\nSubject: n={n}\r\n\r\nmessage {n}\r\n".encode()) for n in range(count)]
    try:
        port = await queue.start()
        await queue.submit(port, mails)
        await until(lambda: {held.transaction.helo for held in net.held} == set(RUNNER_NAMES),
                    "both runners delivering at once")
        net.holding = False
        net.release()
        await until(lambda: len(net.messages) == count and len(org.messages) == count, "every delivery")
        await queue.drained()
    finally:
        await queue.stop()
        await stop_all([net, org])
    copies = Counter(r for m in net.messages + org.messages for r in m.recipients)
    assert copies == Counter({r: 1 for mail in mails for r in mail.recipients})
    for m in net.messages + org.messages:
        assert subject(m.content) == f"n={m.recipients[0][1:].split('@')[0]}"
    assert {m.helo for m in net.messages} == set(RUNNER_NAMES)
    assert queue.notices() == []


@pytest_twisted.ensureDeferred
async def test_kill_9_of_one_runner_mid_delivery_loses_nothing(backend: Backend, dns: PrivateDNS) -> None:
    """Eight messages, four with each runner (``--concurrency 4``), the MX holding every end-of-data reply. Of the
    runner to be killed: one message is confirmed and recorded; one is confirmed while the runner is stopped
    (SIGSTOP), so that it cannot record it; the others are never answered. Then SIGKILL, and the other runner takes
    over. As docs/queue.md and docs/queue-amqp.md say: the recorded one is never delivered again, the confirmed
    but unrecorded one exactly once more, every other exactly once; nothing is lost."""
    count = 8
    mx = HoldingMX("127.0.0.2", name="mx1.example.net")
    queue = OutboundQueue(backend, dns, listen_all([mx]), runners=2, concurrency=4)
    mails = [Mail("alice@example.org", ["bob@example.net"],
                  f"From: alice@example.org\r\nSubject: n={n}\r\n\r\nmessage {n}\r\n".encode()) for n in range(count)]
    victim, survivor = RUNNER_NAMES

    def held_by(name: str) -> list[str]:
        return [subject(held.transaction.content) for held in mx.held if held.transaction.helo == name]

    try:
        port = await queue.start()
        ids = dict(zip((f"n={n}" for n in range(count)), await queue.submit(port, mails)))
        await until(lambda: len(held_by(victim)) == len(held_by(survivor)) == count // 2,
                    lambda: f"four messages of each runner held at the MX\n{queue.logs()}")
        recorded, confirmed, *unanswered = held_by(victim)
        survivors = held_by(survivor)
        mx.release(lambda held: subject(held.transaction.content) == recorded)
        await queue.recorded(ids[recorded], in_flight=count - 1)
        queue.runner(victim).pause()
        mx.release(lambda held: subject(held.transaction.content) == confirmed)
        assert queue.runner(victim).kill() == -signal.SIGKILL
        mx.forget(lambda held: held.transaction.helo == victim)
        mx.holding = False
        mx.release()
        await queue.look()
        await until(lambda: len(mx.messages) == count + 1, lambda: f"every message delivered\n{queue.logs()}")
        await queue.drained()
    finally:
        await queue.stop()
        await stop_all([mx])
    copies = Counter(subject(t.content) for t in mx.messages)
    assert copies == Counter({name: 2 if name == confirmed else 1 for name in ids})
    by = {name: [t.helo for t in mx.messages if subject(t.content) == name] for name in ids}
    assert by[recorded] == [victim] and by[confirmed] == [victim, survivor]
    assert all(by[name] == [survivor] for name in unanswered + survivors)


# ---- one server process, killed and restarted -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_twistd_killed_mid_delivery_then_restarted_delivers_every_message(workdir: Path,
                                                                                dns: PrivateDNS) -> None:
    """``twistd esmtpkit`` with the Queue handler (spool, runner in the server) killed with SIGKILL while the MX
    holds the end-of-data replies, then started again with no new connection: a message the queue had recorded as
    delivered (its spool files gone) is never delivered again; one the MX confirmed while the server was stopped
    (SIGSTOP), unrecorded, exactly once more; the others, never answered, exactly once."""
    count = 6
    mx = HoldingMX("127.0.0.2", name="mx1.example.net")
    mx_port = listen_all([mx])
    spool = workdir / "queue"
    options = ["--hostname", "queue.test", "--handler", "esmtpkit.handlers.Queue",
               "--handler-option", f"spool={spool}", "--handler-option", f"dns=127.0.0.1:{dns.port}",
               "--handler-option", f"port={mx_port}", "--handler-option", "min_backoff=1",
               "--handler-option", "max_backoff=2"]
    first: Twistd | None = None
    second: Twistd | None = None
    mails = [Mail("alice@example.org", ["bob@example.net"],
                  f"From: alice@example.org\r\nSubject: n={n}\r\n\r\nmessage {n}\r\n".encode()) for n in range(count)]
    try:
        first = await threads.deferToThread(Twistd, workdir / "first", *options)
        ids = dict(zip((f"n={n}" for n in range(count)), await threads.deferToThread(send_all, first.port, mails)))
        await until(lambda: len(mx.held) == count, "every message held at the MX")
        recorded, confirmed, *unanswered = [subject(held.transaction.content) for held in mx.held]
        mx.release(lambda held: subject(held.transaction.content) == recorded)
        await until(lambda: ids[recorded] not in queued(spool), "the delivery to be recorded")
        first.process.send_signal(signal.SIGSTOP)
        mx.release(lambda held: subject(held.transaction.content) == confirmed)
        first.process.send_signal(signal.SIGKILL)
        await threads.deferToThread(first.process.wait, WAIT)
        assert first.process.returncode == -signal.SIGKILL
        mx.forget()
        mx.holding = False
        second = await threads.deferToThread(Twistd, workdir / "second", *options)
        await until(lambda: not queued(spool), "the restarted queue to deliver everything")
        assert "Traceback" not in second.log_text()
    finally:
        for process in (first, second):
            if process is not None:
                await threads.deferToThread(process.stop)
        await stop_all([mx])
    copies = Counter(subject(t.content) for t in mx.messages)
    assert copies == Counter({name: 2 if name == confirmed else 1 for name in ids}), (recorded, confirmed, copies)
