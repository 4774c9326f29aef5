"""The AMQP handler: 250 only after the broker's ack, 451 4.3.0 otherwise, and a shared connection that comes back.

Unit tests drive the handler and its `Publisher` in memory (Conversation + Clock, a scripted link in place of
pika); the pika link's mapping of broker answers is tested against a scripted channel. Integration tests run a
private RabbitMQ node (tests/rabbitmq.py) and real SMTP clients on loopback; they are skipped only when Debian's
``rabbitmq-server`` is not installed.
"""

from __future__ import annotations

import random
import re
import smtplib
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from esmtpkit.core.content import dot_stuff
from esmtpkit.handlers import amqp
from esmtpkit.handlers.amqp import AMQP, QUEUE_ARGUMENTS, NotQueued, Publisher, State, Unroutable
from esmtpkit.queue import broker as broker_module
from esmtpkit.server.interfaces import IMessageHandler
from esmtpkit.server.policy import Policy
from esmtpkit.testing import Conversation, serve

from .rabbitmq import NO_PIKA, RabbitMQ, ScriptedLink, ScriptedOpener, free_port, private_node

CONTENT = b"Subject: queued\r\n\r\n.leading dot\r\n..two\r\n.\r\n8-bit \xe9\xff\r\n"
START = b"EHLO client.test\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.opener = ScriptedOpener()
        self.publisher = Publisher("amqp://guest:secret@broker.test:5672/%2F", "mail", reactor=self.clock,
                                   opener=self.opener, connect_timeout=10, retry_min=0.5, retry_max=4)
        self.talks: list[Conversation] = []

    def tearDown(self) -> None:
        for talk in self.talks:
            if not talk.closed:
                talk.protocol.connectionLost(Failure(ConnectionDone()))
        self.publisher.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def handler(self, **settings: Any) -> AMQP:
        settings.setdefault("publisher", self.publisher)
        settings.setdefault("trace", False)
        return AMQP(**settings)

    def talk(self, handler: AMQP | None = None) -> Conversation:
        talk = Conversation(handler or self.handler(), Policy(hostname="mx.test"), clock=self.clock)
        self.talks.append(talk)
        return talk

    def ready_link(self) -> ScriptedLink:
        self.publisher.start()
        return self.opener.succeed()

    def send(self, talk: Conversation, content: bytes = CONTENT) -> None:
        talk.write(START)
        replies = talk.replies()
        self.assertEqual(replies[-1].code, 354)
        talk.write(dot_stuff(content))

    def final(self, talk: Conversation) -> bytes:
        return talk.transport.value().split(b"\r\n")[-2]


# ---- the handler in memory ----------------------------------------------------------------------------------


class HandlerTests(Base):
    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IMessageHandler, self.handler()))

    def test_250_only_after_the_brokers_ack(self) -> None:
        """The client's 250 waits for basic.ack; the body is the content, byte for byte, with its id."""
        link = self.ready_link()
        talk = self.talk()
        self.send(talk)
        self.assertEqual(talk.replies(), [])
        [published] = link.published
        self.assertEqual(published["body"], CONTENT)
        self.assertEqual(published["queue"], "mail")
        properties = published["properties"]
        self.assertRegex(properties["message_id"], r"^[0-9A-HJKMNP-TV-Z]{20}$")
        self.assertEqual((properties["content_type"], properties["timestamp"]), ("message/rfc822", 0))
        published["confirm"].callback(None)
        self.assertEqual(self.final(talk), b"250 2.0.0 Ok: queued as " + properties["message_id"].encode())

    def test_envelope_travels_in_headers(self) -> None:
        link = self.ready_link()
        talk = self.talk()
        talk.write(b"EHLO client.test\r\nMAIL FROM:<alice@example.com> BODY=8BITMIME\r\n"
                   b"RCPT TO:<bob@example.net>\r\nRCPT TO:<postmaster>\r\nDATA\r\n")
        talk.write(dot_stuff(CONTENT))
        headers = link.published[0]["properties"]["headers"]
        self.assertEqual(headers, {
            "sender": "alice@example.com",
            "recipients": ["bob@example.net", "postmaster"],
            "client-ip": "127.0.0.1",
            "client-helo": "client.test",
            "protocol": "ESMTP",
            "received-by": "mx.test",
            "body-type": "8BITMIME",
        })
        link.published[0]["confirm"].callback(None)

    def test_null_sender_and_authenticated_identity(self) -> None:
        link = self.ready_link()
        talk = self.talk()
        talk.protocol.session.authenticated = "carol"
        talk.write(b"EHLO client.test\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
        talk.write(dot_stuff(CONTENT))
        headers = link.published[0]["properties"]["headers"]
        self.assertEqual((headers["sender"], headers["authenticated"], headers["protocol"]), ("", "carol", "ESMTPA"))
        link.published[0]["confirm"].callback(None)

    def test_trace_field_first_with_the_message_id(self) -> None:
        link = self.ready_link()
        talk = self.talk(self.handler(trace=True))
        self.send(talk)
        published = link.published[0]
        body = published["body"]
        self.assertTrue(body.startswith(b"Received: from client.test"))
        self.assertTrue(body.endswith(b"\r\n" + CONTENT))
        self.assertIn(b"id " + published["properties"]["message_id"].encode(), body[: len(body) - len(CONTENT)])
        published["confirm"].callback(None)

    def test_spool_rolls_over_to_a_file_and_stays_exact(self) -> None:
        link = self.ready_link()
        talk = self.talk(self.handler(spool_max=1000))
        content = b"".join(b"line %06d ..\r\n.dot %d\r\n" % (i, i) for i in range(5000))
        self.send(talk, content)
        self.assertEqual(link.published[0]["body"], content)
        link.published[0]["confirm"].callback(None)
        self.assertTrue(self.final(talk).startswith(b"250 "))

    def test_nack_is_451(self) -> None:
        link = self.ready_link()
        talk = self.talk()
        self.send(talk)
        link.published[0]["confirm"].errback(NotQueued("the broker refused it (nack)"))
        self.assertEqual(self.final(talk),
                         b"451 4.3.0 Message not queued (the broker refused it (nack)), try again later")

    def test_unroutable_is_451_and_the_queue_is_declared_again(self) -> None:
        link = self.ready_link()
        talk = self.talk()
        self.send(talk)
        link.published[0]["confirm"].errback(Unroutable("no queue to route it to", "queue 'mail' is missing"))
        self.assertEqual(self.final(talk), b"451 4.3.0 Message not queued (no queue to route it to), try again later")
        self.assertEqual(link.declared, [("mail", QUEUE_ARGUMENTS, False)] * 2)  # on connecting, then again
        talk.write(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n" + dot_stuff(CONTENT))
        link.published[1]["confirm"].callback(None)
        self.assertTrue(self.final(talk).startswith(b"250 2.0.0 Ok: queued as "))

    def test_no_confirmation_in_time_is_451_and_a_late_ack_changes_nothing(self) -> None:
        link = self.ready_link()
        talk = self.talk(self.handler(confirm_timeout=30))
        self.send(talk)
        self.clock.advance(29.9)
        self.assertEqual(talk.replies(), [])
        self.clock.advance(0.1)
        self.assertEqual(self.final(talk),
                         b"451 4.3.0 Message not queued (no confirmation from the broker within 30 s), try again later")
        written = talk.transport.value()
        link.published[0]["confirm"].callback(None)
        self.assertEqual(talk.transport.value(), written)

    def test_connection_lost_before_the_ack_is_451_then_reconnects(self) -> None:
        link = self.ready_link()
        talk = self.talk()
        self.send(talk)
        link.drop("connection closed: reset by peer")
        self.assertEqual(self.final(talk), b"451 4.3.0 Message not queued (connection to the broker lost before"
                                           b" confirming), try again later")
        self.assertIs(self.publisher.state, State.DOWN)
        self.assertTrue(link.closed)
        self.assertEqual(self.publisher.last_error, "connection closed: reset by peer")
        self.clock.advance(0.5)
        self.assertEqual(len(self.opener.attempts), 2)
        self.opener.succeed()
        self.assertIs(self.publisher.state, State.READY)

    def test_broker_down_answers_451_at_once(self) -> None:
        self.publisher.start()
        self.opener.refuse()
        talk = self.talk()
        self.send(talk)
        self.assertEqual(self.final(talk), b"451 4.3.0 Message not queued (broker unavailable), try again later")

    def test_first_message_waits_for_the_connection_under_way(self) -> None:
        talk = self.talk()
        self.assertEqual(self.publisher.state, State.CONNECTING)  # connect() started it
        self.send(talk)
        self.assertEqual(talk.replies(), [])
        link = self.opener.succeed()
        link.published[0]["confirm"].callback(None)
        self.assertTrue(self.final(talk).startswith(b"250 2.0.0 Ok: queued as "))

    def test_first_message_then_the_attempt_fails(self) -> None:
        talk = self.talk()
        self.send(talk)
        self.opener.refuse()
        self.assertEqual(self.final(talk), b"451 4.3.0 Message not queued (broker unavailable), try again later")

    def test_declared_size_over_the_limit_is_552_at_mail(self) -> None:
        self.ready_link()
        talk = self.talk(self.handler(max_size=1000))
        talk.send("EHLO client.test")
        self.assertEqual(talk.send("MAIL FROM:<alice@example.com> SIZE=1001").code, 552)
        self.assertEqual(self.final(talk), b"552 5.3.4 Message size exceeds the message queue's limit")
        self.assertEqual(talk.send("MAIL FROM:<alice@example.com> SIZE=1000").code, 250)

    def test_content_over_the_limit_is_552_and_not_published(self) -> None:
        link = self.ready_link()
        talk = self.talk(self.handler(max_size=1000, spool_max=100))
        self.send(talk, b"x" * 998 + b"\r\n" + b"y" * 10 + b"\r\n")
        self.assertEqual(self.final(talk), b"552 5.3.4 Message size exceeds the message queue's limit")
        self.assertEqual(link.published, [])
        talk.write(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n" + dot_stuff(CONTENT))
        link.published[0]["confirm"].callback(None)
        self.assertTrue(self.final(talk).startswith(b"250 "))

    def test_abort_discards_the_spool_and_publishes_nothing(self) -> None:
        link = self.ready_link()
        handler = self.handler()
        talk = self.talk(handler)
        talk.write(START + b"Subject: half\r\n\r\nonly part of it\r\n")
        self.assertIsNotNone(handler._spool)
        talk.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(handler._spool)
        self.assertEqual(handler.message_id, "")
        self.assertEqual(link.published, [])

    def test_size_limit_of_the_server_aborts_and_publishes_nothing(self) -> None:
        link = self.ready_link()
        talk = Conversation(self.handler(), Policy(hostname="mx.test", max_message_size=100), clock=self.clock)
        self.talks.append(talk)
        self.send(talk, b"z" * 200 + b"\r\n")
        self.assertEqual(talk.replies()[-1].code, 552)
        self.assertEqual(link.published, [])


class RefuseWhenDownTests(Base):
    def test_greeting_waits_for_the_first_attempt(self) -> None:
        talk = self.talk(self.handler(refuse_when_down=True))
        self.assertIsNone(talk.greeting)
        self.opener.succeed()
        [greeting] = talk.replies()
        self.assertEqual(greeting.code, 220)

    def test_421_while_the_broker_is_unreachable(self) -> None:
        self.publisher.start()
        self.opener.refuse()
        talk = self.talk(self.handler(refuse_when_down="yes"))
        self.assertEqual(talk.transport.value(),
                         b"421 Service not available: message queue unreachable, try again later\r\n")
        self.assertTrue(talk.closed)

    def test_421_when_the_attempt_fails_or_takes_too_long(self) -> None:
        talk = self.talk(self.handler(refuse_when_down=True, confirm_timeout=5))
        self.clock.advance(5)
        self.assertEqual(talk.replies()[0].code, 421)
        self.clock.advance(5)  # the attempt itself times out at connect_timeout
        self.assertEqual(self.opener.cancelled, 1)
        self.assertIs(self.publisher.state, State.DOWN)
        self.assertEqual(self.publisher.last_error, "no answer within 10 s")

    def test_without_the_option_the_greeting_never_waits(self) -> None:
        talk = self.talk(self.handler())
        self.assertEqual(talk.greeting.code, 220)
        self.opener.refuse()
        self.assertEqual(self.talk(self.handler()).greeting.code, 220)


class PublisherTests(Base):
    def test_back_off_doubles_up_to_the_maximum_and_resets_after_success(self) -> None:
        self.publisher.start()
        delays = []
        for _ in range(5):
            self.opener.refuse()
            [retry] = self.clock.getDelayedCalls()
            delays.append(retry.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
        self.assertEqual(delays, [0.5, 1, 2, 4, 4])
        link = self.opener.succeed()
        link.drop()
        [retry] = self.clock.getDelayedCalls()
        self.assertEqual(retry.getTime() - self.clock.seconds(), 0.5)

    def test_no_reconnect_once_the_reactor_has_stopped(self) -> None:
        """twistd stopping drops every connection: that is no reason to reconnect (or to warn)."""
        link = self.ready_link()
        self.clock.running = False  # type: ignore[attr-defined]
        link.drop()
        self.assertIs(self.publisher.state, State.STOPPED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_fails_what_waits_and_closes_the_link(self) -> None:
        self.publisher.start()
        waiting = self.publisher.publish(b"x", "ID1", {}, 30)
        ready = self.publisher.wait_ready(5)
        self.publisher.stop()
        self.assertEqual(self.successResultOf(ready), False)
        self.failureResultOf(waiting, NotQueued)
        self.assertEqual(self.opener.cancelled, 1)
        self.failureResultOf(self.publisher.publish(b"x", "ID2", {}, 30), NotQueued)

    def test_stop_drops_a_connection_whose_close_is_not_answered(self) -> None:
        link = self.ready_link()
        link.closing = Deferred()
        stopped = self.publisher.stop()
        self.assertNoResult(stopped)
        self.clock.advance(9.9)
        self.assertFalse(link.aborted)
        self.clock.advance(0.1)
        self.assertTrue(link.aborted)
        self.successResultOf(stopped)

    def test_password_kept_out_of_logs(self) -> None:
        self.assertEqual(broker_module.safe_url(self.publisher.url), "amqp://guest:***@broker.test:5672/%2F")

    def test_pending_counts_unconfirmed_publishes(self) -> None:
        link = self.ready_link()
        done = self.publisher.publish(b"x", "ID1", {"sender": ""}, 30)
        self.assertEqual(self.publisher.pending, 1)
        link.published[0]["confirm"].callback(None)
        self.assertEqual(self.publisher.pending, 0)
        self.assertIsNone(self.successResultOf(done))


class SettingsTests(SynchronousTestCase):
    """Handlers built as twistd builds them: no publisher given, so pika must be installed."""

    skip = NO_PIKA

    def test_one_shared_publisher_per_url_and_queue(self) -> None:
        clock = Clock()
        first = Publisher.shared("amqp://127.0.0.1/", "mail", reactor=clock)
        self.assertIs(Publisher.shared("amqp://127.0.0.1/", "mail"), first)
        self.assertIsNot(Publisher.shared("amqp://127.0.0.1/", "other"), first)
        handler = AMQP("amqp://127.0.0.1/", "mail")
        self.assertIs(handler._publisher(), first)
        amqp.stop_publishers()
        self.assertEqual(len(Publisher._shared), 0)
        self.assertIs(first.state, State.STOPPED)
        self.assertIsNot(Publisher.shared("amqp://127.0.0.1/", "mail", reactor=clock), first)
        amqp.stop_publishers()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_the_global_reactor_unless_one_is_given(self) -> None:
        """Made without a reactor (as twistd checks the options, before it installs one), a publisher imports the
        global reactor only when it first needs it."""
        from twisted.internet import reactor

        clock = Clock()
        self.assertIs(Publisher("amqp://127.0.0.1/", reactor=clock).reactor, clock)
        publisher = Publisher("amqp://127.0.0.1/")
        self.assertIsNone(publisher.__dict__["_reactor"])
        self.assertIs(publisher.reactor, reactor)

    def test_string_settings_from_the_command_line(self) -> None:
        handler = AMQP(url="amqps://u:p@mq.example:5671/mail", queue="in", confirm_timeout="5",
                       refuse_when_down="yes", max_size="1000", spool_max="10", trace="no")
        self.assertEqual((handler.confirm_timeout, handler.refuse_when_down, handler.max_size, handler.spool_max,
                          handler.trace), (5.0, True, 1000, 10, False))
        self.assertEqual(AMQP(spool_max="0").spool_max, 1)  # 0 would mean "never roll over" to tempfile

    def test_bad_settings(self) -> None:
        for bad in (dict(url="http://broker/"), dict(url="amqp://"), dict(confirm_timeout="0"),
                    dict(refuse_when_down="maybe"), dict(queue="")):
            with self.subTest(bad=bad):
                self.assertRaises(ValueError, AMQP, **bad)

    def test_constructing_starts_no_connection(self) -> None:
        AMQP("amqp://127.0.0.1:1/", "never")
        self.assertNotIn(("amqp://127.0.0.1:1/", "never", None), Publisher._shared)


class WithoutPikaTests(SynchronousTestCase):
    def test_clear_error_without_pika(self) -> None:
        import importlib.util

        real = importlib.util.find_spec
        self.patch(importlib.util, "find_spec", lambda name, *rest: None if name == "pika" else real(name, *rest))
        with self.assertRaisesRegex(ImportError, r"pip install 'esmtpkit\[amqp\]'"):
            AMQP()
        self.assertTrue(verifyObject(IMessageHandler, AMQP(publisher=Publisher())))  # an injected one needs none


# ---- the pika link against a scripted channel ---------------------------------------------------------------


class ScriptedChannel:
    """Just enough of pika's TwistedChannel: basic_publish returns a Deferred the test fires."""

    def __init__(self) -> None:
        self.on_closed: Deferred[Any] = Deferred()
        self.calls: list[dict[str, Any]] = []

    def basic_publish(self, **kwargs: Any) -> "Deferred[Any]":
        kwargs["confirm"] = Deferred()
        self.calls.append(kwargs)
        return kwargs["confirm"]

    def queue_declare(self, **kwargs: Any) -> "Deferred[Any]":
        self.calls.append(kwargs)
        return succeed(SimpleNamespace(method=SimpleNamespace(message_count=3)))


class ScriptedConnection:
    def __init__(self) -> None:
        self.closed: Deferred[Any] | None = Deferred()
        self.is_closed = False


class PikaLinkTests(SynchronousTestCase):
    skip = NO_PIKA

    def setUp(self) -> None:
        self.channel = ScriptedChannel()
        self.connection = ScriptedConnection()
        self.link = broker_module._PikaLink(self.connection, self.channel)

    def publish(self) -> "Deferred[Any]":
        return self.link.publish("mail", b"body", {
            "content_type": "message/rfc822", "message_id": "ID1", "timestamp": 1700000000,
            "headers": {"sender": "a@b.example", "recipients": ["c@d.example"]}})

    def test_persistent_mandatory_to_the_queue(self) -> None:
        done = self.publish()
        call = self.channel.calls[0]
        properties = call["properties"]
        self.assertEqual((call["exchange"], call["routing_key"], call["body"], call["mandatory"]),
                         ("", "mail", b"body", True))
        self.assertEqual((properties.delivery_mode, properties.message_id, properties.content_type,
                          properties.timestamp, properties.app_id),
                         (2, "ID1", "message/rfc822", 1700000000, "esmtpkit"))
        self.assertEqual(properties.headers, {"sender": "a@b.example", "recipients": ["c@d.example"]})
        call["confirm"].callback(object())
        self.successResultOf(done)

    def test_broker_answers_become_not_queued(self) -> None:
        from pika.exceptions import ChannelClosedByBroker, ConnectionClosedByBroker, NackError, UnroutableError

        cases = [
            (NackError([]), NotQueued, "the broker refused it (nack)", ""),
            (UnroutableError([]), Unroutable, "no queue to route it to", "queue 'mail' is missing"),
            (ChannelClosedByBroker(406, "PRECONDITION_FAILED - message size 9 is larger than configured max size 8"),
             NotQueued, "the broker closed the channel before confirming",
             "(406, 'PRECONDITION_FAILED - message size 9 is larger than configured max size 8')"),
            (ConnectionClosedByBroker(320, "CONNECTION_FORCED"), NotQueued,
             "connection to the broker lost before confirming", "(320, 'CONNECTION_FORCED')"),
        ]
        for error, kind, reason, detail in cases:
            with self.subTest(error=error):
                done = self.publish()
                self.channel.calls[-1]["confirm"].errback(error)
                failure = self.failureResultOf(done, NotQueued)
                self.assertIsInstance(failure.value, kind)
                self.assertEqual((failure.value.reason, failure.value.detail), (reason, detail))

    def test_declares_a_durable_quorum_queue(self) -> None:
        self.assertEqual(self.successResultOf(self.link.declare("mail", QUEUE_ARGUMENTS)), 3)
        self.assertEqual(self.successResultOf(self.link.declare("mail", {}, passive=True)), 3)
        self.assertEqual(self.channel.calls, [
            dict(queue="mail", durable=True, passive=False, arguments={"x-queue-type": "quorum"}),
            dict(queue="mail", durable=True, passive=True, arguments=None)])

    def test_lost_once_whichever_closes_first(self) -> None:
        from pika.exceptions import ChannelClosedByBroker

        self.channel.on_closed.callback(ChannelClosedByBroker(404, "NOT_FOUND"))
        self.connection.closed.callback(None)
        self.assertEqual(self.successResultOf(self.link.lost), "channel closed: (404, 'NOT_FOUND')")


# ---- integration: a real RabbitMQ ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker() -> Iterator[RabbitMQ]:
    yield from private_node(tls=True)


@pytest.fixture
def clients() -> Iterator[Callable[..., "Deferred[Any]"]]:
    """Run blocking SMTP clients in threads (as many at once as the test starts); the pool is stopped after."""
    from twisted.internet import reactor

    pool = ThreadPool(minthreads=0, maxthreads=24, name="smtp-clients")
    pool.start()
    try:
        yield lambda f, *args: threads.deferToThreadPool(reactor, pool, f, *args)
    finally:
        pool.stop()


def message_content(client: int, number: int) -> bytes:
    """A distinct message with dots at line starts, 8-bit bytes and a size from 100 bytes to ~40 KB."""
    rnd = random.Random(client * 100_000 + number)
    lines = [b"From: <sender%d@example.com>" % client, b"To: <rcpt%d@example.net>" % number,
             b"Subject: message %d-%d" % (client, number), b"X-Token: %d-%d" % (client, number), b""]
    for i in range(rnd.choice((3, 30, 300, 1000))):
        word = bytes(rnd.choice(b"abcdefghij .\xe9\xff") for _ in range(rnd.randrange(0, 40)))
        lines.append((b"." if i % 7 == 0 else b"") + word)
    lines.append(b".")
    return b"\r\n".join(lines) + b"\r\n"


_TOKEN = re.compile(rb"^X-Token: (\d+-\d+)\r$", re.MULTILINE)
_QUEUED = re.compile(r"queued as ([0-9A-Z]{20})$")


def split_trace(body: bytes) -> tuple[bytes, bytes]:
    """(our Received: field, the client's content) of a queued message body."""
    match = re.match(rb"Received: [^\r\n]*(?:\r\n[ \t][^\r\n]*)*\r\n", body)
    assert match is not None, body[:200]
    return body[: match.end()], body[match.end():]


def transaction(smtp: smtplib.SMTP, client: int, number: int) -> tuple[str, int, str, bytes]:
    content = message_content(client, number)
    smtp.ehlo_or_helo_if_needed()
    smtp.mail(f"sender{client}@example.com")
    smtp.rcpt(f"rcpt{number}@example.net")
    code, text = smtp.data(content)
    return f"{client}-{number}", code, text.decode(), content


def publisher_for(broker: RabbitMQ, queue: str) -> Publisher:
    return Publisher(broker.url, queue, connect_timeout=5, retry_min=0.2, retry_max=1.0)


@pytest_twisted.ensureDeferred
async def test_private_broker_listens_on_loopback_only(broker: RabbitMQ) -> None:
    import ipaddress

    sockets = broker.listening()
    ports = {port for _, port in sockets}
    assert {broker.port, broker.tls_port, broker.dist_port, broker.epmd_port} <= ports, sockets
    assert all(ipaddress.ip_address(address).is_loopback for address, _ in sockets), sockets


@pytest_twisted.ensureDeferred
async def test_500_messages_from_20_clients_arrive_once_byte_exact(broker: RabbitMQ, clients: Any) -> None:
    server = await serve(lambda: AMQP(url=broker.url, queue="mail-500", spool_max=4096))  # the shared publisher
    try:
        def client(number: int) -> list[tuple[str, int, str, bytes]]:
            with smtplib.SMTP(*server.address, timeout=60) as smtp:
                smtp.ehlo(f"client{number}.test")
                return [transaction(smtp, number, i) for i in range(25)]

        began = time.monotonic()
        results = [r for batch in await _gather([clients(client, n) for n in range(20)]) for r in batch]
        print(f"\n500 messages from 20 clients queued and confirmed in {time.monotonic() - began:.2f} s")
        assert len(results) == 500
        assert {code for _, code, _, _ in results} == {250}, [r[:3] for r in results if r[1] != 250][:5]
        assert len(Publisher._shared) == 1
        queued = await threads.deferToThread(broker.drain, "mail-500")
    finally:
        await server.stop()
        await amqp.stop_publishers()
    assert len(queued) == 500
    sent = {token: (_QUEUED.search(text).group(1), content) for token, _, text, content in results}
    seen = set()
    for properties, body in queued:
        trace, content = split_trace(body)
        token = _TOKEN.search(content).group(1).decode()
        assert token not in seen
        seen.add(token)
        message_id, expected = sent[token]
        assert content == expected
        assert properties.message_id == message_id
        assert b"id " + message_id.encode() in trace
        assert properties.delivery_mode == 2
        client, number = token.split("-")
        assert properties.headers["sender"] == f"sender{client}@example.com"
        assert properties.headers["recipients"] == [f"rcpt{number}@example.net"]
        assert properties.headers["client-helo"] == f"client{client}.test"
        assert properties.headers["client-ip"] == "127.0.0.1"
    assert seen == set(sent)


@pytest_twisted.ensureDeferred
async def test_queue_is_a_durable_quorum_queue(broker: RabbitMQ, clients: Any) -> None:
    import pika.exceptions

    publisher = publisher_for(broker, "mail-kind")
    server = await serve(lambda: AMQP(publisher=publisher))
    try:
        def client() -> tuple[str, int, str, bytes]:
            with smtplib.SMTP(*server.address, timeout=30) as smtp:
                return transaction(smtp, 0, 0)

        assert (await clients(client))[1] == 250
    finally:
        await server.stop()
        await publisher.stop()

    def redeclare(arguments: dict[str, Any]) -> Any:
        connection = broker.connection()
        try:
            return connection.channel().queue_declare("mail-kind", durable=True, arguments=arguments)
        finally:
            if connection.is_open:
                connection.close()

    same = await threads.deferToThread(redeclare, {"x-queue-type": "quorum"})
    assert same.method.message_count == 1
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="inequivalent arg 'x-queue-type'"):
        await threads.deferToThread(redeclare, {"x-queue-type": "classic"})
    await threads.deferToThread(broker.drain, "mail-kind", 0.2)


@pytest_twisted.ensureDeferred
async def test_deleted_queue_gives_451_then_is_declared_again(broker: RabbitMQ, clients: Any) -> None:
    publisher = publisher_for(broker, "mail-gone")
    server = await serve(lambda: AMQP(publisher=publisher))
    try:
        def client() -> list[tuple[str, int, str, bytes]]:
            with smtplib.SMTP(*server.address, timeout=30) as smtp:
                first = transaction(smtp, 0, 0)
                broker.delete_queue("mail-gone")
                return [first, transaction(smtp, 0, 1), transaction(smtp, 0, 2)]

        results = await clients(client)
        queued = await threads.deferToThread(broker.drain, "mail-gone", 0.2)
    finally:
        await server.stop()
        await publisher.stop()
    assert [(code, text) for _, code, text, _ in results][1] == (
        451, "4.3.0 Message not queued (no queue to route it to), try again later")
    assert [code for _, code, _, _ in results] == [250, 451, 250]
    assert [split_trace(body)[1] for _, body in queued] == [results[2][3]]


@pytest_twisted.ensureDeferred
async def test_abandoned_message_is_not_published(broker: RabbitMQ, clients: Any) -> None:
    publisher = publisher_for(broker, "mail-abort")
    server = await serve(lambda: AMQP(publisher=publisher))
    try:
        def client() -> tuple[str, int, str, bytes]:
            with socket.create_connection(server.address, timeout=30) as raw:
                raw.recv(1000)
                raw.sendall(START + b"Subject: never finished\r\n\r\n" + b"x" * 100_000)
                time.sleep(0.2)
            with smtplib.SMTP(*server.address, timeout=30) as smtp:
                return transaction(smtp, 1, 1)

        done = await clients(client)
        queued = await threads.deferToThread(broker.drain, "mail-abort", 0.5)
    finally:
        await server.stop()
        await publisher.stop()
    assert done[1] == 250
    assert [split_trace(body)[1] for _, body in queued] == [done[3]]


def test_twistd_with_the_amqp_handler(broker: RabbitMQ, tmp_path: Any) -> None:
    """``twistd esmtpkit --handler esmtpkit.handlers.AMQP`` with string options: messages queued, a clean exit."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    port = free_port()
    log = Path(tmp_path) / "twistd.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    options = [f"url={broker.url}", "queue=mail-twistd", "confirm_timeout=5", "refuse_when_down=yes"]
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=", "--logfile", str(log), "esmtpkit",
         "--listen", f"tcp:{port}:interface=127.0.0.1", "--hostname", "mx.test", "--handler", "esmtpkit.handlers.AMQP",
         *[arg for option in options for arg in ("--handler-option", option)]],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and "starting on" in log.read_text()):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text() if log.exists() else ""
            time.sleep(0.05)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            results = [transaction(smtp, 7, i) for i in range(3)]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    queued = broker.drain("mail-twistd", 0.2)
    assert [code for _, code, _, _ in results] == [250, 250, 250]
    assert sorted(split_trace(body)[1] for _, body in queued) == sorted(r[3] for r in results)
    text = log.read_text()
    assert process.returncode in (0, -signal.SIGTERM)  # twistd ends with the signal it was stopped by
    assert "closed as the process stops" in text
    assert "Traceback" not in text and "Unhandled" not in text, text


@pytest_twisted.ensureDeferred
async def test_consumer_example_delivers_to_a_maildir(broker: RabbitMQ, clients: Any, tmp_path: Any) -> None:
    """examples/amqp_consumer.py takes every queued message into new/, with Return-Path, then acks it."""
    import mailbox
    import subprocess
    import sys
    from pathlib import Path

    publisher = publisher_for(broker, "mail-consumer")
    server = await serve(lambda: AMQP(publisher=publisher))
    try:
        def client() -> list[tuple[str, int, str, bytes]]:
            with smtplib.SMTP(*server.address, timeout=30) as smtp:
                return [transaction(smtp, 3, i) for i in range(4)]

        results = await clients(client)
    finally:
        await server.stop()
        await publisher.stop()
    assert [code for _, code, _, _ in results] == [250] * 4
    example = Path(__file__).resolve().parent.parent / "examples" / "amqp_consumer.py"
    maildir = Path(tmp_path) / "Maildir"

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(example), "--url", broker.url, "--queue", "mail-consumer",
                               "--maildir", str(maildir), "--count", "4"], capture_output=True, text=True,
                              timeout=60)

    done = await threads.deferToThread(run)
    assert done.returncode == 0, done.stderr
    ids = [_QUEUED.search(text).group(1) for _, _, text, _ in results]
    assert [line.split(" ")[0] for line in done.stdout.splitlines()] == ids
    return_path = b"Return-Path: <sender3@example.com>\r\n"
    stored = [path.read_bytes() for path in (maildir / "new").iterdir()]
    assert all(body.startswith(return_path + b"Received: ") for body in stored)
    assert sorted(split_trace(body[len(return_path):])[1] for body in stored) == sorted(r[3] for r in results)
    assert list((maildir / "tmp").iterdir()) == []
    assert len(mailbox.Maildir(str(maildir), create=False)) == 4
    assert await threads.deferToThread(broker.drain, "mail-consumer", 0.2) == []


@pytest_twisted.ensureDeferred
async def test_the_log_says_why_the_broker_refused_the_connection(broker: RabbitMQ) -> None:
    """A wrong password or virtual host, a queue that exists as a classic queue: 451 for the client, the broker's
    own reason in ``last_error``."""

    def classic_queue() -> None:
        connection = broker.connection()
        try:
            connection.channel().queue_declare("mail-classic", durable=True)
        finally:
            connection.close()

    await threads.deferToThread(classic_queue)
    cases = [(broker.url.replace("guest:guest", "guest:wrong"), "mail", "403, 'ACCESS_REFUSED - Login was refused"),
             (broker.url.replace("/%2F", "/nowhere"), "mail", "530, 'NOT_ALLOWED - vhost nowhere not found"),
             (broker.url, "mail-classic", "PRECONDITION_FAILED - inequivalent arg 'x-queue-type'")]
    for url, queue, why in cases:
        publisher = Publisher(url, queue, connect_timeout=5, retry_min=30)
        try:
            with pytest.raises(NotQueued, match="^broker unavailable: "):
                await publisher.publish(b"x", "ID", {}, 10)
        finally:
            await publisher.stop()
        assert why in publisher.last_error, publisher.last_error


@pytest_twisted.ensureDeferred
async def test_amqps_checks_the_brokers_certificate(broker: RabbitMQ, clients: Any) -> None:
    """amqps:// with the test authority as ca_file queues; without it the certificate is refused (451, not 250)."""
    trusted = Publisher(broker.tls_url, "mail-tls", ca_file=str(broker.tls.ca), connect_timeout=5)
    untrusted = Publisher(broker.tls_url, "mail-tls", connect_timeout=5, retry_min=30)
    good = await serve(lambda: AMQP(publisher=trusted))
    bad = await serve(lambda: AMQP(publisher=untrusted))
    try:
        def client(address: tuple[str, int]) -> tuple[str, int, str, bytes]:
            with smtplib.SMTP(*address, timeout=30) as smtp:
                return transaction(smtp, 5, address[1])

        accepted = await clients(client, good.address)
        refused = await clients(client, bad.address)
        queued = await threads.deferToThread(broker.drain, "mail-tls", 0.2)
    finally:
        await good.stop()
        await bad.stop()
        await trusted.stop()
        await untrusted.stop()
    assert accepted[1] == 250
    assert refused[1] == 451
    assert refused[2] == "4.3.0 Message not queued (broker unavailable), try again later"
    assert "certificate verify failed" in untrusted.last_error, untrusted.last_error  # told to the log only
    assert [split_trace(body)[1] for _, body in queued] == [accepted[3]]


@pytest_twisted.ensureDeferred
async def test_broker_stopped_then_crashed_mid_run(broker: RabbitMQ, clients: Any) -> None:
    """Clients keep sending while the broker is stopped (SIGTERM), restarted, crashed (SIGKILL) and restarted.

    Every message answered 250 is in the queue afterwards, exactly once; the others got 451 4.3.0 (a few of those
    may be in the queue too: stored, but not confirmed before the broker went). While the broker is away a
    ``refuse_when_down`` server greets with 421. The clean stop comes first on purpose: RabbitMQ 3.x restarts a
    quorum queue after a crash only if its registration reached disk, which a clean shutdown guarantees.
    """
    from twisted.internet import reactor

    publisher = publisher_for(broker, "mail-outage")
    server = await serve(lambda: AMQP(publisher=publisher, confirm_timeout=10))
    guarded = await serve(lambda: AMQP(publisher=publisher, refuse_when_down=True))
    results: list[tuple[str, int, str, bytes, float]] = []
    stop = threading.Event()

    def client(number: int) -> None:
        """Send until told to stop, reconnecting like an MTA when the server closes (e.g. its error limit)."""
        sent = 0
        while not stop.is_set():
            try:
                with smtplib.SMTP(*server.address, timeout=20) as smtp:
                    smtp.ehlo(f"client{number}.test")
                    while not stop.is_set():
                        sent += 1  # a token is never reused, even when its transaction broke off
                        token, code, text, content = transaction(smtp, number, sent)
                        results.append((token, code, text, content, time.monotonic()))
                        if code != 250:
                            time.sleep(0.02)
            except (smtplib.SMTPException, OSError):
                time.sleep(0.02)

    def greeting() -> int:
        try:
            with smtplib.SMTP(*guarded.address, timeout=20):
                return 220
        except smtplib.SMTPConnectError as e:
            return e.smtp_code

    async def until(condition: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                last = [(r[1], r[2]) for r in results[-3:]]
                raise AssertionError(f"timed out: {len(results)} replies, last {last}; publisher"
                                     f" {publisher.state.value} ({publisher.last_error})")
            await deferLater(reactor, 0.05, lambda: None)

    def count(code: int, since: float = 0.0) -> int:
        return sum(1 for r in results if (r[1] == 250) == (code == 250) and r[4] > since)

    outages: list[tuple[float, float]] = []

    async def outage(take_away: Callable[[], None]) -> None:
        began = time.monotonic()
        await threads.deferToThread(take_away)
        await until(lambda: count(451, began) >= 10)
        assert await clients(greeting) == 421
        await threads.deferToThread(broker.start)
        back = time.monotonic()
        await until(lambda: count(250, back) >= 30)
        outages.append((began, back))
        assert await clients(greeting) == 220

    running = _gather([clients(client, n) for n in range(5)])
    try:
        await until(lambda: count(250) >= 100)
        assert await clients(greeting) == 220
        await outage(broker.terminate)
        await outage(broker.kill)
        stop.set()
        await running
        queued = await threads.deferToThread(broker.drain, "mail-outage")
    finally:
        stop.set()
        await running
        await server.stop()
        await guarded.stop()
        await publisher.stop()

    assert {code for _, code, _, _, _ in results} == {250, 451}
    refused = [r for r in results if r[1] == 451]
    assert all(r[2].startswith("4.3.0 Message not queued (") for r in refused)
    assert all(any(began < r[4] for began, _ in outages) for r in refused)  # no 451 before the first outage
    by_token = {token: (code, content) for token, code, _, content, _ in results}
    queued_tokens = []
    for _, body in queued:
        content = split_trace(body)[1]
        token = _TOKEN.search(content).group(1).decode()
        queued_tokens.append(token)
        assert content == by_token[token][1]
    assert len(queued_tokens) == len(set(queued_tokens))  # nothing twice
    confirmed = {token for token, (code, _) in by_token.items() if code == 250}
    missing = confirmed - set(queued_tokens)
    assert not missing, f"{len(missing)} messages got 250 but are not in the queue"
    print(f"\noutage run: {len(confirmed)} answered 250, {len(refused)} answered 451, of which"
          f" {len(set(queued_tokens) - confirmed)} were stored anyway (the sender's retry makes a duplicate)")


def _gather(deferreds: list["Deferred[Any]"]) -> "Deferred[list[Any]]":
    from twisted.internet.defer import gatherResults

    return gatherResults(deferreds, consumeErrors=True)
