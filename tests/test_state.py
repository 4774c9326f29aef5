"""Tests for `esmtpkit.core.rules`: the rule book of command order (RFC 5321 §3.3, §4.1.4)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core import rules as state
from esmtpkit.core.commands import Verb
from esmtpkit.core.rules import ADVANCE, ALWAYS, Phase

#: Phases in which commands are read.
OPEN = (Phase.CONNECTED, Phase.GREETED, Phase.SENDER, Phase.RECIPIENTS, Phase.CHUNKING)


class RuleBookTests(SynchronousTestCase):
    def test_always_legal(self) -> None:
        """NOOP, VRFY, EXPN, HELP and unknown verbs are legal in every open phase and change nothing."""
        for phase in OPEN:
            for verb in ALWAYS:
                self.assertEqual(state.advance(phase, verb), phase)

    def test_greeting_starts_over(self) -> None:
        """HELO/EHLO at any time act like RSET (RFC 5321 §4.1.4); QUIT always closes."""
        for phase in OPEN:
            for verb in (Verb.HELO, Verb.EHLO, Verb.LHLO):
                self.assertEqual(state.advance(phase, verb), Phase.GREETED)
            self.assertEqual(state.advance(phase, Verb.QUIT), Phase.CLOSED)

    def test_rset(self) -> None:
        self.assertEqual(state.advance(Phase.CONNECTED, Verb.RSET), Phase.CONNECTED)
        for phase in OPEN[1:]:
            self.assertEqual(state.advance(phase, Verb.RSET), Phase.GREETED)

    def test_transaction(self) -> None:
        """MAIL after a greeting, RCPT after MAIL, DATA after a recipient (RFC 5321 §3.3)."""
        self.assertEqual(state.advance(Phase.GREETED, Verb.MAIL), Phase.SENDER)
        self.assertEqual(state.advance(Phase.SENDER, Verb.RCPT), Phase.RECIPIENTS)
        self.assertEqual(state.advance(Phase.RECIPIENTS, Verb.RCPT), Phase.RECIPIENTS)
        self.assertEqual(state.advance(Phase.RECIPIENTS, Verb.DATA), Phase.DATA)
        self.assertEqual(state.advance(Phase.RECIPIENTS, Verb.BDAT), Phase.CHUNKING)
        self.assertEqual(state.advance(Phase.CHUNKING, Verb.BDAT), Phase.CHUNKING)

    def test_out_of_order(self) -> None:
        illegal = [
            (Phase.CONNECTED, Verb.MAIL), (Phase.CONNECTED, Verb.RCPT), (Phase.CONNECTED, Verb.DATA),
            (Phase.GREETED, Verb.RCPT), (Phase.GREETED, Verb.DATA), (Phase.SENDER, Verb.MAIL),
            (Phase.SENDER, Verb.DATA), (Phase.RECIPIENTS, Verb.MAIL), (Phase.CHUNKING, Verb.DATA),
            (Phase.CHUNKING, Verb.RCPT), (Phase.SENDER, Verb.BDAT), (Phase.CONNECTED, Verb.AUTH),
            (Phase.SENDER, Verb.AUTH), (Phase.SENDER, Verb.STARTTLS), (Phase.RECIPIENTS, Verb.STARTTLS),
        ]
        for phase, verb in illegal:
            self.assertFalse(state.allowed(phase, verb), (phase, verb))
            self.assertRaises(KeyError, state.advance, phase, verb)

    def test_tls_and_auth(self) -> None:
        """RFC 3207 §4.2: STARTTLS forgets the greeting; RFC 4954 §4: AUTH only after EHLO, outside a transaction."""
        self.assertEqual(state.advance(Phase.GREETED, Verb.STARTTLS), Phase.CONNECTED)
        self.assertEqual(state.advance(Phase.GREETED, Verb.AUTH), Phase.GREETED)

    def test_no_commands_while_data_or_closed(self) -> None:
        for verb in Verb:
            self.assertFalse(state.allowed(Phase.DATA, verb))
            self.assertFalse(state.allowed(Phase.CLOSED, verb))

    def test_table_targets(self) -> None:
        """Every entry starts in an open phase."""
        for (phase, verb), target in ADVANCE.items():
            self.assertIn(phase, OPEN)
            self.assertIsInstance(verb, Verb)
            self.assertIsInstance(target, Phase)

    def test_refusal_texts(self) -> None:
        self.assertEqual(state.refusal(Phase.CONNECTED, Verb.MAIL), "Send HELO/EHLO first")
        self.assertEqual(state.refusal(Phase.SENDER, Verb.MAIL), "Nested MAIL command")
        self.assertEqual(state.refusal(Phase.GREETED, Verb.RCPT), "Need MAIL command")
        self.assertEqual(state.refusal(Phase.SENDER, Verb.DATA), "Need RCPT command")
        self.assertEqual(state.refusal(Phase.CONNECTED, Verb.HELP), "Bad sequence of commands")

    def test_in_transaction(self) -> None:
        self.assertEqual([p for p in Phase if state.in_transaction(p)],
                         [Phase.SENDER, Phase.RECIPIENTS, Phase.CHUNKING, Phase.DATA])
