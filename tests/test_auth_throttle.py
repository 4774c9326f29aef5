"""Password guessing across connections: the throttle's arithmetic (esmtpkit.server.authlimit), then the protocol with
several connections of one factory on a task.Clock, exact bytes."""

from __future__ import annotations

import base64
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit import ESMTPFactory, Policy
from esmtpkit.server.authlimit import ADDRESS, DEFAULT_MAX_ENTRIES, USER, AuthThrottle, client_key, user_key
from esmtpkit.ops.metrics import Metrics
from esmtpkit.server.monitor import Monitor, Monitors
from esmtpkit.server.protocol import ESMTPProtocol
from esmtpkit.server.sasl import build_portal, portal_from_strings
from esmtpkit.testing import RecordingHandler

from .support import BrokenChecker, LateChecker

OK = b"235 2.7.0 Authentication successful\r\n"
INVALID = b"535 5.7.8 Authentication credentials invalid\r\n"
THROTTLED = b"454 4.7.0 Too many failed authentications, try again later\r\n"


def plain(user: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()) + b"\r\n"


# ---- the throttle alone --------------------------------------------------------------------------------------

class ThrottleTests(SynchronousTestCase):
    """`AuthThrottle` with the defaults (10 per address, 30 per user name, 300 s, 2 s after 3); time is given."""

    def guess(self, throttle: AuthThrottle, ip: str, user: str | None, now: float) -> Any:
        attempt = throttle.begin(ip, user, now)
        self.assertIsNotNone(attempt, f"{ip} {user} refused at {now}")
        assert attempt is not None
        return throttle.failed(attempt, now)

    def test_delays_grow_after_the_first_failures(self) -> None:
        """None for the first three, then 2 s doubling to 16 s (8 times the first) and no further."""
        throttle = AuthThrottle(address_limit=20, user_limit=0)
        delays = [self.guess(throttle, "192.0.2.1", "alice", 0.0).delay for _ in range(10)]
        self.assertEqual(delays, [0, 0, 0, 2, 4, 8, 16, 16, 16, 16])

    def test_limit_starts_a_cool_off_that_ends(self) -> None:
        throttle = AuthThrottle()
        verdicts = [self.guess(throttle, "192.0.2.1", f"user{i}", 0.0) for i in range(10)]
        self.assertEqual([v.scopes for v in verdicts], [()] * 9 + [(ADDRESS,)])
        self.assertTrue(throttle.refuses("192.0.2.1", None, 0.0))
        self.assertIsNone(throttle.begin("192.0.2.1", "user0", 299.9))
        self.assertFalse(throttle.refuses("192.0.2.9", None, 1.0))  # another address is not concerned
        self.assertFalse(throttle.refuses("192.0.2.1", None, 300.0))
        self.assertEqual(len(throttle), 10)  # the user names' counts are still there; the address was forgotten
        self.assertEqual(self.guess(throttle, "192.0.2.1", "other", 300.0).failures, 1)

    def test_one_failure_forgotten_every_cool_off_over_limit_seconds(self) -> None:
        """The leak: 300 s / 10 = one failure forgotten every 30 s, counted from the first failure kept."""
        throttle = AuthThrottle(user_limit=0)
        for _ in range(5):
            self.guess(throttle, "192.0.2.1", None, 0.0)
        self.assertEqual(self.guess(throttle, "192.0.2.1", None, 59.0).failures, 5)  # 6 - 1
        self.assertEqual(self.guess(throttle, "192.0.2.1", None, 60.0).failures, 5)  # 7 - 2
        self.assertFalse(throttle.refuses("192.0.2.1", None, 60.0 + 5 * 30))
        self.assertEqual(len(throttle), 0)  # a key with nothing left is dropped

    def test_rate_from_one_address_is_bounded(self) -> None:
        """An address guessing as fast as it can, for an hour: at most limit * (1 + W / cool_off) wrong guesses
        are judged in any window of W seconds, 12 a minute with the defaults; on average 2 a minute."""
        throttle = AuthThrottle()
        judged: list[float] = []
        now = 0.0
        while now < 3600:
            attempt = throttle.begin("192.0.2.1", f"user{len(judged)}", now)
            if attempt is not None:
                throttle.failed(attempt, now)
                judged.append(now)
            now += 0.5
        self.assertLessEqual(max(sum(1 for t in judged if start <= t < start + 60) for start in judged), 12)
        self.assertLessEqual(len(judged), 2 * 60 + 10)

    def test_checks_in_progress_count(self) -> None:
        """Ten checks begun at once (ten connections) fill the limit; an eleventh is refused until one ends."""
        throttle = AuthThrottle()
        attempts = [throttle.begin("192.0.2.1", "alice", 0.0) for _ in range(10)]
        self.assertNotIn(None, attempts)
        self.assertIsNone(throttle.begin("192.0.2.1", "bob", 0.0))
        throttle.ended(attempts[0], 0.0)  # a success: it no longer counts
        self.assertIsNotNone(throttle.begin("192.0.2.1", "bob", 0.0))

    def test_success_clears_no_failure(self) -> None:
        """Nine wrong guesses, one valid account used in between: the next wrong guess still starts the cool-off."""
        throttle = AuthThrottle()
        for i in range(9):
            self.guess(throttle, "192.0.2.1", f"victim{i}", 0.0)
        ok = throttle.begin("192.0.2.1", "mallory", 0.0)
        assert ok is not None
        throttle.ended(ok, 0.0)
        self.assertEqual(self.guess(throttle, "192.0.2.1", "victim", 0.0).scopes, (ADDRESS,))

    def test_user_names_counted_across_addresses(self) -> None:
        """Thirty addresses, one guess each at alice: alice is refused from anywhere, bob is not."""
        throttle = AuthThrottle()
        verdicts = [self.guess(throttle, f"198.51.100.{i}", "alice", 0.0) for i in range(30)]
        self.assertEqual(verdicts[-1].scopes, (USER,))
        self.assertEqual([v.delay for v in verdicts[:5]], [0, 0, 0, 2, 4])  # the user's count drives delays too
        self.assertTrue(throttle.refuses("203.0.113.7", "alice", 1.0))
        self.assertFalse(throttle.refuses("203.0.113.7", "bob", 1.0))
        self.assertFalse(throttle.refuses("203.0.113.7", None, 1.0))  # before the name is known: no reason

    def test_one_address_alone_never_cools_off_a_user_name(self) -> None:
        """With the defaults a single address (at most 12 a minute) cannot fill a user name's 30 (one a 10 s)."""
        throttle = AuthThrottle()
        now = 0.0
        while now < 3600:
            attempt = throttle.begin("192.0.2.1", "alice", now)
            if attempt is not None:
                self.assertIn(throttle.failed(attempt, now).scopes, ((), (ADDRESS,)))
            now += 0.25
        self.assertFalse(throttle.refuses("203.0.113.7", "alice", now))

    def test_memory_is_bounded(self) -> None:
        """Distinct addresses and user names, each failing once: at most max_entries keys of each kind are kept,
        and the least recently touched go first."""
        throttle = AuthThrottle(address_limit=1, user_limit=1, max_entries=1000)
        count = 100_000

        def address(i: int) -> str:
            return f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}"

        for i in range(count):
            attempt = throttle.begin(address(i), f"u{i}", i / 1000)
            assert attempt is not None
            throttle.failed(attempt, i / 1000)
        self.assertEqual(len(throttle), 2000)
        now = count / 1000
        self.assertEqual([throttle.refuses(address(i), None, now) for i in (0, count - 1001, count - 1000, count - 1)],
                         [False, False, True, True])
        self.assertEqual([throttle.refuses("", f"u{i}", now) for i in (count - 1001, count - 1000)], [False, True])
        self.assertEqual(DEFAULT_MAX_ENTRIES, 16384)

    def test_a_full_table_keeps_cool_offs(self) -> None:
        """Rotating through more addresses than the table holds does not wipe out one in its cool-off."""
        throttle = AuthThrottle(address_limit=2, user_limit=0, max_entries=10)
        for _ in range(2):
            attempt = throttle.begin("192.0.2.1", None, 0.0)
            assert attempt is not None
            throttle.failed(attempt, 0.0)
        self.assertTrue(throttle.refuses("192.0.2.1", None, 1.0))
        for i in range(100):
            attempt = throttle.begin(f"198.51.100.{i}", None, 1.0)
            assert attempt is not None
            throttle.failed(attempt, 1.0)
        self.assertLessEqual(len(throttle), 10)
        self.assertTrue(throttle.refuses("192.0.2.1", None, 2.0))

    def test_clock_going_back_never_refuses_longer_than_a_cool_off(self) -> None:
        throttle = AuthThrottle(user_limit=0)
        for _ in range(10):
            self.guess(throttle, "192.0.2.1", None, 10_000.0)
        self.assertTrue(throttle.refuses("192.0.2.1", None, 0.0))  # the clock was set back 10,000 s
        self.assertFalse(throttle.refuses("192.0.2.1", None, 300.0))

    def test_keys(self) -> None:
        """IPv4 as itself (also IPv4-mapped), IPv6 by its /64; no address, no key; user names as a digest."""
        self.assertEqual(client_key("192.0.2.1"), bytes([192, 0, 2, 1]))
        self.assertEqual(client_key("::ffff:192.0.2.1"), client_key("192.0.2.1"))
        self.assertEqual(client_key("2001:db8::1"), client_key("2001:db8::ffff:1"))
        self.assertEqual(client_key("fe80::1%eth0"), client_key("fe80::2"))
        self.assertNotEqual(client_key("2001:db8:0:1::1"), client_key("2001:db8::1"))
        self.assertIsNone(client_key(""))
        self.assertIsNone(client_key("not an address"))
        self.assertEqual(len(user_key("x" * 12000) or b""), 16)
        self.assertEqual(user_key("alice"), user_key(b"alice"))
        self.assertIsNone(user_key(None))

    def test_ipv6_counted_per_64(self) -> None:
        throttle = AuthThrottle(user_limit=0)
        for i in range(10):
            self.guess(throttle, f"2001:db8::{i + 1:x}", None, 0.0)
        self.assertTrue(throttle.refuses("2001:db8::abcd", None, 0.0))
        self.assertFalse(throttle.refuses("2001:db8:0:1::1", None, 0.0))

    def test_switches(self) -> None:
        """0 turns a part off: a limit (that kind of key is not counted), the delay, the cool-off (everything)."""
        self.assertIsNone(AuthThrottle.from_policy(Policy(hostname="mx.test", auth_cool_off=0)))
        self.assertIsNone(AuthThrottle.from_policy(Policy(hostname="mx.test", auth_failure_limit=0,
                                                          auth_user_failure_limit=0)))
        throttle = AuthThrottle.from_policy(Policy(hostname="mx.test", auth_user_failure_limit=0,
                                                   auth_failure_delay=0))
        assert throttle is not None
        verdicts = [self.guess(throttle, "192.0.2.1", "alice", 0.0) for _ in range(10)]
        self.assertEqual({v.delay for v in verdicts}, {0})
        self.assertFalse(throttle.refuses("192.0.2.2", "alice", 0.0))
        throttle = AuthThrottle(address_limit=0)
        for _ in range(29):
            self.guess(throttle, "192.0.2.1", "alice", 0.0)
        self.assertEqual(self.guess(throttle, "192.0.2.1", "bob", 0.0).failures, 1)

    def test_policy_checks_its_numbers(self) -> None:
        for name in ("auth_failure_limit", "auth_user_failure_limit", "auth_cool_off", "auth_failure_delay",
                     "auth_delay_after"):
            with self.assertRaises(ValueError):
                Policy(hostname="mx.test", **{name: -1})
        with self.assertRaises(ValueError):
            AuthThrottle(cool_off=0)


# ---- the protocol: connections of one factory ----------------------------------------------------------------

class Heard(Monitor):
    """Keeps what the throttle reported."""

    def __init__(self) -> None:
        self.throttled: list[tuple[str, str | None, float]] = []

    def auth_throttled(self, session: Any, scope: str, user: str | None, seconds: float) -> None:
        self.throttled.append((scope, user, seconds))


class ServerTests(SynchronousTestCase):
    """Several connections of one ESMTPFactory, each from a given address, all on one task.Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.heard = Heard()
        self.metrics = Metrics()
        self.connections: list[ESMTPProtocol] = []
        self.addCleanup(self.hang_up)

    def factory(self, **changes: Any) -> ESMTPFactory:
        changes.setdefault("portal", portal_from_strings(["memory:alice:secret:bob:hunter2"]))
        changes.setdefault("auth_require_tls", False)
        changes.setdefault("error_limit", 0)
        return ESMTPFactory(RecordingHandler, policy=Policy(hostname="mx.test", **changes), clock=self.clock,
                            monitor=Monitors([self.heard, self.metrics]))

    def connect(self, factory: ESMTPFactory, ip: str = "192.0.2.1") -> ESMTPProtocol:
        peer = IPv6Address("TCP", ip, 40000) if ":" in ip else IPv4Address("TCP", ip, 40000)
        protocol = factory.buildProtocol(peer)
        protocol.makeConnection(StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "192.0.2.25", 25)))
        self.connections.append(protocol)
        self.assertTrue(self.send(protocol, b"EHLO client.test\r\n").startswith(b"250"))
        return protocol

    def send(self, protocol: ESMTPProtocol, data: bytes) -> bytes:
        """Write ``data``; the bytes the server wrote in response, at once (time does not move)."""
        transport = protocol.transport
        before = len(transport.value())
        protocol.dataReceived(data)
        return transport.value()[before:]

    def later(self, protocol: ESMTPProtocol, seconds: float) -> bytes:
        """Let ``seconds`` pass; what the server wrote meanwhile."""
        before = len(protocol.transport.value())
        self.clock.advance(seconds)
        return protocol.transport.value()[before:]

    def hang_up(self) -> None:
        for protocol in self.connections:
            protocol.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(3600)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def scrape(self, scope: str) -> float | None:
        return self.metrics.registry.get_sample_value("esmtpkit_auth_throttled_total", {"scope": scope})

    def test_failures_on_one_connection_delay_the_reply_on_another(self) -> None:
        """Three wrong guesses on A; B's next wrong guess is answered 2 s late, nothing read meanwhile."""
        factory = self.factory()
        a = self.connect(factory)
        for _ in range(3):
            self.assertEqual(self.send(a, plain("alice", "guess")), INVALID)
        b = self.connect(factory)
        self.assertEqual(self.send(b, plain("bob", "guess") + b"NOOP\r\n"), b"")
        self.assertEqual(b.transport.producerState, "paused")
        self.assertEqual(self.later(b, 1.9), b"")
        self.assertEqual(self.later(b, 0.1), INVALID + b"250 2.0.0 OK\r\n")
        self.assertEqual(b.transport.producerState, "producing")
        # The next one waits twice as long; another address is not concerned.
        self.assertEqual(self.send(a, plain("alice", "guess")), b"")
        self.assertEqual(self.later(a, 3.9), b"")
        self.assertEqual(self.later(a, 0.1), INVALID)
        self.assertEqual(self.send(self.connect(factory, "192.0.2.2"), plain("bob", "guess")), INVALID)

    def test_limit_refuses_auth_with_454_until_the_cool_off_ends(self) -> None:
        factory = self.factory(auth_failure_delay=0)
        first = self.connect(factory)
        for i in range(10):
            self.assertEqual(self.send(self.connect(factory) if i % 2 else first, plain("alice", f"guess{i}")),
                             INVALID)
        self.assertEqual(self.heard.throttled, [("address", "alice", 300.0)])
        self.assertEqual(self.scrape("address"), 1)
        again = self.connect(factory)
        # Refused before any password is judged: the right one, a mechanism that would ask first.
        self.assertEqual(self.send(again, plain("alice", "secret")), THROTTLED)
        self.assertEqual(self.send(again, b"AUTH LOGIN\r\n"), THROTTLED)
        self.assertIsNone(again.session.authenticated)
        self.assertEqual(self.send(self.connect(factory, "192.0.2.2"), plain("alice", "secret")), OK)
        self.clock.advance(299)
        self.assertEqual(self.send(again, plain("alice", "secret")), THROTTLED)
        self.clock.advance(1)
        self.assertEqual(self.send(again, plain("alice", "secret")), OK)

    def test_refusal_is_held_too(self) -> None:
        """In the cool-off, the 454 itself comes after the first delay: a client cannot spin on it."""
        factory = self.factory(auth_failure_limit=1)
        a = self.connect(factory)
        self.assertEqual(self.send(a, plain("alice", "guess")), INVALID)
        self.assertEqual(self.send(a, b"AUTH LOGIN\r\nNOOP\r\n"), b"")
        self.assertEqual(self.later(a, 2), THROTTLED + b"250 2.0.0 OK\r\n")

    def test_success_does_not_reset_the_count(self) -> None:
        """Nine wrong guesses, then a valid login from the same address: the tenth guess still starts the cool-off."""
        factory = self.factory(auth_failure_delay=0)
        attacker = self.connect(factory)
        for i in range(9):
            self.send(attacker, plain("alice", f"guess{i}"))
        self.assertEqual(self.send(self.connect(factory), plain("bob", "hunter2")), OK)
        self.assertEqual(self.send(attacker, plain("alice", "guess9")), INVALID)
        self.assertEqual(self.send(attacker, plain("alice", "secret")), THROTTLED)

    def test_user_name_counted_across_addresses(self) -> None:
        factory = self.factory(auth_failure_delay=0, auth_user_failure_limit=4)
        for i in range(4):
            self.assertEqual(self.send(self.connect(factory, f"198.51.100.{i}"), plain("alice", "guess")), INVALID)
        self.assertEqual(self.heard.throttled, [("user", "alice", 300.0)])
        self.assertEqual(self.scrape("user"), 1)
        fresh = self.connect(factory, "203.0.113.9")
        self.assertEqual(self.send(fresh, plain("alice", "secret")), THROTTLED)
        self.assertEqual(self.send(fresh, plain("bob", "hunter2")), OK)

    def test_ipv6_clients_counted_per_64(self) -> None:
        factory = self.factory(auth_failure_delay=0, auth_failure_limit=2)
        self.send(self.connect(factory, "2001:db8::1"), plain("alice", "guess"))
        self.send(self.connect(factory, "2001:db8::2"), plain("alice", "guess"))
        self.assertEqual(self.send(self.connect(factory, "2001:db8::3"), plain("bob", "hunter2")), THROTTLED)
        self.assertEqual(self.send(self.connect(factory, "2001:db8:0:1::1"), plain("bob", "hunter2")), OK)

    def test_parallel_checks_cannot_pass_the_limit(self) -> None:
        """Ten checks in progress at once from one address: the eleventh connection's AUTH gets 454 unjudged."""
        checker = LateChecker()
        factory = self.factory(portal=build_portal([checker]), auth_failure_delay=0)
        waiting = [self.connect(factory) for _ in range(10)]
        for protocol in waiting:
            self.assertEqual(self.send(protocol, plain("alice", "guess")), b"")
        self.assertEqual(self.send(self.connect(factory), plain("alice", "guess")), THROTTLED)
        self.assertEqual(len(checker.pending), 10)
        for d, _ in checker.pending:
            d.errback(UnauthorizedLogin())
        self.assertEqual([p.transport.value().endswith(INVALID) for p in waiting], [True] * 10)
        self.assertEqual(self.heard.throttled, [("address", "alice", 300.0)])

    def test_checker_failure_is_no_guess(self) -> None:
        factory = self.factory(portal=build_portal([BrokenChecker()]), auth_failure_limit=1)
        a = self.connect(factory)
        for _ in range(3):
            self.assertEqual(self.send(a, plain("alice", "secret")), b"454 4.7.0 Temporary authentication failure\r\n")
        self.assertEqual(self.heard.throttled, [])
        self.flushLoggedErrors(OSError)

    def test_malformed_or_cancelled_exchange_is_no_guess(self) -> None:
        factory = self.factory(auth_failure_limit=1)
        a = self.connect(factory)
        self.assertEqual(self.send(a, b"AUTH PLAIN =\r\n"), b"501 5.5.2 Malformed authentication response\r\n")
        self.assertEqual(self.send(a, b"AUTH LOGIN\r\n*\r\n"),
                         b"334 VXNlcm5hbWU6\r\n501 5.7.0 Authentication cancelled\r\n")
        self.assertEqual(self.send(a, plain("alice", "secret")), OK)

    def test_connection_lost_while_held(self) -> None:
        """A client that leaves during the delay gets nothing more, and no timer outlives the delay."""
        factory = self.factory(auth_delay_after=0)
        a = self.connect(factory)
        self.assertEqual(self.send(a, plain("alice", "guess")), b"")
        a.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.later(a, 2), b"")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_off(self) -> None:
        """auth_cool_off=0: no throttle at all; the per-connection error limit is what remains."""
        factory = self.factory(auth_cool_off=0)
        self.assertIsNone(factory.auth_throttle)
        a = self.connect(factory)
        self.assertEqual(self.send(a, plain("alice", "guess") * 15), INVALID * 15)
        self.assertEqual(self.send(a, plain("alice", "secret")), OK)

    def test_protocol_without_factory_has_no_throttle(self) -> None:
        protocol = ESMTPProtocol(RecordingHandler(), Policy(hostname="mx.test", error_limit=0, auth_require_tls=False,
                                                             portal=portal_from_strings(["memory:alice:secret"])),
                                 self.clock)
        protocol.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 40000)))
        self.connections.append(protocol)
        self.send(protocol, b"EHLO client.test\r\n")
        self.assertEqual(self.send(protocol, plain("alice", "guess") * 15), INVALID * 15)


# ---- twistd esmtpkit options ---------------------------------------------------------------------------------

class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> Any:
        from esmtpkit.cli import tap

        options = tap.Options()
        options.parseOptions(["--handler", "esmtpkit.handlers.base.MessageHandler", *argv])
        return options

    def test_options_reach_the_policy_and_the_factory(self) -> None:
        from twisted.internet.testing import MemoryReactor

        from esmtpkit.cli import tap

        options = self.parse("--auth", "memory:alice:secret", "--auth-failure-limit", "4",
                             "--auth-user-failure-limit", "0", "--auth-cool-off", "60", "--auth-failure-delay", "0.5",
                             "--auth-delay-after", "1")
        policy = options["policy"]
        self.assertEqual((policy.auth_failure_limit, policy.auth_user_failure_limit, policy.auth_cool_off,
                          policy.auth_failure_delay, policy.auth_delay_after), (4, 0, 60.0, 0.5, 1))
        factory = tap.makeService(options, reactor=MemoryReactor()).factory  # type: ignore[attr-defined]
        throttle = factory.auth_throttle
        self.assertEqual((throttle.cool_off, throttle.delay, throttle.delay_after), (60.0, 0.5, 1))
        off = tap.makeService(self.parse("--auth-cool-off", "0"), reactor=MemoryReactor())
        self.assertIsNone(off.factory.auth_throttle)  # type: ignore[attr-defined]

    def test_defaults(self) -> None:
        policy = self.parse()["policy"]
        self.assertEqual((policy.auth_failure_limit, policy.auth_user_failure_limit, policy.auth_cool_off,
                          policy.auth_failure_delay, policy.auth_delay_after), (10, 30, 300.0, 2.0, 3))

    def test_bad_values(self) -> None:
        from twisted.python import usage

        for option, value in (("--auth-failure-limit", "-1"), ("--auth-failure-limit", "x"),
                              ("--auth-cool-off", "-5"), ("--auth-cool-off", "nan"), ("--auth-failure-delay", "inf"),
                              ("--auth-delay-after", "1.5")):
            with self.assertRaises(usage.UsageError, msg=f"{option} {value}"):
                self.parse(option, value)
