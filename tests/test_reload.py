"""Reloading without a restart: `esmtpkit.server.authfile.PasswordFile`, and `esmtpkit.cli.tap.ReloadOnHangup` over it and TLS."""

from __future__ import annotations

import base64
import hmac
import signal
import threading
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.cred.checkers import FilePasswordDB, ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import CramMD5Credentials, IUsernameHashedPassword, IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.testing import MemoryReactor
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from esmtpkit.server import sasl
from esmtpkit.cli import tap
from esmtpkit.server.authfile import PasswordFile, PasswordFileError, password_files, read_passwords, replace_file_databases
from esmtpkit.core.reply import SMTPReply
from esmtpkit.server.tls import ServerTLS

from .certs import make_tls_files
from .support import ScratchPaths

HANDLER = ("--handler", "esmtpkit.handlers.base.MessageHandler")


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class LogCapture:
    """Collects the events logged while a test runs."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def formats(self) -> list[str]:
        return [e.get("log_format", "") for e in self.events]


class PasswordFileTests(ScratchPaths, SynchronousTestCase):
    """The file is read once; logins are checked against the table in memory."""

    def write(self, content: bytes) -> Path:
        path = Path(self.mktemp())
        path.write_bytes(content)
        return path

    def login(self, checker: ICredentialsChecker, user: bytes | str, password: bytes | str) -> Any:
        return checker.requestAvatarId(UsernamePassword(user, password))  # type: ignore[arg-type]

    def test_provides_the_checker_interface(self) -> None:
        checker = PasswordFile(self.write(b"alice:secret\n"))
        self.assertTrue(verifyObject(ICredentialsChecker, checker))
        self.assertEqual(checker.credentialInterfaces, (IUsernamePassword, IUsernameHashedPassword))

    def test_plain_passwords(self) -> None:
        checker = PasswordFile(self.write(b"alice:secret\nbob:hunter2:ignored field\n"))
        self.assertEqual(checker.users, {b"alice", b"bob"})
        self.assertEqual(self.successResultOf(self.login(checker, b"alice", b"secret")), b"alice")
        self.assertEqual(self.successResultOf(self.login(checker, b"bob", b"hunter2")), b"bob")
        self.failureResultOf(self.login(checker, b"alice", b"Secret"), UnauthorizedLogin)
        self.failureResultOf(self.login(checker, b"bob", b"hunter2:ignored field"), UnauthorizedLogin)
        self.failureResultOf(self.login(checker, b"carol", b"secret"), UnauthorizedLogin)
        self.failureResultOf(self.login(checker, b"Alice", b"secret"), UnauthorizedLogin)

    def test_text_credentials(self) -> None:
        """Credentials made with str (as code, not the SASL mechanisms, may build them) are checked as UTF-8."""
        checker = PasswordFile(self.write("jörg:pässword\n".encode("utf-8")))
        self.assertEqual(self.successResultOf(self.login(checker, "jörg", "pässword")), "jörg".encode("utf-8"))

    def test_format(self) -> None:
        """Blank lines, # comments, CRLF and trailing blanks are skipped; the first line for a user wins."""
        path = self.write(b"# users\r\n\r\nalice:secret \r\n   \nalice:other\nbob:\n")
        self.assertEqual(read_passwords(path), {b"alice": b"secret", b"bob": b""})

    def test_empty_file(self) -> None:
        self.assertEqual(PasswordFile(self.write(b"")).users, frozenset())

    def test_bad_lines(self) -> None:
        """A line that is not user:password is an error naming the line, and never shows a password."""
        for content, line in ((b"alice:secret\nbobsecret\n", 2), (b":secret\n", 1), (b"#c\n\nalice secret\n", 3)):
            path = self.write(content)
            error = self.assertRaises(PasswordFileError, read_passwords, path)
            self.assertEqual(str(error), f"{path}, line {line}: not user:password")

    def test_unreadable(self) -> None:
        missing = Path(self.mktemp())
        error = self.assertRaises(PasswordFileError, PasswordFile, missing)
        self.assertEqual(str(error), f"cannot read {missing}: No such file or directory")

    def test_cram_md5(self) -> None:
        """CRAM-MD5 (RFC 2195) works: the file has the password in the clear."""
        portal = sasl.build_portal([PasswordFile(self.write(b"alice:secret\n"))])
        self.assertEqual(sasl.mechanisms_for(portal), ["PLAIN", "LOGIN", "CRAM-MD5"])
        for password, good in ((b"secret", True), (b"wrong", False)):
            mechanism = sasl.CramMD5(nonce=lambda: "1.2", hostname="mx.test")
            challenge = mechanism.start(None).data  # type: ignore[union-attr]
            self.assertEqual(challenge, b"<1.2@mx.test>")
            digest = hmac.new(password, challenge, "md5").hexdigest().encode("ascii")
            ready = mechanism.respond(_b64(b"alice " + digest))
            self.assertIsInstance(ready.credentials, CramMD5Credentials)  # type: ignore[union-attr]
            d = sasl.authenticate(portal, ready)  # type: ignore[arg-type]
            if good:
                self.assertEqual(self.successResultOf(d).name, "alice")
            else:
                self.assertEqual(self.failureResultOf(d, SMTPReply).value.reply, sasl.AUTH_FAILED)

    def test_reload_swaps_the_table(self) -> None:
        log = LogCapture(self)
        path = self.write(b"alice:old\n")
        checker = PasswordFile(path)
        path.write_bytes(b"alice:new\nbob:pw\n")
        self.assertEqual(self.successResultOf(self.login(checker, b"alice", b"old")), b"alice")
        checker.reload()
        self.failureResultOf(self.login(checker, b"alice", b"old"), UnauthorizedLogin)
        self.assertEqual(self.successResultOf(self.login(checker, b"alice", b"new")), b"alice")
        self.assertEqual(self.successResultOf(self.login(checker, b"bob", b"pw")), b"bob")
        [event] = [e for e in log.events if e.get("log_format", "").startswith("AUTH password file reloaded")]
        self.assertEqual(event["log_format"], "AUTH password file reloaded: {count} users")
        self.assertEqual((event["count"], event["path"]), (2, str(path)))

    def test_failed_reload_keeps_the_table(self) -> None:
        path = self.write(b"alice:old\n")
        checker = PasswordFile(path)
        path.write_bytes(b"alice:new\nbob")  # caught half written
        self.assertRaises(PasswordFileError, checker.reload)
        path.unlink()
        self.assertRaises(PasswordFileError, checker.reload)
        self.assertEqual(self.successResultOf(self.login(checker, b"alice", b"old")), b"alice")
        self.assertEqual(checker.users, {b"alice"})


class ReplaceTests(ScratchPaths, SynchronousTestCase):
    """What ``--auth file:`` makes is swapped for a `PasswordFile`; other checkers are left alone."""

    def test_replace(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes(b"alice:secret\n")
        hashed = FilePasswordDB(str(path), hash=lambda user, given, stored: given)
        memory = InMemoryUsernamePasswordDatabaseDontUse(alice=b"x")
        new, kept_hashed, kept_memory = replace_file_databases([FilePasswordDB(str(path)), hashed, memory])
        self.assertIsInstance(new, PasswordFile)
        self.assertEqual(new.path, str(path))  # type: ignore[attr-defined]
        self.assertIs(kept_hashed, hashed)
        self.assertIs(kept_memory, memory)

    def test_missing_file(self) -> None:
        self.assertRaises(PasswordFileError, replace_file_databases, [FilePasswordDB(self.mktemp())])

    def test_password_files(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes(b"alice:secret\n")
        checker = PasswordFile(path)
        portal = Portal(sasl.UsernameRealm(), [InMemoryUsernamePasswordDatabaseDontUse(), checker])
        self.assertEqual(password_files(portal), [checker])
        self.assertEqual(password_files(Portal(sasl.UsernameRealm())), [])


class TapTests(ScratchPaths, SynchronousTestCase):
    """``--auth file:PATH`` under twistd: read at start, reloaded by ``kill -HUP`` with the TLS files."""

    def setUp(self) -> None:
        self.passwd = Path(self.mktemp())
        self.passwd.write_bytes(b"alice:secret\n")
        self.files = make_tls_files(Path(self.mktemp()))

    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions([*HANDLER, *argv])
        return options

    def reload_service(self, options: tap.Options) -> tap.ReloadOnHangup | None:
        service = tap.makeService(options, reactor=MemoryReactor())
        found = [s for s in service if isinstance(s, tap.ReloadOnHangup)]  # type: ignore[attr-defined]
        self.assertLessEqual(len(found), 1)
        return found[0] if found else None

    def test_file_checker_is_a_password_file(self) -> None:
        portal = self.parse("--auth", f"file:{self.passwd}")["policy"].portal
        [checker] = password_files(portal)
        self.assertEqual(checker.path, str(self.passwd))

    def test_unusable_file_is_a_usage_error(self) -> None:
        import io

        from twisted.plugins import cred_file

        self.patch(cred_file.theFileCheckerFactory, "errorOutput", io.StringIO())  # its own warning, on stderr
        missing = Path(self.mktemp())
        error = self.assertRaises(usage.UsageError, self.parse, "--auth", f"file:{missing}")
        self.assertEqual(str(error), f"--auth file:{missing}: cannot read it: no such file or directory")
        self.passwd.write_bytes(b"alice\n")
        error = self.assertRaises(usage.UsageError, self.parse, "--auth", f"file:{self.passwd}")
        self.assertEqual(str(error), f"--auth file: {self.passwd}, line 1: not user:password")

    def test_what_is_reloaded(self) -> None:
        tls = ("--tls-cert", str(self.files.cert), "--tls-key", str(self.files.key))
        auth = ("--auth", f"file:{self.passwd}")
        self.assertIsNone(self.reload_service(self.parse()))
        self.assertIsNone(self.reload_service(self.parse("--auth", "memory:alice:secret")))
        only_auth = self.parse(*auth)
        self.assertEqual(self.reload_service(only_auth).reloadables,  # type: ignore[union-attr]
                         password_files(only_auth["portal"]))
        only_tls = self.parse(*tls)
        self.assertEqual(self.reload_service(only_tls).reloadables, [only_tls["tls"]])  # type: ignore[union-attr]
        both = self.parse(*tls, *auth)
        self.assertEqual(self.reload_service(both).reloadables,  # type: ignore[union-attr]
                         [both["tls"], *password_files(both["portal"])])


class Reactor:
    """Records callFromThread calls, as a signal handler makes them."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []

    def callFromThread(self, f: Callable[[], None]) -> None:
        self.calls.append(f)


class Broken:
    def reload(self) -> None:
        raise RuntimeError("unexpected")


class HangupTests(ScratchPaths, SynchronousTestCase):
    """`tap.ReloadOnHangup` over several parts: each is reloaded, a failing one does not stop the others."""

    def setUp(self) -> None:
        directory = Path(self.mktemp())
        self.files = make_tls_files(directory)
        self.tls = ServerTLS(self.files.cert, self.files.key)
        self.passwd = directory / "passwd"
        self.passwd.write_bytes(b"alice:old\n")
        self.checker = PasswordFile(self.passwd)

    def password_ok(self, password: bytes) -> bool:
        d = self.checker.requestAvatarId(UsernamePassword(b"alice", password))
        results: list[Any] = []
        d.addBoth(results.append)
        return results == [b"alice"]

    def test_signal_reloads_every_part(self) -> None:
        log = LogCapture(self)
        reactor = Reactor()
        service = tap.ReloadOnHangup([self.tls, self.checker], reactor)
        before = signal.getsignal(signal.SIGHUP)
        service.startService()
        try:
            self.assertEqual(signal.getsignal(signal.SIGHUP), service._hangup)
            renewed = make_tls_files(self.passwd.parent, self.files.authority, common_name="renewed")
            self.passwd.write_bytes(b"alice:new\n")
            service._hangup(signal.SIGHUP, None)
            self.assertTrue(self.password_ok(b"old"))  # nothing happens in the signal handler itself
            [reload] = reactor.calls
            reload()
        finally:
            service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)
        self.assertEqual(self.tls.certificate.public_bytes(Encoding.DER), renewed.der)
        self.assertEqual((self.password_ok(b"old"), self.password_ok(b"new")), (False, True))
        self.assertEqual([f for f in log.formats() if "reloaded" in f],
                         ["TLS certificate reloaded from {path}", "AUTH password file reloaded: {count} users"])

    def test_failures_are_logged_and_the_rest_reloaded(self) -> None:
        log = LogCapture(self)
        self.files.key.write_bytes(b"garbage")
        service = tap.ReloadOnHangup([self.tls, Broken(), self.checker])
        self.passwd.write_bytes(b"alice:new\n")
        service.reload()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.tls.certificate.public_bytes(Encoding.DER), self.files.der)
        self.assertTrue(self.password_ok(b"new"))
        self.passwd.write_bytes(b"alice")
        service.reload()
        self.flushLoggedErrors(RuntimeError)
        self.assertTrue(self.password_ok(b"new"))
        errors = [e for e in log.events if "not reloaded" in e.get("log_format", "")]
        self.assertEqual([e["log_format"] for e in errors], [
            "TLS certificate not reloaded: {error}", "{part!r} not reloaded",
            "TLS certificate not reloaded: {error}", "{part!r} not reloaded",
            "AUTH password file not reloaded: {error}",
        ])
        self.assertEqual(errors[-1]["error"], f"{self.passwd}, line 1: not user:password")

    def test_one_part_as_before(self) -> None:
        """A single object with reload() (the signature ReloadOnHangup always had) is a list of one."""
        self.assertEqual(tap.ReloadOnHangup(self.tls).reloadables, [self.tls])

    def test_outside_the_main_thread(self) -> None:
        """No signal handler can be set from another thread: a warning, and reload() still works."""
        log = LogCapture(self)
        service = tap.ReloadOnHangup([self.checker], Reactor())
        before = signal.getsignal(signal.SIGHUP)
        thread = threading.Thread(target=service.startService)
        thread.start()
        thread.join()
        self.addCleanup(service.stopService)
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)
        self.assertIn("cannot handle SIGHUP outside the main thread; call reload() to re-read the files",
                      log.formats())
        self.passwd.write_bytes(b"alice:new\n")
        service.reload()
        self.assertTrue(self.password_ok(b"new"))
