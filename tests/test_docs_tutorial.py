"""docs/tutorial.md and the guides beside it (embedding.md, coming-from-elsewhere.md), followed as a reader would.

Each page is followed once from an empty folder by `tests.docblocks.Reader` (every command and Python block run,
files saved as the page says, servers on free 127.0.0.1 ports); these tests then check what the page says
happens: the servers deliver what the clients send, the tutorial's tests pass, programs print what the page shows.
"""

from __future__ import annotations

import mailbox
import re
import smtplib
import time
from pathlib import Path
from typing import Iterator

import pytest

from .docblocks import DOCS, ROOT, Block, Reader, blocks, commands

DOC = DOCS / "tutorial.md"
EMBEDDING = DOCS / "embedding.md"
ELSEWHERE = DOCS / "coming-from-elsewhere.md"
#: The tutorial's files, shown in full on the page.
FILES = [ROOT / "examples" / "rejecting_handler.py", ROOT / "examples" / "test_rejecting_handler.py"]
#: A bound, not an expectation: how long a client may take.
TIMEOUT = 60.0


def the_block(page: Path, predicate: str) -> Block:
    """The one block of ``page`` whose text holds ``predicate``."""
    (block,) = [b for b in blocks(page) if predicate in b.text]
    return block


def follow(tmp: Path, page: Path, until: Block | None = None) -> Reader:
    """A reader who followed ``page`` (up to and including ``until``), servers left running."""
    reader = Reader(tmp / "reader", tmp / "logs")
    page_blocks = blocks(page)
    reader.follow(page_blocks[:page_blocks.index(until) + 1] if until else page_blocks)
    return reader


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reader]:
    with follow(tmp_path_factory.mktemp("tutorial"), DOC) as reader:
        yield reader


@pytest.fixture(scope="module")
def embedding(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reader]:
    with follow(tmp_path_factory.mktemp("embedding"), EMBEDDING) as reader:
        yield reader


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reader]:
    with follow(tmp_path_factory.mktemp("elsewhere"), ELSEWHERE) as reader:
        yield reader


def send(port: int, recipients: list[str]) -> dict:
    """Send one small message with smtplib; what ``sendmail`` returns (the refused recipients)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        return client.sendmail("alice@example.org", recipients, b"Subject: hi\r\n\r\nhello\r\n")


def test_tutorial_files_are_the_examples() -> None:
    """The handler and the test module are shown in full, saved under the names examples/ has them."""
    saved = {b.file: b.text for b in blocks(DOC) if b.file}
    assert saved == {str(path.relative_to(ROOT)): path.read_text() for path in FILES}


def test_plugin_help_lists_the_options(tutorial: Reader) -> None:
    """``twistd esmtpkit --help`` lists the options the tutorial uses."""
    output = tutorial.output(the_block(DOC, "twistd esmtpkit --help"))
    for option in ("--handler=", "--listen=", "--maildir=", "--handler-option="):
        assert option in output


def test_stock_server_delivered_the_message_read_back(tutorial: Reader) -> None:
    """Step 2's client printed the ``Received:`` field of the message it read back."""
    output = tutorial.output(the_block(DOC, "Hi Bob!"))
    assert output.startswith("from ") and "with ESMTP" in output and "for <bob@example.com>" in output, output


def test_example_tests_pass(tutorial: Reader) -> None:
    """The documented pytest command passes the tutorial's three tests."""
    (block,) = [b for b in blocks(DOC) if b.language == "sh" and "pytest" in b.text]
    assert re.search(r"^=+ 3 passed in ", tutorial.output(block), re.M), tutorial.output(block)


def test_rejecting_handler_under_twistd_stores_only_known_recipients(tutorial: Reader) -> None:
    """Under twistd, the tutorial's handler stored Alice's copy, and nothing for the refused recipient."""
    newest = max(mailbox.Maildir(str(tutorial.folder / "Maildir"), create=False),
                 key=mailbox.MaildirMessage.get_date)
    content = newest.as_bytes()
    assert b"for <alice@example.com>" in content
    assert content.endswith(b"Subject: hi\n\nHello Alice.\n")
    assert len(list((tutorial.folder / "Maildir" / "new").iterdir())) == 2  # Bob's of step 2, Alice's of step 5
    assert list((tutorial.folder / "Maildir" / "tmp").iterdir()) == []


def test_step_two_reads_back_its_message_from_a_maildir_holding_mail(tmp_path: Path) -> None:
    """Step 2's client finds its own message when the Maildir already holds mail, and again when run twice."""
    client = the_block(DOC, "Hi Bob!")
    reader = follow(tmp_path, DOC, until=the_block(DOC, "twistd -n --pidfile= esmtpkit --maildir ./Maildir"))
    with reader:
        older = mailbox.Maildir(str(reader.folder / "Maildir"), create=False)
        older.add(b"Subject: an older message\r\n\r\nfrom the README's server, say\r\n")
        reader.take(client)
        reader.take(client)
        assert len(older) == 3


def test_commands_are_run_or_install_steps(tutorial: Reader) -> None:
    """Every command of the tutorial ran, except the install steps the test environment has done."""
    lines = [line for b in blocks(DOC) if b.language == "sh" for line in commands(b.text)]
    actions = [step.action for step in tutorial.steps if step.block.language == "sh"]
    skipped = [a.removeprefix("done by the test environment: ") for a in actions if a.startswith("done by")]
    assert skipped == ["python3 -m venv .venv", ". .venv/bin/activate", "pip install '/path/to/esmtpkit[test]'"]
    assert len(actions) == len(lines)


def test_embedding_program_prints_what_the_page_shows(embedding: Reader) -> None:
    """The self-contained program of embedding.md ends by itself and prints the page's output."""
    program = blocks(EMBEDDING)[0]
    assert "task.react(" in program.text and not program.file
    (shown,) = [b.text for b in blocks(EMBEDDING) if b.language == "text"]
    expected = re.escape(shown).replace(r"41287", r"\d+")
    assert re.fullmatch(expected, embedding.output(program)), (shown, embedding.output(program))


def test_embedding_application_serves_both_endpoints(embedding: Reader) -> None:
    """mail_service.py and mail.tac, saved as the page says, serve both endpoints under the documented command."""
    server = embedding.server
    assert server is not None and "mail.tac" in server.block.text
    assert sorted(server.ports) == [2525, 2587]
    for port in server.ports.values():
        assert send(port, ["bob@example.com"]) == {}
    assert "0 messages so far" in server.text()


def test_coming_from_elsewhere_examples_print_what_they_say(elsewhere: Reader) -> None:
    output = "".join(step.output for step in elsewhere.steps)
    assert "Message from alice@example.org to bob@example.com: 22 bytes" in output
    assert "for <console@example.com>" in output


def test_net_smtp_server_synopsis_serves(elsewhere: Reader) -> None:
    """The Net::SMTP::Server port serves and prints FROM, TO and MSG for each message."""
    server = elsewhere.server
    assert server is not None and "Net::SMTP::Server's synopsis" in server.block.text
    assert send(server.ports[2525], ["bob@example.com", "carol@example.com"]) == {}
    deadline = time.monotonic() + TIMEOUT
    line = "FROM alice@example.org TO bob@example.com, carol@example.com MSG 22 bytes"
    while line not in server.text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert line in server.text()
