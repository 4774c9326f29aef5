"""Fixtures the test modules share."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from .authzone import AuthWorld, auth_zones, world_dns
from .mailnet import PrivateDNS


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A fresh directory outside the checkout for a real server to run in, removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="esmtpkit-twistd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def auth_world() -> AuthWorld:
    """A fresh world of mail-authentication test domains (`tests.authzone.auth_zones`); a module that needs more
    names overrides this fixture."""
    return auth_zones()


@pytest.fixture
def auth_dns(auth_world: AuthWorld) -> Iterator[PrivateDNS]:
    """``auth_world`` served by a private name server on 127.0.0.1, stopped after the test."""
    with world_dns(auth_world) as server:
        yield server
