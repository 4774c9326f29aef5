"""How the client talks to a server: its name, TLS, credentials, LMTP or SMTP, BDAT, all or nothing, and its
timeouts."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Final

__all__ = ["Timeouts", "ClientOptions", "TLS_MODES"]

#: ``none``: never TLS; ``opportunistic``: STARTTLS when offered (taken as ``required`` with ``verify``);
#: ``required``: STARTTLS or fail (4.7.4); ``implicit``: TLS from the first byte (RFC 8314, the endpoint is wrapped).
TLS_MODES: Final = ("none", "opportunistic", "required", "implicit")


@dataclass(frozen=True)
class Timeouts:
    """Seconds the client waits for each step (RFC 5321 §4.5.3.2): the connection, the greeting, the EHLO,
    STARTTLS and AUTH replies (``ehlo``), MAIL, each RCPT, the 354 to DATA, the progress of each data block sent,
    and the reply at the end of the data."""

    connect: float = 30.0
    greeting: float = 300.0
    ehlo: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    block: float = 180.0
    data_end: float = 600.0


@dataclass(frozen=True)
class ClientOptions:
    """One session's settings. ``helo`` is the name given in EHLO/HELO/LHLO; ``tls`` one of `TLS_MODES`;
    ``verify`` checks the server's certificate chain and name (``tls_hostname``, else the host's name) against
    ``ca_file`` or the platform's trust store, where opportunistic TLS takes any certificate; it makes
    ``"opportunistic"`` mean ``"required"`` (``tls`` then reads ``"required"``), so that a server whose STARTTLS
    an attacker strips, refuses or breaks never gets the mail in clear, and it needs TLS (``"none"`` is refused).
    ``username`` and ``password`` log in with AUTH PLAIN or LOGIN, only over TLS. ``lmtp`` speaks LMTP (RFC
    2033); ``chunking`` sends with BDAT when the server offers CHUNKING (binary content always goes that way).
    ``all_or_nothing``: when the server refuses any recipient, the content is not completed for the others, so
    that the message reaches every recipient or none (a relay that already said 250 to each of them can then
    answer for all).
    """

    helo: str = "localhost"
    tls: str = "opportunistic"
    verify: bool = False
    tls_hostname: str | None = None
    ca_file: str | None = None
    username: str | None = None
    password: str | None = None
    lmtp: bool = False
    chunking: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    all_or_nothing: bool = False

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {self.tls!r}")
        if self.verify and self.tls == "none":
            raise ValueError("verify needs TLS: there is no certificate to check without it")
        if self.verify and self.tls == "opportunistic":
            object.__setattr__(self, "tls", "required")  # a checked certificate or nothing: no downgrade
        if self.username is not None and self.tls == "none":
            raise ValueError("a username needs TLS: credentials are never sent in clear")
        if not self.helo or any(c.isspace() for c in self.helo) or not self.helo.isprintable():
            raise ValueError(f"helo must be a host name without spaces, not {self.helo!r}")

    def for_requiretls(self) -> "ClientOptions":
        """These options as a REQUIRETLS message needs them (RFC 8689 §4.2.1): TLS required (``"none"`` and
        ``"opportunistic"`` become ``"required"``; ``"implicit"`` stays) and the certificate verified."""
        if self.verify and self.tls in ("required", "implicit"):
            return self
        return replace(self, verify=True, tls="implicit" if self.tls == "implicit" else "required")
