"""Server TLS for STARTTLS (RFC 3207) and implicit TLS (RFC 8314): PEM files in, OpenSSL connections out.

`ServerTLS` reads a certificate (with its chain) and a private key from PEM files, offers TLS 1.2 or newer, and
re-reads the files on `ServerTLS.reload` so that new connections get a renewed certificate while established ones
keep theirs. It is an ``IOpenSSLServerConnectionCreator``: give it to ``transport.startTLS`` for STARTTLS, or to
``twisted.internet.endpoints.wrapServerTLS`` for an implicit-TLS listener. `is_tls` says whether a transport is
encrypted; `tls_info` and `describe` report what it negotiated, for the session and for ``Received`` headers.
"""

from __future__ import annotations

import os
import re
from typing import Any, Final, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from zope.interface import implementer

__all__ = ["ServerTLS", "TLSConfigError", "load_options", "is_tls", "tls_info", "describe"]

_CERTIFICATE: Final = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.S)
_PRIVATE_KEY: Final = re.compile(rb"-----BEGIN ((?:RSA |EC |)PRIVATE KEY)-----\r?\n.+?-----END \1-----", re.S)
_ENCRYPTED_KEY: Final = re.compile(rb"-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type: 4,ENCRYPTED")


class TLSConfigError(Exception):
    """The certificate or key files cannot be used; the message says which file and why."""


def _read(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"cannot read {os.fspath(path)}: {e.strerror or e}") from None


def load_options(cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str] | None = None, *,
                 minimum: TLSVersion = TLSVersion.TLSv1_2) -> CertificateOptions:
    """Build server `CertificateOptions` from PEM files and check that they work together.

    ``cert_path`` holds the server certificate first, then any intermediate certificates; ``key_path`` the
    unencrypted private key (None: the key is in ``cert_path`` too). Raises `TLSConfigError`.
    """
    cert_pem = _read(cert_path)
    key_pem = cert_pem if key_path is None else _read(key_path)
    key_source = os.fspath(cert_path if key_path is None else key_path)
    if not _CERTIFICATE.search(cert_pem):
        raise TLSConfigError(f"no PEM certificate in {os.fspath(cert_path)}")
    key_match = _PRIVATE_KEY.search(key_pem)
    if key_match is None:
        why = "an encrypted private key (not supported)" if _ENCRYPTED_KEY.search(key_pem) else "no PEM private key"
        raise TLSConfigError(f"{why} in {key_source}")
    try:
        certificates = x509.load_pem_x509_certificates(b"\n".join(_CERTIFICATE.findall(cert_pem)))
    except ValueError as e:
        raise TLSConfigError(f"bad certificate in {os.fspath(cert_path)}: {e}") from None
    try:
        key = serialization.load_pem_private_key(key_match.group(0), password=None)
    except (TypeError, ValueError) as e:
        raise TLSConfigError(f"bad private key in {key_source}: {e}") from None
    options = CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]  # pyOpenSSL prefers cryptography objects to PKey/X509
        certificate=certificates[0],  # type: ignore[arg-type]
        extraCertChain=list(certificates[1:]),  # type: ignore[arg-type]
        raiseMinimumTo=minimum,
    )
    try:
        context = options.getContext()
    except SSL.Error as e:
        raise TLSConfigError(f"the key in {key_source} does not fit the certificate in "
                             f"{os.fspath(cert_path)}: {e}") from None
    # A client-started renegotiation (TLS 1.2) costs a full handshake each time, and needs reading while the
    # connection may have stopped reading because its replies wait to be sent. TLS 1.3 has none.
    context.set_options(SSL.OP_NO_RENEGOTIATION)
    return options


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """TLS settings for a server, read from PEM files; `reload` swaps in renewed files for new connections."""

    log = Logger()

    def __init__(self, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str] | None = None, *,
                 minimum: TLSVersion = TLSVersion.TLSv1_2) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.minimum = minimum
        self._options = load_options(cert_path, key_path, minimum=minimum)

    @property
    def options(self) -> CertificateOptions:
        """The options new connections use (replaced by each successful `reload`)."""
        return self._options

    @property
    def certificate(self) -> x509.Certificate:
        """The server certificate new connections present."""
        return self._options.certificate  # type: ignore[return-value]

    def reload(self) -> None:
        """Re-read the certificate and key files (e.g. on SIGHUP after a renewal).

        If the new files are unusable, `TLSConfigError` is raised and the previous certificate stays in use.
        """
        self._options = load_options(self.cert_path, self.key_path, minimum=self.minimum)
        self.log.info("TLS certificate reloaded from {path}", path=os.fspath(self.cert_path))

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A new OpenSSL connection for one client, with the current certificate (called by Twisted)."""
        return self._options.serverConnectionForTLS(tlsProtocol)


def _connection(transport: Any) -> SSL.Connection | None:
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    try:
        handle = get_handle()
    except Exception:
        return None
    return handle if isinstance(handle, SSL.Connection) else None


def is_tls(transport: Any) -> bool:
    """True when ``transport`` runs over TLS: an implicit-TLS listener, or a connection after ``startTLS``
    (even before the handshake is over).
    """
    return _connection(transport) is not None


def tls_info(transport: Any) -> dict[str, str]:
    """Negotiated ``version``, ``cipher`` and ``bits`` of a TLS transport, as text; {} before the handshake or
    without TLS. Suits `esmtpkit.core.session.Session.tls_info`.
    """
    connection = _connection(transport)
    if connection is None:
        return {}
    cipher = connection.get_cipher_name()
    if not cipher:
        return {}
    info = {"version": connection.get_protocol_version_name(), "cipher": cipher}
    bits = connection.get_cipher_bits()
    if bits:
        info["bits"] = str(bits)
    return info


def describe(info: Mapping[str, str]) -> str:
    """The TLS clause for a ``Received`` header, as mail servers commonly write it (RFC 5321 §4.4 leaves the
    comment free): ``using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)``; '' without TLS.
    """
    if not info.get("cipher"):
        return ""
    text = f"using {info.get('version', 'TLS')} with cipher {info['cipher']}"
    if info.get("bits"):
        text += f" ({info['bits']}/{info['bits']} bits)"
    return text
