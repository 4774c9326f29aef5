"""`MessageHandler`: the default reply for every verb, word for word from Apache2::Protocol::ESMTP.

Subclass it and override the verbs you care about; everything else keeps the defaults below.
"""

from __future__ import annotations

from typing import Any, Final, Mapping

from zope.interface import implementer

from esmtpkit.core.address import Address
from esmtpkit.core.content import ContentMode
from esmtpkit.core.reply import Reply
from esmtpkit.core.session import Session
from esmtpkit.server.interfaces import IMessageHandler

__all__ = ["MessageHandler"]

#: The seed's default replies, built once (replies are immutable values).
GREETING: Final = Reply.of(220, "ESMTP Mail Server")
OK: Final = Reply.of(250, "OK")
GO_AHEAD: Final = Reply.of(354, 'Enter mail, end with "." on a line by itself')
ACCEPTED: Final = Reply.of(250, "Message accepted for delivery", enhanced="2.0.0")
NO_EXPN: Final = Reply.of(502, "Sorry we don't allow this operation", enhanced="5.5.1")
NO_VRFY: Final = Reply.of(252, "Cannot VRFY user; try RCPT to attempt delivery", enhanced="2.5.2")
HELP: Final = Reply.of(214, "This is SMTP::Proxy 1.0")
BYE: Final = Reply.of(221, "Closing connection", enhanced="2.0.0")


@implementer(IMessageHandler)
class MessageHandler:
    """Carries on an SMTP conversation and keeps nothing; override verbs to make it do something."""

    #: How content reaches header()/eoh()/body() (`ContentMode`); None: as ``chunk_mode`` says.
    content_mode: ContentMode | None = None
    #: The seed's chunkmode: None means PARSED (the default), True RAW, False LINES.
    chunk_mode: bool | None = None
    #: Largest chunk passed to body(), in bytes; None: the policy's ``chunk_size``.
    chunk_size: int | None = None
    #: Set true to close the connection after the current reply.
    disconnect: bool = False
    #: The connection, set by connect().
    session: Session | None = None

    def connect(self, session: Session) -> Any:
        """Keep the session; greet with ``220 ESMTP Mail Server``."""
        self.session = session
        return GREETING

    def helo(self, domain: str) -> Any:
        """``250 OK``."""
        return OK

    def ehlo(self, domain: str) -> Any:
        """``250 <client>, pleased to meet you`` and the ``HELP`` keyword."""
        return Reply.of(250, f"{domain}, pleased to meet you", "HELP")

    def mail(self, sender: Address, params: Mapping[str, Any]) -> Any:
        """``250 <sender>, sender ok``."""
        return Reply(250, (f"<{sender}>, sender ok",), "2.1.0")  # built directly: once per message

    def rcpt(self, recipient: Address, params: Mapping[str, Any]) -> Any:
        """``250 <recipient>, recipient ok``."""
        return Reply(250, (f"<{recipient}>, recipient ok",), "2.1.5")

    def data(self) -> Any:
        """``354 Enter mail, end with "." on a line by itself``."""
        return GO_AHEAD

    def header(self, name: str, value: str) -> Any:
        """Ignore the header."""
        return None

    def eoh(self) -> Any:
        """Nothing to do at the end of the headers."""
        return None

    def body(self, chunk: bytes) -> Any:
        """Ignore the content."""
        return None

    def eom(self) -> Any:
        """``250 Message accepted for delivery``."""
        return ACCEPTED

    def abort(self, reason: str) -> Any:
        """Nothing was kept, so nothing to drop."""
        return None

    def expn(self, argument: str) -> Any:
        """``502 Sorry we don't allow this operation``."""
        return NO_EXPN

    def vrfy(self, argument: str) -> Any:
        """``252 Cannot VRFY user; try RCPT to attempt delivery``."""
        return NO_VRFY

    def noop(self) -> Any:
        """``250 OK``."""
        return OK

    def rset(self) -> Any:
        """``250 OK``."""
        return OK

    def help(self, topic: str | None) -> Any:
        """``214 This is SMTP::Proxy 1.0``."""
        return HELP

    def quit(self) -> Any:
        """``221 Closing connection``."""
        return BYE

    def unknown(self, command: str) -> Any:
        """``500 Command unrecognized: <line>``."""
        return Reply.of(500, f"Command unrecognized: {command}", enhanced="5.5.2")
