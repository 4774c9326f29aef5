"""The docs cannot drift from the code they describe."""

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.handlers.base import MessageHandler
from esmtpkit.core.reply import coerce
from esmtpkit.core.rules import rulebook_markdown

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


class RunningDocExampleTests(SynchronousTestCase):
    def test_composition_example_builds_an_application(self) -> None:
        """The Python example of docs/running.md builds an Application with one listening service (not started)."""
        import re

        from twisted.application import service

        (block,) = re.findall(r"```python\n(.*?)```", (DOCS / "running.md").read_text(), re.S)
        namespace: dict = {}
        exec(compile(block, "running.md", "exec"), namespace)
        children = list(service.IServiceCollection(namespace["application"]))
        self.assertEqual(len(children), 1)
        self.assertEqual(namespace["factory"].policy.hostname, "mx.example.com")
