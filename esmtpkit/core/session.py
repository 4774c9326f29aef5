"""What the handler can see of its connection: addresses, greeting, TLS/AUTH state and the envelope so far."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from esmtpkit.core.address import Address

__all__ = ["Session", "Envelope"]


@dataclass
class Envelope:
    """The mail transaction so far: reverse-path, accepted recipients, and their ESMTP parameters (parsed).

    ``id`` names the transaction once MAIL is accepted (see `esmtpkit.core.ids`): handlers show it in their final
    reply ("queued as ...") and trace headers, and every log event about the message carries it. ``auth`` holds
    the mail-authentication verdicts (an `esmtpkit.mailauth.AuthVerdicts`) when checks run in front of the handler.
    ``quarantine`` is the reason a filter gave for holding the message (`esmtpkit.filters`), None when none did:
    a handler that stores mail keeps such a message apart.
    """

    id: str = ""
    sender: Address | None = None
    mail_params: dict[str, Any] = field(default_factory=dict)
    recipients: list[Address] = field(default_factory=list)
    rcpt_params: list[dict[str, Any]] = field(default_factory=list)
    auth: Any = None
    quarantine: str | None = None


@dataclass
class Session:
    """One connection as the protocol knows it; the handler gets it in ``connect`` and may keep it.

    ``peer``/``host`` are Twisted `IAddress` values (``peer.host`` is the client IP). ``helo`` is the name the
    client gave, ``esmtp`` whether it used EHLO (or LHLO); STARTTLS clears both (RFC 3207 §4.2). ``lmtp`` is set
    on an LMTP server. ``tls`` is set after STARTTLS or on an implicit-TLS listener; once the handshake is done
    ``tls_info`` holds ``version``, ``cipher`` and ``bits`` as text (see `esmtpkit.server.tls.tls_info`).
    ``authenticated`` is the identity from AUTH and ``auth_mechanism`` its SASL mechanism (None without AUTH).
    ``transport`` is the connection (the seed's input/output handle) for handlers that need it. ``id`` names the
    connection in log events; ``transactions`` counts the messages it began (MAIL accepted). ``trusted`` is set
    for a client on the policy's trusted networks (it may use XCLIENT and XFORWARD); ``client_name`` is the
    client's host name when one is known (given by XCLIENT NAME); ``forwarded`` holds what XFORWARD said.
    """

    hostname: str
    peer: Any = None
    host: Any = None
    helo: str | None = None
    esmtp: bool = False
    lmtp: bool = False
    tls: bool = False
    tls_info: dict[str, str] = field(default_factory=dict)
    authenticated: str | None = None
    auth_mechanism: str | None = None
    envelope: Envelope = field(default_factory=Envelope)
    transport: Any = field(default=None, repr=False)
    transactions: int = 0
    id: str = ""
    trusted: bool = False
    client_name: str | None = None
    #: What XFORWARD said about the client of the next message (an `esmtpkit.core.xclient.Forwarded`); read it
    #: through `esmtpkit.core.xclient.forwarded_client`, which knows the message it is for.
    forwarded: Any = None

    @property
    def peer_ip(self) -> str:
        """The client's IP address as text ('' when the transport has none, e.g. a UNIX socket)."""
        return str(getattr(self.peer, "host", "") or "")

    @property
    def with_protocol(self) -> str:
        """The ``with`` keyword for trace headers: SMTP, ESMTP, ESMTPS, ESMTPSA, LMTP... (RFC 3848), and UTF8SMTP,
        UTF8SMTPS, UTF8LMTPSA... for a transaction that uses SMTPUTF8 (RFC 6531 §3.7.3)."""
        if self.lmtp:
            base = "LMTP"
        elif not self.esmtp:
            return "SMTP"
        else:
            base = "ESMTP"
        if self.envelope.mail_params.get("SMTPUTF8"):
            base = "UTF8" + base.removeprefix("E")
        return base + ("S" if self.tls else "") + ("A" if self.authenticated else "")
