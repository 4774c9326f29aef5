"""Tests for `esmtpkit.server.tls`: loading PEM files, reloading them, and a real TLS connection on loopback."""

from __future__ import annotations

import socket
import ssl
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint, wrapServerTLS
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from esmtpkit.server.tls import ServerTLS, TLSConfigError, describe, is_tls, load_options, tls_info

from .certs import make_authority, make_tls_files
from .support import ScratchPaths


class LoadTests(ScratchPaths, SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.files = make_tls_files(self.dir)

    def test_loads_certificate_and_key(self) -> None:
        tls = ServerTLS(self.files.cert, self.files.key)
        self.assertTrue(verifyObject(IOpenSSLServerConnectionCreator, tls))
        self.assertEqual(tls.certificate.public_bytes(serialization.Encoding.DER), self.files.der)

    def test_tls_1_2_at_least(self) -> None:
        """SSLv3, TLS 1.0 and 1.1 are switched off; 1.2 and 1.3 stay on."""
        options = ServerTLS(self.files.cert, self.files.key).options.getContext().set_options(0)
        for off in (SSL.OP_NO_SSLv3, SSL.OP_NO_TLSv1, SSL.OP_NO_TLSv1_1):
            self.assertTrue(options & off, off)
        for on in (SSL.OP_NO_TLSv1_2, SSL.OP_NO_TLSv1_3):
            self.assertFalse(options & on, on)

    def test_key_in_the_certificate_file(self) -> None:
        combined = self.dir / "combined.pem"
        combined.write_bytes(self.files.cert.read_bytes() + self.files.key.read_bytes())
        tls = ServerTLS(combined)
        self.assertEqual(tls.certificate.public_bytes(serialization.Encoding.DER), self.files.der)

    def test_chain(self) -> None:
        """Certificates after the first in the file are sent as the chain."""
        chained = self.dir / "chain.pem"
        chained.write_bytes(self.files.cert.read_bytes() + self.files.authority.pem)
        options = load_options(chained, self.files.key)
        self.assertEqual([c.public_bytes(serialization.Encoding.PEM) for c in options.extraCertChain],
                         [self.files.authority.pem])

    def test_errors(self) -> None:
        other = make_tls_files(self.dir / "other")
        bad = self.dir / "bad.pem"
        bad.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        encrypted = self.dir / "encrypted.key"
        encrypted.write_bytes(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n")
        cases = [
            ((self.dir / "missing.crt", self.files.key), f"cannot read {self.dir / 'missing.crt'}: "),
            ((self.files.key, self.files.key), f"no PEM certificate in {self.files.key}"),
            ((self.files.cert, self.files.cert), f"no PEM private key in {self.files.cert}"),
            ((self.files.cert, None), f"no PEM private key in {self.files.cert}"),
            ((self.files.cert, encrypted), f"an encrypted private key (not supported) in {encrypted}"),
            ((bad, self.files.key), f"bad certificate in {bad}: "),
            ((self.files.cert, other.key), f"the key in {other.key} does not fit the certificate in "
                                           f"{self.files.cert}: "),
        ]
        for args, message in cases:
            with self.assertRaises(TLSConfigError, msg=str(args)) as caught:
                ServerTLS(*args)
            self.assertTrue(str(caught.exception).startswith(message), str(caught.exception))

    def test_reload(self) -> None:
        tls = ServerTLS(self.files.cert, self.files.key)
        renewed = make_tls_files(self.dir, self.files.authority)
        self.assertNotEqual(renewed.der, self.files.der)
        tls.reload()
        self.assertEqual(tls.certificate.public_bytes(serialization.Encoding.DER), renewed.der)

    def test_failed_reload_keeps_the_certificate(self) -> None:
        tls = ServerTLS(self.files.cert, self.files.key)
        before = tls.options
        other = make_tls_files(self.dir / "other")
        self.files.key.write_bytes(other.key.read_bytes())
        self.assertRaises(TLSConfigError, tls.reload)
        self.assertIs(tls.options, before)
        self.assertEqual(tls.certificate.public_bytes(serialization.Encoding.DER), self.files.der)


class InfoTests(ScratchPaths, SynchronousTestCase):
    def test_no_tls(self) -> None:
        self.assertEqual(tls_info(StringTransport()), {})
        self.assertEqual(tls_info(None), {})
        self.assertFalse(is_tls(StringTransport()))
        self.assertFalse(is_tls(None))

        class Plain:
            def getHandle(self) -> object:
                return object()

        self.assertFalse(is_tls(Plain()))

    def test_before_handshake(self) -> None:
        files = make_tls_files(Path(self.mktemp()))
        connection = SSL.Connection(ServerTLS(files.cert, files.key).options.getContext(), None)

        class Transport:
            def getHandle(self) -> SSL.Connection:
                return connection

        self.assertEqual(tls_info(Transport()), {})
        self.assertTrue(is_tls(Transport()))

    def test_describe(self) -> None:
        info = {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "bits": "256"}
        self.assertEqual(describe(info), "using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)")
        self.assertEqual(describe({"version": "TLSv1.2", "cipher": "ECDHE-ECDSA-AES128-GCM-SHA256"}),
                         "using TLSv1.2 with cipher ECDHE-ECDSA-AES128-GCM-SHA256")
        self.assertEqual(describe({}), "")


@implementer(IHandshakeListener)
class ReportTLS(Protocol):
    """Tells the client, once the handshake is done, what the server sees: version, cipher, bits."""

    def handshakeCompleted(self) -> None:
        assert is_tls(self.transport)
        info = tls_info(self.transport)
        self.transport.write(f"{info['version']} {info['cipher']} {info['bits']}\r\n".encode())


def _client(port: int, ca: Path, maximum: ssl.TLSVersion | None = None) -> tuple[str, tuple[str, int], bytes, bytes]:
    """Connect with Python's ssl module, trusting only the test CA and checking the name "localhost"."""
    context = ssl.create_default_context(cafile=str(ca))
    if maximum is not None:
        context.maximum_version = maximum
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            line = b""
            while not line.endswith(b"\r\n"):
                chunk = tls.recv(200)
                if not chunk:
                    break
                line += chunk
            version, (cipher, _, bits) = tls.version(), tls.cipher()
            return version, (cipher, bits), tls.getpeercert(binary_form=True), line


@pytest_twisted.inlineCallbacks
def test_loopback_tls_info_and_reload(tmp_path: Path) -> Any:
    """A real TLS listener on 127.0.0.1: the server reports what the client negotiated, and after the files are
    replaced and reload() is called, a new connection gets the new certificate.
    """
    authority = make_authority()
    first = make_tls_files(tmp_path, authority)
    tls = ServerTLS(first.cert, first.key)
    endpoint = wrapServerTLS(tls, TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    port = yield endpoint.listen(Factory.forProtocol(ReportTLS))
    try:
        number = port.getHost().port
        version, (cipher, bits), der, line = yield deferToThread(_client, number, first.ca)
        assert der == first.der
        assert version == "TLSv1.3"
        assert line == f"{version} {cipher} {bits}\r\n".encode()

        version, (cipher, bits), der, line = yield deferToThread(_client, number, first.ca, ssl.TLSVersion.TLSv1_2)
        assert version == "TLSv1.2"
        assert line == f"TLSv1.2 {cipher} {bits}\r\n".encode()

        second = make_tls_files(tmp_path, authority)
        assert second.der != first.der
        tls.reload()
        version, _, der, line = yield deferToThread(_client, number, second.ca)
        assert der == second.der
        assert line.startswith(b"TLSv1.3 ")
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_loopback_refuses_tls_1_1(tmp_path: Path) -> Any:
    """A client that offers only TLS 1.1 gets no connection (the server's minimum is TLS 1.2)."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            client.minimum_version = client.maximum_version = ssl.TLSVersion.TLSv1_1
        client.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot offer TLS 1.1 at all")
    files = make_tls_files(tmp_path)
    endpoint = wrapServerTLS(ServerTLS(files.cert, files.key), TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    port = yield endpoint.listen(Factory.forProtocol(ReportTLS))

    def connect() -> str:
        client.load_verify_locations(str(files.ca))
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as raw:
            try:
                with client.wrap_socket(raw, server_hostname="localhost"):
                    return "connected"
            except ssl.SSLError as e:
                return e.reason or str(e)

    try:
        reason = yield deferToThread(connect)
        assert reason in ("TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE")
        if reason == "NO_PROTOCOLS_AVAILABLE":
            pytest.skip("this OpenSSL refuses to offer TLS 1.1 on the client side")
    finally:
        yield port.stopListening()
