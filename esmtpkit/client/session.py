"""`send`: one delivery attempt to one server, whose result says what became of each recipient.

It connects (within the connect timeout), runs a `ClientProtocol` and always fires with an `Attempt`, never with
a failure: a refused connection, a timeout, a TLS problem or a lost connection becomes each recipient's
`Outcome`, as the server's replies do. Cancelled (the caller's deadline), it aborts the connection and fires at
once with what is known.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import IO, Any, Callable, Sequence

from twisted.internet import ssl
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from esmtpkit.core.outbound import Message, Outcome
from esmtpkit.client.options import ClientOptions
from esmtpkit.client.protocol import ClientProtocol

__all__ = ["Attempt", "OpenContent", "send", "tls_creator", "host_name"]

#: Opens a fresh, readable binary file of a message's content (RAW: CRLF line ends, no dot-stuffing).
OpenContent = Callable[[], IO[bytes]]

_log = Logger()
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


@dataclass
class Attempt:
    """One session's result: who answered (``host``), an Outcome for every recipient index asked for, and
    whether the session failed as a whole, so another host may be tried for the recipients left temporary."""

    host: str
    outcomes: dict[int, Outcome]
    session_failed: bool


def host_name(host: str) -> str:
    """The name in a host label: ``mx.example.net`` for ``mx.example.net[192.0.2.1]``, ``192.0.2.1`` for
    ``[192.0.2.1]``."""
    name, bracket, rest = host.partition("[")
    if not bracket:
        return host
    return name or rest.rstrip("]")


def tls_creator(options: ClientOptions, host: str = "") -> Any:
    """The client TLS settings for ``options``: with ``verify``, the chain and the name (``tls_hostname``, else
    the host's name) checked against ``ca_file`` or the platform's trust store; without, any certificate, as
    opportunistic TLS takes it (RFC 7435). ValueError or OSError when the settings cannot be made."""
    if not options.verify:
        return ssl.CertificateOptions(verify=False)
    name = options.tls_hostname or host_name(host)
    if not name:
        raise ValueError("verifying the server's certificate needs its name (tls_hostname)")
    if options.ca_file:
        with open(options.ca_file, "rb") as f:
            pems = _PEM_CERTIFICATE.findall(f.read())
        if not pems:
            raise ValueError(f"no certificate in {options.ca_file}")
        trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(pem) for pem in pems])
    else:
        trust = ssl.platformTrust()
    return ssl.optionsForClientTLS(name, trustRoot=trust)


class _OneProtocol(Factory):
    """Hands the endpoint the one protocol made for this attempt."""

    noisy = False

    def __init__(self, protocol: ClientProtocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: IAddress) -> Protocol:
        return self.protocol_instance


def _everyone(host: str, indexes: Sequence[int], outcome: Outcome, session_failed: bool = True) -> Attempt:
    return Attempt(host, {i: outcome for i in indexes}, session_failed)


def send(reactor: IReactorTime, endpoint: IStreamClientEndpoint, message: Message, open_content: OpenContent,
         options: ClientOptions, *, indexes: Sequence[int] | None = None, host: str = "") -> "Deferred[Attempt]":
    """Offer ``message`` to the server at ``endpoint`` for the recipients at ``indexes`` (default: those still
    pending). Fires with an `Attempt` holding an Outcome for each of them; never fails.

    ``host`` labels the server in outcomes (``mx.example.net[192.0.2.1]``) and names it for certificate checks.
    With ``tls="implicit"`` the endpoint is wrapped in TLS here. When an opportunistic STARTTLS handshake fails
    (never with ``verify``, which makes TLS required), the message is offered again over a new connection in
    clear. Cancelling the Deferred aborts the connection and fires it at once with the Attempt as it stands:
    answers already given are kept, the other recipients get 4.4.2 "attempt timed out". A REQUIRETLS message
    goes with `ClientOptions.for_requiretls` (verified TLS, never in clear), whatever ``options`` say.
    """
    chosen = list(message.pending if indexes is None else indexes)
    if not chosen:
        return succeed(Attempt(host, {}, False))
    if message.requiretls:
        options = options.for_requiretls()
    return _Sending(reactor, endpoint, message, open_content, options, chosen, host).start()


class _Sending:
    """One `send`: a connection (two, when opportunistic TLS fails and the message goes again in clear), and the
    Deferred that fires once with its Attempt, or at once when cancelled."""

    def __init__(self, reactor: IReactorTime, endpoint: IStreamClientEndpoint, message: Message,
                 open_content: OpenContent, options: ClientOptions, indexes: list[int], host: str) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.message = message
        self.open_content = open_content
        self.options = options
        self.indexes = indexes
        self.host = host
        self.where = host or "the server"
        self.result: Deferred[Attempt] = Deferred(self._cancel)
        self.cancelled = False
        self._protocol: ClientProtocol | None = None
        self._connecting: Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None

    def start(self) -> "Deferred[Attempt]":
        self._guarded(self._connect, self.options)
        return self.result

    def _guarded(self, step: Callable[..., None], *args: Any) -> None:
        """Run one step; a bug in it defers every recipient rather than leaving the Deferred unfired."""
        try:
            step(*args)
        except Exception:
            _log.failure("delivery attempt to {host} failed unexpectedly", host=self.where)
            self._finish(_everyone(self.host, self.indexes,
                                   Outcome.local(451, "4.3.0", "local error while delivering, will retry")))

    def _finish(self, attempt: Attempt) -> None:
        self._stop_timer()
        if not self.result.called:
            self.result.callback(attempt)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _connect(self, options: ClientOptions) -> None:
        endpoint = self.endpoint
        creator = None
        if options.tls != "none":
            try:
                creator = tls_creator(options, self.host)
            except (OSError, ValueError) as e:
                outcome = Outcome.local(451, "4.3.5", f"cannot set up TLS for {self.where}: {e}")
                self._finish(_everyone(self.host, self.indexes, outcome))
                return
            if options.tls == "implicit":
                endpoint = wrapClientTLS(creator, endpoint)
        protocol = ClientProtocol(self.message, self.open_content, options, self.indexes, clock=self.reactor,
                                  host=self.host, tls_creator=creator)
        self._protocol = protocol
        self._timer = self.reactor.callLater(options.timeouts.connect, self._too_slow)
        self._connecting = connecting = endpoint.connect(_OneProtocol(protocol))
        connecting.addCallbacks(lambda _: self._guarded(self._connected, protocol, options),
                                lambda failure: self._guarded(self._not_connected, failure))

    def _too_slow(self) -> None:
        self._timer = None
        if self._connecting is not None:
            self._connecting.cancel()

    def _connected(self, protocol: ClientProtocol, options: ClientOptions) -> None:
        self._connecting = None
        self._stop_timer()
        if self.cancelled:
            protocol.cancel()
            return
        protocol.finished.addCallback(lambda _: self._guarded(self._ended, protocol, options))

    def _not_connected(self, failure: Failure) -> None:
        timed_out = self._connecting is not None and self._timer is None
        self._connecting = None
        self._stop_timer()
        if self.cancelled:
            return
        if timed_out:
            text = f"connection to {self.where} timed out"
        elif failure.check(ConnectionRefusedError):
            text = f"connection refused by {self.where}"
        else:
            text = f"cannot connect to {self.where}: {failure.getErrorMessage()}"
        self._finish(_everyone(self.host, self.indexes, Outcome.local(451, "4.4.1", text)))

    def _ended(self, protocol: ClientProtocol, options: ClientOptions) -> None:
        if self.cancelled or self.result.called:
            return
        attempt = Attempt(self.host, dict(protocol.outcomes), protocol.session_failed)
        if (protocol.tls_failed and options.tls == "opportunistic" and not options.verify
                and options.username is None):
            _log.info("TLS with {host} failed, trying again without: {why}", host=self.where,
                      why=next(iter(attempt.outcomes.values())).text)
            self._connect(replace(options, tls="none"))
            return
        self._finish(attempt)

    def _cancel(self, result: "Deferred[Attempt]") -> None:
        """The caller gave up (its deadline): abort what is under way and fire with the Attempt as it stands."""
        self.cancelled = True
        self._stop_timer()
        protocol = self._protocol
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
        elif protocol is not None:
            protocol.cancel()
        timed_out = Outcome.local(451, "4.4.2", f"attempt timed out ({self.where}, while connecting)")
        outcomes = dict(protocol.outcomes) if protocol is not None else {}
        self._finish(Attempt(self.host, {i: outcomes.get(i, timed_out) for i in self.indexes}, True))
