"""docs/operating.md cannot drift from the code: every event and field EventLog emits, every metric Metrics exposes,
and its Python examples run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core.address import Address
from esmtpkit.ops.metrics import Metrics
from esmtpkit.server.monitor import EVENTS, EventLog
from esmtpkit.core.reply import Reply
from esmtpkit.core.session import Envelope, Session

DOC = Path(__file__).resolve().parent.parent / "docs" / "operating.md"
TEXT = DOC.read_text()
#: Fields every event carries, documented once above the table rather than in each row.
COMMON = {"event", "conn", "peer"}


def table_row(first_cell: str) -> str:
    """The line of a Markdown table whose first cell is ``first_cell`` (exactly one must exist)."""
    rows = [line for line in TEXT.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, f"{first_cell}: {len(rows)} rows"
    return rows[0]


def exposed_names(registry: Any) -> list[str]:
    """The metric names as a scrape shows them: counters with ``_total``, other families as registered."""
    return [f"{family.name}_total" if family.type == "counter" else family.name for family in registry.collect()]


def emitted_events() -> dict[str, set[str]]:
    """Each event EventLog emits, with the names of its own fields (Twisted's ``log_*`` keys left out)."""
    events: list[dict[str, Any]] = []
    log = EventLog(Logger(namespace="esmtpkit.events", observer=events.append))
    session = Session(hostname="mx.test", peer=IPv4Address("TCP", "192.0.2.1", 40000),
                      host=IPv4Address("TCP", "192.0.2.25", 25), id="06H0GEFXJATN0RZ1RM21")
    session.tls_info = {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "bits": "256"}
    envelope = Envelope(id="06H0GEFXJT2VB8H00DNC", sender=Address("a@example.org"),
                        recipients=[Address("b@example.com")])
    ok, refused = Reply(250, ("Ok",), "2.0.0"), Reply(550, ("No",), "5.7.1")
    log.connection_opened(session)
    log.connection_refused(session, Reply(421, ("Too many connections",), "4.3.2"))
    log.connection_closed(session, 1.5, "QUIT")
    log.tls_established(session)
    log.tls_failed(session, "handshake")
    log.auth_succeeded(session, "PLAIN", "alice")
    log.auth_failed(session, "PLAIN", "alice", Reply(535, ("Authentication credentials invalid",), "5.7.8"))
    log.auth_throttled(session, "address", "alice", 300.0)
    log.replied(session, "RCPT", refused)
    log.timed_out(session, "greeted")
    log.client_replaced(session, "XCLIENT", "192.0.2.9")
    log.message_accepted(session, envelope, 10, 0.5, ok)
    log.message_rejected(session, envelope, 10, refused)
    log.message_aborted(session, envelope, 0, "reset by RSET")
    log.checked(session, "spf.mailfrom", "pass", "example.org", 0.01)
    log.filtered(session, "rspamd", "message", "reject", 0.2, "Gtube pattern")
    return {e["event"]: {k for k in e if not k.startswith("log_")} for e in events}


class EventVocabularyTests(SynchronousTestCase):
    def test_every_event_is_in_the_table_with_its_level(self) -> None:
        for name, level in EVENTS.items():
            row = table_row(f"`{name}`")
            self.assertEqual(row.split("|")[2].strip(), level.name, name)

    def test_every_field_is_in_its_events_row_and_in_the_field_table(self) -> None:
        """Each field an event really has appears in that event's row (or is a common one) and is explained."""
        fields = emitted_events()
        self.assertEqual(set(fields), set(EVENTS), "a call of the test emitted no event, or an unlisted one")
        for name, names in fields.items():
            row = table_row(f"`{name}`")
            self.assertTrue(COMMON <= names, name)
            for field in sorted(names - COMMON):
                self.assertIn(f"`{field}`", row.split("|")[4], f"{name}: {field}")
        for field in sorted(set().union(*fields.values())):
            self.assertTrue(re.search(rf"^\| [^|]*`{field}`[^|]*\|", TEXT, re.M), f"field {field} not explained")


class MetricsListTests(SynchronousTestCase):
    def test_every_metric_is_listed_with_its_type(self) -> None:
        registry = Metrics().registry
        families = {name: family.type for name, family in zip(exposed_names(registry), registry.collect())}
        self.assertEqual(len(families), 16)
        for name, kind in families.items():
            row = table_row(f"`{name}`")
            self.assertEqual(row.split("|")[2].strip(), kind, name)

    def test_no_metric_is_listed_that_does_not_exist(self) -> None:
        listed = set(re.findall(r"^\| `(esmtpkit_\w+)` \|", TEXT, re.M))
        self.assertEqual(listed, set(exposed_names(Metrics().registry)))


class ExampleTests(SynchronousTestCase):
    def test_monitor_examples_run(self) -> None:
        """The monitor example builds a factory; the test example, run after it, passes and leaves no timer."""
        blocks = re.findall(r"```python\n(.*?)```", TEXT, re.S)
        self.assertEqual(len(blocks), 2)
        namespace: dict[str, Any] = {}
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)
        self.assertEqual(namespace["monitor"].rejects, {"127.0.0.1": 1})
        self.assertEqual(namespace["talk"].clock.getDelayedCalls(), [])
        self.assertIs(namespace["factory"].monitor.monitors[1], namespace["rejects"])
