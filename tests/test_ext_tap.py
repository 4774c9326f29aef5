"""``twistd esmtpkit`` options for the extensions: TLS, AUTH (--auth), CHUNKING, DSN, LMTP; against a MemoryReactor."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Callable

from twisted.cred.credentials import UsernamePassword
from twisted.internet.testing import MemoryReactor
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.server import sasl
from esmtpkit.cli import tap
from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.server.tls import ServerTLS

from .certs import make_tls_files
from .support import ScratchPaths

HANDLER = ("--handler", "esmtpkit.handlers.base.MessageHandler")


class TapMixin:
    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions([*HANDLER, *argv])
        return options

    def refuse(self, *argv: str) -> str:
        error = self.assertRaises(usage.UsageError, self.parse, *argv)  # type: ignore[attr-defined]
        return str(error)


class ExtensionOptionTests(TapMixin, SynchronousTestCase):
    def test_defaults(self) -> None:
        policy = self.parse()["policy"]
        self.assertEqual((policy.chunking, policy.binarymime, policy.dsn, policy.lmtp, policy.tls_context,
                          policy.require_tls, policy.portal, policy.auth_require_tls, policy.require_auth),
                         (True, True, False, False, None, False, None, True, False))

    def test_flags(self) -> None:
        policy = self.parse("--no-chunking", "--no-binarymime", "--dsn", "--lmtp")["policy"]
        self.assertEqual((policy.chunking, policy.binarymime, policy.dsn, policy.lmtp), (False, False, True, True))


class TLSOptionTests(TapMixin, ScratchPaths, SynchronousTestCase):
    def setUp(self) -> None:
        self.files = make_tls_files(Path(self.mktemp()))

    def test_certificate_and_key(self) -> None:
        options = self.parse("--tls-cert", str(self.files.cert), "--tls-key", str(self.files.key), "--require-tls")
        self.assertIsInstance(options["tls"], ServerTLS)
        self.assertIs(options["policy"].tls_context, options["tls"])
        self.assertTrue(options["policy"].require_tls)

    def test_key_in_the_certificate_file(self) -> None:
        combined = Path(self.mktemp())
        combined.write_bytes(self.files.cert.read_bytes() + self.files.key.read_bytes())
        self.assertIsInstance(self.parse("--tls-cert", str(combined))["tls"], ServerTLS)

    def test_errors(self) -> None:
        self.assertIn("cannot read /nonexistent.pem", self.refuse("--tls-cert", "/nonexistent.pem"))
        self.assertIn("no PEM private key", self.refuse("--tls-cert", str(self.files.cert)))
        self.assertEqual(self.refuse("--tls-key", str(self.files.key)), "--tls-key needs --tls-cert")
        self.assertEqual(self.refuse("--require-tls"), "--require-tls needs --tls-cert (or an ssl: listener)")
        self.assertEqual(self.refuse("--listen", "ssl:465"),
                         "--listen ssl:465 names no privateKey=: give --tls-cert (and --tls-key)")

    def test_require_tls_with_an_ssl_listener_of_its_own(self) -> None:
        listen = f"ssl:465:privateKey={self.files.key}:certKey={self.files.cert}"
        self.assertTrue(self.parse("--listen", listen, "--require-tls")["policy"].require_tls)

    def test_ssl_listener_serves_the_tls_cert(self) -> None:
        """``ssl:`` without privateKey=: TCP wrapped in TLS with --tls-cert; other listeners stay as they are."""
        reactor = MemoryReactor()
        options = self.parse("--tls-cert", str(self.files.cert), "--tls-key", str(self.files.key),
                             "--listen", "ssl:4650:interface=127.0.0.1", "--listen", "tcp:2525")
        service = tap.makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        (port, tls_factory, _, interface), (plain_port, plain_factory, _, _) = reactor.tcpServers
        self.assertEqual((port, interface, plain_port), (4650, "127.0.0.1", 2525))
        self.assertIsInstance(tls_factory, TLSMemoryBIOFactory)
        self.assertIsInstance(plain_factory, ESMTPFactory)
        self.assertIs(tls_factory.wrappedFactory, plain_factory)
        self.assertIsInstance(list(service)[-1], tap.ReloadOnHangup)


class ReloadTests(ScratchPaths, SynchronousTestCase):
    """``kill -HUP`` re-reads the certificate files (see `esmtpkit.server.tls.ServerTLS.reload`)."""

    class Reactor:
        def __init__(self) -> None:
            self.calls: list[Callable[[], None]] = []

        def callFromThread(self, f: Callable[[], None]) -> None:
            self.calls.append(f)

    def test_signal_handler(self) -> None:
        directory = Path(self.mktemp())
        files = make_tls_files(directory)
        tls = ServerTLS(files.cert, files.key)
        reactor = self.Reactor()
        service = tap.ReloadOnHangup(tls, reactor)
        before = signal.getsignal(signal.SIGHUP)
        service.startService()
        try:
            self.assertEqual(signal.getsignal(signal.SIGHUP), service._hangup)
            renewed = make_tls_files(directory, files.authority)
            service._hangup(signal.SIGHUP, None)
            [reload] = reactor.calls
            reload()
            self.assertEqual(tls.certificate.public_bytes(_der()), renewed.der)
        finally:
            service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)

    def test_bad_files_are_logged_and_the_certificate_kept(self) -> None:
        directory = Path(self.mktemp())
        files = make_tls_files(directory)
        tls = ServerTLS(files.cert, files.key)
        files.key.write_bytes(b"garbage")
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        tap.ReloadOnHangup(tls).reload()
        self.assertEqual(tls.certificate.public_bytes(_der()), files.der)
        self.assertTrue(any(e.get("log_format", "").startswith("TLS certificate not reloaded") for e in events))


def _der() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


class AuthOptionTests(TapMixin, ScratchPaths, SynchronousTestCase):
    def test_memory(self) -> None:
        options = self.parse("--auth", "memory:alice:secret", "--auth-over-plaintext", "--require-auth")
        policy = options["policy"]
        self.assertEqual(sasl.mechanisms_for(policy.portal, policy.auth_mechanisms), ["PLAIN", "LOGIN", "CRAM-MD5"])
        self.assertEqual((policy.auth_require_tls, policy.require_auth), (False, True))

    def test_file(self) -> None:
        passwd = Path(self.mktemp())
        passwd.write_text("alice:secret\n")
        policy = self.parse("--auth", f"file:{passwd}", "--auth-mechanisms", "login, plain")["policy"]
        self.assertEqual(policy.auth_mechanisms, ("LOGIN", "PLAIN"))
        ready = sasl.Ready("PLAIN", UsernamePassword(b"alice", b"secret"))
        self.assertEqual(self.successResultOf(sasl.authenticate(policy.portal, ready)).name, "alice")

    def test_unix_offers_no_cram_md5(self) -> None:
        """A checker that cannot see passwords in the clear gets PLAIN and LOGIN only."""
        portal = self.parse("--auth", "unix")["policy"].portal
        self.assertEqual(sasl.mechanisms_for(portal), ["PLAIN", "LOGIN"])
        self.assertIn("no mechanism among CRAM-MD5",
                      self.refuse("--auth", "unix", "--auth-mechanisms", "CRAM-MD5"))

    def test_errors(self) -> None:
        self.assertEqual(self.refuse("--require-auth"), "--require-auth needs --auth")
        self.assertEqual(self.refuse("--auth-over-plaintext"), "--auth-over-plaintext needs --auth")
        self.assertIn("unknown XOAUTH2", self.refuse("--auth", "memory:a:b", "--auth-mechanisms", "PLAIN,XOAUTH2"))
        self.assertIn("Auth plugin not supported", self.refuse("--auth", "anonymous"))
        self.assertIn("Auth plugin not recognized", self.refuse("--auth", "nonsense:x"))
