"""`FilterFront`: a `FilterChain` (rspamd, clamd, spamd, milters, your own) in front of any handler.

Each verb is shown to the filters first, then passed to the handler behind: connect, HELO/EHLO, MAIL and RCPT
as they come; the message at the end of data, held by the `Front` (memory, then a temporary file) and streamed
to each filter. What the filters answer:

- REJECT / TEMPFAIL: that reply goes to the client for that verb (a refused connection gets ``554``, and every
  later command ``503``; a deferred one ``421``, and it closes; a HELO refused gets the filter's reply and every
  later command ``554``, a HELO deferred ``421``, and it closes); the handler behind never sees the verb, or the
  end of that message (it is told ``abort``);
- DISCARD: the client is told the message was accepted, the handler behind is told ``abort`` and nothing is
  delivered (at connect or HELO: every message of the connection; at RCPT: the whole message);
- QUARANTINE: the message goes on with ``envelope.quarantine`` set to the reason, to a handler that keeps such
  messages apart (it says so with ``quarantines = True``: Maildir, Queue); any other refuses it (``550 5.7.1``),
  since passing it on would deliver it as if nothing had been found;
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
#: Every command after a filter refused the client at HELO (as after a refused connection).
SERVICE_REFUSED = Reply.of(554, "Service refused by a message filter", enhanced="5.7.1")
#: A quarantined message, when the handler behind cannot keep it apart (it has no ``quarantines = True``).
CANNOT_QUARANTINE = Reply.of(550, "Message refused: a filter quarantined it and it cannot be held here",
                             enhanced="5.7.1")


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
        self._refused = False  # a filter refused the client at HELO: nothing more is taken
        self._client: Any = None  # who the filters were told connected (peer, name, login)
        self._deciding: Deferred[Decision] | None = None

    # ---- the conversation ---------------------------------------------------------------------------------------

    def connect(self, session: Session) -> Any:
        self.session = session

        async def run() -> Any:
            refusal = await self._connected()
            if refusal is not None:
                return refusal
            return await _settled(self.behind.connect(session))

        return Deferred.fromCoroutine(run())

    async def _connected(self) -> Reply | None:
        """A new chain session for the client the session names, and its connect stage: the refusal, if any."""
        session = self.session
        self._client = (session.peer, session.client_name, session.authenticated)  # type: ignore[union-attr]
        self.filters = self.chain.start(session)  # type: ignore[arg-type]
        verdict = await self.filters.stage("connect")
        return self._connection_verdict(verdict)

    async def _client_replaced(self) -> Reply | None:
        """XCLIENT named another client (the session's peer, name or login changed since connect): what the
        filters said of the proxy does not hold for it, so they start over, with this client's connect stage."""
        session = self.session
        if (session.peer, session.client_name, session.authenticated) == self._client:  # type: ignore[union-attr]
            return None
        if self.filters is not None:
            self.filters.close()
        self._discard_all, self._quarantine_all, self._refused = False, None, False
        refusal = await self._connected()
        if refusal is not None:
            self._refused = True  # as after a refused HELO: every later command is refused
            return SERVICE_REFUSED if refusal.code != 421 else refusal
        return None

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
        if self._refused:
            return SERVICE_REFUSED

        async def run() -> Any:
            replaced = await self._client_replaced()
            if replaced is not None:
                return replaced
            verdict = await self.filters.stage("helo", domain)  # type: ignore[union-attr]
            if verdict.action is Action.TEMPFAIL:
                return CONNECTION_DEFERRED  # 421: the connection closes (a new HELO name would not change it)
            if verdict.action is Action.REJECT:
                self._refused = True  # nor would another HELO name: the client is refused from now on
                return _reply(verdict)
            if verdict.action is Action.DISCARD:
                self._discard_all = True
            elif verdict.action is Action.QUARANTINE:
                self._quarantine_all = verdict.reason or "quarantined by a filter"
            return await _settled(passed(domain))

        return Deferred.fromCoroutine(run())

    def mail(self, sender: Address, params: Mapping[str, Any]) -> Any:
        self._end_transaction()
        if self._refused:
            return SERVICE_REFUSED

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
        if self._refused:
            return SERVICE_REFUSED

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
        self.lost = True  # first: a cancelled decision must find the message going no further (see Front)
        deciding, self._deciding = self._deciding, None
        if deciding is not None:
            deciding.cancel()
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
        deciding = self._deciding = Deferred.fromCoroutine(self._decide())

        def done(result: Any) -> Any:
            if self._deciding is deciding:
                self._deciding = None
            return result

        return deciding.addBoth(done)

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
            if not getattr(self.behind, "quarantines", False):
                return Decision(CANNOT_QUARANTINE)
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
