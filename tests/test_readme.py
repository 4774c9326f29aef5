"""README.md, followed as a reader would, and its handler checked in memory.

The page is followed from an empty folder by `tests.docblocks.Reader` (servers on free 127.0.0.1 ports, see there):
the stock server takes the messages the next block sends, the handler saved as ``mymodule.py`` serves under
``twistd`` and refuses and logs what the page says, and ``serve.py`` serves, logs and keeps a message too. The
set-up commands stay one line each, and the test command is the one CI runs.
"""

from __future__ import annotations

import ast
import re
import shutil
import smtplib
from typing import Any, Iterator

import pytest
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit import Policy
from esmtpkit.core.reply import Reply
from esmtpkit.testing import Conversation

from .docblocks import ROOT, Block, Reader, blocks

README = ROOT / "README.md"
BLOCKS = blocks(README)
SH = [b for b in BLOCKS if b.language == "sh"]
TIMEOUT = 60.0


def the_block(predicate: str) -> Block:
    """The one block of the README whose text holds ``predicate``."""
    (block,) = [b for b in BLOCKS if predicate in b.text]
    return block


def handler_module() -> dict[str, Any]:
    """The namespace of ``mymodule.py`` as the README shows it."""
    namespace: dict[str, Any] = {"__name__": "mymodule"}
    exec(compile(the_block("class OnlyExampleCom").text, str(README), "exec"), namespace)
    return namespace


class ReadmeHandlerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.module = handler_module()
        self.talk = self.connect()

    def connect(self) -> Conversation:
        talk = Conversation(self.module["OnlyExampleCom"](), Policy(hostname="mx.test"))
        talk.send("EHLO client.test")
        talk.send("MAIL FROM:<alice@elsewhere.test>")
        self.addCleanup(self.quit, talk)
        return talk

    def quit(self, talk: Conversation) -> None:
        self.assertEqual(talk.send("QUIT").code, 221)
        self.assertEqual(talk.clock.getDelayedCalls(), [])

    def test_example_com_recipient_accepted(self) -> None:
        reply = self.talk.send("RCPT TO:<bob@Example.COM>")
        self.assertEqual((reply.code, reply.enhanced), (250, "2.1.5"))

    def test_other_domain_refused(self) -> None:
        reply = self.talk.send("RCPT TO:<bob@example.org>")
        self.assertEqual(reply, Reply(550, ("No such user here",), "5.1.1"))

    def test_messages_are_kept_after_their_connections(self) -> None:
        """Each accepted message's bytes, exactly as sent, stay in ``received``, whichever connection brought it."""
        content = b"Subject: hi\r\nX-Test: 1\r\n\r\nhello\r\n.leading dot\r\n"
        self.talk.send("RCPT TO:<bob@example.com>")
        self.talk.send("RCPT TO:<carol@example.net>")
        self.assertEqual(self.talk.send("DATA").code, 354)
        self.talk.write(content.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        (reply,) = self.talk.replies()
        self.assertEqual(reply.code, 250)
        second = self.connect()
        self.assertEqual(second.message("dave@elsewhere.test", ["erin@example.com"], b"\r\nbye\r\n").code, 250)
        self.assertEqual(self.module["received"], [("alice@elsewhere.test", ["bob@example.com"], content),
                                                   ("dave@elsewhere.test", ["erin@example.com"], b"\r\nbye\r\n")])

    def test_refused_message_is_not_kept(self) -> None:
        self.talk.send("RCPT TO:<bob@example.org>")
        self.assertEqual(self.talk.send("DATA").code, 503)
        self.assertEqual(self.module["received"], [])


class ReadmeBlocksTests(SynchronousTestCase):
    def test_setup_blocks_are_one_command_each(self) -> None:
        for block in SH[:2]:
            self.assertEqual(len(block.text.strip().splitlines()), 1, block.text)
            self.assertFalse(block.text.lstrip().startswith("#"), block.text)

    def test_ci_runs_the_test_command(self) -> None:
        """The second command is not run by the docs tests: it is the whole suite, which CI runs as written."""
        command = SH[1].text.strip()
        self.assertIn("pytest", command)
        self.assertIsNotNone(SH[1].not_run)
        self.assertIn(command, (ROOT / ".ci" / "run").read_text().splitlines())

    def test_programs_listen_on_loopback_only(self) -> None:
        """The servers the README starts listen on 127.0.0.1, as ``twistd esmtpkit`` does by default."""
        endpoints = re.findall(r"\btcp:[^\s\"'`]+", README.read_text())
        self.assertIn("tcp:2525:interface=127.0.0.1", endpoints)
        self.assertEqual([e for e in endpoints if not e.endswith(":interface=127.0.0.1")], [])


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reader]:
    """The README followed once, from an empty folder; ``serve.py``, started last, is still serving."""
    tmp = tmp_path_factory.mktemp("readme")
    with Reader(tmp / "reader", tmp / "logs") as followed:
        followed.follow(BLOCKS)
        yield followed


def test_stock_server_delivers_what_the_clients_send(reader: Reader) -> None:
    """The first command's server takes the message of each client the next block runs; ``ls`` lists them."""
    block = the_block("ls Maildir/new/")
    senders = 1 + (shutil.which("swaks") is not None)
    listed = [line for step in reader.steps if step.block == block and step.action.startswith("ls ")
              for line in step.output.split()]
    assert len(listed) == senders
    assert sorted(listed) == sorted(p.name for p in (reader.folder / "Maildir" / "new").iterdir())


def test_own_handler_under_twistd_refuses_and_logs_as_shown(reader: Reader) -> None:
    """The client prints the refusal its comment shows, and the twistd log has the line the README quotes."""
    client = the_block("print(refused)")
    shown = ast.literal_eval(client.text.split("# ", 1)[1].strip())
    assert ast.literal_eval(reader.output(client).strip()) == shown
    (server,) = [s for s in reader.servers if "OnlyExampleCom" in s.block.text]
    (quoted,) = re.findall(r"`(kept a message [^`]+)`", README.read_text())
    assert quoted in server.text()


def test_own_program_serves_logs_and_keeps(reader: Reader) -> None:
    """``serve.py`` logs to standard output, serves the handler and logs each message it keeps (before its 250)."""
    server = reader.server
    assert server is not None and "serve.py" in server.block.text
    with smtplib.SMTP("127.0.0.1", server.ports[2525], timeout=TIMEOUT) as client:
        refused = client.sendmail("alice@example.org", ["bob@example.com", "carol@example.org"],
                                  b"Subject: hi\r\n\r\nhello\r\n")
    assert refused == {"carol@example.org": (550, b"5.1.1 No such user here")}
    assert "ESMTPFactory starting on" in server.text()
    assert "kept a message from <alice@example.org> for bob@example.com: 22 bytes" in server.text()
