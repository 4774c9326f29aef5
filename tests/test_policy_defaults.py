"""`Policy` carries no setting nothing reads, states the SASL default order once, and imports without twisted.cred."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from esmtpkit.core import mechanisms
from esmtpkit.server import sasl
from esmtpkit.server.policy import Policy

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "esmtpkit"
POLICY_SOURCE = PACKAGE / "server" / "policy.py"


def attributes_read_outside_policy() -> set[str]:
    """Every attribute name the package's code (policy.py aside) reads as ``something.name``."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        if path == POLICY_SOURCE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
    return names


def public_policy_names() -> list[str]:
    """The fields of `Policy`, then any other public attribute its class defines (methods, properties)."""
    fields = [f.name for f in dataclasses.fields(Policy)]
    others = [name for name in vars(Policy) if not name.startswith("_") and name not in fields]
    return fields + others


def test_policy_has_fields() -> None:
    """The scan below looks at real settings (a guard against comparing two empty lists)."""
    names = public_policy_names()
    assert "max_message_size" in names and "auth_mechanisms" in names


def test_every_policy_setting_is_read_somewhere() -> None:
    """A field or method of `Policy` that no module of the package reads is a setting that does nothing."""
    read = attributes_read_outside_policy()
    assert [name for name in public_policy_names() if name not in read] == []


@pytest.mark.parametrize("removed", ["extras", "with_"])
def test_removed_settings_stay_removed(removed: str) -> None:
    """Neither the catch-all ``extras`` nor the ``with_`` copier is part of `Policy` (``dataclasses.replace`` is)."""
    assert not hasattr(Policy, removed)
    with pytest.raises(TypeError):
        Policy(**{removed: {}})


def test_default_mechanism_order_is_stated_once() -> None:
    """Policy's default, sasl's ``DEFAULT_ORDER`` and `sasl.mechanisms_for`'s default are one and the same tuple."""
    default = {f.name: f for f in dataclasses.fields(Policy)}["auth_mechanisms"].default
    assert default is mechanisms.DEFAULT_ORDER
    assert sasl.DEFAULT_ORDER is mechanisms.DEFAULT_ORDER
    assert inspect.signature(sasl.mechanisms_for).parameters["names"].default is mechanisms.DEFAULT_ORDER
    assert Policy().auth_mechanisms == mechanisms.DEFAULT_ORDER


def test_mechanism_names_match_the_mechanisms() -> None:
    """The names Policy checks against are exactly those sasl implements, in the same order."""
    assert tuple(sasl.MECHANISMS) == mechanisms.NAMES
    assert set(mechanisms.DEFAULT_ORDER) <= set(mechanisms.NAMES)
    assert [cls.name for cls in sasl.MECHANISMS.values()] == [mechanisms.PLAIN, mechanisms.LOGIN,
                                                              mechanisms.CRAM_MD5]


def test_policy_rejects_an_unknown_mechanism_without_sasl() -> None:
    """The check of ``auth_mechanisms`` names the known mechanisms, from the core list."""
    with pytest.raises(ValueError, match="known: PLAIN, LOGIN, CRAM-MD5"):
        Policy(auth_mechanisms=("PLAIN", "GSSAPI"))
    assert Policy(auth_mechanisms="login, cram-md5").auth_mechanisms == ("LOGIN", "CRAM-MD5")


def test_importing_policy_does_not_load_twisted_cred() -> None:
    """``import esmtpkit.server.policy`` stays light: the mechanism names come from the core, not from sasl."""
    script = ("import sys, esmtpkit.server.policy\n"
              "print(sorted(m for m in sys.modules if m == 'twisted.cred' or m.startswith('twisted.cred.')))\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
