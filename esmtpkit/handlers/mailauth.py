"""`MailAuthFront`: SPF, DKIM, ARC and DMARC checks in front of any handler.

SPF runs at MAIL FROM (MAIL waits for it only with ``spf_reject``); DKIM, ARC and DMARC run once the whole
message is in. The verdicts go on ``session.envelope.auth`` (an `esmtpkit.mailauth.AuthVerdicts`) before the
handler behind sees the message, and an ``Authentication-Results:`` field (RFC 8601) goes on top of it, so a
handler that stores the message (Maildir, Queue, AMQP) stores the verdicts with it. Fields that claim to be this
server's own results are removed first (RFC 8601 §5) from the whole header section, however long (`Front` reads
it a field at a time as it passes the message on), so a sender cannot forge them.
Use it as ``Policy(fronts=[mail_auth_front(MailAuth(...))])`` or ``twistd esmtpkit --verify all``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from twisted.internet.defer import Deferred

from esmtpkit.core.address import Address
from esmtpkit.handlers.front import Decision, Front, _settled
from esmtpkit.mailauth.checks import MailAuth
from esmtpkit.mailauth.verdicts import AuthVerdicts

__all__ = ["MailAuthFront", "mail_auth_front", "claims_to_be"]


def claims_to_be(authserv_id: str) -> Callable[[bytes, bytes], bool]:
    """Picks the ``Authentication-Results:`` fields that name ``authserv_id`` as their author (any case)."""
    ours = authserv_id.lower().encode("ascii", "replace")

    def picks(name: bytes, value: bytes) -> bool:
        return name.lower() == b"authentication-results" and _author(value).lower() == ours

    return picks


def _author(value: bytes) -> bytes:
    """The authserv-id an ``Authentication-Results:`` value starts with (RFC 8601 §2.2): comments before it are
    skipped (they nest, and may hold ``;`` or quoted pairs), a quoted-string is unquoted."""
    i, end = 0, len(value)
    while i < end:
        c = value[i]
        if c in b" \t\r\n":
            i += 1
        elif c == ord("("):
            depth = 0
            while i < end:
                c = value[i]
                i += 2 if c == ord("\\") else 1
                depth += (c == ord("(")) - (c == ord(")"))
                if depth == 0:
                    break
        else:
            break
    if value[i:i + 1] == b'"':
        word = bytearray()
        i += 1
        while i < end and value[i] != ord('"'):
            i += 1 if value[i] == ord("\\") else 0
            word += value[i:i + 1]
            i += 1
        return bytes(word)
    start = i
    while i < end and value[i] not in b" \t\r\n;(":
        i += 1
    return value[start:i]


class MailAuthFront(Front):
    """``behind`` with ``checks`` (a `MailAuth`) in front of it. See the module docstring."""

    def __init__(self, behind: Any, checks: MailAuth) -> None:
        super().__init__(behind, getattr(checks, "reactor", None))
        self.checks = checks
        self._sender: Deferred[AuthVerdicts] | None = None
        self._verdicts: AuthVerdicts | None = None
        self._remove = claims_to_be(checks.authserv_id)

    def mail(self, sender: Address, params: Mapping[str, Any]) -> Any:
        self._verdicts = None
        checking = self.checks.check_sender(self.session, str(sender))  # type: ignore[arg-type]
        if not self.checks.spf_reject:
            self._sender = checking
            checking.addCallback(self._kept, checking)
            return self.behind.mail(sender, params)

        async def checked() -> Any:
            verdicts = self._kept(await checking)
            refusal = self.checks.refusal_at_mail(verdicts)
            if refusal is not None:
                return refusal
            return await _settled(self.behind.mail(sender, params))

        self._sender = None
        return Deferred.fromCoroutine(checked())

    def _kept(self, verdicts: AuthVerdicts, checking: "Deferred[AuthVerdicts] | None" = None) -> AuthVerdicts:
        if checking is not None and checking is not self._sender:
            return verdicts  # an earlier transaction's check, answering after RSET and a new MAIL
        self._verdicts = verdicts
        envelope = self.session.envelope  # type: ignore[union-attr]
        if envelope.sender is not None and envelope.auth is None:
            envelope.auth = verdicts
        return verdicts

    def rcpt(self, recipient: Address, params: Mapping[str, Any]) -> Any:
        envelope = self.session.envelope  # type: ignore[union-attr]
        if envelope.auth is None and self._verdicts is not None:
            envelope.auth = self._verdicts
        return self.behind.rcpt(recipient, params)

    def aborted(self, reason: str) -> None:
        self._sender, self._verdicts = None, None

    def decide(self) -> "Deferred[Decision]":
        return Deferred.fromCoroutine(self._decide())

    async def _decide(self) -> Decision:
        session = self.session
        checks = self.checks
        if self._verdicts is not None:
            verdicts = self._verdicts
        elif self._sender is not None:
            verdicts = await self._sender
        else:
            verdicts = AuthVerdicts(remote_ip=session.peer_ip)  # type: ignore[union-attr]
        self._sender = None
        verdicts = await checks.check_message(session, verdicts, self.head, self.open_held)  # type: ignore
        session.envelope.auth = verdicts  # type: ignore[union-attr]
        refusal = checks.refusal_at_end(verdicts)
        if refusal is not None:
            return Decision(refusal)
        return Decision(add=[verdicts.field(checks.authserv_id)], remove=self._remove)


def mail_auth_front(checks: MailAuth) -> Callable[[Any], MailAuthFront]:
    """For `Policy.fronts`: puts ``checks`` in front of each connection's handler."""
    def front(behind: Any) -> MailAuthFront:
        return MailAuthFront(behind, checks)

    return front
