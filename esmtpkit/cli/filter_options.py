"""The filter options of ``twistd esmtpkit``: the filters put in front of the handler, in order (``--filter``,
repeatable), how long each may take (``--filter-timeout``) and what one that fails counts as
(``--filter-failure``). `FilterOptions` is mixed into `esmtpkit.cli.tap.Options`; `build_filters` makes the
`esmtpkit.filters.FilterChain`."""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from esmtpkit.cli.mailauth_options import finite_seconds

__all__ = ["FilterOptions", "build_filters"]


def _failure(value: str) -> str:
    if value.strip().lower() not in ("tempfail", "accept"):
        raise usage.UsageError(f"--filter-failure takes tempfail or accept, not {value!r}")
    return value.strip().lower()


class FilterOptions(usage.Options):
    """Options for the filters in front of the handler."""

    optParameters = [
        ["filter-timeout", None, 60.0, "Seconds a filter may take to answer one stage (connect, HELO, MAIL, RCPT, "
         "the message) before it counts as failed.", finite_seconds("filter-timeout")],
        ["filter-failure", None, "tempfail", "What a filter that is down, fails or takes too long counts as: "
         "tempfail (451 4.7.1: the client tries again later) or accept (the message goes on unfiltered by it).",
         _failure],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["filters"] = []

    def opt_filter(self, entry: str) -> None:
        """KIND:TARGET[,KEY=VALUE...]: put a filter in front of the handler (repeatable; asked in order). KIND is
        rspamd (TARGET a URL: http://127.0.0.1:11333), clamd, spamd or milter (TARGET a Twisted client endpoint:
        tcp:127.0.0.1:3310, unix:/run/clamav/clamd.ctl). Every kind takes name=, timeout= and on-failure=."""
        from esmtpkit.filters.registry import parse_spec

        try:
            parse_spec(entry)
        except ValueError as e:
            raise usage.UsageError(f"--filter: {e}") from None
        self["filters"].append(entry)


def build_filters(options: usage.Options, reactor: Any = None, monitor: Any = None) -> Any:
    """The `FilterChain` the options ask for, or None without ``--filter``; a filter that cannot be made is a
    usage error naming it."""
    entries = options["filters"]
    if not entries:
        return None
    from esmtpkit.filters.chain import FilterChain
    from esmtpkit.filters.registry import build

    filters = []
    for entry in entries:
        try:
            filters.append(build(entry, reactor))
        except ValueError as e:
            raise usage.UsageError(f"--filter: {e}") from None
        except ImportError as e:
            raise usage.UsageError(f"--filter {entry.split(':', 1)[0]}: not available ({e})") from None
    return FilterChain(filters, timeout=options["filter-timeout"], on_failure=options["filter-failure"],
                       reactor=reactor, monitor=monitor)
