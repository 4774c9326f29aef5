"""AUTH passwords from a file of ``user:password`` lines: read once, checked from memory, re-read on `reload`.

The format is the one twistd's ``--auth file:PATH`` documents (Twisted's ``FilePasswordDB``): one ``user:password``
per line, the password in the clear, anything after a second ``:`` ignored, trailing blanks dropped; blank lines
and lines starting with ``#`` are skipped. ``FilePasswordDB`` reads the whole file on every AUTH, in the reactor
thread, and fails every login while the file is missing or half written. `PasswordFile` reads it at start (an
unusable file is an error then), answers from memory, and `PasswordFile.reload` (``kill -HUP`` under twistd) swaps
in the new table only when the whole file was read and parsed; otherwise the table in use stays.
"""

from __future__ import annotations

import hmac
import os
from typing import Any, Iterable, Mapping

from twisted.cred.checkers import FilePasswordDB, ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

__all__ = ["PasswordFile", "PasswordFileError", "read_passwords", "replace_file_databases", "password_files"]


class PasswordFileError(Exception):
    """The password file cannot be read or parsed; the message names the file (and line), never a password."""


def _bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def read_passwords(path: str | os.PathLike[str]) -> Mapping[bytes, bytes]:
    """Read ``path`` into ``{user: password}`` (bytes, as credentials carry them); the first line for a user wins,
    as in ``FilePasswordDB``. Raises `PasswordFileError` for an unreadable file or a line that is not user:password.
    """
    try:
        with open(path, "rb") as f:
            content = f.read()
    except OSError as e:
        raise PasswordFileError(f"cannot read {os.fspath(path)}: {e.strerror or e}") from None
    users: dict[bytes, bytes] = {}
    for number, line in enumerate(content.split(b"\n"), 1):
        line = line.rstrip()
        if not line or line.startswith(b"#"):
            continue
        user, colon, rest = line.partition(b":")
        if not colon or not user:
            raise PasswordFileError(f"{os.fspath(path)}, line {number}: not user:password")
        users.setdefault(user, rest.partition(b":")[0])
    return users


@implementer(ICredentialsChecker)
class PasswordFile:
    """A ``twisted.cred`` checker over a password file held in memory; `reload` re-reads the file.

    Checks `IUsernamePassword` (PLAIN, LOGIN) and `IUsernameHashedPassword` (CRAM-MD5, which needs the password in
    the clear, as this file has it). The avatar id is the user name as bytes. Raises `PasswordFileError` at once if
    ``path`` cannot be used.
    """

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)
    log = Logger()

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path
        self._users = read_passwords(path)

    @property
    def users(self) -> frozenset[bytes]:
        """The user names logins are checked against now (never the passwords)."""
        return frozenset(self._users)

    def reload(self) -> None:
        """Re-read the file and use it for every later login; if it is unusable, raise `PasswordFileError` and keep
        the table in use.
        """
        users = read_passwords(self.path)
        self._users = users
        self.log.info("AUTH password file reloaded: {count} users", count=len(users), path=os.fspath(self.path))

    def requestAvatarId(self, credentials: Any) -> "defer.Deferred[bytes]":
        """Fire with the user name if the password is right, else fail with `UnauthorizedLogin`."""
        username = _bytes(credentials.username)
        stored = self._users.get(username)
        if stored is None:
            return defer.fail(UnauthorizedLogin())
        if IUsernamePassword.providedBy(credentials):
            checked: defer.Deferred[Any] = defer.succeed(hmac.compare_digest(_bytes(credentials.password), stored))
        else:
            checked = defer.maybeDeferred(credentials.checkPassword, stored)
        return checked.addCallback(_matched, username)


def _matched(matched: Any, username: bytes) -> bytes:
    if not matched:
        raise UnauthorizedLogin()
    return username


def _plain_file_database(checker: Any) -> bool:
    """True for a ``FilePasswordDB`` with the settings ``--auth file:`` gives it (``user:password``, clear text)."""
    return (type(checker) is FilePasswordDB and checker.hash is None and checker.delim == b":"
            and (checker.ufield, checker.pfield) == (0, 1) and bool(checker.caseSensitive))


def replace_file_databases(checkers: Iterable[ICredentialsChecker]) -> list[ICredentialsChecker]:
    """``checkers`` with each plain ``FilePasswordDB`` (what ``--auth file:PATH`` makes) replaced by a `PasswordFile`
    on the same file. Raises `PasswordFileError` if such a file cannot be used.
    """
    return [PasswordFile(c.filename) if _plain_file_database(c) else c for c in checkers]  # type: ignore[attr-defined]


def password_files(portal: Portal) -> list[PasswordFile]:
    """The `PasswordFile` checkers ``portal`` uses, each once, for ``kill -HUP`` to reload."""
    found: list[PasswordFile] = []
    for checker in portal.checkers.values():
        if isinstance(checker, PasswordFile) and not any(checker is f for f in found):
            found.append(checker)
    return found
