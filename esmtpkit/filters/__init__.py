"""Filters in front of any handler: rspamd, ClamAV's clamd, SpamAssassin's spamd, any milter, or your own.

A filter (`IFilter`) sees the stages it asks for and answers a `Verdict`; a `FilterChain` runs filters in order,
each bounded in time; `esmtpkit.handlers.filtering` puts a chain in front of a handler.
"""

from esmtpkit.filters.base import FilterSession, MessageFilter
from esmtpkit.filters.chain import FilterChain
from esmtpkit.filters.interfaces import STAGES, HeldMessage, IFilter, IFilterSession
from esmtpkit.filters.verdict import CONTINUE, FILTER_FAILED, Action, HeaderEdit, Verdict

__all__ = ["Action", "CONTINUE", "FILTER_FAILED", "FilterChain", "FilterSession", "HeaderEdit", "HeldMessage",
           "IFilter", "IFilterSession", "MessageFilter", "STAGES", "Verdict"]
