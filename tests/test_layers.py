"""The package's rings: import-linter's contracts (setup.cfg) hold, and the core imports without Twisted."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import esmtpkit.core

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept() -> None:
    """``lint-imports`` finds every contract kept: each ring imports only inward, the core no third party."""
    linter = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(linter), "--no-cache", "--config", str(ROOT / "setup.cfg")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "BROKEN" not in run.stdout


def test_core_imports_with_twisted_absent() -> None:
    """Every core module imports in an interpreter where Twisted and zope.interface cannot be imported."""
    modules = sorted(info.name for info in pkgutil.walk_packages(esmtpkit.core.__path__, "esmtpkit.core."))
    assert "esmtpkit.core.rules" in modules and "esmtpkit.core.content" in modules
    script = textwrap.dedent(f"""
        import importlib, importlib.abc, sys

        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("twisted", "zope", "OpenSSL", "cryptography"):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, Absent())
        for name in {modules!r}:
            importlib.import_module(name)
        loaded = sorted(n for n in sys.modules if n.split(".")[0] in ("twisted", "zope"))
        assert not loaded, loaded
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"


def test_old_module_names_still_import_with_a_warning() -> None:
    """Code written for the flat layout keeps working: ``esmtpkit.protocol`` is the moved module, deprecated."""
    script = textwrap.dedent("""
        import warnings
        warnings.simplefilter("error", DeprecationWarning)
        try:
            import esmtpkit.protocol
        except DeprecationWarning as e:
            print(e)
        warnings.simplefilter("ignore", DeprecationWarning)
        import esmtpkit.protocol, esmtpkit.server.protocol, esmtpkit.state, esmtpkit.core.rules
        from esmtpkit.handlers.trace import received_header
        assert esmtpkit.protocol is esmtpkit.server.protocol
        assert esmtpkit.state is esmtpkit.core.rules
        print(received_header.__module__)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "esmtpkit.protocol is deprecated: import esmtpkit.server.protocol", "esmtpkit.core.trace"]
