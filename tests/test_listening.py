"""`esmtpkit.ops.listening`: endpoint strings checked at option time, and the `Listener` service, against fake reactors."""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor, RaisingMemoryReactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.ops.listening import ListenFailed, Listener, check_endpoint


def in_use(interface: str | None = "127.0.0.1", port: Any = 2525) -> CannotListenError:
    return CannotListenError(interface, port, OSError(errno.EADDRINUSE, "Address already in use"))


class CheckEndpointTests(SynchronousTestCase):
    """`check_endpoint`: each kind of mistake is a usage error that starts with the option it came from."""

    def refuse(self, description: str) -> str:
        error = self.assertRaises(usage.UsageError, check_endpoint, f"--listen {description}", description,
                                  MemoryReactor())
        return str(error)

    def test_accepted(self) -> None:
        for description in ("tcp:0", "tcp:65535:interface=127.0.0.1", "tcp:port=25", "tcp6:25:interface=\\:\\:1",
                            "unix:/run/smtp.sock:mode=660", "haproxy:tcp:2525", "tcp:25:backlog=4096"):
            check_endpoint("--listen", description, MemoryReactor())

    def test_ports(self) -> None:
        """A port outside 0..65535 is caught here; Twisted itself would only fail when binding."""
        for description, port in (("tcp:notaport", "notaport"), ("tcp:70000", "70000"), ("tcp6:-1", "-1"),
                                  ("tcp:port=65536", "65536"), ("haproxy:tcp:99999", "99999"), ("tcp:", "")):
            self.assertEqual(self.refuse(description),
                             f"--listen {description}: the port must be a number from 0 to 65535, not {port!r}")

    def test_unknown_type(self) -> None:
        self.assertEqual(self.refuse("nosuchtype:1"), "--listen nosuchtype:1: Unknown endpoint type: 'nosuchtype'")

    def test_unknown_argument(self) -> None:
        self.assertEqual(self.refuse("tcp:25:colour=blue"), "--listen tcp:25:colour=blue: not a valid endpoint "
                         "string (got an unexpected keyword argument 'colour')")

    def test_bad_value(self) -> None:
        self.assertIn("--listen unix:/x.sock:mode=abc: invalid literal", self.refuse("unix:/x.sock:mode=abc"))

    def test_socket_not_passed(self) -> None:
        for description in ("systemd:domain=INET:index=7", "systemd:domain=INET:name=nosuch"):
            self.assertEqual(self.refuse(description), f"--listen {description}: no such socket was passed to this "
                             "process")

    def test_missing_key_file(self) -> None:
        self.assertEqual(self.refuse("ssl:465:privateKey=/nonexistent.pem"),
                         "--listen ssl:465:privateKey=/nonexistent.pem: cannot read /nonexistent.pem: No such file or "
                         "directory")


class ListenerTests(SynchronousTestCase):
    """`Listener` binds in privilegedStartService and stops listening when stopped."""

    def test_listens_once_before_privileges_are_dropped(self) -> None:
        reactor = MemoryReactor()
        factory = Factory()
        listener = Listener("--listen", serverFromString(reactor, "tcp:2525:interface=127.0.0.1"), factory)
        listener.privilegedStartService()
        listener.startService()
        ((port, listening, _, interface),) = reactor.tcpServers
        self.assertEqual((port, interface), (2525, "127.0.0.1"))
        self.assertIs(listening, factory)
        self.assertIsNotNone(listener.port)
        self.successResultOf(listener.stopService())
        self.assertIsNone(listener.port)

    def test_listens_when_started_outside_twistd(self) -> None:
        """An application that only calls startService gets the port too."""
        reactor = MemoryReactor()
        listener = Listener("--listen", serverFromString(reactor, "tcp:2525"), Factory())
        listener.startService()
        self.assertEqual(len(reactor.tcpServers), 1)
        self.successResultOf(listener.stopService())

    def test_cannot_listen(self) -> None:
        """An address in use: `ListenFailed`, exit status 1, and one critical log line saying where and why."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        reactor = RaisingMemoryReactor(listenException=in_use())
        listener = Listener("--listen", serverFromString(reactor, "tcp:2525"), Factory())
        failed = self.assertRaises(ListenFailed, listener.privilegedStartService)
        self.assertIsInstance(failed, SystemExit)
        self.assertIsInstance(failed, Exception)
        self.assertEqual(failed.code, 1)
        self.assertEqual(str(failed), "cannot listen on 127.0.0.1:2525 (--listen): address already in use")
        (logged,) = [e for e in events if e.get("log_namespace") == "esmtpkit.ops.listening"]
        self.assertEqual((logged["log_level"], formatEvent(logged)), (LogLevel.critical, str(failed)))
        self.assertIsNone(listener.stopService())

    def test_addresses(self) -> None:
        """All interfaces, IPv6 and Unix sockets are named as a reader would write them."""
        for error, where in ((in_use("", 25), "0.0.0.0:25"), (in_use("::1", 25), "[::1]:25"),
                             (in_use(None, "/run/smtp.sock"), "/run/smtp.sock")):
            self.assertEqual(str(ListenFailed("--listen", error)),
                             f"cannot listen on {where} (--listen): address already in use")
        denied = CannotListenError("", 25, OSError(errno.EACCES, "Permission denied"))
        self.assertEqual(str(ListenFailed("--listen", denied)),
                         "cannot listen on 0.0.0.0:25 (--listen): permission denied")

    def test_failing_later_is_logged(self) -> None:
        """An endpoint that fails after start cannot stop twistd any more: the failure is logged."""
        later: Deferred[Any] = Deferred()

        class Later:
            def listen(self, factory: Any) -> Deferred[Any]:
                return later

        listener = Listener("--listen", Later(), Factory())  # type: ignore[arg-type]
        listener.privilegedStartService()
        later.errback(in_use())
        self.assertEqual(len(self.flushLoggedErrors(CannotListenError)), 1)
        self.assertIsNone(self.successResultOf(listener.stopService()))

    def test_stop_before_listening_cancels(self) -> None:
        pending: Deferred[Any] = Deferred()

        class Pending:
            def listen(self, factory: Any) -> Deferred[Any]:
                return pending

        listener = Listener("--listen", Pending(), Factory())  # type: ignore[arg-type]
        listener.startService()
        self.successResultOf(listener.stopService())
        self.assertTrue(pending.called)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_failure_not_raised_twice(self) -> None:
        """After a failed start the listener is as new: starting again tries again."""
        attempts: list[int] = []

        class Refusing:
            def listen(self, factory: Any) -> Deferred[Any]:
                attempts.append(1)
                return fail(in_use())

        listener = Listener("--listen", Refusing(), Factory())  # type: ignore[arg-type]
        self.assertRaises(ListenFailed, listener.privilegedStartService)
        self.assertRaises(ListenFailed, listener.privilegedStartService)
        self.assertEqual(len(attempts), 2)
