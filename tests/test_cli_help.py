"""What ``twistd esmtpkit`` says about itself: ``--help``, ``--version``, the ``--auth`` text, and the options table of
docs/running.md, which must list every option the help lists."""

from __future__ import annotations

import re
from pathlib import Path

from twisted import version as twisted_version
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.cli import tap

from .support import run_twistd

RUNNING = Path(__file__).parent.parent / "docs" / "running.md"


def documented_options() -> set[str]:
    """The options named in the first column of docs/running.md's options table."""
    table = RUNNING.read_text().split("## Options", 1)[1].split("\n\n", 2)[1]
    names: set[str] = set()
    for row in table.splitlines()[2:]:
        first_cell = row.split(" | ", 1)[0]
        names.update(re.findall(r"`--([a-z][a-z0-9-]*)", first_cell))
    return names


def help_options() -> set[str]:
    """The options ``twistd esmtpkit --help`` lists."""
    return {name.rstrip("=") for name in tap.Options().longOpt}


class HelpTextTests(SynchronousTestCase):
    def test_every_option_documented(self) -> None:
        """Each option of the help has a row in docs/running.md, and each row names a real option."""
        self.assertEqual(help_options() - documented_options(), set())
        self.assertEqual(documented_options() - help_options(), set())

    def test_auth_help(self) -> None:
        """--auth shows examples of the checkers and says it repeats (not Twisted's generic sentence)."""
        text = " ".join(tap.Options().docs["auth"].split())
        for part in ("memory:user:password", "file:PATH", "repeat", "--help-auth"):
            self.assertIn(part, text)

    def test_version_in_synopsis(self) -> None:
        self.assertIn(f"esmtpkit {tap.installed_version()} (Twisted {twisted_version.short()})",
                      tap.Options().getSynopsis())


def test_help(tmp_path: Path) -> None:
    """``twistd esmtpkit --help``: on stdout, exit 0, headed by the command and the installed esmtpkit version."""
    from importlib.metadata import version

    run = run_twistd(tmp_path, "--help")
    assert (run.returncode, run.stderr) == (0, "")
    usage, about, *rest = run.stdout.splitlines()
    assert usage == "Usage: twistd [options] esmtpkit [options]"
    assert about == f"esmtpkit {version('esmtpkit')} (Twisted {twisted_version.short()})"
    assert any(line.lstrip().startswith("--auth=") for line in rest)


def test_version(tmp_path: Path) -> None:
    """``twistd esmtpkit --version`` names esmtpkit, Twisted and Python, on stdout, and exits 0."""
    from importlib.metadata import version

    run = run_twistd(tmp_path, "--version")
    assert (run.returncode, run.stderr) == (0, "")
    assert run.stdout.startswith(f"esmtpkit {version('esmtpkit')} (Twisted {twisted_version.short()}, Python ")
