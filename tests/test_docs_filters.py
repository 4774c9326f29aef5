"""docs/filters.md, run: its filter of your own prints what the page says it prints, and its command line makes
the filters the page lists, in that order."""

from __future__ import annotations

import contextlib
import io
import shlex
from pathlib import Path

import pytest

from esmtpkit.cli import tap

from .docblocks import DOCS, blocks

PAGE = DOCS / "filters.md"
BLOCKS = blocks(PAGE)


def test_the_filter_of_your_own_prints_what_the_page_shows() -> None:
    [code] = [b for b in BLOCKS if b.language == "python"]
    [shown] = [b for b in BLOCKS if b.language == "text" and "No lotteries" in b.text]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.text, code.where, "exec"), {"__name__": "docs"})
    assert printed.getvalue() == shown.text


def test_the_command_builds_the_chain_it_shows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # its --maildir Maildir is made where the reader runs it
    [command] = [b for b in BLOCKS if b.language == "sh"]
    argv = shlex.split(command.text.replace("\\\n", " "))
    assert argv[:3] == ["twistd", "-n", "esmtpkit"]
    options = tap.Options()
    options.parseOptions(argv[3:])
    assert options["filter-chain"].names == ("clamd", "rspamd", "milter")
