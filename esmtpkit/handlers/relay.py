"""`Relay`: forward each message to an upstream smarthost, answering 250 only once the upstream has accepted it.

Net::SMTP::Server::Relay in Pythonic form, built on Twisted's own client (``twisted.mail.smtp.ESMTPSenderFactory``).
Not an open relay: recipients are accepted only for authenticated sessions or clients inside ``networks``.
The body is spooled while it arrives (memory up to ``spool_max`` bytes, then a temporary file), and goes upstream
with CRLF line ends only (RFC 5321 §2.3.8), so no bare CR or LF can end the data early at a lenient next hop.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import secrets
import tempfile
from typing import Any, Iterable, Iterator, Mapping

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from esmtpkit.core import dsn
from esmtpkit.core.address import Address
from esmtpkit.core.content import ContentMode
from esmtpkit.core.escape import escape
from esmtpkit.core.reply import Reply
from esmtpkit.core.stuffing import DotStuffer
from esmtpkit.core.trace import received_header
from esmtpkit.handlers.base import MessageHandler
from esmtpkit.handlers.settings import flag

__all__ = ["Relay", "DEFAULT_NETWORKS", "DotStuffer", "parse_networks"]

#: Clients that may relay without authenticating: this host only.
DEFAULT_NETWORKS = ("127.0.0.0/8", "::1/128")

_TLS_MODES = ("none", "starttls", "implicit")
_ENHANCED_PREFIX = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} +")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(networks: str | Iterable[str]) -> tuple[Network, ...]:
    """Networks from CIDR texts (a comma/space separated string or an iterable); ValueError on a bad one."""
    items = re.split(r"[,\s]+", networks) if isinstance(networks, str) else list(networks)
    return tuple(ipaddress.ip_network(str(item).strip(), strict=False) for item in items if str(item).strip())


class UpstreamError(Exception):
    """The upstream did not take the message; ``reply`` is what our client gets."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


def _mail_dsn(params: Mapping[str, Any]) -> bytes:
    """RET and ENVID as they go after ``MAIL FROM:<...>`` (RFC 3461 §4.3, §4.4), or b""."""
    words = []
    if params.get("RET") is not None:
        words.append(f" RET={params['RET']}")
    if params.get("ENVID") is not None:
        words.append(f" ENVID={dsn.xtext_encode(params['ENVID'])}")
    return "".join(words).encode("ascii")


def _rcpt_dsn(params: Mapping[str, Any]) -> bytes:
    """NOTIFY and ORCPT as they go after ``RCPT TO:<...>`` (RFC 3461 §4.1, §4.2), or b""."""
    words = [f" {key}={params[key]}" for key in ("NOTIFY", "ORCPT") if params.get(key) is not None]
    return "".join(words).encode("ascii")


def _text(resp: Any) -> str:
    if isinstance(resp, bytes):
        resp = resp.decode("utf-8", "replace")
    lines = [_ENHANCED_PREFIX.sub("", line).strip() for line in str(resp or "").splitlines()]
    return " ".join(line for line in lines if line)


@functools.lru_cache(maxsize=None)
def _sender_classes() -> tuple[type, type]:
    """Subclasses of Twisted's ESMTP sender and its factory, built on first use.

    ``twisted.mail.smtp`` imports the global reactor, so it is imported here, not when this module is.
    """
    from twisted.mail import smtp

    class Path(smtp.Address):
        """A path sent exactly as the client gave it (Twisted's own Address would reparse and may rewrite it)."""

        def __init__(self, text: str, dsn: bytes = b"") -> None:
            self.addrstr = text.encode("ascii")
            self.dsn = dsn

        def __bytes__(self) -> bytes:
            return self.addrstr

    class Sender(smtp.ESMTPSender):
        """Sends one message; all or nothing: DATA is sent only if every recipient was accepted."""

        offers_dsn = False

        def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
            """Note whether the EHLO reply offers DSN (RFC 3461 §5.2.1); after STARTTLS the new reply decides."""
            keywords = (line.split(None, 1)[0].upper() for line in resp.splitlines()[1:] if line.strip())
            self.offers_dsn = b"DSN" in keywords
            super().esmtpState_serverConfig(code, resp)

        def sendLine(self, line: bytes) -> None:
            """Pass the client's DSN parameters on with MAIL and RCPT, but only to an upstream offering DSN."""
            if self.offers_dsn:
                if line.startswith(b"MAIL FROM:"):
                    line += self.factory.mail_dsn
                elif line.startswith(b"RCPT TO:"):
                    line += self.lastAddress.dsn
            super().sendLine(line)

        def callLater(self, period: float, func: Any) -> Any:
            return self.factory.reactor.callLater(period, func)

        def transformChunk(self, chunk: bytes) -> bytes:
            self.resetTimeout()
            return self.factory.stuffer(chunk)

        def finishedFileTransfer(self, lastsent: bytes) -> None:
            """End the data as the stuffer says: CRLF before the dot, whatever the content's last octet was."""
            self.transport.write(self.factory.stuffer.finish())

        def getMailFrom(self) -> Any:
            if self.done:
                return None
            self.done = 1
            return Path(self.factory.sender)

        def getMailTo(self) -> Iterator[Any]:
            for recipient, params in zip(self.factory.recipients, self.factory.rcpt_params):
                yield Path(recipient, _rcpt_dsn(params))
            if any(code not in smtp.SUCCESS for _, code, _ in self.toAddressesResult):
                self.successAddresses = []  # no DATA: a partial delivery could be neither promised nor undone

        def sentMail(self, code: int, resp: Any, numOk: int, addresses: list[Any], log: Any) -> None:
            refused = [(bytes(a).decode("ascii"), c, _text(r)) for a, c, r in addresses if c not in smtp.SUCCESS]
            if refused:
                worst = 451 if any(c < 500 for _, c, _ in refused) else 554
                detail = "; ".join(f"<{a}>: {c} {r}".rstrip() for a, c, r in refused)
                self.factory.finish(UpstreamError(_refusal(worst, f"Upstream refused recipient(s): {detail}")))
            elif code in smtp.SUCCESS:
                said = _text(resp)
                self.factory.finish(Reply(250, (f"Ok: relayed ({said})" if said else "Ok: relayed",), "2.0.0"))
            else:
                worst = 451 if code < 500 else 554
                self.factory.finish(UpstreamError(_refusal(worst, f"Upstream said: {code} {_text(resp)}")))

        def sendError(self, exc: Exception) -> None:
            if isinstance(exc, smtp.SMTPTimeoutError) and self.transport is not None:
                self.transport.abortConnection()
            else:
                smtp.SMTPClient.sendError(self, exc)
            self.factory.finish(UpstreamError(_unavailable(self.factory.where, _text(getattr(exc, "resp", exc)))))

        def connectionLost(self, reason: Failure = smtp.protocol.connectionDone) -> None:
            super().connectionLost(reason)
            self.factory.finish(UpstreamError(_unavailable(self.factory.where, reason.getErrorMessage())))
            self.factory.file.close()  # only now: the file sender may read until the connection is gone

    class SenderFactory(smtp.ESMTPSenderFactory):
        """One message to send; ``done`` fires once with our client's Reply or fails with UpstreamError."""

        protocol = Sender
        noisy = False

        def __init__(self, relay: "Relay", sender: str, recipients: list[str], file: Any, identity: str,
                     mail_params: Mapping[str, Any] | None = None,
                     rcpt_params: list[Mapping[str, Any]] | None = None) -> None:
            self.done: Deferred[Reply] = Deferred()
            super().__init__(
                relay.username.encode("utf-8") if relay.username else None,
                relay.password.encode("utf-8") if relay.password else None,
                Path(sender), recipients, file, Deferred(), retries=0, timeout=relay.timeout,
                contextFactory=relay._tls_options() if relay.tls == "starttls" else None,
                heloFallback=not relay.username and relay.tls != "starttls",
                requireAuthentication=bool(relay.username),
                requireTransportSecurity=relay.tls == "starttls",
            )
            self.domain = identity.encode("ascii", "replace")
            self.sender = sender
            self.recipients = recipients
            self.mail_dsn = _mail_dsn(mail_params or {})
            given = list(rcpt_params or [])
            self.rcpt_params = given[:len(recipients)] + [{}] * (len(recipients) - len(given))
            self.reactor = relay._reactor()
            self.stuffer = DotStuffer()
            self.where = f"{relay.host}:{relay.port}"

        def finish(self, outcome: Reply | Exception) -> None:
            self.sendFinished = True
            if self.done.called:
                return
            if isinstance(outcome, Exception):
                self.done.errback(outcome)
            else:
                self.done.callback(outcome)

    return SenderFactory, Sender


def _refusal(code: int, text: str) -> Reply:
    if code < 500:
        return Reply(451, (text,), "4.4.1")
    return Reply(554, (text,), "5.0.0")


def _unavailable(where: str, detail: str) -> Reply:
    text = f"Upstream {where} unavailable, try again later"
    return Reply(451, (f"{text} ({detail})" if detail else text,), "4.4.1")


class Relay(MessageHandler):
    """Forward every accepted message to the smarthost ``host``:``port``, unchanged but for a ``Received:`` field
    and CRLF for any bare CR or LF (`DotStuffer`); ``BODY=BINARYMIME`` is refused at MAIL (see `mail`).

    Who may relay: an authenticated session, or a client whose IP is in ``networks`` (default: loopback only);
    every other RCPT gets ``554 5.7.1 Relay access denied``. After the final dot the client waits until the
    upstream answered: 250 means the upstream accepted the message for every recipient; 451 4.4.1 means it was
    unreachable, timed out or answered 4xx (the client keeps the message and retries); 554 5.0.0 carries the
    upstream's permanent refusal. ``tls``: "none", "starttls" (required) or "implicit"; ``ca_file`` and
    ``tls_hostname`` tune certificate checks. ``username``/``password`` log in upstream.
    """

    content_mode = ContentMode.RAW
    log = Logger()

    def __init__(self, host: str = "127.0.0.1", port: int | str = 25,
                 networks: str | Iterable[str] = DEFAULT_NETWORKS, username: str | None = None,
                 password: str | None = None, tls: str = "none", tls_hostname: str | None = None,
                 ca_file: str | None = None, timeout: float | str = 60.0, spool_max: int | str = 1024 * 1024,
                 trace: bool | str = True, reactor: Any = None, endpoint: Any = None) -> None:
        self.host = str(host)
        self.port = int(port)
        self.networks = parse_networks(networks)
        self.username = username or None
        self.password = password or None
        if tls not in _TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(_TLS_MODES)}, not {tls!r}")
        self.tls = tls
        self.tls_hostname = tls_hostname
        self.ca_file = ca_file
        self.timeout = float(timeout)
        self.spool_max = int(spool_max)
        self.trace = flag(trace)
        self.reactor = reactor
        self.endpoint = endpoint
        self._spool: Any = None
        self._sending = False

    # ---- who may relay ----------------------------------------------------------------------------------------

    def may_relay(self) -> bool:
        """True when the session is authenticated or the client's IP is inside one of ``networks``."""
        session = self.session
        if session is None:
            return False
        if session.authenticated:
            return True
        try:
            ip = ipaddress.ip_address(session.peer_ip)
        except ValueError:
            return False
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        return any(candidate in network for candidate in candidates for network in self.networks
                   if candidate.version == network.version)

    def mail(self, sender: Address, params: Any) -> Any:
        """Refuse what Twisted's client cannot pass on unchanged (SMTPUTF8, non-ASCII paths, binary content).

        Binary content goes only with BDAT to a next hop offering BINARYMIME (RFC 3030 §3); the upstream is sent
        DATA, so ``BODY=BINARYMIME`` is refused before any content: 555, a MAIL parameter this server cannot
        implement (RFC 5321 §4.1.1.11), with 5.6.3, conversion required but not supported (RFC 3463 §3.7).
        """
        if params.get("SMTPUTF8") or not str(sender).isascii():
            return Reply(555, ("SMTPUTF8 cannot be relayed by this server",), "5.5.4")
        if params.get("BODY") == "BINARYMIME":
            return Reply(555, ("BODY=BINARYMIME cannot be relayed by this server: send 7BIT or 8BITMIME content",),
                         "5.6.3")
        return super().mail(sender, params)

    def rcpt(self, recipient: Address, params: Any) -> Any:
        """``554 5.7.1 Relay access denied`` unless `may_relay`; otherwise the default 250."""
        if not self.may_relay():
            return Reply(554, (f"<{recipient}>: Relay access denied",), "5.7.1")
        if not str(recipient).isascii():
            return Reply(553, (f"<{recipient}>: non-ASCII address cannot be relayed",), "5.6.7")
        return super().rcpt(recipient, params)

    # ---- the message ------------------------------------------------------------------------------------------

    def data(self) -> Any:
        """Open the spool and write our ``Received:`` field first (RFC 5321 §4.4)."""
        self._close_spool()
        self._spool = tempfile.SpooledTemporaryFile(max_size=self.spool_max)
        session = self.session
        if self.trace and session is not None:
            trace_id = session.envelope.id or secrets.token_hex(8).upper()
            self._spool.write(received_header(session, id=trace_id, show_user=False))
        return super().data()

    def body(self, chunk: bytes) -> None:
        """Append to the spool (memory up to ``spool_max``, then a temporary file)."""
        self._spool.write(chunk)

    def eom(self) -> "Deferred[Reply] | Reply":
        """Send the spooled message upstream; the Deferred fires with 250, 451 4.4.1 or 554 5.0.0."""
        session = self.session
        assert session is not None and self._spool is not None
        envelope = session.envelope
        spool, self._spool = self._spool, None
        spool.seek(0)
        factory_class, _ = _sender_classes()
        try:
            factory = factory_class(self, str(envelope.sender or ""), [str(r) for r in envelope.recipients], spool,
                                    session.hostname, envelope.mail_params, envelope.rcpt_params)
            connecting = self._endpoint().connect(factory)
        except Exception:
            spool.close()
            self.log.failure("cannot start relaying to {host}:{port}", host=self.host, port=self.port)
            return _unavailable(f"{self.host}:{self.port}", "")
        self._sending = True

        def not_connected(failure: Failure) -> None:
            factory.finish(UpstreamError(_unavailable(factory.where, failure.getErrorMessage())))
            spool.close()

        connecting.addErrback(not_connected)

        def answer(result: Reply | Failure) -> Reply:
            self._sending = False
            if isinstance(result, Failure):
                if result.check(UpstreamError):
                    reply: Reply = result.value.reply
                else:
                    self.log.failure("relaying to {where} failed", result, where=factory.where)
                    reply = _unavailable(factory.where, "")
                self.log.warn("not relayed to {where}: {reply}", where=factory.where, reply=escape(str(reply)))
                return reply
            return result

        return factory.done.addBoth(answer)

    def abort(self, reason: str) -> None:
        """Drop the spooled message (a send already under way is left to finish)."""
        if not self._sending:
            self._close_spool()

    def _close_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    # ---- the upstream connection ------------------------------------------------------------------------------

    def _reactor(self) -> Any:
        if self.reactor is None:
            from twisted.internet import reactor

            self.reactor = reactor
        return self.reactor

    def _tls_options(self) -> Any:
        from twisted.internet import ssl

        trust = None
        if self.ca_file:
            with open(self.ca_file, "rb") as f:
                trust = ssl.Certificate.loadPEM(f.read())
        return ssl.optionsForClientTLS(self.tls_hostname or self.host, trustRoot=trust)

    def _endpoint(self) -> Any:
        if self.endpoint is not None:
            return self.endpoint
        from twisted.internet import endpoints

        reactor = self._reactor()
        try:
            version = ipaddress.ip_address(self.host).version
        except ValueError:
            version = 0
        if version == 4:
            endpoint = endpoints.TCP4ClientEndpoint(reactor, self.host, self.port, timeout=self.timeout)
        elif version == 6:
            endpoint = endpoints.TCP6ClientEndpoint(reactor, self.host, self.port, timeout=self.timeout)
        else:
            endpoint = endpoints.HostnameEndpoint(reactor, self.host, self.port, timeout=self.timeout)
        if self.tls == "implicit":
            endpoint = endpoints.wrapClientTLS(self._tls_options(), endpoint)
        return endpoint
