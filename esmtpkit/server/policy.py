"""`Policy`: every limit and switch of an esmtpkit server in one frozen value (built by tap, or by tests directly)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from esmtpkit.core.mechanisms import DEFAULT_ORDER, NAMES
from esmtpkit.server.extensions import check_extensions

__all__ = ["Policy"]


def _fqdn() -> str:
    return socket.getfqdn() or "localhost"


@dataclass(frozen=True)
class Policy:
    """Limits and switches. Defaults follow RFC 5321 and Postfix's smtpd where the RFC leaves a choice.

    Timeouts are in seconds (RFC 5321 §4.5.3.2: 5 minutes waiting for a command, 3 minutes per data block,
    10 minutes for the reply to the final dot is the client's side; the server's data block timer applies).
    """

    hostname: str = field(default_factory=_fqdn)
    #: Largest message accepted, in bytes (SIZE, RFC 1870); 0 means no limit (not advertised with a value).
    max_message_size: int = 32 * 1024 * 1024
    #: Most recipients per message; beyond, RCPT gets 452 4.5.3 (RFC 5321 §4.5.3.1.8 asks for at least 100).
    max_recipients: int = 1000
    #: Base command line limit, CRLF included (RFC 5321 §4.5.3.1.4); extensions add their allowance.
    max_command_length: int = 512
    #: Longest header line in message content, CRLF included (RFC 5321 §4.5.3.1.6), whatever the handler's
    #: ``chunk_mode``. 0: no limit of its own (a header line the handler is given parsed must still fit within
    #: ``max_header_size``, or 1 MiB).
    max_line_length: int = 1000
    #: Largest header section, in bytes (like Postfix's header_size_limit), whatever the handler's ``chunk_mode``.
    #: 0: no limit.
    max_header_size: int = 102400
    #: Seconds to wait for the next command line (RFC 5321 §4.5.3.2.7).
    command_timeout: float = 300.0
    #: Seconds to wait for the next data block while a message arrives (RFC 5321 §4.5.3.2.5).
    data_timeout: float = 180.0
    #: Client errors (5xx replies) after which the connection is closed with 421 (Postfix smtpd_hard_error_limit).
    error_limit: int = 20
    #: After this many errors, each further error reply is followed by ``error_delay`` seconds of silence
    #: (Postfix smtpd_soft_error_limit / smtpd_error_sleep_time); ``error_delay`` 0 turns the tarpit off.
    soft_error_limit: int = 10
    error_delay: float = 0.0
    #: Most simultaneous connections (421 4.3.2 beyond); 0 for no limit.
    max_connections: int = 1000
    #: Most simultaneous connections from one client IP address (421 4.7.0 beyond); 0 for no limit.
    max_connections_per_client: int = 50
    #: Most mail transactions (MAIL commands accepted) per connection (421 4.7.0 beyond); 0 for no limit.
    max_transactions: int = 0
    #: Commands that move no mail (NOOP, RSET, VRFY, EXPN, HELP, HELO/EHLO) a session may send before each further
    #: one counts as an error toward ``error_limit`` (Postfix's smtpd_junk_command_limit); a delivered message
    #: starts the count again. 0 for no limit.
    junk_command_limit: int = 100
    #: Seconds to wait before greeting; a client that talks first is refused (postscreen's pregreet test). 0: off.
    pregreet_delay: float = 0.0
    #: Seconds that transactions in flight may take to finish when the server shuts down.
    shutdown_timeout: float = 30.0
    #: What a bare CR or LF in message content gets: "reject" (550 5.5.2 after the final dot) or "allow".
    bare_newline: Literal["reject", "allow"] = "reject"
    #: Default chunk size handed to body() when the handler does not set chunk_size.
    chunk_size: int = 65536
    #: ESMTP extensions to advertise.
    pipelining: bool = True
    enhanced_status_codes: bool = True
    eightbitmime: bool = True
    smtputf8: bool = True
    #: CHUNKING (BDAT, RFC 3030) and, with it, BINARYMIME (RFC 3030 §3: BODY=BINARYMIME needs BDAT).
    chunking: bool = True
    binarymime: bool = True
    #: DSN (RFC 3461): RET/ENVID/NOTIFY/ORCPT parsed and handed to the handler. Off by default: advertising DSN
    #: promises the notifications RFC 3461 §5 asks for, which only a handler can keep.
    dsn: bool = False
    #: LMTP (RFC 2033) instead of SMTP: LHLO, and one reply per accepted recipient after the content.
    lmtp: bool = False
    #: STARTTLS (RFC 3207): an IOpenSSLServerConnectionCreator (e.g. `esmtpkit.server.tls.ServerTLS`) or context
    #: factory for ``transport.startTLS``; None: STARTTLS is not offered.
    tls_context: Any = field(default=None, compare=False)
    #: MAIL before TLS gets 530 5.7.0 (RFC 3207 §4). Satisfied on implicit-TLS listeners too.
    require_tls: bool = False
    #: AUTH (RFC 4954): a twisted.cred Portal (see `esmtpkit.server.sasl.build_portal`); None: AUTH is not offered.
    portal: Any = field(default=None, compare=False)
    #: SASL mechanisms to offer, in order, among those the portal's checkers can verify.
    auth_mechanisms: tuple[str, ...] = DEFAULT_ORDER
    #: Offer and accept AUTH only over TLS (RFC 4954 §4: 538 5.7.11 otherwise).
    auth_require_tls: bool = True
    #: MAIL before a successful AUTH gets 530 5.7.0 (a submission server, RFC 6409).
    require_auth: bool = False
    #: Whether an authenticated user (first argument) may act as another identity (second, PLAIN's authzid).
    auth_authorize: Callable[[str, str], bool] | None = field(default=None, compare=False)
    #: Password guessing, counted across connections (`esmtpkit.server.authlimit`): wrong passwords from one client
    #: address (an IPv6 /64) that start a cool-off of ``auth_cool_off`` seconds, in which AUTH gets 454 4.7.0
    #: (RFC 4954 §6); one failure is forgotten every ``auth_cool_off / limit`` seconds. 0: not counted.
    auth_failure_limit: int = 10
    #: The same for one user name, whatever the address (a guessing network); 0: not counted.
    auth_user_failure_limit: int = 30
    #: Seconds of a cool-off; 0 turns the whole throttle off.
    auth_cool_off: float = 300.0
    #: Seconds the reply to a failure is held once its address or user name has more than ``auth_delay_after``;
    #: doubled for each further one, up to 8 times (Dovecot's auth_failure_delay is 2 s). 0: no delay.
    auth_failure_delay: float = 2.0
    #: Failures of an address or user name answered without delay before ``auth_failure_delay`` applies.
    auth_delay_after: int = 3
    #: More ESMTP extensions, in EHLO order after the standard ones: objects providing
    #: `esmtpkit.server.extensions.IExtension` (see docs/extensions.md).
    extensions: tuple[Any, ...] = field(default=(), compare=False)
    #: Client networks trusted to use XCLIENT and XFORWARD (CIDR text, e.g. ``"127.0.0.0/8"``); none by default.
    trusted_networks: tuple[str, ...] = ()
    #: Handlers put in front of every connection's handler: each is called with the handler behind it and returns
    #: the one in front (mail-authentication checks, filters); the first listed is the outermost.
    fronts: tuple[Callable[[Any], Any], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.bare_newline not in ("reject", "allow"):
            raise ValueError("bare_newline must be 'reject' or 'allow'")
        for name in ("max_message_size", "max_recipients", "error_limit", "soft_error_limit", "error_delay",
                     "max_connections", "max_connections_per_client", "max_transactions", "pregreet_delay",
                     "junk_command_limit", "max_line_length", "max_header_size",
                     "shutdown_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("auth_failure_limit", "auth_user_failure_limit", "auth_cool_off", "auth_failure_delay",
                     "auth_delay_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_command_length < 512:
            raise ValueError("max_command_length below 512 breaks RFC 5321 §4.5.3.1.4")
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        names = self.auth_mechanisms.replace(",", " ").split() if isinstance(self.auth_mechanisms, str) \
            else self.auth_mechanisms
        object.__setattr__(self, "auth_mechanisms", tuple(m.upper() for m in names))
        unknown = [m for m in self.auth_mechanisms if m not in NAMES]
        if unknown:
            raise ValueError(f"unknown AUTH mechanism(s) {', '.join(unknown)}; known: {', '.join(NAMES)}")
        object.__setattr__(self, "extensions", tuple(self.extensions))
        object.__setattr__(self, "fronts", tuple(self.fronts))
        check_extensions(self)  # names, keywords and verbs unique: fail here, not at the first connection
        trusted = (self.trusted_networks,) if isinstance(self.trusted_networks, str) else self.trusted_networks
        try:
            networks = tuple(str(ipaddress.ip_network(net.strip(), strict=False)) for net in trusted)
        except ValueError as e:
            raise ValueError(f"trusted_networks: {e}") from None
        object.__setattr__(self, "trusted_networks", networks)
        if self.require_auth and self.portal is None:
            raise ValueError("require_auth needs a portal (no client could ever authenticate)")
