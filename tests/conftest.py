"""Fixtures the test modules share."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A fresh directory outside the checkout for a real server to run in, removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="esmtpkit-twistd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
