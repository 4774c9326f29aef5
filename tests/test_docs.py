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


def shipped_extensions() -> list:
    """Every extension esmtpkit ships: the standard ones with every switch on, then each name ``--extension`` takes."""
    from esmtpkit.core.standard import standard
    from esmtpkit.server.extensions import BUILT_IN, resolve
    from esmtpkit.server.policy import Policy

    return [*standard(Policy(dsn=True, tls_context=object()), ("PLAIN", "LOGIN", "CRAM-MD5")),
            *(resolve(name) for name in BUILT_IN)]


class ExtensionsDocTests(SynchronousTestCase):
    def test_reference_table_is_current(self) -> None:
        """The keyword table of docs/extensions.md is what reference_markdown generates from every shipped extension."""
        from esmtpkit.server.extensions import reference_markdown

        self.assertIn(reference_markdown(shipped_extensions()), (DOCS / "extensions.md").read_text())

    def test_rule_book_with_extension_verbs_is_current(self) -> None:
        """docs/extensions.md shows the rule book with the rows of every shipped extension verb, as generated."""
        verbs = {spec.name: spec.phases for ext in shipped_extensions() for spec in ext.verbs}
        self.assertEqual(sorted(verbs), ["XCLIENT", "XFORWARD"])
        self.assertIn(rulebook_markdown(verbs), (DOCS / "extensions.md").read_text())

    def test_every_built_in_extension_has_a_row_and_a_section(self) -> None:
        """Each name ``--extension`` takes is in the intro table and heads a section of its own."""
        from esmtpkit.server.extensions import BUILT_IN

        text = (DOCS / "extensions.md").read_text()
        headings = [line for line in text.splitlines() if line.startswith("## ") or line.startswith("### ")]
        for name in BUILT_IN:
            self.assertIn(f"| `{name}` |", text.split("## Every extension at a glance")[0], name)
            self.assertTrue(any(name in heading for heading in headings), name)
            self.assertIn(f"`--extension {name}`", text, name)
