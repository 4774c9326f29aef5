"""Run the Python examples of docs/testing.md so the documentation cannot rot.

Examples that define tests (a trial TestCase, a pytest function) are executed into this module so that the test
runner collects and runs them; the others run as they are. Examples naming ``mypackage`` are placeholders.
"""

import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

DOC = Path(__file__).resolve().parent.parent / "docs" / "testing.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
RUNNABLE = [b for b in BLOCKS if "mypackage" not in b]
DEFINES_TESTS = [b for b in RUNNABLE if re.search(r"^(class \w+Tests|(async )?def test_|@pytest_twisted)", b, re.M)]

for _block in DEFINES_TESTS:
    exec(compile(_block, str(DOC), "exec"), globals())


class PlainExamplesTests(SynchronousTestCase):
    def test_examples_run(self) -> None:
        """Each example that is not a test definition runs without error."""
        plain = [b for b in RUNNABLE if b not in DEFINES_TESTS]
        self.assertGreaterEqual(len(plain), 2)
        for block in plain:
            exec(compile(block, str(DOC), "exec"), {})

    def test_test_examples_found(self) -> None:
        """The trial and pytest examples were found (and are collected from this module)."""
        self.assertEqual(len(DEFINES_TESTS), 2)
