"""docs/testing.md, followed as a reader would: its handler and its two test modules pass under pytest and trial.

The page is followed from an empty folder by `tests.docblocks.Reader`: the three files it shows are saved there, and
its two commands, ``python -m pytest test_mailhandler.py`` and ``python -m twisted.trial trial_mailhandler``, run
in subprocesses against the installed package. These tests read what the commands reported (how many tests were
collected, run and passed), check that a bare ``pytest`` in that folder leaves the trial module alone, and that the
page's tests fail when the handler keeps nothing, so they do look at what it received.
"""

from __future__ import annotations

import re
from typing import Iterator

import pytest

from .docblocks import DOCS, Block, Reader, blocks

DOC = DOCS / "testing.md"
BLOCKS = blocks(DOC)
#: The number of tests in the page's pytest module and in its trial module.
PYTEST_TESTS, TRIAL_TESTS = 4, 2


def the_block(predicate: str) -> Block:
    """The one block of the page whose text holds ``predicate``."""
    (block,) = [b for b in BLOCKS if predicate in b.text]
    return block


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reader]:
    """The page followed once, from an empty folder."""
    tmp = tmp_path_factory.mktemp("testing-page")
    with Reader(tmp / "reader", tmp / "logs") as followed:
        followed.follow(BLOCKS)
        yield followed


def test_page_shows_a_handler_and_two_test_modules() -> None:
    assert [b.file for b in BLOCKS if b.file] == ["mailhandler.py", "test_mailhandler.py", "trial_mailhandler.py"]
    assert [b.text for b in BLOCKS if b.language == "sh"] == ["python -m pytest test_mailhandler.py\n",
                                                              "python -m twisted.trial trial_mailhandler\n"]
    assert [b for b in BLOCKS if b.language == "python" and not b.file] == []


def test_pytest_collects_and_passes_every_test(reader: Reader) -> None:
    output = reader.output(the_block("python -m pytest"))
    assert re.search(rf"^collected {PYTEST_TESTS} items$", output, re.M), output
    assert re.search(rf"^=+ {PYTEST_TESTS} passed in ", output, re.M), output


def test_trial_runs_and_passes_every_test(reader: Reader) -> None:
    output = reader.output(the_block("python -m twisted.trial"))
    assert f"Ran {TRIAL_TESTS} tests in " in output, output
    assert re.search(rf"^PASSED \(successes={TRIAL_TESTS}\)$", output, re.M), output


def test_bare_pytest_leaves_the_trial_module_alone(reader: Reader) -> None:
    """``pytest`` with no argument in the folder collects only the pytest module (trial's would never end there)."""
    run = reader.shell("python -m pytest -p no:cacheprovider")
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(rf"^=+ {PYTEST_TESTS} passed in ", run.stdout, re.M), run.stdout


def test_page_tests_fail_when_the_handler_keeps_nothing(reader: Reader) -> None:
    """With ``delivered`` never appended to, the tests that look at what the handler received fail."""
    handler = reader.folder / "mailhandler.py"
    kept = handler.read_text()
    assert kept.count("self.delivered.append(") == 1
    handler.write_text(kept.replace("self.delivered.append(", "("))
    try:
        pytest_run = reader.shell("python -m pytest -p no:cacheprovider test_mailhandler.py")
        trial_run = reader.shell("python -m twisted.trial trial_mailhandler")
    finally:
        handler.write_text(kept)
    assert re.search(r"^=+ 2 failed, 2 passed in ", pytest_run.stdout, re.M), pytest_run.stdout
    assert re.search(rf"^FAILED \(failures={TRIAL_TESTS}\)$", trial_run.stdout, re.M), trial_run.stdout
