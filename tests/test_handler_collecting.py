"""The Collecting handler: FROM/TO/MSG per transaction, a shared store, a callback that decides the final reply."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from esmtpkit.core.content import dot_stuff
from esmtpkit.handlers import Collecting, Message, MessageStore
from esmtpkit.server.interfaces import IMessageHandler
from esmtpkit.core.reply import SMTPReply
from esmtpkit.testing import Conversation

from .support import HandlerTestCase

CONTENT = b"Subject: hello\r\n\r\n.starts with a dot\r\n8-bit \xe9\xff\r\n"
START = b"EHLO client.test\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"


class Base(HandlerTestCase):
    def talk(self, handler: Collecting, peer: tuple[str, int] = ("127.0.0.1", 40000)) -> Conversation:
        return self.conversation(handler, peer=peer)


class CollectingTests(Base):
    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IMessageHandler, Collecting()))

    def test_collects_envelope_and_bytes(self) -> None:
        """Sender, recipients and the exact unstuffed bytes, with where they came from."""
        store = MessageStore()
        talk = self.talk(Collecting(store), peer=("192.0.2.9", 1234))
        reply = talk.message("alice@example.com", ["bob@example.net", "carol@example.net"], CONTENT)
        self.assertEqual((reply.code, reply.enhanced), (250, "2.0.0"))
        [message] = store.messages
        self.assertEqual(message.sender, "alice@example.com")
        self.assertEqual(message.recipients, ("bob@example.net", "carol@example.net"))
        self.assertEqual(message.data, CONTENT)
        self.assertEqual((message.peer, message.helo, message.protocol, message.tls, message.authenticated),
                         ("192.0.2.9", "client.test", "ESMTP", False, None))

    def test_mail_params_kept(self) -> None:
        """ESMTP parameters of MAIL come along (parsed)."""
        store = MessageStore()
        talk = self.talk(Collecting(store))
        talk.write(b"EHLO c.test\r\nMAIL FROM:<a@x.test> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"
                   b"hi\r\n.\r\n")
        [message] = store.messages
        self.assertEqual(message.mail_params, {"SIZE": 100, "BODY": "8BITMIME"})
        self.assertEqual(message.rcpt_params, ({},))

    def test_null_sender_and_transactions_separate(self) -> None:
        """Two transactions on one connection are two messages; ``<>`` is the empty sender."""
        store = MessageStore()
        talk = self.talk(Collecting(store))
        talk.message("", ["b@y.test"], b"one\r\n")
        talk.message("a@x.test", ["c@y.test"], b"two\r\n")
        self.assertEqual([(m.sender, m.recipients, m.data) for m in store.messages],
                         [("", ("b@y.test",), b"one\r\n"), ("a@x.test", ("c@y.test",), b"two\r\n")])

    def test_shared_by_default(self) -> None:
        """Built with no arguments (``--handler esmtpkit.handlers.Collecting``) every handler uses Collecting.shared."""
        self.assertIs(Collecting().store, Collecting.shared)
        self.assertIs(Collecting().store, Collecting().store)

    def test_factory_shares_one_store(self) -> None:
        """``Collecting.factory(store)`` makes handlers for every connection that collect into one store."""
        store = MessageStore()
        make = Collecting.factory(store)
        first, second = make(), make()
        self.assertIsNot(first, second)
        self.talk(first).message("a@x.test", ["b@y.test"], b"one\r\n")
        self.talk(second).message("c@x.test", ["d@y.test"], b"two\r\n")
        self.assertEqual([m.data for m in store.messages], [b"one\r\n", b"two\r\n"])
        self.assertEqual(len(store), 2)

    def test_factory_without_store_makes_a_fresh_one(self) -> None:
        make = Collecting.factory()
        self.assertIs(make().store, make().store)
        self.assertIsNot(make().store, Collecting.shared)

    def test_cut_mid_data_keeps_nothing(self) -> None:
        """A dropped connection mid-message stores nothing; the next transaction starts clean."""
        store = MessageStore()
        handler = Collecting(store)
        talk = self.talk(handler)
        talk.write(START + b"Subject: half\r\n\r\npart of it")
        talk.protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(store.messages, [])
        again = self.talk(handler)
        again.message("a@x.test", ["b@y.test"], b"whole\r\n")
        self.assertEqual([m.data for m in store.messages], [b"whole\r\n"])

    def test_refused_content_keeps_nothing(self) -> None:
        """Content refused by the protocol (bare LF) never reaches the store."""
        store = MessageStore()
        talk = self.talk(Collecting(store))
        self.assertEqual(talk.message("a@x.test", ["b@y.test"], b"bare\nLF\r\n").code, 550)
        self.assertEqual(store.messages, [])


class NextMessageTests(Base):
    def test_waits_for_a_message(self) -> None:
        """``next_message()`` fires when a message arrives."""
        store = MessageStore()
        waiting = store.next_message()
        self.assertNoResult(waiting)
        self.talk(Collecting(store)).message("a@x.test", ["b@y.test"], b"hi\r\n")
        self.assertEqual(self.successResultOf(waiting).data, b"hi\r\n")

    def test_already_there(self) -> None:
        """Messages that came before the call are handed out in order, each once."""
        store = MessageStore()
        talk = self.talk(Collecting(store))
        talk.message("a@x.test", ["b@y.test"], b"1\r\n")
        talk.message("a@x.test", ["b@y.test"], b"2\r\n")
        self.assertEqual(self.successResultOf(store.next_message()).data, b"1\r\n")
        self.assertEqual(self.successResultOf(store.next_message()).data, b"2\r\n")
        self.assertNoResult(store.next_message())

    def test_clear(self) -> None:
        store = MessageStore()
        self.talk(Collecting(store)).message("a@x.test", ["b@y.test"], b"1\r\n")
        store.clear()
        self.assertEqual(store.messages, [])
        self.assertNoResult(store.next_message())


class CallbackTests(Base):
    def start(self, on_message: Any) -> tuple[Conversation, MessageStore]:
        store = MessageStore()
        talk = self.talk(Collecting(store, on_message=on_message))
        talk.write(START)
        talk.replies()
        return talk, store

    def test_250_only_after_the_callback_succeeds(self) -> None:
        """While the callback's Deferred is pending, no reply is sent and nothing is stored."""
        pending: Deferred[None] = Deferred()
        seen: list[Message] = []

        def on_message(message: Message) -> Deferred[None]:
            seen.append(message)
            return pending

        talk, store = self.start(on_message)
        talk.write(dot_stuff(CONTENT) + b"NOOP\r\n")
        self.assertEqual(talk.replies(), [])
        self.assertEqual(store.messages, [])
        self.assertEqual([m.data for m in seen], [CONTENT])
        pending.callback(None)
        self.assertEqual(talk.transport.value()[-len(b"250 2.0.0 Message accepted for delivery\r\n250 2.0.0 OK\r\n"):],
                         b"250 2.0.0 Message accepted for delivery\r\n250 2.0.0 OK\r\n")
        self.assertEqual(store.messages, seen)

    def test_callback_failure_is_451(self) -> None:
        """A failing callback: 451 4.3.0, the error is logged, the store keeps nothing."""
        talk, store = self.start(lambda message: fail(RuntimeError("database down")))
        talk.write(dot_stuff(CONTENT))
        [reply] = talk.replies()
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))
        self.assertEqual(store.messages, [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_callback_raises_synchronously(self) -> None:
        def boom(message: Message) -> None:
            raise ValueError("bad")

        talk, store = self.start(boom)
        talk.write(dot_stuff(CONTENT))
        self.assertEqual(talk.replies()[0].code, 451)
        self.assertEqual(store.messages, [])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_callback_chooses_the_reply(self) -> None:
        """An SMTPReply from the callback is what the client gets."""
        def refuse(message: Message) -> None:
            raise SMTPReply(550, "No thanks", enhanced="5.7.1")

        talk, store = self.start(refuse)
        talk.write(dot_stuff(CONTENT))
        self.assertEqual(talk.transport.value().split(b"\r\n")[-2], b"550 5.7.1 No thanks")
        self.assertEqual(store.messages, [])

    def test_coroutine_callback(self) -> None:
        """An ``async def`` callback works like one returning a Deferred."""
        gate: Deferred[None] = Deferred()

        async def on_message(message: Message) -> None:
            await gate

        talk, store = self.start(on_message)
        talk.write(dot_stuff(CONTENT))
        self.assertEqual(talk.replies(), [])
        gate.callback(None)
        self.assertEqual(talk.replies()[0].code, 250)
        self.assertEqual([m.data for m in store.messages], [CONTENT])

    def test_connection_lost_while_callback_pending(self) -> None:
        """The client leaves before the answer: the callback still completes and nothing breaks."""
        pending: Deferred[None] = Deferred()
        talk, store = self.start(lambda message: pending)
        talk.write(dot_stuff(CONTENT))
        talk.protocol.connectionLost(Failure(ConnectionLost()))
        pending.callback(None)
        self.assertEqual([m.data for m in store.messages], [CONTENT])
