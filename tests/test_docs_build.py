"""The documentation site builds without a warning, and the API reference covers every public module.

The build needs the ``docs`` extra (``pip install -e '.[docs]'``, or ``tox -e docs``); without it that test is
skipped, saying so. The other checks need nothing beyond the standard library.
"""

from __future__ import annotations

import configparser
import importlib.util
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import esmtpkit

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
#: What ``tox -e docs`` runs, with the output directory left to the caller.
BUILD = ["-m", "sphinx", "-W", "--keep-going", "-b", "html", str(DOCS)]
DOCS_REQUIREMENTS = ("sphinx", "myst_parser", "repoze.sphinx.autointerface")


def _missing_requirements() -> list[str]:
    missing = []
    for name in DOCS_REQUIREMENTS:
        try:
            found = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            found = None
        if found is None:
            missing.append(name)
    return missing


def public_modules() -> list[str]:
    """Every importable module of the esmtpkit package whose name has no leading underscore."""
    names = ["esmtpkit"]
    for info in pkgutil.walk_packages(esmtpkit.__path__, "esmtpkit."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def test_docs_build_without_warnings(tmp_path: Path) -> None:
    """``sphinx-build -W`` succeeds: every page is in the toctree, every link and reference resolves."""
    missing = _missing_requirements()
    if missing:
        pytest.skip(f"the docs extra is not installed (no {', '.join(missing)}): pip install -e '.[docs]'")
    run = subprocess.run([sys.executable, *BUILD, str(tmp_path / "html"), "-d", str(tmp_path / "doctrees"), "-q"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "WARNING" not in run.stderr, run.stderr
    api = (tmp_path / "html" / "api.html").read_text()
    for anchor in ("esmtpkit.server.interfaces.IMessageHandler.rcpt", "esmtpkit.handlers.base.MessageHandler.rcpt",
                   "esmtpkit.testing.Conversation", "esmtpkit.server.factory.ESMTPFactory"):
        assert f'id="{anchor}"' in api, anchor
    for page in DOCS.glob("*.md"):
        assert (tmp_path / "html" / page.with_suffix(".html").name).exists(), page.name


def test_api_reference_covers_every_public_module() -> None:
    """docs/api.md documents each public module: a new module needs an ``automodule`` line there."""
    documented = set(re.findall(r"^\.\. automodule:: (\S+)", (DOCS / "api.md").read_text(), re.M))
    assert set(public_modules()) - documented == set()
    assert documented - set(public_modules()) == set()


def test_tox_docs_environment_runs_the_same_build() -> None:
    """``tox -e docs`` installs the docs extra and builds with warnings as errors."""
    tox = configparser.ConfigParser()
    tox.read(ROOT / "tox.ini")
    assert tox["testenv:docs"]["extras"].split() == ["docs"]
    assert tox["testenv:docs"]["commands"].split() == ["sphinx-build", "-W", "--keep-going", "-b", "html", "docs",
                                                       "docs/_build/html"]
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    extra = setup["options.extras_require"]["docs"].split()
    assert {re.split(r"[<>=!~]", requirement)[0].lower().replace(".", "-").replace("_", "-")
            for requirement in extra} >= {"sphinx", "myst-parser", "repoze-sphinx-autointerface"}


def test_links_between_pages_resolve() -> None:
    """Every ``[text](page.md)`` link in docs/ names a page that exists (GitHub shows them as they are)."""
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).resolve().exists(), f"{page.name}: {target}"
