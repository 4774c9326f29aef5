"""Tests for `esmtpkit.core.schedule`: backoff, the delays a broker needs queues for, lifetime and delay warnings."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core.outbound import Message, Outcome, Recipient, Status
from esmtpkit.core.schedule import Schedule

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)
DAY = 86400.0
ARRIVED = 1_700_000_000.0


def message(*recipients: Recipient, sender: str = "alice@example.org") -> Message:
    return Message("Q1", sender, list(recipients) or [Recipient("bob@example.net")], arrived=ARRIVED)


class DefaultsTests(SynchronousTestCase):
    def test_postfix_values(self) -> None:
        """minimal_backoff, maximal_backoff, maximal_queue_lifetime, bounce_queue_lifetime, delay_warning_time."""
        schedule = Schedule()
        self.assertEqual((schedule.min_backoff, schedule.max_backoff), (300.0, 4000.0))
        self.assertEqual((schedule.lifetime, schedule.bounce_lifetime), (5 * DAY, 5 * DAY))
        self.assertIsNone(schedule.delay_warning)

    def test_whole_seconds_become_floats(self) -> None:
        schedule = Schedule(min_backoff=60, max_backoff=600, lifetime=DAY, bounce_lifetime=3600, delay_warning=7200)
        self.assertEqual(schedule, Schedule(60.0, 600.0, DAY, 3600.0, 7200.0))
        self.assertIsInstance(schedule.min_backoff, float)
        self.assertIsInstance(schedule.delay_warning, float)

    def test_frozen(self) -> None:
        with self.assertRaises(AttributeError):
            Schedule().min_backoff = 1.0  # type: ignore[misc]


class ValidationTests(SynchronousTestCase):
    def test_zero_and_negative(self) -> None:
        for name in ("min_backoff", "max_backoff", "lifetime", "bounce_lifetime", "delay_warning"):
            for value in (0, 0.0, -1, -300.0):
                with self.assertRaises(ValueError, msg=(name, value)) as caught:
                    Schedule(**{name: value, **({"min_backoff": 0.5} if name == "max_backoff" else {})})
                self.assertIn(name, str(caught.exception))
                self.assertIn("more than 0 seconds", str(caught.exception))

    def test_not_a_number(self) -> None:
        for value in (float("nan"), float("inf"), "300", None, True):
            with self.assertRaises(ValueError, msg=repr(value)) as caught:
                Schedule(min_backoff=value)  # type: ignore[arg-type]
            self.assertIn("min_backoff", str(caught.exception))

    def test_max_below_min(self) -> None:
        with self.assertRaises(ValueError) as caught:
            Schedule(min_backoff=600, max_backoff=300)
        self.assertEqual(str(caught.exception), "max_backoff (300 s) must not be less than min_backoff (600 s)")

    def test_equal_backoffs_allowed(self) -> None:
        self.assertEqual(Schedule(min_backoff=600, max_backoff=600).intervals(), (600.0,))


class DelayTests(SynchronousTestCase):
    def test_doubles_then_caps(self) -> None:
        schedule = Schedule()
        self.assertEqual([schedule.delay(n) for n in range(1, 8)], [300.0, 600.0, 1200.0, 2400.0, 4000.0,
                                                                    4000.0, 4000.0])

    def test_no_attempt_yet_counts_as_one(self) -> None:
        self.assertEqual(Schedule().delay(0), 300.0)
        self.assertEqual(Schedule().delay(-5), 300.0)

    def test_huge_attempt_counts(self) -> None:
        """No overflow however many attempts were made."""
        for attempts in (1023, 1024, 1025, 5000, 10 ** 9):
            self.assertEqual(Schedule().delay(attempts), 4000.0)
        self.assertEqual(Schedule(min_backoff=1e-300, max_backoff=1e300).delay(2000), 1e300)

    def test_intervals(self) -> None:
        self.assertEqual(Schedule().intervals(), (300.0, 600.0, 1200.0, 2400.0, 4000.0))
        self.assertEqual(Schedule(min_backoff=100, max_backoff=800).intervals(), (100.0, 200.0, 400.0, 800.0))

    def test_intervals_are_exactly_the_delays(self) -> None:
        for schedule in (Schedule(), Schedule(1, 1e6), Schedule(7, 8), Schedule(1e-300, 1e300)):
            delays = {schedule.delay(n) for n in range(1, 2100)}
            self.assertEqual(set(schedule.intervals()), delays)
            self.assertEqual(list(schedule.intervals()), sorted(delays))


class DelayPropertyTests(SynchronousTestCase):
    @SETTINGS
    @given(st.floats(min_value=1e-3, max_value=1e6), st.floats(min_value=1.0, max_value=1e4),
           st.integers(min_value=1, max_value=3000), st.integers(min_value=0, max_value=3000))
    def test_monotonic_and_capped(self, low: float, factor: float, attempts: int, more: int) -> None:
        schedule = Schedule(min_backoff=low, max_backoff=low * factor)
        first, later = schedule.delay(attempts), schedule.delay(attempts + more)
        self.assertLessEqual(first, later)
        self.assertGreaterEqual(first, schedule.min_backoff)
        self.assertLessEqual(later, schedule.max_backoff)
        self.assertEqual(schedule.delay(1), schedule.min_backoff)
        self.assertIn(first, schedule.intervals())
        self.assertIn(later, schedule.intervals())


class ExpiryTests(SynchronousTestCase):
    def test_lifetime(self) -> None:
        schedule = Schedule(lifetime=DAY, bounce_lifetime=3600)
        self.assertFalse(schedule.expired(message(), ARRIVED + DAY - 1))
        self.assertTrue(schedule.expired(message(), ARRIVED + DAY))
        self.assertTrue(schedule.expired(message(), ARRIVED + 2 * DAY))

    def test_bounce_lifetime_for_null_sender(self) -> None:
        schedule = Schedule(lifetime=DAY, bounce_lifetime=3600)
        self.assertFalse(schedule.expired(message(sender=""), ARRIVED + 3599))
        self.assertTrue(schedule.expired(message(sender=""), ARRIVED + 3600))


class WarningTests(SynchronousTestCase):
    def test_off_by_default(self) -> None:
        self.assertFalse(Schedule().warn_due(message(), ARRIVED + 4 * DAY))

    def test_due_after_delay_warning(self) -> None:
        schedule = Schedule(delay_warning=4 * 3600)
        self.assertFalse(schedule.warn_due(message(), ARRIVED + 4 * 3600 - 1))
        self.assertTrue(schedule.warn_due(message(), ARRIVED + 4 * 3600))

    def test_only_for_recipients_that_want_it(self) -> None:
        schedule = Schedule(delay_warning=3600)
        late = ARRIVED + 7200
        self.assertTrue(schedule.warn_due(message(Recipient("a@x.test", notify=("DELAY",))), late))
        self.assertTrue(schedule.warn_due(message(Recipient("a@x.test", notify=("FAILURE", "DELAY"))), late))
        self.assertFalse(schedule.warn_due(message(Recipient("a@x.test", notify=("FAILURE",))), late))
        self.assertFalse(schedule.warn_due(message(Recipient("a@x.test", notify=("NEVER",))), late))

    def test_not_twice(self) -> None:
        schedule = Schedule(delay_warning=3600)
        late = ARRIVED + 7200
        self.assertFalse(schedule.warn_due(message(Recipient("a@x.test", delay_reported=True)), late))
        mixed = message(Recipient("a@x.test", delay_reported=True), Recipient("b@x.test"))
        self.assertTrue(schedule.warn_due(mixed, late))

    def test_only_pending_recipients(self) -> None:
        schedule = Schedule(delay_warning=3600)
        late = ARRIVED + 7200
        done = message(Recipient("a@x.test", status=Status.DELIVERED, outcome=Outcome(250, "2.0.0", "ok")),
                       Recipient("b@x.test", status=Status.FAILED, outcome=Outcome(550, "5.1.1", "no")))
        self.assertFalse(schedule.warn_due(done, late))

    def test_never_for_null_sender(self) -> None:
        self.assertFalse(Schedule(delay_warning=3600).warn_due(message(sender=""), ARRIVED + 7200))
