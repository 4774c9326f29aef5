"""Credential checkers the AUTH tests share: one that answers when the test says, one that always breaks."""

from __future__ import annotations

from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet.defer import Deferred
from zope.interface import implementer


@implementer(ICredentialsChecker)
class LateChecker:
    """A checker whose answers the test gives, to pin the order of replies around a slow password database.

    ``pending`` holds ``(deferred, credentials)`` for every check still waiting for its answer.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.pending: list[tuple[Deferred[Any], Any]] = []

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((d, credentials))
        return d


@implementer(ICredentialsChecker)
class BrokenChecker:
    """A checker whose password database is never reachable."""

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials: Any) -> Any:
        raise OSError("password database unreachable")
