"""Base classes for filters: `FilterSession` answers CONTINUE at every stage, and `MessageFilter` is a filter
that only looks at the whole message (rspamd, clamd, spamd): it implements `check` and nothing else."""

from __future__ import annotations

from typing import Any, Mapping

from zope.interface import implementer

from esmtpkit.core.session import Session
from esmtpkit.filters.interfaces import HeldMessage, IFilter, IFilterSession, VerdictResult
from esmtpkit.filters.verdict import CONTINUE, Action

__all__ = ["FilterSession", "MessageFilter", "parse_failure"]


def parse_failure(value: str | Action | None) -> Action | None:
    """``tempfail`` or ``accept`` (or the Action) as the Action a failed filter counts as; None stays None."""
    if value is None or isinstance(value, Action):
        if value not in (None, Action.TEMPFAIL, Action.ACCEPT):
            raise ValueError(f"a failed filter counts as tempfail or accept, not {value.value}")  # type: ignore
        return value
    try:
        action = Action(value.strip().lower())
    except ValueError:
        action = None
    if action not in (Action.TEMPFAIL, Action.ACCEPT):
        raise ValueError(f"a failed filter counts as tempfail or accept, not {value!r}")
    return action


@implementer(IFilterSession)
class FilterSession:
    """Answers CONTINUE at every stage; subclasses override the stages they use. ``session`` is the connection's."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def connect(self) -> VerdictResult:
        return CONTINUE

    def helo(self, name: str) -> VerdictResult:
        return CONTINUE

    def mail(self, sender: str, params: Mapping[str, Any]) -> VerdictResult:
        return CONTINUE

    def rcpt(self, recipient: str, params: Mapping[str, Any]) -> VerdictResult:
        return CONTINUE

    def message(self, message: HeldMessage) -> VerdictResult:
        return CONTINUE

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass


class _MessageOnly(FilterSession):
    def __init__(self, session: Session, owner: "MessageFilter") -> None:
        super().__init__(session)
        self.owner = owner

    def message(self, message: HeldMessage) -> VerdictResult:
        return self.owner.check(message)


@implementer(IFilter)
class MessageFilter:
    """A filter that looks only at whole messages: subclasses implement `check`. ``timeout`` and
    ``on_failure`` (``"tempfail"`` or ``"accept"``) override the chain's for this filter."""

    name = "filter"
    #: Keeps nothing between messages: asked afresh after a failure (see `esmtpkit.filters.chain`).
    stateless = True

    def __init__(self, *, name: str | None = None, timeout: float | None = None,
                 on_failure: str | Action | None = None) -> None:
        if name is not None:
            self.name = name
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout is a number of seconds above 0")
        self.timeout = timeout
        self.on_failure = parse_failure(on_failure)

    def start(self, session: Session) -> IFilterSession:
        return _MessageOnly(session, self)

    def check(self, message: HeldMessage) -> VerdictResult:
        """The verdict on ``message`` (a Deferred of one when it asks a server)."""
        raise NotImplementedError
