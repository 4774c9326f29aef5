"""`send`: one delivery attempt to one server, whose result says what became of each recipient.

It connects (within the connect timeout), runs a `ClientProtocol` and always fires with an `Attempt`, never with
a failure: a refused connection, a timeout, a TLS problem or a lost connection becomes each recipient's
`Outcome`, as the server's replies do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import IO, Any, Callable, Sequence

from twisted.internet import ssl
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IAddress, IReactorTime, IStreamClientEndpoint
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
    (and certificates are not verified), the message is offered again over a new connection in clear.
    """
    chosen = list(message.pending if indexes is None else indexes)
    if not chosen:
        return succeed(Attempt(host, {}, False))
    d = _attempt(reactor, endpoint, message, open_content, options, chosen, host)

    def retry_in_clear(result: tuple[Attempt, bool]) -> Any:
        attempt, tls_failed = result
        if tls_failed and options.tls == "opportunistic" and not options.verify and options.username is None:
            _log.info("TLS with {host} failed, trying again without: {why}", host=host or "the server",
                      why=next(iter(attempt.outcomes.values())).text)
            plain = replace(options, tls="none")
            return _attempt(reactor, endpoint, message, open_content, plain, chosen, host).addCallback(
                lambda again: again[0])
        return attempt

    def unexpected(failure: Failure) -> Attempt:
        _log.failure("delivery attempt to {host} failed unexpectedly", failure, host=host or "the server")
        return _everyone(host, chosen, Outcome.local(451, "4.3.0", "local error while delivering, will retry"))

    return d.addCallback(retry_in_clear).addErrback(unexpected)


def _attempt(reactor: IReactorTime, endpoint: IStreamClientEndpoint, message: Message, open_content: OpenContent,
             options: ClientOptions, indexes: list[int], host: str) -> "Deferred[tuple[Attempt, bool]]":
    """One connection: fires with the Attempt and whether a TLS handshake failed."""
    where = host or "the server"
    creator = None
    if options.tls != "none":
        try:
            creator = tls_creator(options, host)
        except (OSError, ValueError) as e:
            outcome = Outcome.local(451, "4.3.5", f"cannot set up TLS for {where}: {e}")
            return succeed((_everyone(host, indexes, outcome), False))
        if options.tls == "implicit":
            endpoint = wrapClientTLS(creator, endpoint)
    protocol = ClientProtocol(message, open_content, options, indexes, clock=reactor, host=host,
                              tls_creator=creator)
    connecting = endpoint.connect(_OneProtocol(protocol))
    timed_out = []

    def too_slow() -> None:
        timed_out.append(True)
        connecting.cancel()

    timer = reactor.callLater(options.timeouts.connect, too_slow)

    def connected(_: Any) -> "Deferred[tuple[Attempt, bool]]":
        if timer.active():
            timer.cancel()
        return protocol.finished.addCallback(
            lambda _: (Attempt(host, dict(protocol.outcomes), protocol.session_failed), protocol.tls_failed))

    def not_connected(failure: Failure) -> tuple[Attempt, bool]:
        if timer.active():
            timer.cancel()
        if timed_out:
            text = f"connection to {where} timed out"
        elif failure.check(ConnectionRefusedError):
            text = f"connection refused by {where}"
        else:
            text = f"cannot connect to {where}: {failure.getErrorMessage()}"
        return _everyone(host, indexes, Outcome.local(451, "4.4.1", text)), False

    return connecting.addCallbacks(connected, not_connected)
