"""`Null`: accept every message and keep nothing (a sink for benchmarks and load tests)."""

from __future__ import annotations

from typing import Any

from esmtpkit.core.content import ContentMode
from esmtpkit.core.reply import Reply
from esmtpkit.handlers.base import MessageHandler

__all__ = ["Null"]

_ACCEPTED = Reply(250, ("Ok: discarded",), "2.0.0")


class Null(MessageHandler):
    """Answer 250 to every message and throw the content away as it arrives.

    A 250 here promises nothing: the message is gone. Content comes raw (``content_mode = ContentMode.RAW``) so the server
    does no header parsing, and ``body`` does no work at all.
    """

    content_mode = ContentMode.RAW

    def body(self, chunk: bytes) -> None:
        """Drop the chunk."""

    def eom(self) -> Any:
        """``250 2.0.0 Ok: discarded``."""
        return _ACCEPTED
