"""AUTH (RFC 4954) in the protocol: exchanges, failures, the TLS rule, MAIL's AUTH= parameter; exact bytes."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.server.sasl import build_portal, portal_from_strings

from .support import BrokenChecker, LateChecker, ServerMixin

OK = b"235 2.7.0 Authentication successful\r\n"
INVALID = b"535 5.7.8 Authentication credentials invalid\r\n"
PLAIN_ALICE = base64.b64encode(b"\x00alice\x00secret")


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class AuthMixin(ServerMixin):
    def auth(self, **changes: Any) -> Any:
        """A conversation after EHLO, with AUTH allowed over this (plaintext) test transport."""
        changes.setdefault("portal", portal_from_strings(["memory:alice:secret:bob:hunter2"]))
        changes.setdefault("auth_require_tls", False)
        talk = self.connect(**changes)
        self.exchange(talk, b"EHLO client.test\r\n")
        return talk


class ExchangeTests(AuthMixin, SynchronousTestCase):
    def test_advertised(self) -> None:
        talk = self.connect(portal=portal_from_strings(["memory:alice:secret"]), auth_require_tls=False)
        self.assertTrue(self.exchange(talk, b"EHLO client.test\r\n").endswith(
            b"250-BINARYMIME\r\n250 AUTH PLAIN LOGIN CRAM-MD5\r\n"))
        talk = self.connect(portal=portal_from_strings(["memory:alice:secret"]), auth_require_tls=False,
                            auth_mechanisms=("LOGIN",))
        self.assertTrue(self.exchange(talk, b"EHLO client.test\r\n").endswith(b"250 AUTH LOGIN\r\n"))

    def test_plain_initial_response(self) -> None:
        talk = self.auth()
        self.assertEqual(self.exchange(talk, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n"), OK)
        session = talk.protocol.session
        self.assertEqual((session.authenticated, session.auth_mechanism, session.with_protocol),
                         ("alice", "PLAIN", "ESMTPA"))
        self.assertEqual(talk.handler.verbs, ["connect", "ehlo"])  # AUTH is the protocol's, not the handler's

    def test_plain_after_empty_challenge(self) -> None:
        """RFC 4954 §4: ``334`` and a space even when the challenge is empty."""
        talk = self.auth()
        self.assertEqual(self.exchange(talk, b"AUTH plain\r\n"), b"334 \r\n")
        self.assertEqual(self.exchange(talk, PLAIN_ALICE + b"\r\n"), OK)

    def test_login(self) -> None:
        talk = self.auth()
        self.assertEqual(self.exchange(talk, b"AUTH LOGIN\r\n"), b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(self.exchange(talk, b64(b"bob") + b"\r\n"), b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(self.exchange(talk, b64(b"hunter2") + b"\r\n"), OK)
        self.assertEqual(talk.protocol.session.authenticated, "bob")

    def test_login_pipelined_answers(self) -> None:
        """A client that sends its answers without waiting still gets every challenge, in order."""
        talk = self.auth()
        self.assertEqual(self.exchange(talk, b"AUTH LOGIN " + b64(b"bob") + b"\r\n" + b64(b"hunter2") + b"\r\nNOOP\r\n"),
                         b"334 UGFzc3dvcmQ6\r\n" + OK + b"250 2.0.0 OK\r\n")

    def test_cram_md5(self) -> None:
        talk = self.auth()
        challenge = self.exchange(talk, b"AUTH CRAM-MD5\r\n")
        self.assertTrue(challenge.startswith(b"334 ") and challenge.endswith(b"\r\n"))
        nonce = base64.b64decode(challenge[4:-2])
        self.assertRegex(nonce, rb"^<\d+\.\d+@mx\.test>$")
        digest = hmac.new(b"secret", nonce, hashlib.md5).hexdigest().encode()
        self.assertEqual(self.exchange(talk, b64(b"alice " + digest) + b"\r\n"), OK)
        self.assertEqual(talk.protocol.session.auth_mechanism, "CRAM-MD5")

    def test_identity_survives_rset_and_ehlo(self) -> None:
        talk = self.auth()
        self.exchange(talk, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        self.exchange(talk, b"RSET\r\nEHLO again.test\r\n")
        self.assertEqual(talk.protocol.session.authenticated, "alice")
        self.assertEqual(self.exchange(talk, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n"),
                         b"503 5.5.1 Already authenticated\r\n")

    def test_authorization_identity(self) -> None:
        """PLAIN's authzid: refused unless Policy.auth_authorize allows it; then it is the session's identity."""
        acting = base64.b64encode(b"postmaster\x00alice\x00secret")
        talk = self.auth()
        self.assertEqual(self.exchange(talk, b"AUTH PLAIN " + acting + b"\r\n"), INVALID)
        talk = self.auth(auth_authorize=lambda user, as_whom: (user, as_whom) == ("alice", "postmaster"))
        self.assertEqual(self.exchange(talk, b"AUTH PLAIN " + acting + b"\r\n"), OK)
        self.assertEqual(talk.protocol.session.authenticated, "postmaster")

    def test_slow_checker(self) -> None:
        """While the portal decides, nothing else is read; the 235 comes before the pipelined NOOP's reply."""
        checker = LateChecker()
        talk = self.auth(portal=build_portal([checker]))
        self.assertEqual(self.exchange(talk, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\nNOOP\r\n"), b"")
        self.assertEqual(talk.transport.producerState, "paused")
        d, credentials = checker.pending[0]
        self.assertEqual((credentials.username, credentials.password), (b"alice", b"secret"))
        before = len(talk.transport.value())
        d.callback(b"alice")
        self.assertEqual(talk.transport.value()[before:], OK + b"250 2.0.0 OK\r\n")

    def test_long_auth_line(self) -> None:
        """RFC 4954 §4: AUTH lines may be up to 12288 octets; other commands keep their limits."""
        talk = self.auth()
        padded = b"AUTH PLAIN " + b"A" * 12000 + b"=\r\n"
        self.assertEqual(self.exchange(talk, padded), b"501 5.5.2 Malformed authentication response\r\n")
        self.assertEqual(self.exchange(talk, b"NOOP " + b"x" * 600 + b"\r\n"), b"500 5.5.2 Line too long\r\n")


class FailureTests(AuthMixin, SynchronousTestCase):
    def test_failures(self) -> None:
        talk = self.auth()
        cases = [
            (b"AUTH PLAIN " + b64(b"\x00alice\x00wrong") + b"\r\n", INVALID),
            (b"AUTH PLAIN " + b64(b"\x00nobody\x00secret") + b"\r\n", INVALID),
            (b"AUTH PLAIN !!!\r\n", b"501 5.5.2 Invalid base64 data\r\n"),
            (b"AUTH PLAIN " + b64(b"no nuls") + b"\r\n", b"501 5.5.2 Malformed authentication response\r\n"),
            (b"AUTH GSSAPI\r\n", b"504 5.5.4 Unrecognized authentication type\r\n"),
            (b"AUTH\r\n", b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
            (b"AUTH CRAM-MD5 " + b64(b"x") + b"\r\n", b"501 5.5.4 This mechanism takes no initial response\r\n"),
            (b"AUTH LOGIN\r\n*\r\n", b"334 VXNlcm5hbWU6\r\n501 5.7.0 Authentication cancelled\r\n"),
        ]
        for command, reply in cases:
            self.assertEqual(self.exchange(talk, command), reply, command)
        self.assertIsNone(talk.protocol.session.authenticated)
        self.assertEqual(talk.protocol.errors, len(cases))

    def test_failures_count_toward_the_error_limit(self) -> None:
        """Guessing passwords: the third failure closes the connection with 421 4.7.0."""
        talk = self.auth(error_limit=3)
        wrong = b"AUTH PLAIN " + b64(b"\x00alice\x00guess") + b"\r\n"
        self.assertEqual(self.exchange(talk, wrong * 2), INVALID * 2)
        self.assertEqual(self.exchange(talk, wrong), INVALID + b"421 4.7.0 Too many errors, closing connection\r\n")
        self.assertTrue(talk.closed)

    def test_broken_checker(self) -> None:
        talk = self.auth(portal=build_portal([BrokenChecker()]))
        self.assertEqual(self.exchange(talk, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n"),
                         b"454 4.7.0 Temporary authentication failure\r\n")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_over_long_response_line(self) -> None:
        talk = self.auth()
        self.assertEqual(self.exchange(talk, b"AUTH LOGIN\r\n"), b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(self.exchange(talk, b"A" * 13000 + b"\r\nNOOP\r\n"),
                         b"500 5.5.6 Authentication exchange line is too long\r\n250 2.0.0 OK\r\n")

    def test_order(self) -> None:
        talk = self.connect(portal=portal_from_strings(["memory:alice:secret"]), auth_require_tls=False)
        self.assertEqual(self.exchange(talk, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n"), b"503 Send EHLO first\r\n")
        self.exchange(talk, b"HELO client.test\r\n")
        self.assertEqual(self.exchange(talk, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n"), b"503 Send EHLO first\r\n")
        self.exchange(talk, b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n")
        self.assertEqual(self.exchange(talk, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n"),
                         b"503 5.5.1 AUTH not allowed during a mail transaction\r\n")

    def test_not_offered_before_tls(self) -> None:
        """By default AUTH needs TLS: not in the EHLO reply, and 538 5.7.11 when tried (RFC 4954 §4)."""
        talk = self.connect(portal=portal_from_strings(["memory:alice:secret"]))
        self.assertTrue(self.exchange(talk, b"EHLO client.test\r\n").endswith(b"250 BINARYMIME\r\n"))
        self.assertEqual(self.exchange(talk, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n"),
                         b"538 5.7.11 Encryption required for requested authentication mechanism\r\n")
        self.assertEqual(self.exchange(talk, b"MAIL FROM:<a@example.org> AUTH=<>\r\n"),
                         b"555 5.5.4 Unsupported MAIL parameter AUTH\r\n")

    def test_not_configured(self) -> None:
        talk = self.ehlo()
        self.assertEqual(self.exchange(talk, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n"),
                         b"500 5.5.2 Command unrecognized: AUTH PLAIN " + PLAIN_ALICE + b"\r\n")

    def test_timeout_during_the_exchange(self) -> None:
        talk = self.auth()
        self.exchange(talk, b"AUTH LOGIN\r\n")
        talk.clock.advance(talk.policy.command_timeout)
        self.assertTrue(talk.transport.value().endswith(b"421 4.4.2 Timeout exceeded, closing connection\r\n"))


class RequireAuthTests(AuthMixin, SynchronousTestCase):
    def test_mail_needs_auth(self) -> None:
        talk = self.auth(require_auth=True)
        self.assertEqual(self.exchange(talk, b"MAIL FROM:<a@example.org>\r\n"),
                         b"530 5.7.0 Authentication required\r\n")
        self.exchange(talk, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        self.assertEqual(self.exchange(talk, b"MAIL FROM:<a@example.org>\r\n"),
                         b"250 2.1.0 <a@example.org>, sender ok\r\n")

    def test_require_auth_needs_a_portal(self) -> None:
        from esmtpkit.server.policy import Policy

        self.assertRaises(ValueError, Policy, require_auth=True)
        self.assertRaises(ValueError, Policy, auth_mechanisms=("PLAIN", "XOAUTH2"))


class MailParameterTests(AuthMixin, SynchronousTestCase):
    """MAIL FROM's AUTH= (RFC 4954 §5): xtext decoded; trusted only from an authenticated client."""

    def mail_params(self, talk: Any, line: bytes) -> Any:
        self.assertEqual(self.exchange(talk, line + b"\r\nRSET\r\n")[:9], b"250 2.1.0")
        return [c.args[1] for c in talk.handler.calls if c.verb == "mail"][-1]

    def test_authenticated(self) -> None:
        talk = self.auth()
        self.exchange(talk, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        self.assertEqual(self.mail_params(talk, b"MAIL FROM:<a@example.org> AUTH=alice+2Bsub@example.org"),
                         {"AUTH": "alice+sub@example.org"})
        self.assertEqual(self.mail_params(talk, b"MAIL FROM:<a@example.org> AUTH=<>"), {"AUTH": "<>"})

    def test_not_authenticated_counts_as_empty(self) -> None:
        talk = self.auth()
        self.assertEqual(self.mail_params(talk, b"MAIL FROM:<a@example.org> AUTH=boss@example.org"), {"AUTH": "<>"})

    def test_bad_values(self) -> None:
        talk = self.auth()
        for value in (b"", b"a+2", b"a+zzb", b"a+20b"):
            self.assertEqual(self.exchange(talk, b"MAIL FROM:<a@example.org> AUTH=" + value + b"\r\n")[:9],
                             b"501 5.5.4", value)
