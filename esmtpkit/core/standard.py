"""The extensions esmtpkit speaks itself, as `esmtpkit.core.extension.Extension` values: PIPELINING (RFC 2920),
SIZE (RFC 1870), 8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531), ENHANCEDSTATUSCODES (RFC 2034), CHUNKING and
BINARYMIME (RFC 3030), DSN (RFC 3461), STARTTLS (RFC 3207) and AUTH (RFC 4954).

Pure core. Their verbs (BDAT, STARTTLS, AUTH) are the protocol's own, so they declare only what EHLO offers and the
parameters they accept; `standard` picks the ones a policy turns on, in the order EHLO lists them.
"""

from __future__ import annotations

from typing import Any, Final, Sequence

from esmtpkit.core.dsn import parse_envid, parse_notify, parse_orcpt, parse_ret
from esmtpkit.core.extension import Extension, Offer, ParamContext
from esmtpkit.core.params import auth_mailbox, parse_body, parse_size, parse_smtputf8
from esmtpkit.core.session import Session

__all__ = ["Pipelining", "Size", "EightBitMime", "SmtpUtf8", "EnhancedStatusCodes", "Chunking", "BinaryMime", "Dsn",
           "StartTLS", "Auth", "standard"]


def _body(value: str | None, context: ParamContext) -> str:
    return parse_body(value, context.offered)


class Pipelining(Extension):
    name = keyword = "PIPELINING"
    rfc = "RFC 2920"


class Size(Extension):
    """SIZE, with the policy's ``max_message_size`` as its parameter when there is a limit."""

    name = keyword = "SIZE"
    rfc = "RFC 1870"
    mail_params = {"SIZE": lambda value, context: parse_size(value)}

    def ehlo_params(self, session: Session, settings: Any) -> str:
        limit = getattr(settings, "max_message_size", 0)
        return str(limit) if limit else ""


class EightBitMime(Extension):
    name = keyword = "8BITMIME"
    rfc = "RFC 6152"
    mail_params = {"BODY": _body}


class SmtpUtf8(Extension):
    name = keyword = "SMTPUTF8"
    rfc = "RFC 6531"
    mail_params = {"SMTPUTF8": lambda value, context: parse_smtputf8(value)}


class EnhancedStatusCodes(Extension):
    name = keyword = "ENHANCEDSTATUSCODES"
    rfc = "RFC 2034"


class Chunking(Extension):
    """CHUNKING: the BDAT verb, which the protocol runs itself (it reads the chunk's octets raw)."""

    name = keyword = "CHUNKING"
    rfc = "RFC 3030"
    protocol_verbs = ("BDAT",)


class BinaryMime(Extension):
    """BINARYMIME, offered only with CHUNKING (RFC 3030 §3); ``BODY=BINARYMIME`` needs it."""

    name = keyword = "BINARYMIME"
    rfc = "RFC 3030"
    mail_params = {"BODY": _body}


class Dsn(Extension):
    name = keyword = "DSN"
    rfc = "RFC 3461"
    mail_params = {"RET": lambda value, context: parse_ret(value),
                   "ENVID": lambda value, context: parse_envid(value)}
    rcpt_params = {"NOTIFY": lambda value, context: parse_notify(value),
                   "ORCPT": lambda value, context: parse_orcpt(value, utf8=context.utf8)}


class StartTLS(Extension):
    """STARTTLS, offered until the connection is encrypted (RFC 3207 §4.2: not again after the handshake)."""

    name = keyword = "STARTTLS"
    rfc = "RFC 3207"
    protocol_verbs = ("STARTTLS",)
    offer = Offer.BEFORE_TLS


def _auth_param(value: str | None, context: ParamContext) -> str:
    # RFC 4954 §5: an AUTH= value from a client that has not authenticated counts as <>.
    mailbox = auth_mailbox(value)
    return mailbox if context.session.authenticated is not None else "<>"


class Auth(Extension):
    """AUTH with the mechanisms the portal can check; only over TLS unless the policy allows plaintext."""

    name = keyword = "AUTH"
    rfc = "RFC 4954"
    offer = Offer.TLS  # and before TLS too when the policy allows AUTH over plaintext (see offered)
    protocol_verbs = ("AUTH",)
    mail_params = {"AUTH": _auth_param}

    def __init__(self, mechanisms: Sequence[str], require_tls: bool = True) -> None:
        self.mechanisms = tuple(mechanisms)
        self.require_tls = require_tls

    def offered(self, session: Session, settings: Any) -> bool:
        return session.tls or not self.require_tls

    def ehlo_params(self, session: Session, settings: Any) -> str:
        return " ".join(self.mechanisms)


_PIPELINING: Final = Pipelining()
_SIZE: Final = Size()
_EIGHTBITMIME: Final = EightBitMime()
_SMTPUTF8: Final = SmtpUtf8()
_ENHANCED: Final = EnhancedStatusCodes()
_CHUNKING: Final = Chunking()
_BINARYMIME: Final = BinaryMime()
_DSN: Final = Dsn()
_STARTTLS: Final = StartTLS()


def standard(settings: Any, mechanisms: Sequence[str] = ()) -> list[Extension]:
    """The standard extensions ``settings`` (a Policy) turns on, in EHLO order; AUTH when ``mechanisms`` are
    offered."""
    items: list[Extension] = []
    if settings.pipelining:
        items.append(_PIPELINING)
    items.append(_SIZE)
    if settings.eightbitmime:
        items.append(_EIGHTBITMIME)
    if settings.smtputf8:
        items.append(_SMTPUTF8)
    if settings.enhanced_status_codes:
        items.append(_ENHANCED)
    if settings.chunking:
        items.append(_CHUNKING)
        if settings.binarymime:
            items.append(_BINARYMIME)
    if settings.dsn:
        items.append(_DSN)
    if settings.tls_context is not None:
        items.append(_STARTTLS)
    if mechanisms:
        items.append(Auth(mechanisms, settings.auth_require_tls))
    return items
