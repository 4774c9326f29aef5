"""`FilterChain`: the filters in order, each stage bounded in time, a failed filter counted as configured.

At each stage the filters are asked one after the other. The first REJECT, TEMPFAIL or DISCARD ends the stage
with that verdict; ACCEPT takes that filter out of the rest of the message (of the connection, at connect or HELO; the others still
look); QUARANTINE
is remembered and the filters go on; header edits are collected in filter order and applied together at the end
of data (every filter sees the message as the client sent it). A filter that raises, answers something that is
not a `Verdict`, or takes longer than its timeout counts as its ``on_failure`` outcome: TEMPFAIL (the default:
``451 4.7.1``, nothing lost, the client tries again) or ACCEPT (the message goes on unfiltered by it). A filter
with a session of its own (a milter) is left out of the rest of the connection once it failed, with the same
outcome; one that keeps nothing between messages (`stateless`) is asked afresh each time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger

from esmtpkit.core.session import Session
from esmtpkit.filters.base import parse_failure
from esmtpkit.filters.interfaces import IFilter, IFilterSession
from esmtpkit.filters.verdict import CONTINUE, FILTER_FAILED, Action, HeaderEdit, Verdict
from esmtpkit.server.monitor import EventLog, Monitor, guarded

__all__ = ["FilterChain", "ChainSession", "DEFAULT_TIMEOUT"]

#: Seconds one stage of one filter may take, unless the filter says otherwise.
DEFAULT_TIMEOUT = 60.0


class FilterChain:
    """``filters`` (`IFilter` providers) run in this order. ``timeout`` and ``on_failure`` apply to those that do
    not set their own; ``monitor`` hears every verdict (`Monitor.filtered`)."""

    log = Logger()

    def __init__(self, filters: Sequence[Any], *, timeout: float = DEFAULT_TIMEOUT,
                 on_failure: str | Action = Action.TEMPFAIL, reactor: Any = None,
                 monitor: Monitor | None = None) -> None:
        if not timeout > 0:
            raise ValueError("timeout is a number of seconds above 0")
        for one in filters:
            if not IFilter.providedBy(one):
                raise TypeError(f"{one!r} is not a filter (it does not provide IFilter)")
        self.filters = tuple(filters)
        self.timeout = timeout
        self.on_failure = parse_failure(on_failure)
        self._reactor = reactor
        self.monitor = guarded(monitor if monitor is not None else EventLog())

    @property
    def reactor(self) -> Any:
        """The reactor the timeouts run on: the one given, else the global one, imported at first use (so that
        making a chain, as parsing options does, installs no reactor)."""
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    @property
    def names(self) -> tuple[str, ...]:
        """The filters' names, in order."""
        return tuple(f.name for f in self.filters)

    def start(self, session: Session) -> "ChainSession":
        """The chain's view of one connection."""
        return ChainSession(self, session)


@dataclass
class _Member:
    filter: Any
    session: IFilterSession
    timeout: float
    on_failure: Action
    stateless: bool
    accepted: bool = False  # ACCEPT for this transaction
    done: bool = False  # ACCEPT at connect or HELO: for the whole connection
    broken: bool = False
    closed: bool = False


def _expected(error: Exception) -> bool:
    """Whether ``error`` is a filter's ordinary trouble (down, slow, a broken answer), not a bug to trace."""
    if isinstance(error, TimeoutError):
        return True
    module = type(error).__module__
    return module.startswith(("twisted.internet.error", "twisted.web", "esmtpkit.filters", "twisted.internet.defer"))


class ChainSession:
    """Runs the chain's stages for one connection; see the module docstring."""

    def __init__(self, chain: FilterChain, session: Session) -> None:
        self.chain = chain
        self.session = session
        #: Set by `close`: the connection ended.
        self.closed = False
        self.members = [_Member(f, f.start(session), f.timeout or chain.timeout,
                                f.on_failure or chain.on_failure, bool(getattr(f, "stateless", False)))
                        for f in chain.filters]

    async def stage(self, stage: str, *args: Any) -> Verdict:
        """Ask every filter still looking about ``stage`` (`IFilterSession`'s method of that name) with ``args``:
        the combined verdict (its ``edits`` are every filter's, in order)."""
        edits: list[HeaderEdit] = []
        quarantine: Verdict | None = None
        for member in self.members:
            if self.closed:
                break  # called off (the connection ended): no filter after it is asked
            if member.accepted or member.done:
                continue
            verdict = await self._ask(member, stage, args)
            edits.extend(verdict.edits)
            if verdict.final:
                return replace(verdict, edits=tuple(edits))
            if verdict.action is Action.ACCEPT:
                if stage in ("connect", "helo"):
                    member.done = True
                else:
                    member.accepted = True
            elif verdict.action is Action.QUARANTINE and quarantine is None:
                quarantine = verdict
        if quarantine is not None:
            return replace(quarantine, edits=tuple(edits))
        return Verdict(edits=tuple(edits)) if edits else CONTINUE

    async def _ask(self, member: _Member, stage: str, args: tuple[Any, ...]) -> Verdict:
        started = time.monotonic()
        name = member.filter.name
        if member.broken:
            verdict = self._failed(member)
        else:
            d: Deferred[Any] = maybeDeferred(getattr(member.session, stage), *args)
            d.addTimeout(member.timeout, self.chain.reactor)
            try:
                verdict = await d
                if not isinstance(verdict, Verdict):
                    raise TypeError(f"{stage} answered {verdict!r}, not a Verdict")
            except CancelledError:  # not its timeout (that is a TimeoutError): the stage was called off
                if not member.stateless:
                    member.broken = True
                    self._close(member)
                verdict = self._failed(member, "called off: the client went away")
            except Exception as e:
                if _expected(e):  # the documented outcomes of a filter that is down or slow: one line
                    self.chain.log.warn("filter {name} failed at {stage}: {error}", name=name, stage=stage,
                                        error=f"{type(e).__name__}: {e}"[:300])
                else:
                    self.chain.log.failure("filter {name} failed at {stage}", name=name, stage=stage)
                if not member.stateless:
                    member.broken = True
                    self._close(member)
                verdict = self._failed(member, f"{type(e).__name__}: {e}"[:200])
        self.chain.monitor.filtered(self.session, name, stage, verdict.action.value, time.monotonic() - started,
                                    verdict.reason)
        return verdict

    @staticmethod
    def _failed(member: _Member, why: str = "failed earlier in this connection") -> Verdict:
        if member.on_failure is Action.ACCEPT:
            return Verdict(Action.CONTINUE, reason=f"filter unavailable: {why}")
        return Verdict(Action.TEMPFAIL, FILTER_FAILED, reason=f"filter unavailable: {why}")

    def reset(self) -> None:
        """The transaction ended: every filter forgets its envelope (and its ACCEPT for it)."""
        for member in self.members:
            member.accepted = False
            if not member.broken:
                try:
                    member.session.reset()
                except Exception:
                    self.chain.log.failure("filter {name} failed to reset", name=member.filter.name)

    def close(self) -> None:
        """The connection ended: every filter releases what it holds, and no stage asks any more."""
        self.closed = True
        for member in self.members:
            self._close(member)

    def _close(self, member: _Member) -> None:
        if member.closed:
            return
        member.closed = True
        try:
            member.session.close()
        except Exception:
            self.chain.log.failure("filter {name} failed to close", name=member.filter.name)
