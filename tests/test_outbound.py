"""The outbound message model: JSON round trips, recipients grouped by domain, DSN wishes by NOTIFY."""

from __future__ import annotations

import json

from esmtpkit.core.outbound import MAX_OUTCOME_TEXT, Message, Outcome, Recipient, Status, domain_of
from esmtpkit.core.reply import Reply


def sample() -> Message:
    return Message(
        id="Q1", sender="alice@example.org", size=1234, body="8BITMIME", smtputf8=True, ret="HDRS",
        envid="env 1", arrived=1000.5, next_attempt=1300.0, attempts=2, held=True,
        received_from="dns; client.example (192.0.2.7)", extra={"priority": 3},
        recipients=[
            Recipient("bob@Example.NET", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;bob+2Bx@example.net"),
            Recipient("carol@example.com", status=Status.DELIVERED,
                      outcome=Outcome.of(Reply(250, ("Ok queued",)), "mx.example.com[192.0.2.1]"), reported=True),
            Recipient("dave@example.net", notify=("NEVER",), status=Status.FAILED, delay_reported=True,
                      outcome=Outcome.local(554, "5.4.7", "delivery time expired")),
        ],
    )


def test_json_round_trip_through_text() -> None:
    message = sample()
    again = Message.from_json(json.loads(json.dumps(message.to_json())))
    assert again == message
    assert again.recipients[1].outcome == Outcome(250, "2.0.0", "Ok queued", "mx.example.com[192.0.2.1]")


def test_pending_done_and_domains() -> None:
    message = sample()
    assert message.pending == [0]
    assert not message.done
    assert message.by_domain() == {"example.net": [0]}
    assert message.by_domain([0, 1, 2]) == {"example.net": [0, 2], "example.com": [1]}
    message.recipients[0].status = Status.DELIVERED
    assert message.done and message.by_domain() == {}


def test_copy_is_independent() -> None:
    message = sample()
    copy = message.copy()
    copy.recipients[0].status = Status.FAILED
    copy.extra["priority"] = 9
    assert message.recipients[0].status is Status.PENDING and message.extra["priority"] == 3


def test_notify_defaults_follow_rfc3461() -> None:
    plain = Recipient("a@b.example")
    assert plain.wants("FAILURE") and plain.wants("DELAY") and not plain.wants("SUCCESS")
    never = Recipient("a@b.example", notify=("NEVER",))
    assert not any(never.wants(event) for event in ("SUCCESS", "FAILURE", "DELAY"))
    success = Recipient("a@b.example", notify=("SUCCESS",))
    assert success.wants("SUCCESS") and not success.wants("FAILURE")


def test_outcome_kinds_and_text() -> None:
    temp = Outcome.of(Reply(451, ("Try", "later")), "mx[192.0.2.1]")
    assert temp.temporary and not temp.delivered and not temp.permanent
    assert temp.enhanced == "4.0.0" and temp.text == "Try later"
    assert str(Outcome.local(550, "5.1.10", "null MX")) == "550 5.1.10 null MX"
    assert Outcome.of(Reply(250, ("2.1.5 Ok",))).enhanced == "2.1.5"


def test_domain_of_lowers_the_domain_only() -> None:
    assert domain_of("Bob@Example.NET") == "example.net"
    assert domain_of("postmaster") == ""
    assert domain_of('"a@b"@Example.org') == "example.org"


def test_outcome_text_is_capped_and_dsn_round_trips() -> None:
    long = Outcome.of(Reply(550, tuple("x" * 2000 for _ in range(100))), "mx[192.0.2.1]", dsn=True)
    assert len(long.text) == MAX_OUTCOME_TEXT and long.text.endswith("...")
    again = Outcome.from_json(json.loads(json.dumps(long.to_json())))
    assert again == long and again.dsn
    assert Outcome.from_json([250, "2.0.0", "ok", ""]).dsn is False
