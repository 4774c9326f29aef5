"""The step queue: handler calls run one at a time, in order, and reading pauses while one is pending.

A step is a callable that may return a Deferred (a handler result still to come). While one is pending nothing
more is read from the client and no timer runs, so replies stay in order under pipelining and a slow handler
never makes the server buffer a message (`esmtpkit.server.protocol` mixes this in).
"""

from __future__ import annotations

from types import CoroutineType
from typing import Any, Callable, Final

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from esmtpkit.core.reply import Reply, SMTPReply, coerce
from esmtpkit.server.replies import HANDLER_ERROR

__all__ = ["Steps", "Step"]

Step = Callable[[], "Deferred[Any] | None"]

#: Enhanced codes for handler replies that give none, where the verb makes the meaning clear (RFC 3463 §3.2).
_VERB_ENHANCED: Final = {
    ("mail", 250): "2.1.0",
    ("rcpt", 250): "2.1.5",
    ("rcpt", 251): "2.1.5",
    ("rcpt", 550): "5.1.1",
    ("rcpt", 450): "4.2.0",
    ("rcpt", 551): "5.1.6",
    ("rcpt", 553): "5.1.3",
    ("mail", 553): "5.1.7",
}


class Steps:
    """Mixin: the queue of steps and the calls into the handler (see the module docstring)."""

    log = Logger()
    __slots__ = ()

    # The protocol provides these, and _update_reading, _cancel_timer, _reset_timer, _now, _close and _gone.
    _todo: list[Step]
    _waiting: bool
    monitor: Any

    def _schedule(self, *steps: Step) -> None:
        self._todo[:0] = steps[::-1]  # after everything already queued (the list is kept in reverse)
        if not self._waiting:
            self._drive()

    def _drive(self) -> None:
        while self._todo and not self._waiting and not self._gone:
            pending = self._todo.pop()()
            if pending is not None:
                self._wait_for(pending)
                return

    def _wait_for(self, pending: "Deferred[Any]") -> None:
        """A handler result is pending: read nothing more (and run no timer) until it comes."""
        self._waiting = True
        self._update_reading()
        self._cancel_timer()
        pending.addBoth(self._resume)

    def _resume(self, _: object) -> None:
        self._waiting = False
        if self._gone:
            return
        self._drive()
        if not self._waiting and not self._gone:
            self._reset_timer()
            self._update_reading()

    def _call(self, method: Callable[..., Any], args: tuple[Any, ...],
              then: Callable[[Any], None]) -> "Deferred[Any] | None":
        """Call a handler method; give ``then`` its result (a value, or a Failure). Return a Deferred if pending."""
        if self.monitor.timing:
            then = self._timed(method, then)
        try:
            result = method(*args)
            # Most results are a Reply (or None) at once: skip the type tests (Deferred's is an ABC check).
            if type(result) is not Reply and result is not None and isinstance(result, CoroutineType):
                result = Deferred.fromCoroutine(result)
        except Exception:
            then(Failure())
            return None
        if type(result) is Reply or result is None or not isinstance(result, Deferred):
            then(result)
            return None
        box: list[Any] = []
        result.addBoth(box.append)
        if box:
            then(box[0])
            return None
        done: Deferred[Any] = Deferred()

        def fired(_: object) -> None:
            try:
                then(box[0])
            except Exception:
                self.log.failure("internal error after a handler result")
                self._close("internal error")
            finally:
                done.callback(None)

        result.addBoth(fired)
        return done

    def _timed(self, method: Callable[..., Any], then: Callable[[Any], None]) -> Callable[[Any], None]:
        """Wrap ``then`` to tell the monitor how long the handler took to give its result."""
        name, start = getattr(method, "__name__", "handler"), self._now()

        def timed(value: Any) -> None:
            self.monitor.handled(name, self._now() - start)
            then(value)

        return timed

    def _reply_from(self, value: Any, what: str) -> Reply:
        """Turn a handler result (value or Failure) into a Reply; unexpected errors become 451 4.3.0 and a log."""
        if type(value) is Reply:  # the usual result, tested first: no coerce() call
            reply = value
        elif isinstance(value, Failure):
            if not value.check(SMTPReply):
                self.log.failure("handler {what} failed", value, what=what)
                return HANDLER_ERROR
            reply = value.value.reply
        else:
            try:
                reply = coerce(value)
            except (TypeError, ValueError):
                self.log.error("handler {what} returned {value!r}, not a reply", what=what, value=value)
                return HANDLER_ERROR
        if reply.enhanced is None and (what, reply.code) in _VERB_ENHANCED:
            return Reply(reply.code, reply.lines, _VERB_ENHANCED[what, reply.code])
        return reply
