"""The docs cannot drift from the code they describe."""

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.handlers.base import MessageHandler
from esmtpkit.reply import coerce
from esmtpkit.state import rulebook_markdown

DOCS = Path(__file__).resolve().parent.parent / "docs"


class HandlerContractDocTests(SynchronousTestCase):
    def test_rule_book_table_is_current(self) -> None:
        """The table in docs/handler-contract.md is exactly what the state table generates."""
        self.assertIn(rulebook_markdown(), (DOCS / "handler-contract.md").read_text())

    def test_default_replies_are_documented(self) -> None:
        """Every default reply text of MessageHandler appears in the contract page."""
        text = (DOCS / "handler-contract.md").read_text()
        handler = MessageHandler()
        calls = {"helo": ("client",), "mail": ("a@b", {}), "rcpt": ("c@d", {}), "data": (), "eom": (),
                 "expn": ("x",), "vrfy": ("x",), "noop": (), "rset": (), "help": (None,), "quit": ()}
        for verb, args in calls.items():
            reply = coerce(getattr(handler, verb)(*args))
            first = reply.lines[0].replace("a@b", "sender").replace("c@d", "recipient")
            self.assertIn(f"{reply.code} {first}", text, verb)
