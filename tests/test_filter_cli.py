"""``twistd esmtpkit --filter``: what the options build (a FilterChain inside the mail-auth checks, in order), and
the one line each mistake gets."""

from __future__ import annotations

import pytest
from esmtpkit.cli import tap
from esmtpkit.filters import Action, FilterChain
from esmtpkit.filters.registry import parse_spec
from esmtpkit.handlers.filtering import FilterFront
from esmtpkit.handlers.mailauth import MailAuthFront
from esmtpkit.testing import RecordingHandler

from .support import tap_mistake, tap_options

BASE = ["--handler", "esmtpkit.handlers.base.MessageHandler"]


def parse(*argv: str) -> tap.Options:
    return tap_options(*BASE, *argv)


def mistake(*argv: str) -> str:
    return tap_mistake(*BASE, *argv)


def test_without_filters_there_is_no_chain() -> None:
    options = parse()
    assert options["filter-chain"] is None and options["policy"].fronts == ()


def test_filters_in_the_order_given_with_the_chain_settings() -> None:
    options = parse("--filter", "clamd:tcp:127.0.0.1:3310", "--filter", "spamd:unix:/run/spamd.sock,name=sa",
                    "--filter-timeout", "12", "--filter-failure", "accept")
    chain: FilterChain = options["filter-chain"]
    assert chain.names == ("clamd", "sa")
    assert (chain.timeout, chain.on_failure) == (12.0, Action.ACCEPT)
    [front] = options["policy"].fronts
    made = front(RecordingHandler())
    assert isinstance(made, FilterFront) and made.chain is chain


def test_filters_go_inside_the_mail_auth_checks() -> None:
    options = parse("--verify", "spf", "--filter", "clamd:tcp:127.0.0.1:3310")
    outer, inner = options["policy"].fronts
    handler = RecordingHandler()
    made = outer(inner(handler))
    assert isinstance(made, MailAuthFront) and isinstance(made.behind, FilterFront) and made.behind.behind is handler


def test_a_filter_setting_of_its_own() -> None:
    chain = parse("--filter", "clamd:tcp:127.0.0.1:3310,timeout=5,on-failure=accept")["filter-chain"]
    [clamd] = chain.filters
    assert (clamd.timeout, clamd.on_failure) == (5.0, Action.ACCEPT)


@pytest.mark.parametrize("argv, start", [
    (["--filter", "virus:tcp:127.0.0.1:1"], "--filter: 'virus:tcp:127.0.0.1:1' is not KIND:TARGET with KIND one of"),
    (["--filter", "clamd"], "--filter: 'clamd' is not KIND:TARGET"),
    (["--filter", "clamd:"], "--filter: 'clamd:' names no clamd to ask"),
    (["--filter", "clamd:tcp:127.0.0.1:3310,timeout"], "--filter: 'clamd:tcp:127.0.0.1:3310,timeout': 'timeout' is"),
    (["--filter", "clamd:tcp:127.0.0.1:1,name=a,name=b"], "--filter: 'clamd:tcp:127.0.0.1:1,name=a,name=b': name is"),
    (["--filter-timeout", "0"], "--filter-timeout takes a finite number of seconds above 0"),
    (["--filter-timeout", "soon"], "--filter-timeout takes seconds, not 'soon'"),
    (["--filter-failure", "discard"], "--filter-failure takes tempfail or accept, not 'discard'"),
    (["--filter", "clamd:tcp:127.0.0.1:3310,on-failure=maybe"], "--filter: clamd:"),
    (["--filter", "clamd:tcp:127.0.0.1:3310,timeout=-1"], "--filter: clamd:"),
    (["--filter", "clamd:tcp:127.0.0.1:3310,colour=blue"], "--filter: clamd:"),
])
def test_mistakes_are_one_line(argv: list[str], start: str) -> None:
    assert mistake(*argv).startswith(start)


def test_spec_parsing() -> None:
    assert parse_spec(" Milter:unix:/run/x.sock , Name = dkim ,timeout=3") == (
        "milter", "unix:/run/x.sock", {"name": "dkim", "timeout": "3"})
