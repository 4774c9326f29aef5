"""The module names of esmtpkit 0.1, before the package was arranged in rings: still importable, with a warning.

``import esmtpkit.protocol`` gives the module now at ``esmtpkit.server.protocol`` (the same module object, so
patching one patches the other) and warns once that the old name is deprecated.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Final, Sequence

#: Old name (under ``esmtpkit.``) -> where the module lives now.
MOVED: Final = {
    "address": "esmtpkit.core.address", "reply": "esmtpkit.core.reply", "commands": "esmtpkit.core.commands",
    "state": "esmtpkit.core.rules", "data": "esmtpkit.core.content", "params": "esmtpkit.core.params",
    "dsn": "esmtpkit.core.dsn", "ids": "esmtpkit.core.ids", "session": "esmtpkit.core.session",
    "escape": "esmtpkit.core.escape", "handlers.trace": "esmtpkit.core.trace",
    "protocol": "esmtpkit.server.protocol", "factory": "esmtpkit.server.factory",
    "service": "esmtpkit.server.service", "policy": "esmtpkit.server.policy", "tls": "esmtpkit.server.tls",
    "proxy": "esmtpkit.server.proxy", "sasl": "esmtpkit.server.sasl", "authlimit": "esmtpkit.server.authlimit",
    "monitor": "esmtpkit.server.monitor", "interfaces": "esmtpkit.server.interfaces",
    "authfile": "esmtpkit.server.authfile", "logformat": "esmtpkit.ops.logformat", "metrics": "esmtpkit.ops.metrics",
    "workers": "esmtpkit.ops.workers", "backlog": "esmtpkit.ops.backlog", "listening": "esmtpkit.ops.listening",
    "tap": "esmtpkit.cli.tap",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        """A placeholder module; `exec_module` swaps in the real one."""
        return None

    def exec_module(self, module: ModuleType) -> None:
        """Put the module at its new home under the old name too (its own spec untouched, so reload works)."""
        warnings.warn(f"{module.__name__} is deprecated: import {self.target}", DeprecationWarning, stacklevel=2)
        sys.modules[module.__name__] = importlib.import_module(self.target)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("esmtpkit."):
            return None
        new = MOVED.get(fullname[len("esmtpkit."):])
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Make the old names importable (once per interpreter)."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())
