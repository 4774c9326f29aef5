"""The replies the server writes itself (handler replies come from the handler), in one place.

Admission refusals live with their rules in `esmtpkit.core.rules`; they are re-exported here so every reply the
server can send without asking the handler can be found from this module.
"""

from __future__ import annotations

from typing import Final

from esmtpkit.core.content import ContentError
from esmtpkit.core.conversation import LINE_TOO_LONG
from esmtpkit.core.reply import Reply
from esmtpkit.core.rules import (AUTH_ALREADY_DONE, AUTH_ENCRYPTION_REQUIRED, AUTH_REQUIRED, BINARY_NEEDS_BDAT,
                                 EHLO_FIRST, LMTP_GREETING, NO_SERVICE, TLS_ACTIVE, TLS_REQUIRED,
                                 TOO_MANY_TRANSACTIONS)

__all__ = ["LINE_TOO_LONG", "HANDLER_ERROR", "TOO_MANY_ERRORS", "TIMEOUT", "TOO_BIG", "HEADER_TOO_BIG",
           "BARE_NEWLINE", "TOO_MANY_RECIPIENTS", "NO_SERVICE", "SHUTTING_DOWN", "EARLY_TALKER",
           "TOO_MANY_TRANSACTIONS", "TLS_READY", "TLS_ACTIVE", "TLS_UNAVAILABLE", "TLS_REQUIRED", "EHLO_FIRST",
           "CHUNK_SYNTAX", "CHUNK_FAILED", "BINARY_NEEDS_BDAT", "LMTP_GREETING", "AUTH_REQUIRED",
           "AUTH_ALREADY_DONE", "AUTH_ENCRYPTION_REQUIRED", "CONTENT_ERRORS"]

HANDLER_ERROR: Final = Reply(451, ("Requested action aborted: local error in processing",), "4.3.0")
TOO_MANY_ERRORS: Final = Reply(421, ("Too many errors, closing connection",), "4.7.0")
TIMEOUT: Final = Reply(421, ("Timeout exceeded, closing connection",), "4.4.2")
TOO_BIG: Final = Reply(552, ("Message size exceeds fixed maximum message size",), "5.3.4")
HEADER_TOO_BIG: Final = Reply(552, ("Message header size exceeds limit",), "5.3.4")
BARE_NEWLINE: Final = Reply(550, ("Message contains a bare CR or LF (only CRLF ends a line)",), "5.5.2")
TOO_MANY_RECIPIENTS: Final = Reply(452, ("Too many recipients",), "4.5.3")
SHUTTING_DOWN: Final = Reply(421, ("Service shutting down, try again later",), "4.3.2")
EARLY_TALKER: Final = Reply(554, ("Protocol error: data sent before the greeting",), "5.5.1")
TLS_READY: Final = Reply(220, ("Ready to start TLS",), "2.0.0")
TLS_UNAVAILABLE: Final = Reply(454, ("TLS not available due to temporary reason",), "4.7.0")
CHUNK_SYNTAX: Final = Reply(501, ("Syntax: BDAT size [LAST]",), "5.5.4")
CHUNK_FAILED: Final = Reply(503, ("Transaction failed at an earlier BDAT: send RSET",), "5.5.1")

#: The reply for each way content can break a limit.
CONTENT_ERRORS: Final = {
    ContentError.LINE_TOO_LONG: LINE_TOO_LONG,
    ContentError.HEADER_TOO_BIG: HEADER_TOO_BIG,
    ContentError.TOO_BIG: TOO_BIG,
    ContentError.BARE_NEWLINE: BARE_NEWLINE,
}
