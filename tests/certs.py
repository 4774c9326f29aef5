"""Throw-away TLS material for tests: a certificate authority and a server certificate for localhost/127.0.0.1.

Everything is made at test time with `cryptography` and written as PEM files to a temporary directory, so no key
or certificate is ever kept in the repository. Keys are ECDSA P-256: quick to make, accepted by every TLS stack.
`serve_implicit_tls` listens on loopback with TLS from the first byte (RFC 8314), with such files.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, wrapServerTLS

from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.testing import LoopbackServer
from esmtpkit.server.tls import ServerTLS

__all__ = ["Authority", "CertFiles", "make_authority", "make_tls_files", "serve_implicit_tls"]

_VALIDITY = datetime.timedelta(days=2)


@dataclass(frozen=True)
class Authority:
    """A certificate authority that signs server certificates for one test."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        """The authority's certificate in PEM form (what a client trusts)."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class CertFiles:
    """Paths of the PEM files written for one server certificate, and that certificate in DER form."""

    authority: Authority
    ca: Path
    cert: Path
    key: Path
    der: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_authority(common_name: str = "esmtpkit test CA") -> Authority:
    """A self-signed CA certificate and its key, valid from a day ago for two days."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(certificate, key)


def make_tls_files(directory: Path, authority: Authority | None = None, *, common_name: str = "localhost",
                   prefix: str = "server") -> CertFiles:
    """Write ``ca.pem``, ``<prefix>.crt`` and ``<prefix>.key`` under ``directory`` for a localhost server.

    The certificate names ``localhost`` and ``127.0.0.1`` (subjectAltName) whatever ``common_name`` says, so a
    client that checks the host name accepts it; pass the same ``authority`` to issue a second certificate that
    the same client trusts.
    """
    authority = authority if authority is not None else make_authority()
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(authority.certificate.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()),
                       critical=False)
        .sign(authority.key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    ca_path = directory / "ca.pem"
    cert_path = directory / f"{prefix}.crt"
    key_path = directory / f"{prefix}.key"
    ca_path.write_bytes(authority.pem)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return CertFiles(authority, ca_path, cert_path, key_path, certificate.public_bytes(serialization.Encoding.DER))


def serve_implicit_tls(factory: ESMTPFactory, cert: str | Path, key: str | Path,
                       reactor: Any = None) -> "Deferred[LoopbackServer]":
    """Like `esmtpkit.testing.serve`, on a 127.0.0.1 listener that is TLS from the first byte (RFC 8314).

    The TLS side is esmtpkit's `ServerTLS`, which hands pyOpenSSL `cryptography` objects; an ``ssl:`` endpoint
    string would load the same files as pyOpenSSL ``X509``/``PKey`` objects, which pyOpenSSL deprecates.
    """
    if reactor is None:
        from twisted.internet import reactor as default

        reactor = default
    endpoint = wrapServerTLS(ServerTLS(cert, key), TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    return endpoint.listen(factory).addCallback(lambda port: LoopbackServer(port.getHost().port, port, factory))
