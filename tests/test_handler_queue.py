"""The Queue handler: who may send, what it stores (content and envelope), 250 only once the store committed,
its settings as text, and how ``twistd esmtpkit`` attaches its per-process service (and metrics).
"""

from __future__ import annotations

import os
import random
import re
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.application.service import IService, MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.python import usage
from zope.interface import implementer
from zope.interface.verify import verifyObject

from esmtpkit.cli import tap
from esmtpkit.core.outbound import Message, Recipient
from esmtpkit.core.reply import Reply
from esmtpkit.core.schedule import Schedule
from esmtpkit.handlers import Queue, Relay
from esmtpkit.handlers.access import may_relay, parse_networks
from esmtpkit.handlers.queue import STORAGE_FAILED, TOO_BIG, HeaderScan
from esmtpkit.core.session import Session
from esmtpkit.ops.queue_metrics import QueueMetrics, watch
from esmtpkit.queue.interfaces import MessageTooBig
from esmtpkit.queue.memory import MemoryEntry, MemoryStore
from esmtpkit.queue.runner import QueueMonitor
from esmtpkit.queue.service import (QueueConfig, QueueService, listening_addresses, parse_relayhost, parse_seconds,
                                    parse_servers)
from esmtpkit.server.interfaces import IMessageHandler
from esmtpkit.server.policy import Policy

from .support import HandlerTestCase, run_twistd

CONTENT = b"From: alice@example.org\r\nSubject: queued\r\n\r\n.leading dot\r\nbody \xe9\r\n"
#: 100 octets of content: 15 of them are over the limit of the stores below.
LINES = b"x" * 98 + b"\r\n"


class HeldStore(MemoryStore):
    """A MemoryStore whose commits wait for the test (``pending``) to fire them."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pending: list[tuple[Deferred[None], Message, bytes]] = []

    def enqueue(self, message: Message, content: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.pending.append((d, message, content))
        return d

    def fire(self, ok: bool = True, error: Exception | None = None) -> None:
        d, message, content = self.pending.pop(0)
        if ok:
            super().enqueue(message, content).chainDeferred(d)
        else:
            d.errback(error or OSError("fsync failed"))


class LimitedStore(MemoryStore):
    """A MemoryStore that, like RabbitMQ's, holds no message beyond ``max_size`` octets."""

    def __init__(self, max_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_size = max_size

    def enqueue(self, message: Message, content: bytes) -> Deferred[None]:
        if len(content) > self.max_size:
            return fail(MessageTooBig(f"{len(content)} octets, over {self.max_size}"))
        return super().enqueue(message, content)


class BrokenEntry(MemoryEntry):
    """Takes the Received: field, then fails: the disk filled up during the content."""

    def write(self, data: bytes) -> None:
        if data.startswith(b"Received:"):
            return super().write(data)
        raise OSError("No space left on device")


class BrokenWrites(MemoryStore):
    def open_entry(self) -> MemoryEntry:
        return BrokenEntry(self)


class NoEntries(MemoryStore):
    def open_entry(self) -> MemoryEntry:
        raise PermissionError("spool not writable")


class QueueHandlerTests(HandlerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.clock.advance(1_700_000_000)

    def handler(self, store: MemoryStore | None = None, **settings: Any) -> Queue:
        self.store = store if store is not None else MemoryStore(reactor=self.clock)
        return Queue(store=self.store, reactor=self.clock, hostname="mx.test", **settings)

    def only(self) -> tuple[Message, bytes]:
        [message] = self.store.messages.values()
        return message, self.store.contents[message.id]

    def test_provides_the_handler_interface(self) -> None:
        self.assertTrue(verifyObject(IMessageHandler, self.handler()))

    def test_queues_the_content_after_a_received_field_and_says_its_id(self) -> None:
        talk = self.conversation(self.handler())
        reply = talk.message("alice@example.org", ["bob@example.net", "carol@example.com"], CONTENT)
        message, content = self.only()
        self.assertEqual(reply, Reply(250, (f"Ok: queued as {message.id}",), "2.0.0"))
        self.assertTrue(content.startswith(b"Received: from client.test (127.0.0.1 [127.0.0.1]) by mx.test with "
                                           b"ESMTP\r\n\tid " + message.id.encode() + b";"), content[:100])
        self.assertIn(f"id {message.id}".encode(), content)
        self.assertTrue(content.endswith(b"\r\n" + CONTENT))
        self.assertEqual(message.size, len(content))
        self.assertEqual(message.sender, "alice@example.org")
        self.assertEqual([r.address for r in message.recipients], ["bob@example.net", "carol@example.com"])
        self.assertEqual((message.arrived, message.next_attempt), (1_700_000_000, 1_700_000_000))
        self.assertEqual(message.received_from, "dns; client.test (127.0.0.1)")
        self.assertEqual((message.body, message.smtputf8, message.ret, message.envid), (None, False, None, None))

    def test_the_message_id_is_the_transaction_id(self) -> None:
        talk = self.conversation(self.handler())
        talk.message("alice@example.org", ["bob@example.net"], CONTENT)
        message, _ = self.only()
        self.assertEqual(len(message.id), 20)
        self.assertEqual(talk.handler.message_id, message.id)

    def test_250_only_once_the_store_committed(self) -> None:
        store = HeldStore(reactor=self.clock)
        talk = self.conversation(self.handler(store))
        talk.write(b"EHLO client.test\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
        talk.replies()
        talk.write(CONTENT + b".\r\n")
        self.assertEqual(talk.replies(), [])
        store.fire()
        [reply] = talk.replies()
        self.assertEqual((reply.code, reply.enhanced), (250, "2.0.0"))
        self.assertEqual(len(store.messages), 1)

    def test_451_when_the_commit_fails(self) -> None:
        store = HeldStore(reactor=self.clock)
        talk = self.conversation(self.handler(store))
        talk.write(b"EHLO client.test\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
        talk.replies()
        talk.write(CONTENT + b".\r\n")
        store.fire(ok=False)
        self.assertEqual(talk.replies(), [STORAGE_FAILED])
        self.assertEqual(store.messages, {})
        self.assertEqual(self.flushLoggedErrors(OSError)[0].value.args, ("fsync failed",))

    def test_552_when_the_store_can_never_hold_the_message(self) -> None:
        store = HeldStore(reactor=self.clock)
        talk = self.conversation(self.handler(store))
        talk.write(b"EHLO client.test\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
        talk.replies()
        talk.write(CONTENT + b".\r\n")
        store.fire(ok=False, error=MessageTooBig("over the limit"))
        self.assertEqual(talk.replies(), [TOO_BIG])
        self.assertEqual((TOO_BIG.code, TOO_BIG.enhanced), (552, "5.3.4"))
        self.assertEqual(store.messages, {})
        self.assertEqual(self.flushLoggedErrors(), [])  # refused, not a fault: no traceback in the log

    def test_a_declared_size_over_the_stores_limit_is_refused_at_mail(self) -> None:
        talk = self.conversation(self.handler(LimitedStore(1000, reactor=self.clock)))
        talk.send("EHLO client.test")
        self.assertEqual(talk.send("MAIL FROM:<alice@example.org> SIZE=1001"), TOO_BIG)
        self.assertEqual(talk.send("MAIL FROM:<alice@example.org> SIZE=1000").code, 250)

    def test_content_over_the_stores_limit_without_size_gets_552_at_the_end(self) -> None:
        talk = self.conversation(self.handler(LimitedStore(1000, reactor=self.clock)))
        self.assertEqual(talk.message("alice@example.org", ["bob@example.net"], LINES * 15), TOO_BIG)
        self.assertEqual(talk.message("alice@example.org", ["bob@example.net"], CONTENT).code, 250)
        self.assertEqual(len(self.store.messages), 1)

    def test_a_store_without_a_limit_takes_any_declared_size(self) -> None:
        talk = self.conversation(self.handler())
        talk.send("EHLO client.test")
        self.assertEqual(talk.send("MAIL FROM:<alice@example.org> SIZE=10000000").code, 250)

    def test_rabbitmqs_too_big_is_552_and_nothing_is_published(self) -> None:
        from esmtpkit.queue.amqp import STATE_ROOM, AMQPStore, TooBig

        opened: list[Any] = []
        store = AMQPStore("amqp://broker.test/", reactor=self.clock, schedule=Schedule(), max_size=STATE_ROOM + 1000,
                          opener=lambda: opened.append(1) or Deferred())
        self.assertTrue(issubclass(TooBig, MessageTooBig))
        handler = Queue(store=store, reactor=self.clock, hostname="mx.test")
        self.assertEqual(handler.max_size(), STATE_ROOM + 1000)
        talk = self.conversation(handler)
        self.assertEqual(talk.message("alice@example.org", ["bob@example.net"], LINES * 15), TOO_BIG)
        talk.send("EHLO client.test")
        self.assertEqual(talk.send(f"MAIL FROM:<alice@example.org> SIZE={STATE_ROOM + 1001}"), TOO_BIG)
        self.assertEqual(opened, [])

    def test_451_when_the_store_is_failing(self) -> None:
        handler = self.handler()
        self.store.failing = OSError("No space left on device")
        talk = self.conversation(handler)
        self.assertEqual(talk.message("alice@example.org", ["bob@example.net"], CONTENT), STORAGE_FAILED)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_451_when_the_content_cannot_be_written(self) -> None:
        talk = self.conversation(self.handler(BrokenWrites(reactor=self.clock)))
        reply = talk.message("alice@example.org", ["bob@example.net"], CONTENT)
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))
        self.assertEqual(self.store.messages, {})
        self.assertTrue(self.flushLoggedErrors(OSError))

    def test_451_at_data_when_no_entry_can_be_opened(self) -> None:
        talk = self.conversation(self.handler(NoEntries(reactor=self.clock)))
        talk.write(b"EHLO client.test\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\n")
        talk.replies()
        self.assertEqual(talk.send("DATA"), STORAGE_FAILED)
        self.assertEqual(len(self.flushLoggedErrors(PermissionError)), 1)

    def test_an_unfinished_message_is_discarded(self) -> None:
        talk = self.conversation(self.handler())
        talk.write(b"EHLO client.test\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
        talk.write(b"Subject: cut short\r\n\r\nhalf")
        entry = talk.handler._entry
        self.assertIsNotNone(entry)
        talk.protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertTrue(entry.closed)
        self.assertEqual(self.store.messages, {})

    # ---- who may send ----------------------------------------------------------------------------------------

    def test_relay_access_denied_outside_the_networks(self) -> None:
        talk = self.conversation(self.handler(), peer=("192.0.2.7", 40000))
        talk.send("EHLO client.test")
        talk.send("MAIL FROM:<alice@example.org>")
        self.assertEqual(talk.send("RCPT TO:<bob@example.net>"),
                         Reply(554, ("<bob@example.net>: Relay access denied",), "5.7.1"))

    def test_an_authenticated_client_may_send_from_anywhere(self) -> None:
        talk = self.conversation(self.handler(), peer=("192.0.2.7", 40000))
        talk.send("EHLO client.test")
        talk.handler.session.authenticated = "alice"
        talk.send("MAIL FROM:<alice@example.org>")
        self.assertEqual(talk.send("RCPT TO:<bob@example.net>").code, 250)

    def test_networks_say_who_may_send(self) -> None:
        talk = self.conversation(self.handler(networks="10.0.0.0/8, 192.0.2.0/24"), peer=("192.0.2.7", 40000))
        talk.send("EHLO client.test")
        talk.send("MAIL FROM:<alice@example.org>")
        self.assertEqual(talk.send("RCPT TO:<bob@example.net>").code, 250)

    def test_a_recipient_without_a_domain_is_refused(self) -> None:
        talk = self.conversation(self.handler())
        talk.send("EHLO client.test")
        talk.send("MAIL FROM:<alice@example.org>")
        reply = talk.send("RCPT TO:<Postmaster>")
        self.assertEqual((reply.code, reply.enhanced), (550, "5.1.1"))

    # ---- what the envelope carries ---------------------------------------------------------------------------

    def test_dsn_parameters_reach_the_queued_message(self) -> None:
        talk = self.conversation(self.handler(), Policy(hostname="mx.test", dsn=True))
        talk.send("EHLO client.test")
        talk.send("MAIL FROM:<alice@example.org> RET=HDRS ENVID=QQ+2B314 BODY=8BITMIME")
        talk.send("RCPT TO:<bob@example.net> NOTIFY=success,delay ORCPT=rfc822;Bob+40example.net")
        talk.send("RCPT TO:<carol@example.net> NOTIFY=NEVER")
        talk.send("RCPT TO:<dave@example.net>")
        talk.send("DATA")
        talk.write(CONTENT + b".\r\n")
        self.assertEqual(talk.replies()[0].code, 250)
        message, _ = self.only()
        self.assertEqual((message.body, message.ret, message.envid), ("8BITMIME", "HDRS", "QQ+314"))
        self.assertEqual(message.recipients, [
            Recipient("bob@example.net", ("SUCCESS", "DELAY"), "rfc822;Bob@example.net"),
            Recipient("carol@example.net", ("NEVER",)),
            Recipient("dave@example.net"),
        ])

    def test_smtputf8_and_binarymime_are_accepted(self) -> None:
        talk = self.conversation(self.handler())
        talk.send("EHLO client.test")
        self.assertEqual(talk.send("MAIL FROM:<élise@example.org> SMTPUTF8 BODY=BINARYMIME").code, 250)
        self.assertEqual(talk.send("RCPT TO:<bob@example.net>").code, 250)
        binary = b"Subject: bin\r\n\r\n\x00\x01\xff\r\n"
        talk.write(b"BDAT %d LAST\r\n" % len(binary) + binary)
        self.assertEqual(talk.replies()[0].code, 250)
        message, content = self.only()
        self.assertEqual((message.sender, message.smtputf8, message.body), ("élise@example.org", True, "BINARYMIME"))
        self.assertTrue(content.endswith(binary))

    def test_8bitmime_content_that_is_all_ascii_is_queued_as_7bit(self) -> None:
        """BODY=8BITMIME declared, but every octet ASCII: queued with no BODY, so any next hop can take it."""
        for content, body in ((b"Subject: plain\r\n\r\nonly ascii\r\n", None), (CONTENT, "8BITMIME")):
            store = MemoryStore(reactor=self.clock)
            talk = self.conversation(self.handler(store))
            talk.send("EHLO client.test")
            talk.send("MAIL FROM:<alice@example.org> BODY=8BITMIME")
            talk.send("RCPT TO:<bob@example.net>")
            talk.send("DATA")
            talk.write(content + b".\r\n")
            self.assertEqual(talk.replies()[0].code, 250)
            message, _ = self.only()
            self.assertEqual(message.body, body)

    def test_a_message_that_passed_too_many_hosts_is_refused(self) -> None:
        """More than 50 Received: fields (Postfix's hopcount_limit) is a loop: 554 5.4.6, nothing queued; 50 pass.
        Received: lines in the body do not count."""
        hops = b"".join(b"Received: from hop%d.example by hop%d.example; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
                        % (n, n + 1) for n in range(50))
        talk = self.conversation(self.handler())
        reply = talk.message("alice@example.org", ["bob@example.net"], b"received: from one.more\r\n" + hops +
                             b"Subject: loop\r\n\r\nbody\r\n")
        self.assertEqual((reply.code, reply.enhanced, reply.lines), (554, "5.4.6", ("Too many hops",)))
        self.assertEqual(self.store.messages, {})
        reply = talk.message("alice@example.org", ["bob@example.net"], hops + b"Subject: fine\r\n\r\n" +
                             b"Received: in the body\r\n" * 3)
        self.assertEqual(reply.code, 250)
        self.assertEqual(len(self.store.messages), 1)

    def test_the_service_hears_of_each_message_queued(self) -> None:
        monitor = RecordingQueued()
        handler = self.handler()
        handler.service.monitor.add(monitor)
        self.conversation(handler).message("alice@example.org", ["bob@example.net"], CONTENT)
        self.assertEqual(monitor.origins, ["smtp"])


@pytest.mark.parametrize("split", ["whole", "bytes", "random"])
def test_header_scan_counts_received_fields_however_the_content_is_split(split: str) -> None:
    content = (b"Received: a\r\nRECEIVED: b\r\n\tReceived: a continuation\r\nX-Received: no\r\nreceived:c\r\n"
               b"Received : obsolete spacing, not counted\r\nSubject: s\r\n\r\nReceived: body\r\n")
    if split == "whole":
        pieces = [content]
    elif split == "bytes":
        pieces = [content[i:i + 1] for i in range(len(content))]
    else:
        rng = random.Random(7)
        cuts = sorted(rng.sample(range(1, len(content)), 12))
        pieces = [content[a:b] for a, b in zip([0] + cuts, cuts + [len(content)])]
    scan = HeaderScan()
    for piece in pieces:
        scan.feed(piece)
    assert (scan.received, scan.ascii) == (3, True)
    scan.feed(b"\xe9", header=False)
    assert scan.ascii is False


class RecordingQueued(QueueMonitor):
    def __init__(self) -> None:
        self.origins: list[str] = []

    def message_queued(self, message: Message, origin: str) -> None:
        self.origins.append(origin)


# ---- the relay-access rule ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("peer, user, networks, allowed", [
    ("127.0.0.1", None, "127.0.0.0/8, ::1/128", True),
    ("192.0.2.7", None, "127.0.0.0/8, ::1/128", False),
    ("192.0.2.7", "alice", "127.0.0.0/8", True),
    ("::ffff:192.0.2.7", None, "192.0.2.0/24", True),
    ("::1", None, "127.0.0.0/8 ::1/128", True),
    ("", None, "0.0.0.0/0", False),
])
def test_may_relay(peer: str, user: str | None, networks: str, allowed: bool) -> None:
    class Peer:
        host = peer

    session = Session("mx.test", peer=Peer(), authenticated=user)
    assert may_relay(session, parse_networks(networks)) is allowed
    assert may_relay(None, parse_networks(networks)) is False
    relay = Relay(networks=networks)  # the same rule as the Relay handler's
    relay.session = session
    assert relay.may_relay() is allowed


def test_parse_networks_refuses_a_bad_one() -> None:
    with pytest.raises(ValueError):
        parse_networks("10.0.0.0/8, not-a-network")


# ---- settings as text ---------------------------------------------------------------------------------------------

def test_settings_from_text() -> None:
    config = QueueConfig.from_options(relayhost="[smtp.example.net]:587", dns="127.0.0.1:5353,[::1]",
                                      tls="required", verify="yes", min_backoff="1m", max_backoff="1h",
                                      lifetime="2d", delay_warning="4h", concurrency="5", runner="no",
                                      username="u", password="p", hostname="mx.test")
    assert config.relayhost == "[smtp.example.net]:587"
    assert config.dns == (("127.0.0.1", 5353), ("::1", 53))
    assert (config.tls, config.verify, config.concurrency, config.runner) == ("required", True, 5, False)
    assert config.schedule == Schedule(min_backoff=60, max_backoff=3600, lifetime=2 * 86400, delay_warning=4 * 3600)
    assert "password" not in repr(config)


@pytest.mark.parametrize("text, expected", [
    ("smtp.example.net", ("smtp.example.net", None)), ("smtp.example.net:2525", ("smtp.example.net", 2525)),
    ("[192.0.2.1]:25", ("192.0.2.1", 25)), ("[::1]:2525", ("::1", 2525)), ("[relay.test]", ("relay.test", None)),
])
def test_parse_relayhost(text: str, expected: tuple[str, int | None]) -> None:
    assert parse_relayhost(text) == expected


@pytest.mark.parametrize("settings, word", [
    ({"relayhost": "host:notaport"}, "relayhost"), ({"relayhost": "[::1"}, "relayhost"),
    ({"port": "70000"}, "port"), ({"dns": "127.0.0.1:x"}, "dns"), ({"tls": "maybe"}, "tls"),
    ({"verify": "perhaps"}, "verify"), ({"min_backoff": "-5"}, "min_backoff"), ({"lifetime": "5y"}, "lifetime"),
    ({"min_backoff": "2h", "max_backoff": "1h"}, "min_backoff"), ({"concurrency": "0"}, "concurrency"),
    ({"concurrency": "many"}, "concurrency"), ({"backend": "sqlite"}, "backend"),
    ({"username": "u"}, "password"), ({"username": "u", "password": "p"}, "relayhost"),
    ({"tls": "implicit"}, "relayhost"), ({"username": "u", "password": "p", "relayhost": "r", "tls": "none"}, "tls"),
    ({"hostname": "two words"}, "hostname"),
])
def test_bad_settings_say_which(settings: dict[str, str], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        QueueConfig.from_options(**{"hostname": "mx.test", **settings})


@pytest.mark.parametrize("settings, line", [
    ({"relayhost": ""}, "relayhost is empty: name a host, or leave relayhost out to deliver by MX"),
    ({"relayhost": "  "}, "relayhost is empty"),
    ({"dns": "notanip"}, "dns takes IP addresses with an optional port"),
    ({"dns": "127.0.0.1:53,ns.example:53"}, "dns takes IP addresses"),
    ({"ca_file": "/nonexistent/ca.pem"}, "ca_file: no such file: /nonexistent/ca.pem"),
    ({"networks": "10.0.0.0/33"}, "networks: '10.0.0.0/33'"),
])
def test_settings_that_would_fail_later_are_refused_at_once(tmp_path: Any, settings: dict[str, str],
                                                            line: str) -> None:
    """A wrong setting is one line naming it, when the handler is made, not at the first delivery."""
    with pytest.raises(ValueError, match=re.escape(line)) as raised:
        Queue(spool=str(tmp_path / "q"), hostname="mx.test", **settings)
    assert "\n" not in str(raised.value)


def test_ca_file_must_be_a_file(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="ca_file: not a file"):
        QueueConfig.from_options(ca_file=str(tmp_path), hostname="h")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert QueueConfig.from_options(ca_file=str(ca), hostname="h").ca_file == str(ca)
    assert QueueConfig.from_options(ca_file="", hostname="h").ca_file is None


def test_dns_takes_addresses_with_ports() -> None:
    assert parse_servers("127.0.0.1:5353 [::1]:53,::1") == (("127.0.0.1", 5353), ("::1", 53), ("::1", 53))


def test_verify_implies_required_tls_and_refuses_a_downgrade() -> None:
    """Opportunistic TLS would send in plaintext when the certificate fails: verify=yes makes it required, and
    refuses an explicit tls=opportunistic (or none) with a line saying so."""
    assert QueueConfig.from_options(verify="yes", hostname="h").tls == "required"
    assert QueueConfig.from_options(verify="yes", tls="implicit", relayhost="[r.test]:465", hostname="h").tls == (
        "implicit")
    assert QueueConfig.from_options(hostname="h").tls == "opportunistic"
    for tls in ("opportunistic", "none"):
        with pytest.raises(ValueError, match=f"verify=yes needs tls=required or tls=implicit, not tls={tls}"):
            QueueConfig.from_options(verify="yes", tls=tls, hostname="h")


def test_local_addresses_and_the_amqp_backend_from_settings() -> None:
    config = QueueConfig.from_options(local_addresses="192.0.2.1, [2001:db8::1] 127.0.0.1", hostname="h")
    assert config.local_addresses == ("192.0.2.1", "2001:db8::1", "127.0.0.1")
    assert QueueConfig.from_options(hostname="h").local_addresses is None
    with pytest.raises(ValueError, match="local_addresses"):
        QueueConfig.from_options(local_addresses="192.0.2.1,mx.example", hostname="h")
    assert QueueConfig.from_options(amqp_url="amqp://mq.test/", hostname="h").backend == "amqp"
    assert QueueConfig.from_options(amqp_url="amqp://mq.test/", backend="spool", hostname="h").backend == "spool"
    assert QueueConfig.from_options(attempt_timeout="10m", hostname="h").attempt_timeout == 600


def test_durations() -> None:
    assert [parse_seconds("x", v) for v in ("300", "30m", "4h", "5d", "1w", "1.5h", 12)] == [
        300, 1800, 14400, 432000, 604800, 5400, 12]
    assert parse_servers("192.0.2.53") == (("192.0.2.53", 53),)


def test_no_delay_warning_by_default_or_when_off() -> None:
    assert QueueConfig.from_options(hostname="h").schedule.delay_warning is None
    assert QueueConfig.from_options(hostname="h", delay_warning="none").schedule.delay_warning is None


def test_handlers_with_the_same_settings_share_one_service(tmp_path: Any) -> None:
    first, second = str(tmp_path / "q1"), str(tmp_path / "q2")
    one = Queue(spool=first, relayhost="127.0.0.1:2525", hostname="mx.test")
    two = Queue(spool=first, relayhost="127.0.0.1:2525", hostname="mx.test")
    other = Queue(spool=second, relayhost="127.0.0.1:2525", hostname="mx.test")
    assert one.service is two.service is Queue.process_service(spool=first, relayhost="127.0.0.1:2525",
                                                                  hostname="mx.test")
    assert other.service is not one.service
    assert isinstance(one.service, QueueService) and IService.providedBy(one.service)


# ---- twistd esmtpkit --------------------------------------------------------------------------------------------

def test_twistd_attaches_the_queue_service_and_its_metrics(tmp_path: Any) -> None:
    options = tap.Options()
    options.parseOptions(["--handler", "esmtpkit.handlers.Queue", "--hostname", "mx.test",
                          "--handler-option", f"spool={tmp_path / 'queue'}", "--handler-option", "runner=no",
                          "--handler-option", "relayhost=127.0.0.1:2526",
                          "--metrics", "tcp:9101:interface=127.0.0.1"])
    top = tap.makeService(options, reactor=MemoryReactor())
    [queue] = [s for s in top if isinstance(s, QueueService)]
    assert queue.config.hostname == "mx.test" and queue.config.runner is False
    assert queue.config.relayhost == "127.0.0.1:2526"
    registry = options["metrics-recorder"].registry
    assert registry.get_sample_value("esmtpkit_queue_attempts_total") == 0.0
    assert any(isinstance(m, QueueMetrics) for m in queue.monitor.monitors)
    queue.monitor.message_queued(Message("X", "a@b.example", [Recipient("c@d.example")]), "smtp")
    assert registry.get_sample_value("esmtpkit_queue_messages_queued_total", {"origin": "smtp"}) == 1.0


def test_labelled_queue_metrics_start_at_zero() -> None:
    """Every origin and notice action shows from the first scrape, as the recipient results do."""
    metrics = QueueMetrics()
    sample = metrics.registry.get_sample_value
    for origin in ("smtp", "notice"):
        assert sample("esmtpkit_queue_messages_queued_total", {"origin": origin}) == 0.0
    for action in ("failed", "delayed", "relayed"):
        assert sample("esmtpkit_queue_notices_total", {"action": action}) == 0.0
    for result in ("delivered", "deferred", "bounced"):
        assert sample("esmtpkit_queue_recipients_total", {"result": result}) == 0.0
    notice = Message("N", "", [Recipient("a@b.example")])
    metrics.notice_queued(notice, "delayed")
    metrics.message_queued(notice, "notice")
    assert sample("esmtpkit_queue_notices_total", {"action": "delayed"}) == 1.0
    assert sample("esmtpkit_queue_messages_queued_total", {"origin": "notice"}) == 1.0


def test_twistd_refuses_an_empty_relayhost_in_one_line(tmp_path: Any) -> None:
    options = tap.Options()
    with pytest.raises(usage.UsageError) as raised:
        options.parseOptions(["--handler", "esmtpkit.handlers.Queue", "--hostname", "mx.test",
                              "--handler-option", f"spool={tmp_path / 'queue'}", "--handler-option", "relayhost="])
    assert "relayhost is empty: name a host, or leave relayhost out to deliver by MX" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_twistd_amqp_options_reach_the_queue_handler(tmp_path: Any) -> None:
    """``--amqp-url`` and ``--amqp-queue`` work for the Queue handler as for the AMQP one (and imply
    backend=amqp), as do the handler options of the same names."""
    url = "amqp://u:p@127.0.0.1:5672/%2F"
    for args in (["--amqp-url", url, "--amqp-queue", "out"],
                 ["--handler-option", f"amqp_url={url}", "--handler-option", "amqp_queue=out"]):
        options = tap.Options()
        options.parseOptions(["--handler", "esmtpkit.handlers.Queue", "--hostname", "mx.test", *args])
        assert {k: v for k, v in options["handler-kwargs"].items() if k.startswith("amqp")} == {
            "amqp_url": url, "amqp_queue": "out"}
        [queue] = [s for s in tap.makeService(options, reactor=MemoryReactor()) if isinstance(s, QueueService)]
        assert (queue.config.backend, queue.config.amqp_url, queue.config.amqp_queue) == ("amqp", url, "out")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_twistd_refuses_an_unusable_spool_with_one_line(tmp_path: Any) -> None:
    """A spool that cannot be made or written stops twistd before it listens: one line, exit status 1."""
    run = run_twistd(tmp_path, "--listen", "tcp:0:interface=127.0.0.1", "--handler", "esmtpkit.handlers.Queue",
                     "--handler-option", "spool=/proc/nope")
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert run.stdout == ""
    assert run.stderr.splitlines() == [
        "twistd esmtpkit: queue spool /proc/nope: not usable: no such file or directory (/proc/nope)"]


def test_twistd_attaches_nothing_for_other_handlers(tmp_path: Any) -> None:
    options = tap.Options()
    options.parseOptions(["--maildir", str(tmp_path / "md"), "--hostname", "mx.test"])
    top = tap.makeService(options, reactor=MemoryReactor())
    assert not [s for s in top if isinstance(s, QueueService)]


def test_a_bad_setting_is_a_usage_error() -> None:
    from twisted.python import usage

    options = tap.Options()
    with pytest.raises(usage.UsageError, match="tls"):
        options.parseOptions(["--handler", "esmtpkit.handlers.Queue", "--handler-option", "tls=sometimes"])


def test_watch_ignores_other_services_and_shares_metrics_per_registry() -> None:
    registry = CollectorRegistry()
    assert watch(object(), registry) is False
    one = QueueService(QueueConfig(hostname="a"), store=MemoryStore(reactor=Clock()))
    two = QueueService(QueueConfig(hostname="b"), store=MemoryStore(reactor=Clock()))
    assert watch(one, registry) and watch(two, registry) and watch(one, registry)
    assert len(one.monitor.monitors) == 1 and one.monitor.monitors[0] is two.monitor.monitors[0]


def test_the_service_delivers_what_its_store_holds_and_stops_cleanly() -> None:
    clock = Clock()
    store = MemoryStore(reactor=clock)
    done: list[Any] = []

    class Deliverer:
        def deliver(self, message: Message, indexes: list[int], open_content: Any) -> Deferred[Any]:
            from esmtpkit.core.outbound import Outcome

            done.append(message.id)
            return succeed({i: Outcome(250, "2.0.0", "ok", "mx") for i in indexes})

    store.enqueue(Message("OLD", "a@example.org", [Recipient("b@example.net")]), b"Subject: x\r\n\r\n")
    service = QueueService(QueueConfig(hostname="mx.test"), reactor=clock, store=store, deliverer=Deliverer())
    service.startService()
    clock.advance(0)
    assert done == ["OLD"] and store.messages == {}
    stopped = service.stopService()
    assert stopped.called and clock.getDelayedCalls() == []


def test_a_service_without_runner_delivers_nothing() -> None:
    clock = Clock()
    store = MemoryStore(reactor=clock)
    store.enqueue(Message("OLD", "a@example.org", [Recipient("b@example.net")]), b"")
    service = QueueService(QueueConfig(hostname="mx.test", runner=False), reactor=clock, store=store,
                           deliverer=object())
    service.startService()
    clock.advance(10)
    assert "OLD" in store.messages
    assert service.stopService().called


def test_stopping_gives_up_waiting_after_the_timeout() -> None:
    clock = Clock()
    store = MemoryStore(reactor=clock)

    class Hanging:
        def deliver(self, message: Message, indexes: list[int], open_content: Any) -> Deferred[Any]:
            return Deferred()

    store.enqueue(Message("M", "a@example.org", [Recipient("b@example.net")]), b"")
    service = QueueService(QueueConfig(hostname="mx.test"), reactor=clock, store=store, deliverer=Hanging(),
                           stop_timeout=30)
    service.startService()
    clock.advance(0)
    stopped = service.stopService()
    assert not stopped.called
    clock.advance(30)
    assert stopped.called
    assert store.messages["M"].attempts == 0  # its state was not changed: the attempt is made again


def test_the_service_builds_its_parts_from_the_settings(tmp_path: Any) -> None:
    from esmtpkit.client.delivery import Deliverer
    from esmtpkit.client.mx import MXRouter, Smarthost
    from esmtpkit.queue.spool import SpoolStore

    relayed = QueueService(QueueConfig.from_options(spool=str(tmp_path / "q"), relayhost="[127.0.0.1]:2526",
                                                    hostname="mx.test", tls="none"), reactor=Clock())
    assert isinstance(relayed.store, SpoolStore) and relayed.store.path == str(tmp_path / "q")
    deliverer = relayed.deliverer
    assert isinstance(deliverer, Deliverer) and isinstance(deliverer.router, Smarthost)
    assert (deliverer.router.host, deliverer.router.port) == ("127.0.0.1", 2526)
    assert (deliverer.options.helo, deliverer.options.tls) == ("mx.test", "none")
    by_mx = QueueService(QueueConfig.from_options(dns="127.0.0.1:5353", port=2525, hostname="mx.test"),
                         reactor=Clock())
    router = by_mx.deliverer.router
    assert isinstance(router, MXRouter) and router.port == 2525 and "mx.test" in router.local_names


@implementer(IListeningPort)
class Bound:
    """A listening port as the service sees it: only its address."""

    def __init__(self, host: str, port: int) -> None:
        self.address = IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        pass

    def getHost(self) -> Any:
        return self.address


def listener(host: str, port: int) -> Service:
    service = Service()
    service.port = Bound(host, port)  # type: ignore[attr-defined]
    return service


def test_mx_routing_knows_the_addresses_this_server_listens_on() -> None:
    """A loop is an MX whose address is this server's own: the concrete addresses it listens on, on the port
    mail is delivered to, are local (not 0.0.0.0, and not a listener on another port such as a test's 127.0.0.1)."""
    top = MultiService()
    for host, port in (("192.0.2.5", 25), ("2001:db8::5", 25), ("0.0.0.0", 25), ("127.0.0.1", 2525)):
        listener(host, port).setServiceParent(top)
    clock = Clock()
    service = QueueService(QueueConfig.from_options(dns="127.0.0.1:5353", hostname="mx.test"), reactor=clock,
                           store=MemoryStore(reactor=clock))
    service.setServiceParent(top)
    top.startService()
    assert service.local_addresses() == ("192.0.2.5", "2001:db8::5")
    assert service.deliverer.router.local_addresses == frozenset({"192.0.2.5", "2001:db8::5"})
    assert top.stopService().called
    given = QueueService(QueueConfig.from_options(dns="127.0.0.1:5353", local_addresses="198.51.100.7",
                                                  hostname="mx.test"), reactor=Clock())
    assert given.deliverer.router.local_addresses == frozenset({"198.51.100.7"})
    assert listening_addresses(object(), 25) == ()


def test_the_store_counts_reach_the_queue_size_gauge() -> None:
    registry = CollectorRegistry()
    clock = Clock()
    counted: list[Any] = []

    class Counting(MemoryStore):
        def watch_counts(self, listener: Any) -> None:
            counted.append(listener)

    service = QueueService(QueueConfig(hostname="mx.test"), reactor=clock, store=Counting(reactor=clock),
                           deliverer=object())
    watch(service, registry)
    service.startService()
    [listener] = counted
    listener({"queued": 7, "held": 2, "active": 1})
    assert registry.get_sample_value("esmtpkit_queue_messages", {"state": "queued"}) == 7
    assert registry.get_sample_value("esmtpkit_queue_messages", {"state": "held"}) == 2
    assert service.stopService().called


def test_the_amqp_backend_keeps_the_queue_in_rabbitmq() -> None:
    from esmtpkit.queue.amqp import AMQPStore

    config = QueueConfig.from_options(backend="amqp", amqp_url="amqp://u:p@127.0.0.1:5672/%2F", amqp_queue="out",
                                      min_backoff="60", max_backoff="240", hostname="mx.test")
    store = QueueService(config, reactor=Clock()).store
    assert isinstance(store, AMQPStore) and store.queue == "out"
    assert sorted(store.delay_queues) == [60.0, 120.0, 240.0]  # one delay queue per retry interval of the schedule
