"""The Maildir handler's tmp/ cleaning: what killed deliveries left is removed at start, nothing else."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.handlers.maildir import TMP_MAX_AGE, Maildir, clean_tmp

from .support import Twistd

HOUR = 3600.0


def aged(path: Path, hours: float, now: float, data: bytes = b"partial", atime_hours: float | None = None) -> Path:
    """Write ``path`` and set its modification (and, unless told otherwise, access) time ``hours`` before ``now``."""
    path.write_bytes(data)
    access = hours if atime_hours is None else atime_hours
    os.utime(path, (now - access * HOUR, now - hours * HOUR))
    return path


class CleanTmpTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.root, True)
        for sub in ("tmp", "new", "cur"):
            (self.root / sub).mkdir()
        self.now = time.time()
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_only_old_regular_files_in_tmp_go(self) -> None:
        tmp, now = self.root / "tmp", self.now
        old = aged(tmp / "1.M1P1Q1Rdead.host", 37, now)
        older = aged(tmp / "2.M1P1Q1Rdead.host", 24 * 30, now)
        fresh = aged(tmp / "3.M1P1Q1Rlive.host", 1, now)
        edge = aged(tmp / "4.M1P1Q1Redge.host", 35.9, now)
        read_lately = aged(tmp / "5.M1P1Q1Rread.host", 40, now, atime_hours=2)  # a reader has it open
        folder = tmp / "a-folder"
        folder.mkdir()
        os.utime(folder, (now - 40 * HOUR, now - 40 * HOUR))
        target = aged(self.root / "outside", 40, now)
        link = tmp / "a-link"
        link.symlink_to(target)
        delivered = [aged(self.root / sub / "9.M1P1Q1Rold.host", 100, now) for sub in ("new", "cur")]

        self.assertEqual(clean_tmp(str(tmp), now), 2)
        self.assertFalse(old.exists() or older.exists())
        for kept in (fresh, edge, read_lately, folder, link, target, *delivered):
            self.assertTrue(kept.exists(), kept)
        [logged] = [e for e in self.events if "left unfinished" in e.get("log_format", "")]
        self.assertEqual((logged["count"], logged["folder"], logged["hours"]), (2, str(tmp), 36.0))

    def test_age_is_a_parameter(self) -> None:
        tmp = self.root / "tmp"
        aged(tmp / "a", 2, self.now)
        self.assertEqual(clean_tmp(str(tmp), self.now, max_age=3 * HOUR), 0)
        self.assertEqual(clean_tmp(str(tmp), self.now, max_age=HOUR), 1)
        self.assertEqual(TMP_MAX_AGE, 36 * HOUR)

    def test_nothing_to_remove_logs_nothing(self) -> None:
        self.assertEqual(clean_tmp(str(self.root / "tmp"), self.now), 0)
        self.assertEqual([e for e in self.events if "left unfinished" in e.get("log_format", "")], [])

    def test_missing_folder_is_logged_not_raised(self) -> None:
        self.assertEqual(clean_tmp(str(self.root / "nowhere"), self.now), 0)
        self.assertTrue([e for e in self.events if "cannot look for old files" in e.get("log_format", "")])

    def test_handler_cleans_once_per_folder_per_process(self) -> None:
        """The first Maildir for a folder removes the old file; later ones (one per connection) do not look again."""
        tmp = self.root / "tmp"
        aged(tmp / "first", 48, self.now)
        Maildir(str(self.root))
        self.assertEqual(os.listdir(tmp), [])
        aged(tmp / "second", 48, self.now)
        Maildir(str(self.root))
        self.assertEqual(os.listdir(tmp), ["second"])

    def test_handler_makes_the_folders_of_a_new_maildir(self) -> None:
        path = self.root / "fresh"
        Maildir(str(path))
        self.assertEqual(sorted(os.listdir(path)), ["cur", "new", "tmp"])


def test_twistd_cleans_tmp_at_start(tmp_path: Path) -> None:
    """A real ``twistd esmtpkit``: the file a killed delivery left two days ago is gone once the server listens;
    a fresh one (a delivery in progress elsewhere) stays; new/ is untouched; the log says how many went."""
    maildir = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True)
    now = time.time()
    old = aged(maildir / "tmp" / "1.M1P99Q1Rkilled.host", 48, now)
    fresh = aged(maildir / "tmp" / "2.M1P99Q1Rbusy.host", 0.5, now)
    delivered = aged(maildir / "new" / "3.M1P99Q1Rdone.host", 48, now)
    server = Twistd(tmp_path / "run", "--maildir", str(maildir), "--hostname", "mx.test")
    try:
        assert not old.exists()
        assert fresh.exists() and delivered.exists()
        assert f"Maildir {maildir / 'tmp'}: removed 1 file(s) left unfinished for over 36 hours" in server.log_text()
    finally:
        server.stop()
