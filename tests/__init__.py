"""esmtpkit's tests, for pytest or trial.

Hypothesis keeps caches (Unicode tables, constants found in the code) in ``.hypothesis/`` under the current
directory, even with no example database; importing this package sends them to the user's cache folder instead, so
a test run leaves the checkout as it found it. A ``HYPOTHESIS_STORAGE_DIRECTORY`` already set wins.
"""

import os
from pathlib import Path

os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY",
    str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "esmtpkit" / "hypothesis"),
)
