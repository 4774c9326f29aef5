"""Run the Python examples of docs/testing.md so the documentation cannot rot.

Plain examples run as they are. The pytest example is executed into this module so pytest collects it. The trial
example runs under trial in a subprocess: trial spins the reactor itself, which must not happen inside a pytest run
where pytest-twisted already runs it. Examples naming ``mypackage`` are placeholders.
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

DOC = Path(__file__).resolve().parent.parent / "docs" / "testing.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
RUNNABLE = [b for b in BLOCKS if "mypackage" not in b]
TRIAL = [b for b in RUNNABLE if "from twisted.trial import unittest" in b]
PYTEST = [b for b in RUNNABLE if b not in TRIAL and re.search(r"^(async )?def test_|^@pytest_twisted", b, re.M)]
PLAIN = [b for b in RUNNABLE if b not in TRIAL and b not in PYTEST]

for _block in PYTEST:
    exec(compile(_block, str(DOC), "exec"), globals())


class DocExamplesTests(SynchronousTestCase):
    def test_plain_examples_run(self) -> None:
        """Each example that is not a test definition runs without error."""
        self.assertGreaterEqual(len(PLAIN), 2)
        for block in PLAIN:
            exec(compile(block, str(DOC), "exec"), {})

    def test_examples_found(self) -> None:
        self.assertEqual((len(TRIAL), len(PYTEST)), (1, 1))

    def test_trial_example_passes_under_trial(self) -> None:
        """The trial example, saved as a module, passes when run by trial (and fails if its assertion does)."""
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "test_doc_trial_example.py").write_text(TRIAL[0])
            run = subprocess.run([sys.executable, "-m", "twisted.trial", "test_doc_trial_example"], cwd=tmp,
                                 capture_output=True, text=True, timeout=120)
            self.assertEqual(run.returncode, 0, run.stdout + run.stderr)
            self.assertIn("PASSED (successes=1)", run.stdout)
