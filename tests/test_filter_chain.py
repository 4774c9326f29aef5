"""`FilterChain`: the order filters are asked in, what ends a stage, and what a filter that fails or hangs counts
as (with `task.Clock`, no network)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer

from esmtpkit.core.session import Session
from esmtpkit.filters import (CONTINUE, FILTER_FAILED, Action, FilterChain, FilterSession, HeaderEdit, IFilter,
                              MessageFilter, Verdict)
from esmtpkit.core.reply import Reply
from tests.support import Recorder

REJECTED = Reply.of(550, "No", enhanced="5.7.1")


@implementer(IFilter)
class Scripted:
    """A filter answering each stage from ``answers`` (a Verdict, an exception to raise, or a Deferred)."""

    timeout = None
    on_failure = None

    def __init__(self, name: str, **answers: Any) -> None:
        self.name = name
        self.answers = answers
        self.asked: list[str] = []
        self.closed = 0
        self.resets = 0

    def start(self, session: Session) -> Any:
        owner = self

        class One(FilterSession):
            def _answer(self, stage: str) -> Any:
                owner.asked.append(stage)
                answer = owner.answers.get(stage, CONTINUE)
                if isinstance(answer, Exception):
                    raise answer
                return answer

            def connect(self) -> Any:
                return self._answer("connect")

            def mail(self, sender: str, params: Any) -> Any:
                return self._answer("mail")

            def message(self, message: Any) -> Any:
                return self._answer("message")

            def reset(self) -> None:
                owner.resets += 1

            def close(self) -> None:
                owner.closed += 1

        return One(session)


def run(d: Any) -> Any:
    """The result of a coroutine or Deferred that has already fired."""
    results: list[Any] = []
    Deferred.fromCoroutine(d).addBoth(results.append)
    assert results, "not fired yet"
    return results[0]


def chain(*filters: Any, **options: Any) -> tuple[Any, Clock, Recorder]:
    clock = Clock()
    monitor = Recorder()
    made = FilterChain(filters, reactor=clock, monitor=monitor, **options)
    return made.start(Session(hostname="mx.test")), clock, monitor


def test_the_first_refusal_ends_the_stage_and_keeps_the_edits_before_it() -> None:
    first = Scripted("one", message=Verdict(edits=(HeaderEdit("add", "X-One", "1"),)))
    second = Scripted("two", message=Verdict(Action.REJECT, REJECTED, edits=(HeaderEdit("add", "X-Two", "2"),)))
    third = Scripted("three")
    session, _, _ = chain(first, second, third)
    verdict = run(session.stage("message", None))
    assert verdict.action is Action.REJECT and verdict.reply == REJECTED
    assert [e.name for e in verdict.edits] == ["X-One", "X-Two"]
    assert third.asked == []


def test_accept_leaves_that_filter_out_until_the_next_transaction() -> None:
    accepting = Scripted("accepting", mail=Verdict(Action.ACCEPT))
    other = Scripted("other")
    session, _, _ = chain(accepting, other)
    assert run(session.stage("mail", "a@b.test", {})) == CONTINUE
    run(session.stage("message", None))
    assert accepting.asked == ["mail"] and other.asked == ["mail", "message"]
    session.reset()
    run(session.stage("message", None))
    assert accepting.asked == ["mail", "message"] and accepting.resets == 1


def test_accept_at_connect_is_for_the_whole_connection() -> None:
    accepting = Scripted("accepting", connect=Verdict(Action.ACCEPT))
    session, _, _ = chain(accepting)
    run(session.stage("connect"))
    session.reset()
    run(session.stage("mail", "a@b.test", {}))
    assert accepting.asked == ["connect"]


def test_quarantine_is_remembered_and_the_others_still_look() -> None:
    held = Scripted("held", message=Verdict(Action.QUARANTINE, reason="looks odd"))
    later = Scripted("later", message=Verdict(edits=(HeaderEdit("add", "X-Later", "yes"),)))
    session, _, _ = chain(held, later)
    verdict = run(session.stage("message", None))
    assert (verdict.action, verdict.reason, len(verdict.edits)) == (Action.QUARANTINE, "looks odd", 1)


def test_a_filter_that_hangs_counts_as_tempfail_after_its_timeout() -> None:
    hanging = Scripted("hanging", message=Deferred())
    session, clock, monitor = chain(hanging, timeout=5)
    results: list[Any] = []
    Deferred.fromCoroutine(session.stage("message", None)).addBoth(results.append)
    clock.advance(4.9)
    assert results == []
    clock.advance(0.2)
    [verdict] = results
    assert verdict.action is Action.TEMPFAIL and verdict.reply == FILTER_FAILED
    assert "TimeoutError" in verdict.reason
    assert hanging.closed == 1
    assert [(c[0], c[2], c[3], c[4]) for c in monitor.calls if c[0] == "filtered"] == [
        ("filtered", "hanging", "message", "tempfail")]


def test_a_broken_filter_with_a_session_is_not_asked_again_in_that_connection() -> None:
    broken = Scripted("broken", connect=RuntimeError("down"))
    session, _, _ = chain(broken, on_failure="accept")
    assert run(session.stage("connect")).action is Action.CONTINUE
    assert run(session.stage("mail", "a@b.test", {})).action is Action.CONTINUE
    assert broken.asked == ["connect"]


class Flaky(MessageFilter):
    name = "flaky"

    def __init__(self) -> None:
        super().__init__()
        self.answers = [RuntimeError("once"), Verdict(Action.REJECT, REJECTED)]

    def check(self, message: Any) -> Any:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_a_stateless_filter_is_asked_afresh_after_a_failure() -> None:
    session, _, _ = chain(Flaky())
    assert run(session.stage("message", None)).action is Action.TEMPFAIL
    assert run(session.stage("message", None)).reply == REJECTED


def test_an_answer_that_is_not_a_verdict_is_a_failure() -> None:
    odd = Scripted("odd", message="yes")
    session, _, monitor = chain(odd, on_failure=Action.ACCEPT)
    assert run(session.stage("message", None)) == CONTINUE
    assert run(session.stage("message", None)) == CONTINUE
    assert odd.asked == ["message"] and odd.closed == 1
    assert [c[4] for c in monitor.calls if c[0] == "filtered"] == ["continue", "continue"]


def test_a_filter_timeout_of_its_own_wins() -> None:
    slow = Scripted("slow", message=Deferred())
    slow.timeout = 1
    session, clock, _ = chain(slow, timeout=100)
    results: list[Any] = []
    Deferred.fromCoroutine(session.stage("message", None)).addBoth(results.append)
    clock.advance(1.5)
    assert results and results[0].action is Action.TEMPFAIL


@pytest.mark.parametrize("bad", [dict(timeout=0), dict(on_failure="discard"), dict(on_failure="sometimes")])
def test_bad_chain_settings(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FilterChain([], reactor=Clock(), **bad)


def test_only_filters_go_in_a_chain() -> None:
    with pytest.raises(TypeError, match="does not provide IFilter"):
        FilterChain([object()], reactor=Clock())


@pytest.mark.parametrize("kind, name, value", [("move", "X", ""), ("add", "Bad Name", ""), ("add", "X", "a\r\nb")])
def test_bad_header_edits(kind: str, name: str, value: str) -> None:
    with pytest.raises(ValueError):
        HeaderEdit(kind, name, value)


def test_a_chain_made_without_a_reactor_installs_none_until_it_needs_one() -> None:
    """Options are parsed (and the chain made) before twistd installs its reactor: the global one is imported at
    the first use of ``reactor``, not when the chain is made."""
    script = ("import sys\n"
              "from esmtpkit.filters.chain import FilterChain\n"
              "chain = FilterChain([])\n"
              "assert 'twisted.internet.reactor' not in sys.modules, 'the chain installed a reactor'\n"
              "from twisted.internet import reactor\n"
              "assert chain.reactor is reactor\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_chain_keeps_the_reactor_it_was_given() -> None:
    clock = Clock()
    assert FilterChain([], reactor=clock).reactor is clock
