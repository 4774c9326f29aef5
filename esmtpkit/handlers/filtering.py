"""`FilterFront`: a `FilterChain` (rspamd, clamd, spamd, milters, your own) in front of any handler.

Each verb is shown to the filters first, then passed to the handler behind: connect, HELO/EHLO, MAIL and RCPT
as they come; the message at the end of data, held by the `Front` (memory, then a temporary file) and streamed
to each filter. What the filters answer:

- REJECT / TEMPFAIL: that reply goes to the client for that verb (a refused connection gets ``554``, and every
  later command ``503``; a deferred one ``421``, and it closes); the handler behind never sees the verb, or the
  end of that message (it is told ``abort``);
- DISCARD: the client is told the message was accepted, the handler behind is told ``abort`` and nothing is
  delivered (at connect or HELO: every message of the connection; at RCPT: the whole message);
- QUARANTINE: the message goes on with ``envelope.quarantine`` set to the reason;
- header edits are made as the message is passed on.

A filter that is down or too slow counts as its ``on_failure`` outcome (`esmtpkit.filters.chain`): by default a
``451 4.7.1``, so the client keeps the message and tries again; nothing is lost either way.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from twisted.internet.defer import Deferred

from esmtpkit.core.address import Address
from esmtpkit.core.reply import Reply, coerce
from esmtpkit.core.session import Session
from esmtpkit.filters.chain import ChainSession, FilterChain
from esmtpkit.filters.interfaces import HeldMessage
from esmtpkit.filters.verdict import Action, Verdict
from esmtpkit.handlers.front import Decision, Front, _settled

__all__ = ["FilterFront", "filter_front", "REFUSED", "DEFERRED", "DISCARDED"]

#: The defaults when a filter refuses without a reply of its own.
REFUSED = Reply.of(550, "Refused by a message filter", enhanced="5.7.1")
DEFERRED = Reply.of(451, "Deferred by a message filter, try again later", enhanced="4.7.1")
#: What the client hears for a discarded message: it was taken (and dropped on purpose).
DISCARDED = Reply.of(250, "Ok: message accepted", enhanced="2.0.0")
#: A refused connection: every later command but QUIT gets 503 (`IMessageHandler.connect`).
CONNECTION_REFUSED = Reply.of(554, "Service refused by a message filter", enhanced="5.7.1")
CONNECTION_DEFERRED = Reply.of(421, "Service deferred by a message filter, try again later", enhanced="4.7.1")


def _reply(verdict: Verdict) -> Reply:
    """The reply for a REJECT or TEMPFAIL verdict: its own, if it is of the right class, else the default."""
    reply = verdict.reply
    if verdict.action is Action.REJECT:
        return reply if reply is not None and 500 <= reply.code < 600 else REFUSED
    return reply if reply is not None and 400 <= reply.code < 500 else DEFERRED


class FilterFront(Front):
    """``behind`` with ``chain`` (a `FilterChain`) in front of it. See the module docstring."""

    def __init__(self, behind: Any, chain: FilterChain) -> None:
        super().__init__(behind, chain.reactor)
        self.chain = chain
        self.filters: ChainSession | None = None
        self._discard_all = False
        self._quarantine_all: str | None = None
        self._discard = False
        self._quarantine: str | None = None
        self._open = False  # the filters have seen MAIL of a transaction not yet ended

    # ---- the conversation ---------------------------------------------------------------------------------------

    def connect(self, session: Session) -> Any:
        self.session = session
        self.filters = self.chain.start(session)

        async def run() -> Any:
            verdict = await self.filters.stage("connect")  # type: ignore[union-attr]
            refusal = self._connection_verdict(verdict)
            if refusal is not None:
                return refusal
            return await _settled(self.behind.connect(session))

        return Deferred.fromCoroutine(run())

    def _connection_verdict(self, verdict: Verdict) -> Reply | None:
        """A verdict at connect or HELO: the reply that refuses, else None (DISCARD and QUARANTINE then hold for
        every message of the connection)."""
        if verdict.action is Action.REJECT:
            return CONNECTION_REFUSED
        if verdict.action is Action.TEMPFAIL:
            return CONNECTION_DEFERRED
        if verdict.action is Action.DISCARD:
            self._discard_all = True
        elif verdict.action is Action.QUARANTINE:
            self._quarantine_all = verdict.reason or "quarantined by a filter"
        return None

    def helo(self, domain: str) -> Any:
        return self._greeted(domain, self.behind.helo)

    def ehlo(self, domain: str) -> Any:
        return self._greeted(domain, self.behind.ehlo)

    def _greeted(self, domain: str, passed: Callable[[str], Any]) -> Any:
        self._end_transaction()

        async def run() -> Any:
            verdict = await self.filters.stage("helo", domain)  # type: ignore[union-attr]
            if verdict.final and verdict.action is not Action.DISCARD:
                return _reply(verdict)
            if verdict.action is Action.DISCARD:
                self._discard_all = True
            elif verdict.action is Action.QUARANTINE:
                self._quarantine_all = verdict.reason or "quarantined by a filter"
            return await _settled(passed(domain))

        return Deferred.fromCoroutine(run())

    def mail(self, sender: Address, params: Mapping[str, Any]) -> Any:
        self._end_transaction()

        async def run() -> Any:
            self._open = True
            verdict = await self.filters.stage("mail", str(sender), params)  # type: ignore[union-attr]
            if verdict.action in (Action.REJECT, Action.TEMPFAIL):
                self._end_transaction()
                return _reply(verdict)
            self._note(verdict)
            reply = await _settled(self.behind.mail(sender, params))
            if _negative(reply):
                self._end_transaction()
            return reply

        return Deferred.fromCoroutine(run())

    def rcpt(self, recipient: Address, params: Mapping[str, Any]) -> Any:
        async def run() -> Any:
            verdict = await self.filters.stage("rcpt", str(recipient), params)  # type: ignore[union-attr]
            if verdict.action in (Action.REJECT, Action.TEMPFAIL):
                return _reply(verdict)
            self._note(verdict)
            return await _settled(self.behind.rcpt(recipient, params))

        return Deferred.fromCoroutine(run())

    def _note(self, verdict: Verdict) -> None:
        if verdict.action is Action.DISCARD:
            self._discard = True
        elif verdict.action is Action.QUARANTINE and self._quarantine is None:
            self._quarantine = verdict.reason or "quarantined by a filter"

    def aborted(self, reason: str) -> None:
        self._end_transaction()

    def connection_lost(self) -> None:
        self._end_transaction()
        if self.filters is not None:
            self.filters.close()
        super().connection_lost()

    def _end_transaction(self) -> None:
        self._discard, self._quarantine = False, None
        if self._open and self.filters is not None:
            self._open = False
            self.filters.reset()

    # ---- the end of data ----------------------------------------------------------------------------------------

    def decide(self) -> "Deferred[Decision]":
        return Deferred.fromCoroutine(self._decide())

    async def _decide(self) -> Decision:
        session = self.session
        message = HeldMessage(session, self.head, self.held_size, self.open_held)  # type: ignore[arg-type]
        try:
            verdict = await self.filters.stage("message", message)  # type: ignore[union-attr]
        finally:
            discard, quarantine = self._discard or self._discard_all, self._quarantine or self._quarantine_all
            self._end_transaction()
        if verdict.action in (Action.REJECT, Action.TEMPFAIL):
            return Decision(_reply(verdict))
        if discard or verdict.action is Action.DISCARD:
            return Decision(DISCARDED)
        if verdict.action is Action.QUARANTINE:
            quarantine = quarantine or verdict.reason or "quarantined by a filter"
        if quarantine is not None:
            session.envelope.quarantine = quarantine  # type: ignore[union-attr]
        return Decision(edits=verdict.edits)


def _negative(reply: Any) -> bool:
    """Whether the handler behind refused (None is its default, a positive reply)."""
    if reply is None:
        return False
    try:
        return coerce(reply).code >= 400
    except TypeError:
        return True


def filter_front(chain: FilterChain) -> Callable[[Any], FilterFront]:
    """For `Policy.fronts`: puts ``chain`` in front of each connection's handler."""
    def front(behind: Any) -> FilterFront:
        return FilterFront(behind, chain)

    return front
