"""AUTH (RFC 4954): server-side SASL mechanisms as small state machines that end in twisted.cred credentials.

A mechanism knows nothing of the connection. The protocol starts it with the AUTH command's initial response,
writes each `Challenge` (a 334 line), feeds it the client's next line, and stops at `Ready` (credentials to check
with `authenticate`) or `Failed` (a reply to send). Mechanisms: PLAIN (RFC 4616), LOGIN (draft-murchison-sasl-login)
and CRAM-MD5 (RFC 2195). Passwords never reach a log or a repr.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Final, Iterable, Mapping, Union

from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import CramMD5Credentials, IUsernameHashedPassword, IUsernamePassword, UsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.cred.strcred import makeChecker
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from esmtpkit.core.commands import CommandError
from esmtpkit.core.mechanisms import CRAM_MD5, DEFAULT_ORDER, LOGIN, PLAIN
from esmtpkit.core.reply import Reply, SMTPReply
# The refusals that decide whether AUTH may run at all belong to the rule book; they are re-exported here.
from esmtpkit.core.rules import AUTH_ALREADY_DONE, AUTH_ENCRYPTION_REQUIRED, AUTH_REQUIRED

__all__ = [
    "AUTH_SUCCEEDED", "AUTH_FAILED", "AUTH_ENCRYPTION_REQUIRED", "AUTH_REQUIRED", "AUTH_MECHANISM_UNKNOWN",
    "AUTH_ALREADY_DONE", "AUTH_CANCELLED", "AUTH_BAD_BASE64", "AUTH_MALFORMED", "AUTH_NO_INITIAL_RESPONSE",
    "AUTH_SYNTAX", "AUTH_TEMPORARY_FAILURE", "AUTH_LINE_TOO_LONG",
    "Challenge", "Ready", "Failed", "Step", "Mechanism", "Plain", "Login", "CramMD5", "MECHANISMS",
    "DEFAULT_ORDER", "SUPPORTED_INTERFACES", "new_mechanism", "mechanisms_for", "parse_auth",
    "Identity", "authenticate", "IAuthenticatedUser", "UsernameRealm", "build_portal", "portal_from_strings",
]

log = Logger()

# ---- replies (RFC 4954 §6, enhanced codes from RFC 3463/RFC 5248) ---------------------------------------------

AUTH_SUCCEEDED: Final = Reply(235, ("Authentication successful",), "2.7.0")
AUTH_FAILED: Final = Reply(535, ("Authentication credentials invalid",), "5.7.8")
AUTH_MECHANISM_UNKNOWN: Final = Reply(504, ("Unrecognized authentication type",), "5.5.4")
AUTH_CANCELLED: Final = Reply(501, ("Authentication cancelled",), "5.7.0")
AUTH_BAD_BASE64: Final = Reply(501, ("Invalid base64 data",), "5.5.2")
AUTH_MALFORMED: Final = Reply(501, ("Malformed authentication response",), "5.5.2")
#: RFC 4954 §4: an initial response to a mechanism where the server speaks first gets 501.
AUTH_NO_INITIAL_RESPONSE: Final = Reply(501, ("This mechanism takes no initial response",), "5.5.4")
AUTH_SYNTAX: Final = Reply(501, ("Syntax: AUTH mechanism [initial-response]",), "5.5.4")
#: RFC 4954 §6: the credentials could not be checked (the checker failed, not the client).
AUTH_TEMPORARY_FAILURE: Final = Reply(454, ("Temporary authentication failure",), "4.7.0")
#: RFC 4954 §4: a response line longer than the server accepts.
AUTH_LINE_TOO_LONG: Final = Reply(500, ("Authentication exchange line is too long",), "5.5.6")


# ---- the steps of an exchange ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``data`` to the client (`wire`) and pass its next line to `Mechanism.respond`."""

    data: bytes = b""

    @property
    def wire(self) -> bytes:
        """``334 <base64 of data>`` CRLF, never with an enhanced code. RFC 4954 §4 puts a space after 334 even
        when the challenge is empty, which `Reply.render` (RFC 5321 §4.2) would leave out: write these bytes.
        """
        return b"334 " + base64.b64encode(self.data) + b"\r\n"


@dataclass(frozen=True, slots=True)
class Ready:
    """The exchange is complete: check ``credentials`` with the portal (see `authenticate`).

    ``authzid`` is the identity the client asked to act as, when it named one other than its own.
    """

    mechanism: str
    credentials: Any = field(repr=False)
    authzid: str | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    """The exchange is over without credentials: send ``reply``."""

    reply: Reply


#: What `Mechanism.start` and `Mechanism.respond` return.
Step = Union[Challenge, Ready, Failed]

#: Decides whether an authenticated user (first argument) may act as another identity (second, the authzid).
Authorizer = Callable[[str, str], bool]


class Mechanism:
    """One SASL exchange on the server side; make a new instance for every AUTH command."""

    #: The name in the EHLO ``AUTH`` line and the AUTH command.
    name: ClassVar[str] = ""
    #: The credentials class this mechanism produces (the portal needs a checker for one of its interfaces).
    credentials_class: ClassVar[type] = UsernamePassword
    #: True when the password itself crosses the wire (only safe under TLS).
    plaintext: ClassVar[bool] = True

    def __init__(self, *, hostname: str = "localhost", authorize: Authorizer | None = None) -> None:
        self.hostname = hostname
        self.authorize = authorize
        self.started = False
        self.done = False

    def start(self, initial: bytes | None) -> Step:
        """Begin with the AUTH command's initial response (base64 text as sent, ``b"="`` for an empty one, None
        when absent).
        """
        if self.started:
            raise RuntimeError(f"the {self.name} exchange has already started")
        self.started = True
        if initial is None:
            return self._finish(self.begin(None))
        data = b"" if initial == b"=" else _decode(initial)
        if data is None:
            return self._finish(Failed(AUTH_BAD_BASE64))
        return self._finish(self.begin(data))

    def respond(self, line: bytes) -> Step:
        """The client's line after a challenge (CRLF removed): base64, or ``*`` to cancel (RFC 4954 §4)."""
        self._check_open()
        if line == b"*":
            return self._finish(Failed(AUTH_CANCELLED))
        data = _decode(line)
        if data is None:
            return self._finish(Failed(AUTH_BAD_BASE64))
        return self._finish(self.step(data))

    def begin(self, data: bytes | None) -> Step:
        """Subclasses: the first step, given the decoded initial response (None when the client sent none)."""
        raise NotImplementedError

    def step(self, data: bytes) -> Step:
        """Subclasses: the next step, given the decoded client response."""
        raise NotImplementedError

    def _check_open(self) -> None:
        if not self.started or self.done:
            raise RuntimeError(f"the {self.name} exchange is not waiting for a response")

    def _finish(self, step: Step) -> Step:
        if not isinstance(step, Challenge):
            self.done = True
        return step


def _decode(line: bytes) -> bytes | None:
    """Strict base64 (RFC 4648 §4, padding required, no whitespace); None when it is not."""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        return None


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class Plain(Mechanism):
    """PLAIN (RFC 4616): one message ``[authzid] NUL authcid NUL passwd``, usually as the initial response.

    An authzid other than the authcid is refused (535) unless ``authorize(authcid, authzid)`` allows it.
    """

    name = PLAIN

    def begin(self, data: bytes | None) -> Step:
        if data is None:
            return Challenge(b"")
        return self.step(data)

    def step(self, data: bytes) -> Step:
        parts = data.split(b"\x00")
        if len(parts) != 3:
            return Failed(AUTH_MALFORMED)
        authzid, authcid, password = (_text(p) for p in parts)
        if authzid is None or authcid is None or password is None or not authcid or not password:
            return Failed(AUTH_MALFORMED)
        if authzid and authzid != authcid:
            if self.authorize is None or not self.authorize(authcid, authzid):
                return Failed(AUTH_FAILED)
            return Ready(self.name, UsernamePassword(parts[1], parts[2]), authzid)
        return Ready(self.name, UsernamePassword(parts[1], parts[2]))


class Login(Mechanism):
    """LOGIN (draft-murchison-sasl-login): ``Username:`` and ``Password:`` challenges, one answer each.

    An initial response, when sent, is the user name.
    """

    name = LOGIN

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._username: bytes | None = None

    def begin(self, data: bytes | None) -> Step:
        if data is None:
            return Challenge(b"Username:")
        return self.step(data)

    def step(self, data: bytes) -> Step:
        if self._username is None:
            if _text(data) is None:
                return Failed(AUTH_MALFORMED)
            self._username = data
            return Challenge(b"Password:")
        return Ready(self.name, UsernamePassword(self._username, data))


_CRAM_RESPONSE: Final = re.compile(rb"(.+) ([0-9a-f]{32})", re.S)


def _default_nonce() -> str:
    return f"{secrets.randbelow(10 ** 12)}.{int(time.time())}"


class CramMD5(Mechanism):
    """CRAM-MD5 (RFC 2195): the server sends ``<nonce@hostname>``; the client answers ``user hex-hmac-md5``.

    The password never crosses the wire, but the checker must know it in the clear (IUsernameHashedPassword).
    ``nonce`` makes the unique part of the challenge (tests pass a fixed one).
    """

    name = CRAM_MD5
    credentials_class = CramMD5Credentials
    plaintext = False

    def __init__(self, *, nonce: Callable[[], str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = CramMD5Credentials(self.hostname)
        self._credentials.challenge = f"<{(nonce or _default_nonce)()}@{self.hostname}>".encode("utf-8")

    def begin(self, data: bytes | None) -> Step:
        if data is not None:
            return Failed(AUTH_NO_INITIAL_RESPONSE)
        return Challenge(self._credentials.challenge)

    def step(self, data: bytes) -> Step:
        match = _CRAM_RESPONSE.fullmatch(data)
        if match is None or _text(match.group(1)) is None:
            return Failed(AUTH_MALFORMED)
        self._credentials.username = match.group(1)
        self._credentials.response = match.group(2)
        return Ready(self.name, self._credentials)


#: Every mechanism esmtpkit implements, by name: `esmtpkit.core.mechanisms.NAMES`, in that order. The default
#: order they are offered in, ``DEFAULT_ORDER``, is `esmtpkit.core.mechanisms.DEFAULT_ORDER` (the same object).
MECHANISMS: Final[Mapping[str, type[Mechanism]]] = {m.name: m for m in (Plain, Login, CramMD5)}

#: Credential interfaces our mechanisms produce (for ``AuthOptionMixin.supportedInterfaces`` in twistd options).
SUPPORTED_INTERFACES: Final = (IUsernamePassword, IUsernameHashedPassword)

_MECHANISM_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,20}\Z")  # RFC 4422 §3.1 sasl-mech, case-insensitive here
_BASE64_ARGUMENT: Final = re.compile(r"(?:[A-Za-z0-9+/]*={0,2}|=)\Z")


def new_mechanism(name: str, *, hostname: str = "localhost", authorize: Authorizer | None = None,
                  offered: Iterable[str] | None = None) -> Mechanism | None:
    """A fresh mechanism for ``name`` (any case), or None if it is unknown or not in ``offered``."""
    name = name.upper()
    if offered is not None and name not in set(offered):
        return None
    cls = MECHANISMS.get(name)
    return None if cls is None else cls(hostname=hostname, authorize=authorize)


def mechanisms_for(portal: Portal, names: Iterable[str] = DEFAULT_ORDER) -> list[str]:
    """The mechanisms among ``names`` whose credentials some checker of ``portal`` can verify, in order.

    CRAM-MD5 needs a checker for IUsernameHashedPassword (it knows the password in the clear); PLAIN and LOGIN
    need one for IUsernamePassword.
    """
    interfaces = portal.listCredentialsInterfaces()
    return [name for name in names
            if name in MECHANISMS and any(i.implementedBy(MECHANISMS[name].credentials_class) for i in interfaces)]


def parse_auth(argument: str) -> tuple[str, bytes | None]:
    """Split the AUTH command's argument into the upper-cased mechanism name and the initial response (RFC 4954
    §4): the base64 text as sent, ``b"="`` for an empty response, None when absent. 501 5.5.4 on bad syntax.
    """
    words = argument.split(" ")
    if not 1 <= len(words) <= 2 or not _MECHANISM_NAME.match(words[0]):
        raise CommandError(AUTH_SYNTAX)
    if len(words) == 1:
        return words[0].upper(), None
    if not words[1] or not _BASE64_ARGUMENT.match(words[1]):
        raise CommandError(AUTH_BAD_BASE64)
    return words[0].upper(), words[1].encode("ascii")


# ---- checking credentials -------------------------------------------------------------------------------------

class IAuthenticatedUser(Interface):
    """What the protocol asks the realm for after AUTH: the avatar is the authenticated user name (a ``str``)."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who authenticated: ``username`` as the realm named them, the mechanism, and an authorized ``authzid``."""

    username: str
    mechanism: str
    authzid: str | None = None
    logout: Callable[[], None] = field(default=lambda: None, repr=False, compare=False)

    @property
    def name(self) -> str:
        """The identity the client acts as: the authzid when one was authorized, else the username."""
        return self.authzid or self.username


def authenticate(portal: Portal, ready: Ready) -> "Deferred[Identity]":
    """Check ``ready.credentials`` with ``portal`` and fire with the `Identity`.

    Fails with `SMTPReply`: 535 5.7.8 for wrong credentials, 454 4.7.0 (logged, without the credentials) when
    the checker or realm broke.
    """

    def succeeded(result: tuple[Any, Any, Callable[[], None]]) -> Identity:
        _, avatar, logout = result
        if not isinstance(avatar, str):
            logout()
            raise TypeError(f"the realm gave a {type(avatar).__name__} avatar for IAuthenticatedUser, not a str")
        return Identity(avatar, ready.mechanism, ready.authzid, logout)

    def failed(failure: Failure) -> Failure:
        if failure.check(cred_error.UnauthorizedLogin, cred_error.LoginDenied):
            return Failure(SMTPReply(AUTH_FAILED))
        if failure.check(cred_error.UnhandledCredentials):
            log.error("AUTH {mechanism}: no checker accepts these credentials", mechanism=ready.mechanism)
            return Failure(SMTPReply(AUTH_FAILED))
        log.failure("AUTH {mechanism}: checking credentials failed", failure, mechanism=ready.mechanism)
        return Failure(SMTPReply(AUTH_TEMPORARY_FAILURE))

    d: Deferred[Any] = maybeDeferred(portal.login, ready.credentials, None, IAuthenticatedUser)
    return d.addCallback(succeeded).addErrback(failed)


@implementer(IRealm)
class UsernameRealm:
    """The simplest realm: the avatar for `IAuthenticatedUser` is the avatar id as text (the user name)."""

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, str, Callable[[], None]]:
        if IAuthenticatedUser not in interfaces:
            raise NotImplementedError("UsernameRealm only provides IAuthenticatedUser")
        name = avatarId.decode("utf-8", "replace") if isinstance(avatarId, bytes) else str(avatarId)
        return IAuthenticatedUser, name, _no_logout


def _no_logout() -> None:
    """Nothing to release for a user name."""


def _bytes(value: Any) -> Any:
    return value.encode("utf-8") if isinstance(value, str) else value


def _normalise(checker: ICredentialsChecker) -> ICredentialsChecker:
    """twistd's ``--auth memory:user:pass`` stores ``str`` names and passwords, but credentials carry bytes (as
    from ``file:``): give such a checker byte keys, in a copy, so both kinds of --auth work.
    """
    if type(checker) is InMemoryUsernamePasswordDatabaseDontUse:
        copy = InMemoryUsernamePasswordDatabaseDontUse()
        for user, password in checker.users.items():
            copy.addUser(_bytes(user), _bytes(password))
        return copy
    return checker


def build_portal(checkers: Iterable[ICredentialsChecker], realm: IRealm | None = None) -> Portal:
    """A Portal over ``checkers`` (e.g. ``options["credCheckers"]`` from ``AuthOptionMixin``) whose avatars are
    user names (`UsernameRealm`) unless another ``realm`` is given.
    """
    return Portal(realm if realm is not None else UsernameRealm(), [_normalise(c) for c in checkers])


def portal_from_strings(descriptions: Iterable[str], realm: IRealm | None = None) -> Portal:
    """A Portal from twistd ``--auth`` strings (``memory:alice:secret``, ``file:/etc/esmtpkit/passwd``, ...).

    ``file:`` passwords are read once, as `esmtpkit.server.authfile.PasswordFile` (``reload()`` re-reads them). Raises
    ``twisted.cred.strcred.StrcredException`` (or ValueError, PasswordFileError) for a description it cannot use.
    """
    from esmtpkit.server.authfile import replace_file_databases

    return build_portal(replace_file_databases([makeChecker(d) for d in descriptions]), realm)
