"""Keep README.md honest: its handler example runs, its composition example compiles, its set-up commands are CI's."""

import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from esmtpkit import Policy
from esmtpkit.reply import Reply
from esmtpkit.testing import Conversation

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEXT = README.read_text()
PYTHON = re.findall(r"```python\n(.*?)```", TEXT, re.S)
SH = re.findall(r"```sh\n(.*?)```", TEXT, re.S)


def readme_handler_class() -> type:
    """Execute the README's handler block and return the class it defines."""
    (block,) = [b for b in PYTHON if "class OnlyExampleCom" in b]
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    return namespace["OnlyExampleCom"]


class ReadmeHandlerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.handler = readme_handler_class()()
        self.talk = Conversation(self.handler, Policy(hostname="mx.test"))
        self.talk.send("EHLO client.test")
        self.talk.send("MAIL FROM:<alice@elsewhere.test>")

    def tearDown(self) -> None:
        self.assertEqual(self.talk.send("QUIT").code, 221)
        self.assertEqual(self.talk.clock.getDelayedCalls(), [])

    def test_example_com_recipient_accepted(self) -> None:
        reply = self.talk.send("RCPT TO:<bob@Example.COM>")
        self.assertEqual((reply.code, reply.enhanced), (250, "2.1.5"))

    def test_other_domain_refused(self) -> None:
        reply = self.talk.send("RCPT TO:<bob@example.org>")
        self.assertEqual(reply, Reply(550, ("No such user here",), "5.1.1"))

    def test_message_bytes_reach_chunks(self) -> None:
        content = b"Subject: hi\r\nX-Test: 1\r\n\r\nhello\r\n.leading dot\r\n"
        self.talk.send("RCPT TO:<bob@example.com>")
        self.talk.send("RCPT TO:<carol@example.net>")
        self.assertEqual(self.talk.send("DATA").code, 354)
        self.talk.write(content.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        (reply,) = self.talk.replies()
        self.assertEqual(reply.code, 250)
        self.assertEqual(b"".join(self.handler.chunks), content)


class ReadmeBlocksTests(SynchronousTestCase):
    def test_two_python_blocks(self) -> None:
        self.assertEqual(len(PYTHON), 2)

    def test_composition_block_compiles(self) -> None:
        """Compiled only: it would start the reactor and listen on port 2525."""
        (block,) = [b for b in PYTHON if "reactor.run()" in b]
        compile(block, str(README), "exec")

    def test_setup_blocks_are_one_command_each(self) -> None:
        for block in SH[:2]:
            self.assertEqual(len(block.strip().splitlines()), 1, block)
            self.assertFalse(block.lstrip().startswith("#"), block)

    def test_ci_runs_the_test_command(self) -> None:
        command = SH[1].strip()
        self.assertIn("pytest", command)
        self.assertIn(command, (ROOT / ".ci" / "run").read_text().splitlines())
