"""The pure conversation core and its rule book, without Twisted: command lines in, decisions out."""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core import rules
from esmtpkit.core.address import Address
from esmtpkit.core.commands import Verb
from esmtpkit.core.conversation import LINE_TOO_LONG, ServerConversation
from esmtpkit.core.rules import Phase, Standing
from esmtpkit.core.session import Session
from esmtpkit.server.protocol import ESMTPProtocol
from esmtpkit.testing import RecordingHandler

PACKAGE = Path(__file__).resolve().parent.parent / "esmtpkit"


def conversation(**standing: object) -> ServerConversation:
    return ServerConversation(Session(hostname="mx.test"), Standing(**standing), junk_limit=3)  # type: ignore[arg-type]


def greeted(**standing: object) -> ServerConversation:
    talk = conversation(**standing)
    talk.answered(talk.receive(b"EHLO client.test").verb, 250)
    talk.greeted("client.test", True, frozenset({"CHUNKING", "SIZE"}))
    return talk


class ReceiveTests(SynchronousTestCase):
    def test_admitted(self) -> None:
        turn = conversation().receive(b"ehlo client.test")
        self.assertEqual((turn.verb, turn.refusal, turn.command.argument), (Verb.EHLO, None, "client.test"))

    def test_out_of_order_is_503_from_the_table(self) -> None:
        turn = conversation().receive(b"MAIL FROM:<a@example.org>")
        self.assertEqual(str(turn.refusal), "503 5.5.1 Send HELO/EHLO first")

    def test_unparsable_line(self) -> None:
        turn = conversation().receive(b"NOOP\x00")
        self.assertEqual((turn.verb, turn.command, turn.refusal.code), (Verb.UNKNOWN, None, 500))

    def test_line_too_long_for_its_verb(self) -> None:
        turn = conversation().receive(b"NOOP " + b"x" * 600)
        self.assertIs(turn.refusal, LINE_TOO_LONG)

    def test_extension_verbs_unknown_unless_enabled(self) -> None:
        talk = conversation()
        for line in (b"STARTTLS", b"AUTH PLAIN", b"LHLO x", b"BDAT 1 LAST"):
            self.assertIs(talk.receive(line).verb, Verb.UNKNOWN, line)
        talk = greeted(starttls=True, auth=True)
        self.assertIs(talk.receive(b"STARTTLS").verb, Verb.STARTTLS)
        self.assertIs(talk.receive(b"AUTH PLAIN").verb, Verb.AUTH)
        self.assertIs(talk.receive(b"BDAT 1").verb, Verb.BDAT)  # CHUNKING was offered

    def test_refused_session_runs_only_quit(self) -> None:
        talk = conversation()
        talk.refuse_service()
        self.assertIs(talk.receive(b"EHLO x").refusal, rules.NO_SERVICE)
        self.assertIsNone(talk.receive(b"QUIT").refusal)

    def test_junk_beyond_the_limit_is_a_penalty(self) -> None:
        talk = conversation()
        for _ in range(3):
            talk.receive(b"NOOP")
            self.assertFalse(talk.take_penalty())
        talk.receive(b"NOOP")
        self.assertTrue(talk.take_penalty())
        self.assertFalse(talk.take_penalty())  # once per command
        talk.message_ended(delivered=True)
        talk.receive(b"NOOP")
        self.assertFalse(talk.take_penalty())


class AdmissionTests(SynchronousTestCase):
    """Each rule beyond the table, in the one place it lives."""

    def test_lmtp_refuses_helo_and_ehlo(self) -> None:
        talk = conversation(lmtp=True)
        self.assertIs(talk.receive(b"HELO x").refusal, rules.LMTP_GREETING)
        self.assertIs(talk.receive(b"EHLO x").refusal, rules.LMTP_GREETING)
        self.assertIsNone(talk.receive(b"LHLO x").refusal)

    def test_mail_rules(self) -> None:
        self.assertIs(greeted(require_tls=True).receive(b"MAIL FROM:<>").refusal, rules.TLS_REQUIRED)
        self.assertIs(greeted(require_auth=True).receive(b"MAIL FROM:<>").refusal, rules.AUTH_REQUIRED)
        talk = greeted(max_transactions=1)
        self.assertIsNone(talk.receive(b"MAIL FROM:<>").refusal)
        self.assertIsNone(talk.admit_parsed(Verb.MAIL))
        talk.mail_accepted("", {}, "id1")
        talk.answered(Verb.MAIL, 250)
        talk.drop_transaction()
        # The limit is checked once the command is known to be well formed (a malformed one gets its 501).
        self.assertIsNone(talk.receive(b"MAIL FROM:<>").refusal)
        self.assertIs(talk.admit_parsed(Verb.MAIL), rules.TOO_MANY_TRANSACTIONS)

    def test_binarymime_needs_bdat(self) -> None:
        talk = greeted()
        talk.mail_accepted("", {"BODY": "BINARYMIME"}, "id1")
        talk.answered(Verb.MAIL, 250)
        talk.answered(Verb.RCPT, 250)
        self.assertIsNone(talk.receive(b"DATA").refusal)
        self.assertIs(talk.admit_parsed(Verb.DATA), rules.BINARY_NEEDS_BDAT)
        self.assertIsNone(talk.receive(b"BDAT 3 LAST").refusal)
        self.assertIsNone(talk.admit_parsed(Verb.BDAT))

    def test_auth_rules(self) -> None:
        talk = conversation(auth=True)
        talk.answered(Verb.HELO, 250)
        talk.greeted("x", extended=False)
        self.assertIs(talk.receive(b"AUTH PLAIN").refusal, rules.EHLO_FIRST)  # the table allows it after HELO
        self.assertIs(greeted(auth=True, auth_require_tls=True).admit_parsed(Verb.AUTH), rules.AUTH_ENCRYPTION_REQUIRED)
        talk = greeted(auth=True)
        talk.session.authenticated = "alice"
        self.assertIs(talk.receive(b"AUTH PLAIN").refusal, rules.AUTH_ALREADY_DONE)

    def test_starttls_once(self) -> None:
        talk = greeted(starttls=True)
        talk.session.tls = True
        self.assertIs(talk.admit_parsed(Verb.STARTTLS), rules.TLS_ACTIVE)


class ContentModeTests(SynchronousTestCase):
    def test_most_specific_setting_wins(self) -> None:
        """A subclass's chunk_mode beats a base class's content_mode (handlers written for the seed's flag)."""
        from esmtpkit.core.content import ContentMode
        from esmtpkit.handlers import Collecting
        from esmtpkit.server.interfaces import content_mode_of

        class Parsed(Collecting):
            chunk_mode = None

        class Lines(Collecting):
            chunk_mode = False

        self.assertIs(content_mode_of(Collecting()), ContentMode.RAW)
        self.assertIs(content_mode_of(Parsed()), ContentMode.PARSED)
        self.assertIs(content_mode_of(Lines()), ContentMode.LINES)
        handler = Lines()
        handler.content_mode = ContentMode.RAW  # on the instance: most specific of all
        self.assertIs(content_mode_of(handler), ContentMode.RAW)


class TransitionTests(SynchronousTestCase):
    def test_a_transaction(self) -> None:
        talk = greeted()
        self.assertIs(talk.phase, Phase.GREETED)
        talk.answered(Verb.MAIL, 250)
        talk.mail_accepted(Address("a@example.org"), {}, "id1")
        self.assertEqual((talk.phase, talk.session.transactions), (Phase.SENDER, 1))
        talk.answered(Verb.RCPT, 550)
        self.assertIs(talk.phase, Phase.SENDER)  # a refused recipient changes nothing
        talk.answered(Verb.RCPT, 250)
        talk.recipient_accepted(Address("b@example.org"), {})
        talk.answered(Verb.DATA, 250)
        self.assertIs(talk.phase, Phase.RECIPIENTS)  # only 354 starts the content
        talk.answered(Verb.DATA, 354)
        self.assertIs(talk.phase, Phase.DATA)
        talk.message_ended(delivered=True)
        self.assertEqual((talk.phase, talk.session.envelope.recipients), (Phase.GREETED, []))

    def test_starttls_forgets_the_greeting(self) -> None:
        talk = greeted(starttls=True)
        talk.session.authenticated = "alice"
        talk.tls_started()
        self.assertEqual((talk.phase, talk.keywords, talk.session.helo, talk.session.authenticated),
                         (Phase.CONNECTED, frozenset(), None, None))

    def test_failed_chunk_and_close(self) -> None:
        talk = greeted()
        talk.answered(Verb.MAIL, 250)
        talk.answered(Verb.RCPT, 250)
        talk.chunk_failed()
        self.assertIs(talk.phase, Phase.CHUNKING)
        self.assertTrue(talk.drop_transaction())
        self.assertFalse(talk.drop_transaction())
        talk.close()
        talk.answered(Verb.EHLO, 250)
        self.assertTrue(talk.closed)  # nothing reopens a closed dialogue


class EdgeTests(SynchronousTestCase):
    def test_the_protocol_cannot_set_the_phase(self) -> None:
        """The phase is the conversation's; the Twisted protocol only reads it."""
        protocol = ESMTPProtocol(RecordingHandler())
        self.assertIs(protocol.phase, Phase.CONNECTED)
        with self.assertRaises(AttributeError):
            protocol.phase = Phase.GREETED  # type: ignore[misc]
        for path in (PACKAGE / "server").glob("*.py"):
            self.assertNotIn(".phase = ", path.read_text(), path.name)

    def test_no_class_over_400_lines(self) -> None:
        """Every class stays small enough to read in one sitting."""
        for path in PACKAGE.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    size = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                    self.assertLessEqual(size, 400, f"{path.name}: {node.name}")
