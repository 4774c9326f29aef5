"""`Debug`: write each message to the log and accept it, like ``python -m smtpd -n -c DebuggingServer`` did."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from esmtpkit.core.content import ContentMode
from esmtpkit.core.escape import escape, escape_lines
from esmtpkit.handlers.base import MessageHandler

__all__ = ["Debug"]


class Debug(MessageHandler):
    """Log every message (envelope and content) through `twisted.logger` at info level, then answer 250.

    Content is decoded as UTF-8 with undecodable bytes replaced, CRLF shown as a newline and other controls escaped
    (``\\x1b``; `esmtpkit.core.escape`), so a message cannot act on the terminal that shows the log. The whole message is
    held in memory until the final dot (bounded by ``Policy.max_message_size``). A 250 means "logged", not "kept".
    """

    content_mode = ContentMode.RAW
    log = Logger()

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def data(self) -> Any:
        """Start a new message."""
        self._chunks = []
        return super().data()

    def body(self, chunk: bytes) -> None:
        """Keep the chunk until the end of the message."""
        self._chunks.append(chunk)

    def eom(self) -> Any:
        """Log the envelope and the content, then ``250 Message accepted for delivery``."""
        session = self.session
        envelope = session.envelope if session is not None else None
        sender = escape(str(envelope.sender)) if envelope is not None and envelope.sender is not None else ""
        recipients = [escape(str(r)) for r in envelope.recipients] if envelope is not None else []
        content = escape_lines(b"".join(self._chunks).replace(b"\r\n", b"\n").decode("utf-8", "replace"))
        self._chunks = []
        self.log.info(
            "---------- MESSAGE FOLLOWS ----------\n"
            "X-Queue-Id: {id}\nX-Peer: {peer}\nX-Mail-From: <{sender}>\nX-Rcpt-To: {rcpt_list}\n\n{content}"
            "------------ END MESSAGE ------------",
            id=envelope.id if envelope is not None else "",
            peer=escape(session.peer_ip) if session is not None else "",
            sender=sender,
            recipients=recipients,
            rcpt_list=", ".join(f"<{r}>" for r in recipients),
            content=content if content.endswith("\n") or not content else content + "\n",
        )
        return super().eom()

    def abort(self, reason: str) -> None:
        """Drop the partial message."""
        self._chunks = []
