"""Tests for `esmtpkit.server.sasl`: the AUTH mechanisms as state machines, and logging in through a real Portal."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import io
import re
from pathlib import Path
from typing import Any

from twisted.cred.checkers import FilePasswordDB, ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword, UsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.cred.strcred import StrcredException
from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from esmtpkit.server import sasl
from esmtpkit.core.commands import CommandError
from esmtpkit.core.reply import Reply, SMTPReply
from esmtpkit.server.sasl import (
    AUTH_BAD_BASE64, AUTH_CANCELLED, AUTH_FAILED, AUTH_MALFORMED, AUTH_NO_INITIAL_RESPONSE, AUTH_SYNTAX,
    AUTH_TEMPORARY_FAILURE, Challenge, CramMD5, Failed, Identity, Login, Plain, Ready,
)

from .support import ScratchPaths


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def memory_portal(**users: bytes) -> Portal:
    return sasl.build_portal([InMemoryUsernamePasswordDatabaseDontUse(**users)])


class RepliesTests(SynchronousTestCase):
    def test_wire_bytes(self) -> None:
        """RFC 4954 §6 codes with their enhanced codes, as the protocol will send them after EHLO."""
        expected = {
            sasl.AUTH_SUCCEEDED: b"235 2.7.0 Authentication successful\r\n",
            sasl.AUTH_FAILED: b"535 5.7.8 Authentication credentials invalid\r\n",
            sasl.AUTH_ENCRYPTION_REQUIRED: b"538 5.7.11 Encryption required for requested authentication mechanism\r\n",
            sasl.AUTH_REQUIRED: b"530 5.7.0 Authentication required\r\n",
            sasl.AUTH_MECHANISM_UNKNOWN: b"504 5.5.4 Unrecognized authentication type\r\n",
            sasl.AUTH_ALREADY_DONE: b"503 5.5.1 Already authenticated\r\n",
            sasl.AUTH_CANCELLED: b"501 5.7.0 Authentication cancelled\r\n",
            sasl.AUTH_BAD_BASE64: b"501 5.5.2 Invalid base64 data\r\n",
            sasl.AUTH_TEMPORARY_FAILURE: b"454 4.7.0 Temporary authentication failure\r\n",
            sasl.AUTH_LINE_TOO_LONG: b"500 5.5.6 Authentication exchange line is too long\r\n",
        }
        for reply, wire in expected.items():
            self.assertEqual(reply.render(enhanced=True), wire)

    def test_challenge_reply(self) -> None:
        """A 334 line carries base64 and never an enhanced code; an empty challenge is "334 " (RFC 4954 §4)."""
        self.assertEqual(Challenge(b"").wire, b"334 \r\n")
        self.assertEqual(Challenge(b"Username:").wire, b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(Challenge(b"\xff\x00").wire, b"334 /wA=\r\n")


class ParseAuthTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(sasl.parse_auth("PLAIN"), ("PLAIN", None))
        self.assertEqual(sasl.parse_auth("plain AGFsaWNlAHNlY3JldA=="), ("PLAIN", b"AGFsaWNlAHNlY3JldA=="))
        self.assertEqual(sasl.parse_auth("PLAIN ="), ("PLAIN", b"="))
        self.assertEqual(sasl.parse_auth("cram-md5"), ("CRAM-MD5", None))
        self.assertEqual(sasl.parse_auth("X-SOME_MECH"), ("X-SOME_MECH", None))

    def test_syntax_errors(self) -> None:
        for argument in ("", "PLAIN a b", "PLAIN  ", "BAD.NAME", "A" * 21, "PL\u00c4IN"):
            with self.assertRaises(CommandError, msg=argument) as caught:
                sasl.parse_auth(argument)
            self.assertEqual(caught.exception.reply, AUTH_SYNTAX)

    def test_bad_initial_response(self) -> None:
        for argument in ("PLAIN a*b", "PLAIN ab=c", "PLAIN \u00e9", "PLAIN a===", "PLAIN -_"):
            with self.assertRaises(CommandError, msg=argument) as caught:
                sasl.parse_auth(argument)
            self.assertEqual(caught.exception.reply, AUTH_BAD_BASE64)


class PlainTests(SynchronousTestCase):
    def credentials(self, step: Any) -> tuple[bytes, bytes]:
        self.assertIsInstance(step, Ready)
        return step.credentials.username, step.credentials.password

    def test_initial_response(self) -> None:
        step = Plain().start(b64(b"\x00alice\x00secret"))
        self.assertEqual(self.credentials(step), (b"alice", b"secret"))
        self.assertEqual((step.mechanism, step.authzid), ("PLAIN", None))

    def test_without_initial_response(self) -> None:
        mechanism = Plain()
        self.assertEqual(mechanism.start(None), Challenge(b""))
        self.assertEqual(self.credentials(mechanism.respond(b64(b"\x00alice\x00secret"))), (b"alice", b"secret"))

    def test_utf8_identities(self) -> None:
        step = Plain().start(b64("\x00j\u00f6rg\x00p\u00e4ss".encode()))
        self.assertEqual(self.credentials(step), ("j\u00f6rg".encode(), "p\u00e4ss".encode()))

    def test_empty_initial_response(self) -> None:
        """RFC 4954 §4: "=" is an empty initial response, which is not a PLAIN message."""
        self.assertEqual(Plain().start(b"="), Failed(AUTH_MALFORMED))

    def test_malformed_messages(self) -> None:
        for message in (b"", b"alice\x00secret", b"\x00\x00secret", b"\x00alice\x00", b"a\x00b\x00c\x00d",
                        b"\x00al\xffice\x00secret", b"\x00alice\x00s\xc3"):
            with self.subTest(message=message):
                self.assertEqual(Plain().start(b64(message)), Failed(AUTH_MALFORMED))

    def test_authzid_equal_to_authcid(self) -> None:
        step = Plain().start(b64(b"alice\x00alice\x00secret"))
        self.assertEqual((self.credentials(step), step.authzid), ((b"alice", b"secret"), None))

    def test_other_authzid_refused(self) -> None:
        """RFC 4616 §2: acting as someone else needs authorization; by default nobody has it."""
        self.assertEqual(Plain().start(b64(b"bob\x00alice\x00secret")), Failed(AUTH_FAILED))
        self.assertEqual(Plain(authorize=lambda authcid, authzid: False).start(b64(b"bob\x00alice\x00secret")),
                         Failed(AUTH_FAILED))

    def test_other_authzid_allowed(self) -> None:
        asked: list[tuple[str, str]] = []

        def authorize(authcid: str, authzid: str) -> bool:
            asked.append((authcid, authzid))
            return True

        step = Plain(authorize=authorize).start(b64(b"bob\x00alice\x00secret"))
        self.assertEqual((self.credentials(step), step.authzid), ((b"alice", b"secret"), "bob"))
        self.assertEqual(asked, [("alice", "bob")])

    def test_cancel(self) -> None:
        """RFC 4954 §4: "*" cancels the exchange with 501."""
        mechanism = Plain()
        mechanism.start(None)
        self.assertEqual(mechanism.respond(b"*"), Failed(AUTH_CANCELLED))

    def test_password_not_in_repr(self) -> None:
        step = Plain().start(b64(b"\x00alice\x00hunter2"))
        self.assertNotIn("hunter2", repr(step))
        self.assertEqual(repr(step), "Ready(mechanism='PLAIN', authzid=None)")


class Base64Tests(SynchronousTestCase):
    """The client's lines are strict base64 (RFC 4954 §4): anything else is 501 5.5.2, and the exchange ends."""

    def test_bad_lines(self) -> None:
        for line in (b"YQ", b"YQ=", b"Y Q==", b"YQ==\t", b" YQ==", b"YQ==YQ==", b"YQ_=", b"-w==", b"=", b"**",
                     b"\xff", b"YQ==\x00"):
            mechanism = Plain()
            mechanism.start(None)
            self.assertEqual(mechanism.respond(line), Failed(AUTH_BAD_BASE64), line)
            self.assertTrue(mechanism.done)

    def test_bad_initial_response(self) -> None:
        self.assertEqual(Plain().start(b"YQ"), Failed(AUTH_BAD_BASE64))
        self.assertEqual(Login().start(b"*"), Failed(AUTH_BAD_BASE64))

    def test_empty_line_is_empty_response(self) -> None:
        mechanism = Login()
        mechanism.start(None)
        self.assertEqual(mechanism.respond(b""), Challenge(b"Password:"))
        step = mechanism.respond(b"")
        self.assertIsInstance(step, Ready)
        self.assertEqual((step.credentials.username, step.credentials.password), (b"", b""))

    def test_out_of_turn_calls_refused(self) -> None:
        """A response before start, a second start, or anything after the end is a programming error."""
        mechanism = Plain()
        self.assertRaises(RuntimeError, mechanism.respond, b"")
        mechanism.start(None)
        self.assertRaises(RuntimeError, mechanism.start, None)
        mechanism.respond(b64(b"\x00a\x00b"))
        self.assertRaises(RuntimeError, mechanism.respond, b"")


class LoginTests(SynchronousTestCase):
    def test_exchange(self) -> None:
        mechanism = Login()
        self.assertEqual(mechanism.start(None), Challenge(b"Username:"))
        self.assertEqual(mechanism.respond(b64(b"alice")), Challenge(b"Password:"))
        self.assertFalse(mechanism.done)
        step = mechanism.respond(b64(b"secret"))
        self.assertIsInstance(step, Ready)
        self.assertEqual((step.mechanism, step.credentials.username, step.credentials.password),
                         ("LOGIN", b"alice", b"secret"))
        self.assertTrue(mechanism.done)

    def test_initial_response_is_the_user_name(self) -> None:
        mechanism = Login()
        self.assertEqual(mechanism.start(b64(b"alice")), Challenge(b"Password:"))
        self.assertEqual(mechanism.respond(b64(b"secret")).credentials.username, b"alice")

    def test_cancel_at_password(self) -> None:
        mechanism = Login()
        mechanism.start(None)
        mechanism.respond(b64(b"alice"))
        self.assertEqual(mechanism.respond(b"*"), Failed(AUTH_CANCELLED))

    def test_user_name_must_be_utf8(self) -> None:
        mechanism = Login()
        mechanism.start(None)
        self.assertEqual(mechanism.respond(b64(b"al\xffice")), Failed(AUTH_MALFORMED))


def cram_digest(password: bytes, challenge: bytes) -> bytes:
    return hmac.new(password, challenge, hashlib.md5).hexdigest().encode()


class CramMD5Tests(SynchronousTestCase):
    CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"

    def mechanism(self) -> CramMD5:
        return CramMD5(hostname="postoffice.reston.mci.net", nonce=lambda: "1896.697170952")

    def test_challenge(self) -> None:
        """RFC 2195 §2: the challenge is a msg-id made of a unique part and the server's host name."""
        self.assertEqual(self.mechanism().start(None), Challenge(self.CHALLENGE))

    def test_default_nonce_is_unique(self) -> None:
        first, second = CramMD5(hostname="mx.test").start(None), CramMD5(hostname="mx.test").start(None)
        self.assertNotEqual(first, second)
        self.assertRegex(first.data, rb"^<\d+\.\d+@mx\.test>$")

    def test_rfc2195_example(self) -> None:
        """The example of RFC 2195 §2: user tim, password tanstaaftanstaaf."""
        mechanism = self.mechanism()
        mechanism.start(None)
        step = mechanism.respond(b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw")
        self.assertIsInstance(step, Ready)
        self.assertEqual((step.credentials.username, step.credentials.response),
                         (b"tim", b"b913a602c7eda7a495b4e6e7334d3890"))
        self.assertTrue(step.credentials.checkPassword(b"tanstaaftanstaaf"))
        self.assertFalse(step.credentials.checkPassword(b"tanstaaf"))

    def test_user_name_with_space(self) -> None:
        mechanism = self.mechanism()
        mechanism.start(None)
        step = mechanism.respond(b64(b"tim smith " + cram_digest(b"pw", self.CHALLENGE)))
        self.assertEqual(step.credentials.username, b"tim smith")

    def test_no_initial_response(self) -> None:
        """RFC 4954 §4: the server speaks first in CRAM-MD5, so an initial response gets 501."""
        self.assertEqual(self.mechanism().start(b64(b"tim")), Failed(AUTH_NO_INITIAL_RESPONSE))
        self.assertEqual(self.mechanism().start(b"="), Failed(AUTH_NO_INITIAL_RESPONSE))
        self.assertEqual(AUTH_NO_INITIAL_RESPONSE.code, 501)

    def test_malformed_responses(self) -> None:
        digest = cram_digest(b"pw", self.CHALLENGE)
        for response in (b"", b"tim", digest, b" " + digest, b"tim " + digest.upper(), b"tim " + digest[:-1],
                         b"tim " + digest + b"0", b"tim\t" + digest, b"t\xffm " + digest):
            mechanism = self.mechanism()
            mechanism.start(None)
            self.assertEqual(mechanism.respond(b64(response)), Failed(AUTH_MALFORMED), response)


class MechanismChoiceTests(SynchronousTestCase):
    def test_new_mechanism(self) -> None:
        self.assertIsInstance(sasl.new_mechanism("plain"), Plain)
        self.assertIsInstance(sasl.new_mechanism("Login"), Login)
        mechanism = sasl.new_mechanism("CRAM-MD5", hostname="mx.test")
        self.assertIsInstance(mechanism, CramMD5)
        self.assertTrue(mechanism.start(None).data.endswith(b"@mx.test>"))
        self.assertIsNone(sasl.new_mechanism("GSSAPI"))
        self.assertIsNone(sasl.new_mechanism("CRAM-MD5", offered=["PLAIN", "LOGIN"]))
        self.assertIsInstance(sasl.new_mechanism("login", offered=["PLAIN", "LOGIN"]), Login)

    def test_authorize_reaches_plain(self) -> None:
        mechanism = sasl.new_mechanism("PLAIN", authorize=lambda authcid, authzid: authzid == "team")
        self.assertEqual(mechanism.start(b64(b"team\x00alice\x00pw")).authzid, "team")

    def test_mechanisms_for_memory_checker(self) -> None:
        self.assertEqual(sasl.mechanisms_for(memory_portal(alice=b"secret")), ["PLAIN", "LOGIN", "CRAM-MD5"])

    def test_mechanisms_for_hashed_passwords(self) -> None:
        """A checker that stores hashes cannot verify CRAM-MD5, so CRAM-MD5 is not offered."""
        checker = FilePasswordDB("/nonexistent", hash=lambda user, given, stored: given)
        self.assertEqual(sasl.mechanisms_for(sasl.build_portal([checker])), ["PLAIN", "LOGIN"])

    def test_mechanisms_for_hashed_only_checker(self) -> None:
        @implementer(ICredentialsChecker)
        class HashedOnly:
            credentialInterfaces = (IUsernameHashedPassword,)

            def requestAvatarId(self, credentials: Any) -> Any:
                return defer.fail(Exception("unused"))

        self.assertEqual(sasl.mechanisms_for(sasl.build_portal([HashedOnly()])), ["CRAM-MD5"])

    def test_mechanisms_for_no_checker(self) -> None:
        self.assertEqual(sasl.mechanisms_for(sasl.build_portal([])), [])

    def test_order_and_filter(self) -> None:
        portal = memory_portal(alice=b"secret")
        self.assertEqual(sasl.mechanisms_for(portal, ["CRAM-MD5", "XOAUTH2", "PLAIN"]), ["CRAM-MD5", "PLAIN"])


class AuthenticateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.portal = memory_portal(alice=b"secret")

    def login(self, mechanism: sasl.Mechanism, *lines: bytes, initial: bytes | None = None) -> Any:
        step = mechanism.start(initial)
        for line in lines:
            step = mechanism.respond(line)
        self.assertIsInstance(step, Ready)
        return sasl.authenticate(self.portal, step)

    def reply_of(self, d: Any) -> Reply:
        return self.failureResultOf(d, SMTPReply).value.reply

    def test_plain_success(self) -> None:
        identity = self.successResultOf(self.login(Plain(), initial=b64(b"\x00alice\x00secret")))
        self.assertEqual(identity, Identity("alice", "PLAIN"))
        self.assertEqual(identity.name, "alice")

    def test_plain_wrong_password_and_unknown_user(self) -> None:
        self.assertEqual(self.reply_of(self.login(Plain(), initial=b64(b"\x00alice\x00Secret"))), AUTH_FAILED)
        self.assertEqual(self.reply_of(self.login(Plain(), initial=b64(b"\x00bob\x00secret"))), AUTH_FAILED)

    def test_login_success_and_failure(self) -> None:
        identity = self.successResultOf(self.login(Login(), b64(b"alice"), b64(b"secret")))
        self.assertEqual((identity.username, identity.mechanism), ("alice", "LOGIN"))
        self.assertEqual(self.reply_of(self.login(Login(), b64(b"alice"), b64(b"secre"))), AUTH_FAILED)

    def test_cram_md5_success_and_failure(self) -> None:
        mechanism = CramMD5(hostname="mx.test", nonce=lambda: "42.1")
        challenge = mechanism.start(None).data
        step = mechanism.respond(b64(b"alice " + cram_digest(b"secret", challenge)))
        self.assertEqual(self.successResultOf(sasl.authenticate(self.portal, step)), Identity("alice", "CRAM-MD5"))
        mechanism = CramMD5(hostname="mx.test", nonce=lambda: "42.1")
        mechanism.start(None)
        step = mechanism.respond(b64(b"alice " + cram_digest(b"wrong", challenge)))
        self.assertEqual(self.reply_of(sasl.authenticate(self.portal, step)), AUTH_FAILED)

    def test_authorized_authzid(self) -> None:
        mechanism = Plain(authorize=lambda authcid, authzid: True)
        identity = self.successResultOf(self.login(mechanism, initial=b64(b"team\x00alice\x00secret")))
        self.assertEqual((identity.username, identity.authzid, identity.name), ("alice", "team", "team"))

    def test_no_checker_for_credentials(self) -> None:
        """Credentials no checker handles (a mechanism offered by mistake) are refused, and logged."""
        checker = FilePasswordDB("/nonexistent", hash=lambda user, given, stored: given)
        portal = sasl.build_portal([checker])
        mechanism = CramMD5(nonce=lambda: "1.1")
        mechanism.start(None)
        step = mechanism.respond(b64(b"alice " + b"0" * 32))
        self.assertEqual(self.reply_of(sasl.authenticate(portal, step)), AUTH_FAILED)

    def test_broken_checker_is_temporary_and_logged_without_password(self) -> None:
        @implementer(ICredentialsChecker)
        class Broken:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials: Any) -> Any:
                raise RuntimeError("user database is down")

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        d = sasl.authenticate(sasl.build_portal([Broken()]), Plain().start(b64(b"\x00alice\x00hunter2")))
        self.assertEqual(self.reply_of(d), AUTH_TEMPORARY_FAILURE)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        logged = [formatEvent(e) + str(e.get("log_failure", "")) for e in events]
        self.assertTrue(any("AUTH PLAIN: checking credentials failed" in t for t in logged))
        self.assertFalse([t for t in logged if "hunter2" in t])

    def test_realm_must_give_a_name(self) -> None:
        logged_out: list[bool] = []

        @implementer(IRealm)
        class ObjectRealm:
            def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
                return sasl.IAuthenticatedUser, object(), lambda: logged_out.append(True)

        portal = Portal(ObjectRealm(), [InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")])
        d = sasl.authenticate(portal, Plain().start(b64(b"\x00alice\x00secret")))
        self.assertEqual(self.reply_of(d), AUTH_TEMPORARY_FAILURE)
        self.assertEqual(logged_out, [True])
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)


class PortalTests(ScratchPaths, SynchronousTestCase):
    def test_realm(self) -> None:
        realm = sasl.UsernameRealm()
        self.assertTrue(verifyObject(IRealm, realm))
        interface, avatar, logout = realm.requestAvatar(b"j\xc3\xb6rg", None, sasl.IAuthenticatedUser)
        self.assertEqual((interface, avatar, logout()), (sasl.IAuthenticatedUser, "j\u00f6rg", None))
        self.assertEqual(realm.requestAvatar("alice", None, sasl.IAuthenticatedUser)[1], "alice")
        self.assertRaises(NotImplementedError, realm.requestAvatar, b"alice", None, IUsernamePassword)

    def test_memory_auth_string(self) -> None:
        """``--auth memory:alice:secret`` stores text; the portal still accepts byte credentials."""
        portal = sasl.portal_from_strings(["memory:alice:secret:bob:pw"])
        self.assertEqual(self.successResultOf(sasl.authenticate(
            portal, Ready("PLAIN", UsernamePassword(b"bob", b"pw")))).username, "bob")
        self.failureResultOf(sasl.authenticate(portal, Ready("PLAIN", UsernamePassword(b"bob", b"px"))), SMTPReply)

    def test_memory_checker_given_is_not_changed(self) -> None:
        checker = InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser("alice", "secret")  # type: ignore[arg-type]
        sasl.build_portal([checker])
        self.assertEqual(checker.users, {"alice": "secret"})

    def test_file_auth_string(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes(b"alice:secret\nbob:pw\n")
        portal = sasl.portal_from_strings([f"file:{path}"])
        self.assertEqual(sasl.mechanisms_for(portal), ["PLAIN", "LOGIN", "CRAM-MD5"])
        mechanism = CramMD5(nonce=lambda: "7.7")
        challenge = mechanism.start(None).data
        step = mechanism.respond(b64(b"bob " + cram_digest(b"pw", challenge)))
        self.assertEqual(self.successResultOf(sasl.authenticate(portal, step)).username, "bob")
        d = sasl.authenticate(portal, Plain().start(b64(b"\x00alice\x00wrong")))
        self.assertEqual(self.failureResultOf(d, SMTPReply).value.reply, AUTH_FAILED)

    def test_bad_auth_string(self) -> None:
        self.assertRaises(StrcredException, sasl.portal_from_strings, ["nonsense:x"])
        self.assertRaises(StrcredException, sasl.portal_from_strings, ["memory:alice"])


class ExtensionsDocTests(SynchronousTestCase):
    def test_examples_run(self) -> None:
        """The self-contained Python examples of docs/extensions.md (those that say what they print, and need no
        server or saved file) run, and print what their comments say; tests/test_docs_blocks.py runs the others."""
        doc = Path(__file__).resolve().parent.parent / "docs" / "extensions.md"
        blocks = [block for block in re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)
                  if re.search(r"print\(.*\)\s+# ", block) and "smtplib" not in block and "import xtag" not in block
                  and "from xtag" not in block]
        self.assertGreaterEqual(len(blocks), 3)
        for block in blocks:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(block, str(doc), "exec"), {})
            promised = [m.group(1).strip() for m in re.finditer(r"print\(.*\)\s+# (.*)", block)]
            printed = out.getvalue().splitlines()
            for text in promised:
                if not text.startswith("e.g."):
                    self.assertIn(text, printed)
