"""The filter contract: what a filter is told at each stage of an SMTP conversation, and what the end of data
gives it (`HeldMessage`: the envelope, the header section and the whole content, to be read in pieces)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Any, Callable, Iterator, Mapping

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from esmtpkit.core.session import Session
from esmtpkit.filters.verdict import Verdict

__all__ = ["IFilter", "IFilterSession", "HeldMessage", "VerdictResult", "STAGES"]

#: A stage's answer: a `Verdict` now, or a Deferred that fires with one.
VerdictResult = Verdict | Deferred[Verdict]

#: The stages, in the order a conversation reaches them.
STAGES = ("connect", "helo", "mail", "rcpt", "message")


@dataclass(frozen=True)
class HeldMessage:
    """A whole message at the end of data, held by the server (memory, then a temporary file) while the filters
    look at it. ``head`` is its header section (at most the first 256 KiB); `open` reads the whole content as
    received (CRLF line ends, no dot-stuffing), `chunks` in pieces, so a filter streams it in bounded memory."""

    session: Session
    head: bytes
    size: int
    opener: Callable[[], IO[bytes]]

    def open(self) -> IO[bytes]:
        """The whole content, from its first octet."""
        return self.opener()

    def chunks(self, size: int = 64 * 1024) -> Iterator[bytes]:
        """The whole content, ``size`` octets at a time."""
        with self.open() as stream:
            while True:
                chunk = stream.read(size)
                if not chunk:
                    return
                yield chunk

    @property
    def sender(self) -> str:
        """The MAIL FROM address (``""`` for the null sender)."""
        return str(self.session.envelope.sender or "")

    @property
    def recipients(self) -> list[str]:
        """The accepted RCPT TO addresses."""
        return [str(r) for r in self.session.envelope.recipients]


class IFilterSession(Interface):
    """One filter's view of one SMTP connection (made by `IFilter.start`). Every method answers a `Verdict`, or
    a Deferred of one; the chain bounds each call with the filter's timeout and cancels the Deferred when it
    passes. A method for a stage the filter does not use answers `esmtpkit.filters.CONTINUE`."""

    def connect() -> VerdictResult:
        """A client connected (``session.peer``, ``session.client_name``)."""

    def helo(name: str) -> VerdictResult:
        """The client said HELO, EHLO or LHLO ``name``."""

    def mail(sender: str, params: Mapping[str, Any]) -> VerdictResult:
        """MAIL FROM was accepted by the server's own checks; ``sender`` is ``""`` for ``<>``."""

    def rcpt(recipient: str, params: Mapping[str, Any]) -> VerdictResult:
        """RCPT TO ``recipient``."""

    def message(message: HeldMessage) -> VerdictResult:
        """The end of data: the header section and the body, streamed from ``message``."""

    def reset() -> None:
        """The transaction ended (delivered, refused, RSET, a new HELO): forget its envelope."""

    def close() -> None:
        """The connection ended: release what the session holds (a connection to the filter)."""


class IFilter(Interface):
    """A filter a server puts in front of its handler (rspamd, clamd, spamd, a milter, or your own)."""

    name = Attribute("A short name for logs and metrics: 'rspamd', 'clamd', 'milter:opendkim'.")
    timeout = Attribute("Seconds each stage may take (None: the chain's).")
    on_failure = Attribute("What a stage that fails or times out counts as: Action.TEMPFAIL or Action.ACCEPT "
                           "(None: the chain's).")
    stateless = Attribute("Optional, False when absent: True when a session keeps nothing between messages, so "
                          "the chain asks it afresh after a failure instead of leaving it out of the connection.")

    def start(session: Session) -> IFilterSession:
        """A session for the connection ``session`` (nothing is sent before its ``connect``)."""
