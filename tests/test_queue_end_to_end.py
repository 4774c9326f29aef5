"""The queue from one end to the other, on loopback: an SMTP client, the Queue handler with a spool directory,
the runner, a private DNS server and scripted mail exchangers (`tests.mailnet`).

- accepted mail is delivered to the domain's best MX, with our Received: field;
- a recipient refused with 5xx bounces: the notice goes to the sender's own domain's MX, and reads as RFC 3464;
- ``twistd esmtpkit`` killed with SIGKILL while deliveries hang mid-DATA, then restarted with no new connection:
  every accepted message arrives; one the MX had not confirmed arrives once more than it did before the kill, and
  one whose confirmation the queue had recorded (its spool files gone) never again.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import signal
import smtplib
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest_twisted
from twisted.internet import task, threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint

from esmtpkit.handlers import Queue
from esmtpkit.queue.service import QueueConfig, QueueService
from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.server.policy import Policy

from .mailnet import PrivateDNS, ScriptedHandler, ScriptedMX, listen_all, stop_all
from .support import Twistd

ZONES = {
    "example.net": {"MX": [(10, "mx1.example.net"), (20, "mx2.example.net")]},
    "mx1.example.net": {"A": ["127.0.0.2"]},
    "mx2.example.net": {"A": ["127.0.0.3"]},
    "example.org": {"MX": [(10, "mx.example.org")]},
    "mx.example.org": {"A": ["127.0.0.4"]},
}
#: Bounds on waiting for something that should happen within moments (a slow machine gets the whole bound).
WAIT = 60.0


async def until(predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Let the reactor run until ``predicate()`` is truthy; fail naming ``what`` after ``timeout`` seconds."""
    from twisted.internet import reactor

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.05, lambda: None)


def submit(port: int, sender: str, recipients: Sequence[str], content: bytes,
           rcpt_options: Sequence[str] = ()) -> tuple[int, bytes]:
    """Send one message with smtplib (call it in a thread); the reply to the end of the data."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        code, reply = client.mail(sender)
        assert code == 250, reply
        for recipient in recipients:
            code, reply = client.rcpt(recipient, list(rcpt_options))
            assert code == 250, reply
        return client.data(content)


def queued(spool: Path) -> list[str]:
    """Ids of the messages in the spool directory (their envelopes)."""
    folder = spool / "messages"
    return sorted(name[:-5] for name in os.listdir(folder) if name.endswith(".json")) if folder.exists() else []


class InProcessQueue:
    """An esmtpkit server with the Queue handler on 127.0.0.1, its queue in ``spool``, delivering by MX."""

    def __init__(self, spool: Path, dns: PrivateDNS, mx_port: int) -> None:
        config = QueueConfig.from_options(spool=str(spool), dns=f"127.0.0.1:{dns.port}", port=mx_port,
                                          hostname="queue.test", min_backoff="1", max_backoff="2")
        self.service = QueueService(config)
        self.factory = ESMTPFactory(lambda: Queue(service=self.service), policy=Policy(hostname="queue.test",
                                                                                        dsn=True))
        self.port: Any = None

    async def start(self) -> int:
        from twisted.internet import reactor

        self.service.startService()
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.factory)
        return int(self.port.getHost().port)

    async def stop(self) -> None:
        if self.port is not None:
            await self.port.stopListening()
        await self.factory.shutdown(timeout=0)
        await self.service.stopService()


@pytest_twisted.ensureDeferred
async def test_accepted_mail_goes_to_the_best_mx(tmp_path: Path) -> None:
    dns = PrivateDNS(ZONES).start()
    best, second = ScriptedMX("127.0.0.2", name="mx1.example.net"), ScriptedMX("127.0.0.3", name="mx2.example.net")
    mx_port = listen_all([best, second])
    queue = InProcessQueue(tmp_path / "queue", dns, mx_port)
    try:
        port = await queue.start()
        content = b"From: alice@example.org\r\nSubject: outbound\r\n\r\n.a line with a dot\r\nbye\r\n"
        code, reply = await threads.deferToThread(submit, port, "alice@example.org", ["bob@example.net"], content)
        assert code == 250 and reply.startswith(b"2.0.0 Ok: queued as "), reply
        queue_id = reply.split()[-1].decode()
        await until(lambda: best.messages, "the delivery to mx1")
        await until(lambda: not queued(tmp_path / "queue"), "the spool to empty")
        [message] = best.messages
        assert (message.sender, message.recipients) == ("alice@example.org", ["bob@example.net"])
        assert message.helo == "queue.test"
        assert message.content.startswith(b"Received: from client.test")
        assert f"id {queue_id}".encode() in message.content
        assert message.content.endswith(b"\r\n" + content)
        assert second.connections == 0
    finally:
        await queue.stop()
        await stop_all([best, second])
        await dns.stop()


@pytest_twisted.ensureDeferred
async def test_a_refused_recipient_bounces_to_the_senders_mx(tmp_path: Path) -> None:
    dns = PrivateDNS(ZONES).start()
    recipient_mx = ScriptedMX("127.0.0.2", name="mx1.example.net",
                              rcpt={"carol@example.net": (550, "5.1.1 <carol@example.net>: no such user")})
    sender_mx = ScriptedMX("127.0.0.4", name="mx.example.org")
    mx_port = listen_all([recipient_mx, sender_mx])
    queue = InProcessQueue(tmp_path / "queue", dns, mx_port)
    try:
        port = await queue.start()
        content = b"From: alice@example.org\r\nSubject: two recipients\r\nMessage-ID: <x1@example.org>\r\n\r\nHi\r\n"
        code, reply = await threads.deferToThread(submit, port, "alice@example.org",
                                                  ["bob@example.net", "carol@example.net"], content,
                                                  ["NOTIFY=FAILURE"])
        assert code == 250, reply
        await until(lambda: sender_mx.messages, "the bounce at the sender's MX")
        await until(lambda: not queued(tmp_path / "queue"), "the spool to empty")
        [delivered] = recipient_mx.messages
        assert delivered.recipients == ["bob@example.net"] and delivered.refused == ["carol@example.net"]
        [bounce] = sender_mx.messages
        assert (bounce.sender, bounce.recipients) == ("", ["alice@example.org"])
        notice = email.message_from_bytes(bounce.content, policy=email.policy.compat32)
        assert notice.get_content_type() == "multipart/report"
        assert notice["To"] == "<alice@example.org>"
        [per_message, block] = notice.get_payload()[1].get_payload()
        assert per_message["Reporting-MTA"] == "dns; queue.test"
        assert per_message["Received-From-MTA"] == "dns; client.test (127.0.0.1)"
        assert block["Final-Recipient"] == "rfc822; carol@example.net"
        assert (block["Action"], block["Status"]) == ("failed", "5.1.1")
        assert block["Remote-MTA"] == "dns; mx1.example.net"
        assert block["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
        returned = notice.get_payload()[2]
        assert returned.get_content_type() == "message/rfc822"
        assert b"Message-ID: <x1@example.org>" in returned.as_bytes()
    finally:
        await queue.stop()
        await stop_all([recipient_mx, sender_mx])
        await dns.stop()


# ---- kill -9 ------------------------------------------------------------------------------------------------------

class HangingHandler(ScriptedHandler):
    """Takes the whole content, then gives no reply to the end of the data while its MX says ``hang``."""

    mx: "HangingMX"

    def eom(self) -> Any:
        if not self.mx.hang or len(self.mx.answered) < self.mx.answer_first:
            reply = super().eom()
            self.mx.answered.append(reply)
            return reply
        current, self.current = self.current, None
        waiting: Deferred[Any] = Deferred()
        self.mx.hanging.append((current, waiting))
        return waiting


class HangingMX(ScriptedMX):
    """A ScriptedMX that answers the first ``answer_first`` ends of data and leaves the next ones hanging."""

    def __init__(self, *args: Any, answer_first: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hang = True
        self.answer_first = answer_first
        self.answered: list[Any] = []
        self.hanging: list[tuple[Any, Deferred[Any]]] = []
        self.factory = ESMTPFactory(lambda: HangingHandler(self), policy=self.policy, clock=self.reactor)


def subject(content: bytes) -> str:
    match = re.search(rb"^Subject: (n=\d+)\r$", content, re.MULTILINE)
    assert match, content[:300]
    return match.group(1).decode()


@pytest_twisted.ensureDeferred
async def test_kill_9_mid_delivery_then_restart_delivers_every_message(tmp_path: Path) -> None:
    count, answered = 6, 2
    dns = PrivateDNS(ZONES).start()
    mx = HangingMX("127.0.0.2", name="mx1.example.net", answer_first=answered)
    mx_port = listen_all([mx])
    spool = tmp_path / "queue"
    options = ["--hostname", "queue.test", "--handler", "esmtpkit.handlers.Queue",
               "--handler-option", f"spool={spool}", "--handler-option", f"dns=127.0.0.1:{dns.port}",
               "--handler-option", f"port={mx_port}", "--handler-option", "min_backoff=1",
               "--handler-option", "max_backoff=2"]
    first: Twistd | None = None
    second: Twistd | None = None
    try:
        first = await threads.deferToThread(Twistd, tmp_path / "first", *options)
        accepted = []
        for n in range(count):
            content = f"From: alice@example.org\r\nSubject: n={n}\r\n\r\nmessage {n}\r\n".encode()
            code, reply = await threads.deferToThread(submit, first.port, "alice@example.org",
                                                      ["bob@example.net"], content)
            assert code == 250, reply
            accepted.append(f"n={n}")
        await until(lambda: len(mx.answered) == answered and len(mx.hanging) == count - answered,
                    "every message at the MX, the last ones left hanging mid-DATA")
        first.process.send_signal(signal.SIGKILL)
        await threads.deferToThread(first.process.wait, WAIT)
        assert first.process.returncode == -signal.SIGKILL
        still_queued = set(queued(spool))
        before = {subject(t.content) for t in mx.messages}
        hanging = {subject(t.content) for t, _ in mx.hanging if t is not None}
        assert len(before) == answered and len(hanging) == count - answered
        assert len(still_queued) >= count - answered  # the unconfirmed ones are all still there

        mx.hang = False
        second = await threads.deferToThread(Twistd, tmp_path / "second", *options)
        await until(lambda: not queued(spool), "the restarted queue to deliver everything")
        after = [subject(t.content) for t in mx.messages]
        assert sorted(set(after)) == sorted(accepted)  # nothing lost
        recorded = {name for name in before if not _still_queued(name, still_queued, mx)}
        for name in accepted:
            copies = after.count(name)
            if name in hanging:
                assert copies == 1, (name, after)  # never confirmed before the kill: delivered once, now
            elif name in recorded:
                assert copies == 1, (name, after)  # confirmed and recorded: never again
            else:
                assert copies == 2, (name, after)  # confirmed, but killed before the queue recorded it
        assert "Traceback" not in second.log_text()
    finally:
        for process in (first, second):
            if process is not None:
                await threads.deferToThread(process.stop)
        await stop_all([mx])
        await dns.stop()


def _still_queued(name: str, ids: set[str], mx: ScriptedMX) -> bool:
    """Whether the message with Subject ``name`` was among the queued ids when the first process died."""
    for transaction in mx.messages:
        if subject(transaction.content) == name:
            match = re.search(rb"\bid ([0-9A-Z]{20})\b", transaction.content)
            assert match, transaction.content[:300]
            return match.group(1).decode() in ids
    return False
