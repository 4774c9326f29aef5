"""`Relay`: forward each message to an upstream smarthost, answering 250 only once the upstream has accepted it.

Net::SMTP::Server::Relay in Pythonic form, on esmtpkit's own client (`esmtpkit.client.session.send`), so what the
client asked for goes on to an upstream that offers it: SIZE, BODY=8BITMIME, BODY=BINARYMIME (in BDAT chunks),
SMTPUTF8 and the DSN parameters. Not an open relay: recipients are accepted only for authenticated sessions or
clients inside ``networks`` (`esmtpkit.handlers.access`). The message is spooled while it arrives (memory up to
``spool_max`` bytes, then a temporary file) and goes upstream all or nothing: to every recipient, or to none. After
DATA it goes with CRLF line ends only (RFC 5321 §2.3.8), so no bare CR or LF can end the data early at a lenient
next hop.
"""

from __future__ import annotations

import dataclasses
import io
import ipaddress
import secrets
import tempfile
from typing import IO, Any, Final, Iterable, Mapping

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from esmtpkit.client.options import ClientOptions, Timeouts
from esmtpkit.client.session import send
from esmtpkit.core.address import Address
from esmtpkit.core.content import ContentMode
from esmtpkit.core.escape import escape
from esmtpkit.core.outbound import Message, Outcome
from esmtpkit.core.reply import Reply
from esmtpkit.core.session import Session
from esmtpkit.core.stuffing import DotStuffer
from esmtpkit.core.trace import received_header
from esmtpkit.handlers.access import DEFAULT_NETWORKS, may_relay, parse_networks
from esmtpkit.handlers.base import MessageHandler
from esmtpkit.handlers.queue import to_message
from esmtpkit.handlers.settings import flag
from esmtpkit.mailauth.signing import parse_sign_from, signer_for

__all__ = ["Relay", "DEFAULT_NETWORKS", "DotStuffer", "parse_networks", "TLS_MODES", "relay_reply"]

#: The Relay's ``tls`` settings and what each asks of the client: its TLS mode, and whether the certificate
#: is checked. ``opportunistic`` takes any certificate and goes on in clear when STARTTLS is not offered.
_TLS: Final = {"none": ("none", False), "opportunistic": ("opportunistic", False),
               "starttls": ("required", True), "implicit": ("implicit", True)}
TLS_MODES: Final = tuple(_TLS)

#: The longest text quoted from the upstream in one reply (RFC 5321 §4.5.3.1.5 allows 512 octets a line).
_QUOTE_MAX: Final = 400


def _clip(text: str, limit: int = _QUOTE_MAX) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def relay_reply(message: Message, outcomes: Mapping[int, Outcome], where: str) -> Reply:
    """The one reply at the end of the data, given what became of each recipient upstream (all or nothing).

    250 when every recipient was accepted; else 451 4.4.1 when anything the upstream (or, when it said nothing,
    this host) reported is temporary, 554 with the upstream's 5.x.x code when everything is permanent. Recipients
    the client held back because another was refused (no remote answer) do not decide the reply.
    """
    missed = {i: o for i, o in sorted(outcomes.items()) if not o.delivered}
    if not missed:
        said = next((o.text for o in outcomes.values() if o.text), "")
        return Reply(250, (_clip(f"Ok: relayed ({said})") if said else "Ok: relayed",), "2.0.0")
    telling = {i: o for i, o in missed.items() if o.remote} or missed
    temporary = any(o.temporary for o in telling.values())
    answers = set(telling.values())
    if len(answers) == 1 and len(telling) == len(outcomes):
        [outcome] = answers
        if outcome.remote:
            text = f"Upstream said: {outcome.code} {outcome.text}"
        elif temporary:
            text = f"Upstream {where} unavailable, try again later ({outcome.text})"
        else:
            text = f"Upstream {where} cannot take this message: {outcome.text}"
    else:
        text = "Upstream refused recipient(s): " + "; ".join(
            f"<{message.recipients[i].address}>: {o.code} {o.text}" for i, o in telling.items())
    if temporary:
        return Reply(451, (_clip(text),), "4.4.1")
    enhanced = next(iter(telling.values())).enhanced
    return Reply(554, (_clip(text),), enhanced if enhanced.startswith("5.") else "5.0.0")


class _SpoolReader(io.RawIOBase):
    """Reads the spool from its start and leaves it open when closed, so that each attempt (a second one in clear
    after a failed opportunistic TLS handshake) reads the whole message."""

    def __init__(self, spool: IO[bytes]) -> None:
        super().__init__()
        self._spool = spool
        self._position = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        self._spool.seek(self._position)
        data = self._spool.read(-1 if size is None else size)
        self._position += len(data)
        return data


class Relay(MessageHandler):
    """Forward every accepted message to the smarthost ``host``:``port``, unchanged but for a ``Received:`` field
    and, after DATA, CRLF for any bare CR or LF (`DotStuffer`).

    Who may relay: an authenticated session, or a client whose IP is in ``networks`` (default: loopback only);
    every other RCPT gets ``554 5.7.1 Relay access denied``. After the end of the data the client waits until the
    upstream answered: 250 means the upstream accepted the message for every recipient; 451 4.4.1 means it was
    unreachable, timed out or answered 4xx (the client keeps the message and retries); 554 carries the
    upstream's permanent refusal (its 5.x.x code), or says why the message cannot go to this upstream at all
    (SMTPUTF8 5.6.7, BINARYMIME 5.6.3, SIZE 5.3.4). ``tls``: "none", "opportunistic" (STARTTLS when offered, any
    certificate), "starttls" (required) or "implicit", the last two with the certificate checked against
    ``ca_file`` (else the system's trust) for ``tls_hostname`` (else ``host``). ``username``/``password`` log in
    upstream, over TLS only. ``timeout`` bounds the connection and each wait for the upstream. ``dkim_sign``
    (``DOMAIN:SELECTOR:KEYFILE``, comma-separated) DKIM-signs mail from those domains, covering the fields named in
    ``dkim_headers`` (``From:To:Subject``; `DEFAULT_HEADERS` when not given); ``arc_seal`` (one such key)
    seals mail checked here (it carries an ``Authentication-Results:`` by ``authserv_id``) with an ARC set
    (`esmtpkit.mailauth.signing`). Only the mail of this server's own users is DKIM-signed: from an authenticated
    session or a client inside ``dkim_sign_from`` (IPs and CIDRs; default this host, ``none``: authenticated
    sessions only).
    """

    content_mode = ContentMode.RAW
    log = Logger()

    def __init__(self, host: str = "127.0.0.1", port: int | str = 25,
                 networks: str | Iterable[str] = DEFAULT_NETWORKS, username: str | None = None,
                 password: str | None = None, tls: str = "none", tls_hostname: str | None = None,
                 ca_file: str | None = None, timeout: float | str = 60.0, spool_max: int | str = 1024 * 1024,
                 trace: bool | str = True, dkim_sign: str | None = None, dkim_headers: str | None = None,
                 arc_seal: str | None = None, authserv_id: str | None = None,
                 dkim_sign_from: str | Iterable[str] | None = None, reactor: Any = None,
                 endpoint: Any = None) -> None:
        self.host = str(host)
        self.port = int(port)
        self.networks = parse_networks(networks)
        self.username = username or None
        self.password = password or None
        if tls not in _TLS:
            raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {tls!r}")
        self.tls = tls
        self.tls_hostname = tls_hostname
        self.ca_file = ca_file
        self.timeout = float(timeout)
        if not self.timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.spool_max = int(spool_max)
        self.trace = flag(trace)
        self.reactor = reactor
        self.endpoint = endpoint
        if self.username is not None and tls == "none":
            raise ValueError("a username needs tls (starttls, implicit or opportunistic): a password is never "
                             "sent in clear")
        self.options = self._client_options()
        self.signer = signer_for(dkim_sign, arc_seal, authserv_id, reactor, headers=dkim_headers)
        try:
            self.sign_from = parse_sign_from(dkim_sign_from)
        except ValueError as e:
            raise ValueError(f"dkim_sign_from: {e}") from None
        self._spool: Any = None
        self._sending = False
        self._eight_bit = False

    @property
    def where(self) -> str:
        """The upstream as ``host:port`` (``[::1]:25`` for an IPv6 address), as replies name it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    # ---- who may relay ----------------------------------------------------------------------------------------

    def may_relay(self) -> bool:
        """True when the session is authenticated or the client's IP is inside one of ``networks``."""
        return may_relay(self.session, self.networks)

    def rcpt(self, recipient: Address, params: Any) -> Any:
        """``554 5.7.1 Relay access denied`` unless `may_relay`; otherwise the default 250."""
        if not self.may_relay():
            return Reply(554, (f"<{recipient}>: Relay access denied",), "5.7.1")
        return super().rcpt(recipient, params)

    # ---- the message ------------------------------------------------------------------------------------------

    def data(self) -> Any:
        """Open the spool and write our ``Received:`` field first (RFC 5321 §4.4)."""
        self._close_spool()
        self._spool = tempfile.SpooledTemporaryFile(max_size=self.spool_max)
        self._eight_bit = False
        session = self.session
        if self.trace and session is not None:
            trace_id = session.envelope.id or secrets.token_hex(8).upper()
            self._spool.write(received_header(session, id=trace_id, show_user=False))
        return super().data()

    def body(self, chunk: bytes) -> None:
        """Append to the spool (memory up to ``spool_max``, then a temporary file), noting any 8-bit octet."""
        self._spool.write(chunk)
        if not self._eight_bit and not chunk.isascii():
            self._eight_bit = True

    def eom(self) -> "Deferred[Reply] | Reply":
        """Send the spooled message upstream, all or nothing; the Deferred fires with the reply `relay_reply`
        gives (250, 451 4.4.1 or 554)."""
        session = self.session
        assert session is not None and self._spool is not None
        spool, self._spool = self._spool, None
        try:
            reactor = self._reactor()
            message = to_message(session, session.envelope.id or secrets.token_hex(8).upper(), spool.tell(),
                                 reactor.seconds())
            if message.body == "8BITMIME" and not self._eight_bit:
                message.body = None  # plain ASCII is 7BIT: it may go to an upstream without 8BITMIME (RFC 6152)
            options = self._options_for(session.hostname)
            endpoint = self._endpoint()
        except Exception:
            spool.close()
            self.log.failure("cannot start relaying to {where}", where=self.where)
            return Reply(451, (f"Upstream {self.where} unavailable, try again later",), "4.4.1")
        self._sending = True
        return Deferred.fromCoroutine(self._relay(session, message, spool, reactor, endpoint, options))

    async def _relay(self, session: Session, message: Message, spool: IO[bytes], reactor: Any, endpoint: Any,
                     options: ClientOptions) -> Reply:
        """Sign (when there is anything to add) and send; a failure to read the message for signing and a failure
        of the send itself are each logged as what they are, and answered 451 4.4.1."""
        unavailable = Reply(451, (f"Upstream {self.where} unavailable, try again later",), "4.4.1")

        def content() -> IO[bytes]:
            return _SpoolReader(spool)  # type: ignore[return-value]

        opener: Any = content
        try:
            sign = may_relay(session, self.sign_from)
            if self.signer is not None and self.signer.acts_on(sign=sign):
                if not sign and self.signer.keys:
                    self.log.info("{id}: not DKIM-signed: client {client} neither authenticated nor in "
                                  "dkim_sign_from", id=message.id, client=escape(session.peer_ip) or "unknown")
                try:
                    opener = await self.signer.prepare(content, binary=message.body == "BINARYMIME", sign=sign)
                except Exception:
                    self.log.failure("cannot read the message to sign it for {where}", where=self.where)
                    return unavailable
            try:
                attempt = await send(reactor, endpoint, message, opener, options, host=self.host)
            except Exception:
                self.log.failure("cannot send the message to {where}", where=self.where)
                return unavailable
        finally:
            self._sending = False
            spool.close()
        reply = relay_reply(message, attempt.outcomes, self.where)
        if reply.code != 250:
            self.log.warn("not relayed to {where}: {reply}", where=self.where, reply=escape(str(reply)))
        return reply

    def abort(self, reason: str) -> None:
        """Drop the spooled message (a send already under way is left to finish)."""
        if not self._sending:
            self._close_spool()

    def _close_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    # ---- the upstream connection ------------------------------------------------------------------------------

    def _client_options(self) -> ClientOptions:
        """The client's settings for this Relay: all or nothing, one ``timeout`` for every wait."""
        mode, verify = _TLS[self.tls]
        waits = Timeouts(**{f.name: self.timeout for f in dataclasses.fields(Timeouts)})
        return ClientOptions(tls=mode, verify=verify, tls_hostname=self.tls_hostname or self.host,
                             ca_file=self.ca_file, username=self.username, password=self.password,
                             timeouts=waits, all_or_nothing=True)

    def _options_for(self, hostname: str) -> ClientOptions:
        """`options` with this server's name for EHLO, as the session knows it (else the options' own)."""
        try:
            return dataclasses.replace(self.options, helo=hostname)
        except ValueError:
            return self.options

    def _reactor(self) -> Any:
        if self.reactor is None:
            from twisted.internet import reactor

            self.reactor = reactor
        return self.reactor

    def _endpoint(self) -> Any:
        """The upstream's endpoint, in clear (the client adds TLS for ``tls="implicit"``)."""
        if self.endpoint is not None:
            return self.endpoint
        from twisted.internet import endpoints

        reactor = self._reactor()
        try:
            version = ipaddress.ip_address(self.host).version
        except ValueError:
            version = 0
        if version == 4:
            return endpoints.TCP4ClientEndpoint(reactor, self.host, self.port, timeout=self.timeout)
        if version == 6:
            return endpoints.TCP6ClientEndpoint(reactor, self.host, self.port, timeout=self.timeout)
        return endpoints.HostnameEndpoint(reactor, self.host, self.port, timeout=self.timeout)
