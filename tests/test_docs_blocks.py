"""Every code block of README.md and docs/*.md that a reader is told to run runs as written, from an empty folder.

Each page is followed by `tests.docblocks.Reader`: its ``python`` and ``sh`` blocks run in order in a new empty
folder, files it asks the reader to save are saved there, its servers run on free 127.0.0.1 ports (the module's
docstring says how the ports are changed) and are stopped at the end. A block that cannot run on a test machine is
marked ``<!-- not run: REASON -->`` on the line before it. The pages that say more about what a block prints or
does have tests of their own (test_readme.py, test_docs_tutorial.py, test_docs_examples.py, ...); this module holds
every page to the rule.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .docblocks import LANGUAGES, PAGES, ROOT, RUNNABLE, Block, Reader, blocks, loopback

ALL = [block for page in PAGES for block in blocks(page)]
#: How each marker comment reads; anything else in an HTML comment before a block is a mistake.
MARKERS = re.compile(r"not run: \S.*|file: \S+|continues the block above")
#: The words an unlabelled block must not start with: a command belongs in an ``sh`` block, run or marked.
COMMAND_WORDS = re.compile(r"(\$ )?(twistd|python3?|pip|swaks|curl|systemctl|\.venv/bin/\S+)\b")


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_blocks_are_read_with_their_markers(tmp_path: Path) -> None:
    """Fences indented in a list item, markers separated by a blank line, and plain blocks are all found."""
    page = tmp_path / "page.md"
    page.write_text("Text.\n\n<!-- not run: needs root -->\n\n```sh\ntwistd -n esmtpkit --listen tcp:25\n```\n\n"
                    "1. A step:\n\n   ```python\n   if True:\n       print(1)\n   ```\n\n"
                    "<!-- file: a.py -->\n```python\nx = 1\n\ny = 2\n```\n")
    found = blocks(page)
    assert [(b.line, b.language, b.marker) for b in found] == [(5, "sh", "not run: needs root"), (11, "python", ""),
                                                               (17, "python", "file: a.py")]
    assert found[0].not_run == "needs root"
    assert found[1].text == "if True:\n    print(1)\n"
    assert (found[2].file, found[2].text) == ("a.py", "x = 1\n\ny = 2\n")


def test_servers_are_moved_to_free_loopback_ports() -> None:
    assert loopback('listen("tcp:2525:interface=127.0.0.1", "tcp:2587:backlog=9:interface=127.0.0.1")') == (
        'listen("tcp:0:interface=127.0.0.1", "tcp:0:backlog=9:interface=127.0.0.1")', [2525, 2587])
    with pytest.raises(AssertionError, match="tcp:25 listens beyond 127.0.0.1"):
        loopback("--listen tcp:25")


def test_every_block_has_a_known_language() -> None:
    """A runnable block written as ``bash`` or ``console`` would escape the rule: only these languages are used."""
    assert [b.where for b in ALL if b.language not in LANGUAGES] == []


def test_markers_are_well_formed() -> None:
    """Each marker is one of the three forms, on a runnable block; ``not run`` says why."""
    for block in ALL:
        if block.marker:
            assert MARKERS.fullmatch(block.marker), f"{block.where}: <!-- {block.marker} -->"
            assert block.language in RUNNABLE, f"{block.where}: a marker on a {block.language or 'plain'} block"
        if block.continues:
            assert block.language == "python", block.where


def test_every_marker_comment_is_on_a_block() -> None:
    """A marker comment followed by prose rather than a block marks nothing: it must be a typo."""
    for page in PAGES:
        lines = page.read_text().splitlines()
        for number, line in enumerate(lines):
            if MARKERS.fullmatch(line.strip().removeprefix("<!--").removesuffix("-->").strip()):
                following = next((later for later in lines[number + 1:] if later.strip()), "")
                assert following.lstrip().startswith("```"), f"{page_id(page)}:{number + 1}: {line}"


def test_unlabelled_blocks_hold_no_commands() -> None:
    """Diagrams, wire transcripts and configuration files are unlabelled; a command there is an ``sh`` block."""
    for block in ALL:
        if block.language == "":
            assert not COMMAND_WORDS.match(block.text.lstrip()), f"{block.where}: label it sh"


def test_illustrations_in_python_compile() -> None:
    """Python that is not run is at least valid Python."""
    for block in ALL:
        if block.language == "python" and block.not_run is not None:
            compile(block.text, block.where, "exec")


def test_benchmark_figures_are_only_on_the_performance_page() -> None:
    """Measured CPU and memory figures live in docs/performance.md; another page that quotes one must agree with it."""
    performance = (ROOT / "docs" / "performance.md").read_text()
    figure = re.compile(r"\d[\d.]*\s?(?:ms|µs)(?: of CPU)?(?: per |/)(?:MiB|msg|message|connection)|"
                        r"\d[\d.]*\s?KiB(?: per |/)conn(?:ection)?")
    for page in PAGES:
        if page.name != "performance.md":
            for quoted in figure.findall(page.read_text()):
                assert quoted in performance, f"{page_id(page)}: {quoted} is not in docs/performance.md"


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.language in RUNNABLE for b in blocks(p))], ids=page_id)
def test_page_runs_as_written(page: Path, tmp_path: Path) -> None:
    """Following the page from an empty folder, every block that is not marked ``not run`` runs and succeeds."""
    runnable = [b for b in blocks(page) if b.language in RUNNABLE and b.not_run is None]
    with Reader(tmp_path / "reader", tmp_path / "logs") as reader:
        reader.follow(blocks(page))
    done = {step.block for step in reader.steps} | {server.block for server in reader.servers}
    assert [b.where for b in runnable if b not in done and not _empty(b)] == []


def _empty(block: Block) -> bool:
    """A block with nothing to run (only comments)."""
    return block.language == "sh" and not re.search(r"^\s*[^#\s]", block.text, re.M)
