"""Scratch paths for trial-style tests, outside the working tree.

Trial's ``TestCase.mktemp`` names a path relative to the current directory: trial runs from its own
``_trial_temp/``, but pytest runs from the checkout, where those paths would stay behind. `ScratchPaths` gives
the same call a fresh temporary directory, removed when the test ends, under either runner; `ScratchWorkingDirectory`
also runs each test from such a directory, for code that writes relative to it (the ``./Maildir`` default).
"""

from __future__ import annotations

import os
import shutil
import tempfile

__all__ = ["ScratchPaths", "ScratchWorkingDirectory"]


class ScratchPaths:
    """Mix in before a trial ``TestCase``: ``mktemp()`` names a path in a temporary directory of its own."""

    def mktemp(self) -> str:
        """An absolute path that does not exist yet, in a new directory removed after the test (file or folder)."""
        directory = tempfile.mkdtemp(prefix="esmtpkit-test-")
        self.addCleanup(shutil.rmtree, directory, True)  # type: ignore[attr-defined]
        return os.path.join(directory, "temp")


class ScratchWorkingDirectory(ScratchPaths):
    """Mix in before a trial ``TestCase``: each test runs from a new temporary directory, the previous one restored."""

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        here = os.getcwd()
        scratch = self.mktemp()
        os.mkdir(scratch)
        os.chdir(scratch)
        self.addCleanup(os.chdir, here)  # type: ignore[attr-defined]
