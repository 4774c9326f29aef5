"""The MAIL and RCPT extensions that apply to the next hop, on the outbound side: REQUIRETLS (RFC 8689), MT-PRIORITY
(RFC 6710), DELIVERBY (RFC 2852) and RRVS (RFC 7293) kept on the queued message, passed on by the client when the
next hop offers them, and what becomes of the message when it does not.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from esmtpkit.client.delivery import Deliverer
from esmtpkit.client.mx import Hop
from esmtpkit.client.options import ClientOptions
from esmtpkit.client.session import Attempt
from esmtpkit.core.client import Extensions, check_offer, check_recipient, mail_command, rcpt_command
from esmtpkit.core.deliverby import By, DeliverBy
from esmtpkit.core.outbound import Message, Outcome, Recipient
from esmtpkit.core.priority import MtPriority
from esmtpkit.core.reply import Reply
from esmtpkit.core.requiretls import RequireTLS
from esmtpkit.core.rrvs import Rrvs, parse_rrvs
from esmtpkit.core.session import Envelope, Session
from esmtpkit.handlers.collecting import MessageStore
from esmtpkit.handlers.queue import to_message
from esmtpkit.queue.spool import SpoolStore
from esmtpkit.server.tls import ServerTLS
from esmtpkit.testing import serve

from .certs import make_tls_files
from .support import (CLIENT_CONTENT, OK, PEER_GREETING, Client, Queue, Worker, collecting, commit, deliver,
                      make_message, report)

SINCE = parse_rrvs("2020-01-02T03:04:05Z")
SINCE_C = parse_rrvs("2020-01-02T03:04:05+01:00;C")


def ehlo(*keywords: str) -> Extensions:
    return Extensions.parse(Reply(250, ("mx.test",) + keywords))


# ---- the queued form ----------------------------------------------------------------------------------------------

def test_json_round_trip_keeps_the_extensions() -> None:
    message = make_message(requiretls=True, priority=-3, deliver_by=By(600, "R", True), arrived=1000.0)
    message.recipients[0].rrvs = SINCE_C
    data = json.loads(json.dumps(message.to_json()))
    assert (data["requiretls"], data["priority"], data["by"]) == (True, -3, "600;RT")
    assert data["recipients"][0]["rrvs"] == "2020-01-02T03:04:05+01:00;C"
    again = Message.from_json(data)
    assert again == message and again.copy() == message


def test_json_without_them_still_loads_and_stays_as_it_was() -> None:
    plain = make_message()
    data = plain.to_json()
    assert not {"requiretls", "priority", "by"} & set(data) and "rrvs" not in data["recipients"][0]
    again = Message.from_json(data)
    assert (again.requiretls, again.priority, again.deliver_by, again.recipients[0].rrvs) == (False, None, None, None)
    assert again.rank == 0


@pytest.mark.parametrize("change", [{"by": "0;R"}, {"by": "soon"}])
def test_a_bad_stored_parameter_is_a_value_error(change: dict[str, Any]) -> None:
    data = {**make_message().to_json(), **change}
    with pytest.raises(ValueError, match="bad stored parameter"):
        Message.from_json(data)


def test_the_queue_handler_keeps_the_parsed_parameters() -> None:
    session = Session("mx.test")
    envelope = session.envelope = Envelope()
    envelope.sender = "a@example.org"
    envelope.recipients = ["b@example.net", "c@example.net"]
    envelope.mail_params.update({"REQUIRETLS": True, "MT-PRIORITY": 4, "BY": By(120, "N")})
    envelope.rcpt_params = [{"RRVS": SINCE}]
    message = to_message(session, "Q1", 10, 500.0)
    assert (message.requiretls, message.priority, message.deliver_by) == (True, 4, By(120, "N"))
    assert [r.rrvs for r in message.recipients] == [SINCE, None]
    plain = Session("mx.test")
    plain.envelope = Envelope()
    plain.envelope.sender = "a@example.org"
    plain.envelope.recipients = ["b@example.net"]
    assert (to_message(plain, "Q2", 1, 0.0).requiretls, to_message(plain, "Q2", 1, 0.0).priority) == (False, None)


# ---- the commands -------------------------------------------------------------------------------------------------

def test_mail_passes_on_what_the_server_offers() -> None:
    message = make_message(size=0, requiretls=True, priority=5, deliver_by=By(600, "R", True), arrived=1000.0)
    everything = ehlo("REQUIRETLS", "MT-PRIORITY", "DELIVERBY 60")
    assert mail_command(message, everything, now=1100.4) == (b"MAIL FROM:<a@example.org> REQUIRETLS MT-PRIORITY=5 "
                                                             b"BY=499;RT")
    assert mail_command(message, ehlo()) == b"MAIL FROM:<a@example.org>"
    late = make_message(size=0, deliver_by=By(60, "N"), arrived=1000.0)
    assert mail_command(late, everything, now=1100.0) == b"MAIL FROM:<a@example.org> BY=-40;N"


def test_rcpt_passes_rrvs_on_when_offered() -> None:
    recipient = Recipient("b@example.net", rrvs=SINCE_C)
    assert rcpt_command(recipient, ehlo("RRVS")) == b"RCPT TO:<b@example.net> RRVS=2020-01-02T03:04:05+01:00;C"
    assert rcpt_command(recipient, ehlo()) == b"RCPT TO:<b@example.net>"
    assert rcpt_command(Recipient("b@example.net", rrvs=SINCE), ehlo("RRVS")).endswith(b"RRVS=2020-01-02T03:04:05Z")


def test_check_recipient_without_rrvs_offered() -> None:
    assert check_recipient(Recipient("b@example.net", rrvs=SINCE_C), ehlo()) is None
    assert check_recipient(Recipient("b@example.net", rrvs=SINCE), ehlo("RRVS")) is None
    refused = check_recipient(Recipient("b@example.net", rrvs=SINCE), ehlo())
    assert refused is not None and (refused.code, refused.enhanced) == (550, "5.7.19")


@pytest.mark.parametrize("fields, offered, now, expected", [
    ({"requiretls": True}, ("REQUIRETLS",), 0, None),
    ({"requiretls": True}, (), 0, (550, "5.7.30")),
    ({"deliver_by": By(600, "R")}, ("DELIVERBY",), 599.0, None),
    ({"deliver_by": By(600, "R")}, ("DELIVERBY",), 599.5, (554, "5.4.7")),
    ({"deliver_by": By(600, "R")}, (), 10.0, (554, "5.4.7")),
    ({"deliver_by": By(600, "R")}, ("DELIVERBY 300",), 400.0, (554, "5.4.7")),
    ({"deliver_by": By(600, "N")}, (), 900.0, None),
])
def test_check_offer_for_requiretls_and_by(fields: dict[str, Any], offered: tuple[str, ...], now: float,
                                           expected: tuple[int, str] | None) -> None:
    outcome = check_offer(make_message(**fields), ehlo(*offered), now=now)
    assert (None if outcome is None else (outcome.code, outcome.enhanced)) == expected


def test_requiretls_options() -> None:
    assert ClientOptions(tls="none").for_requiretls() == ClientOptions(tls="required", verify=True)
    assert ClientOptions().for_requiretls().tls == "required"
    assert ClientOptions(tls="implicit").for_requiretls() == ClientOptions(tls="implicit", verify=True)
    verified = ClientOptions(verify=True, ca_file="/ca.pem")
    assert verified.for_requiretls() is verified


# ---- the session --------------------------------------------------------------------------------------------------

EHLO_TLS = b"250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"


def over_tls(client: Client, ehlo_after: bytes) -> bytes:
    """Greet, STARTTLS, handshake; what the client sends after the second EHLO's reply."""
    assert client.said(PEER_GREETING) == b"EHLO client.test\r\n"
    assert client.said(EHLO_TLS) == b"STARTTLS\r\n"
    client.said(b"220 go ahead\r\n")
    client.protocol.handshakeCompleted()
    return client.said(ehlo_after)


def test_requiretls_goes_with_verified_tls_to_a_server_offering_it() -> None:
    client = Client(make_message(requiretls=True), tls="required", verify=True)
    sent = over_tls(client, b"250-mx.test\r\n250-PIPELINING\r\n250 REQUIRETLS\r\n")
    assert sent.startswith(b"MAIL FROM:<a@example.org> REQUIRETLS\r\n")


def test_requiretls_to_a_server_not_offering_it_fails_for_good() -> None:
    client = Client(make_message(requiretls=True), tls="required", verify=True)
    assert over_tls(client, b"250-mx.test\r\n250 PIPELINING\r\n") == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    outcome = client.result()[0]
    assert (outcome.code, outcome.enhanced, outcome.remote) == (550, "5.7.30", "")
    assert outcome.text.startswith("REQUIRETLS support required")


def test_requiretls_never_goes_without_verified_tls() -> None:
    """Options that do not verify (the session is handed them as is here) send nothing: 5.7.30."""
    client = Client(make_message(requiretls=True), tls="required")
    assert over_tls(client, b"250-mx.test\r\n250 REQUIRETLS\r\n") == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.codes() == {0: (550, "5.7.30"), 1: (550, "5.7.30")}


@pytest.mark.parametrize("ehlo_reply", [b"250-mx.test\r\n250 PIPELINING\r\n", b"502 what\r\n"])
def test_requiretls_without_starttls_fails_for_good(ehlo_reply: bytes) -> None:
    client = Client(make_message(requiretls=True), tls="required", verify=True)
    client.said(PEER_GREETING)
    assert client.said(ehlo_reply) == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.codes()[0] == (550, "5.7.30")


def test_requiretls_certificate_not_verified_fails_for_good() -> None:
    client = Client(make_message(requiretls=True), tls="required", verify=True)
    client.said(PEER_GREETING)
    client.said(EHLO_TLS)
    client.said(b"220 go ahead\r\n")
    client.protocol.connectionLost(Failure(SSL.Error([("SSL routines", "", "certificate verify failed")])))
    outcome = client.result()[0]
    assert (outcome.code, outcome.enhanced) == (550, "5.7.30") and "certificate verify failed" in outcome.text


def test_without_requiretls_tls_failures_stay_temporary() -> None:
    client = Client(tls="required", verify=True)
    client.said(PEER_GREETING)
    assert client.said(b"250-mx.test\r\n250 PIPELINING\r\n") == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.codes()[0] == (454, "4.7.4")


def test_priority_and_by_go_with_the_time_left() -> None:
    message = make_message(priority=-2, deliver_by=By(3600, "N", True), arrived=0.0)
    client = Client(message)
    client.clock.advance(100.9)
    client.said(PEER_GREETING)
    sent = client.said(b"250-mx.test\r\n250-PIPELINING\r\n250-MT-PRIORITY\r\n250 DELIVERBY\r\n")
    assert sent.startswith(b"MAIL FROM:<a@example.org> MT-PRIORITY=-2 BY=3499;NT\r\n")


def test_by_mode_r_expired_at_the_server_is_returned() -> None:
    client = Client(make_message(deliver_by=By(60, "R"), arrived=0.0))
    client.clock.advance(61)
    client.said(PEER_GREETING)
    assert client.said(b"250-mx.test\r\n250 DELIVERBY\r\n") == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.codes() == {0: (554, "5.4.7"), 1: (554, "5.4.7")} and not client.failed


def test_rrvs_recipients_without_rrvs_offered() -> None:
    """;C goes on without the parameter; without ;C the recipient fails alone with 5.7.19, never offered."""
    message = make_message("b@example.net", "c@example.net", "d@example.net")
    message.recipients[0].rrvs = SINCE
    message.recipients[1].rrvs = SINCE_C
    client = Client(message)
    client.said(PEER_GREETING)
    sent = client.said(b"250-mx.test\r\n250 PIPELINING\r\n")
    assert sent == (b"MAIL FROM:<a@example.org>\r\nRCPT TO:<c@example.net>\r\nRCPT TO:<d@example.net>\r\n"
                    b"DATA\r\n")
    client.said(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    client.said(b"250 queued\r\n221 bye\r\n")
    assert client.codes() == {0: (550, "5.7.19"), 1: (250, "2.0.0"), 2: (250, "2.0.0")}
    assert not client.failed


def test_rrvs_alone_refused_ends_the_session() -> None:
    message = make_message("b@example.net")
    message.recipients[0].rrvs = SINCE
    client = Client(message)
    client.said(PEER_GREETING)
    assert client.said(b"250-mx.test\r\n250 HELP\r\n") == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.codes() == {0: (550, "5.7.19")}


def test_rrvs_one_at_a_time_without_pipelining() -> None:
    message = make_message("b@example.net", "c@example.net")
    message.recipients[0].rrvs = SINCE
    client = Client(message)
    client.said(PEER_GREETING)
    assert client.said(b"250 mx.test\r\n").startswith(b"MAIL FROM:")
    assert client.said(b"250 ok\r\n") == b"RCPT TO:<c@example.net>\r\n"
    assert client.said(b"250 ok\r\n") == b"DATA\r\n"


# ---- over loopback, with real TLS ---------------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_loopback_requiretls(tmp_path: Path) -> Any:
    """A REQUIRETLS message goes over verified STARTTLS although the options say opportunistic, to a server
    offering REQUIRETLS; the parameters reach its handler. A server not offering REQUIRETLS gets nothing."""
    files = make_tls_files(tmp_path)
    tls = ServerTLS(files.cert, files.key)
    offering, plain = MessageStore(), MessageStore()
    server = yield serve(collecting(offering, tls_context=tls,
                                    extensions=(RequireTLS(), MtPriority(trust_all=True), DeliverBy(), Rrvs(True))))
    other = yield serve(collecting(plain, tls_context=tls))
    message = make_message(requiretls=True, priority=3, deliver_by=By(86400, "R"))
    message.arrived = time.time()
    message.recipients[0].rrvs = SINCE
    try:
        good = yield deliver(server, message, CLIENT_CONTENT, tls="opportunistic", ca_file=str(files.ca))
        refused = yield deliver(other, make_message(requiretls=True), CLIENT_CONTENT, ca_file=str(files.ca))
    finally:
        yield server.stop()
        yield other.stop()
    assert {o.code for o in good.outcomes.values()} == {250}, good
    [got] = offering.messages
    assert got.tls and got.mail_params["REQUIRETLS"] is True and got.mail_params["MT-PRIORITY"] == 3
    assert got.mail_params["BY"].mode == "R" and 86000 < got.mail_params["BY"].seconds <= 86400
    assert {(o.code, o.enhanced) for o in refused.outcomes.values()} == {(550, "5.7.30")}
    assert plain.messages == []


@pytest_twisted.inlineCallbacks
def test_loopback_requiretls_certificate_not_trusted(tmp_path: Path) -> Any:
    files = make_tls_files(tmp_path)
    store = MessageStore()
    server = yield serve(collecting(store, tls_context=ServerTLS(files.cert, files.key), extensions=(RequireTLS(),)))
    try:
        attempt = yield deliver(server, make_message(requiretls=True), CLIENT_CONTENT,
                                ca_file=str(make_tls_files(tmp_path / "other").ca))
    finally:
        yield server.stop()
    assert {(o.code, o.enhanced) for o in attempt.outcomes.values()} == {(550, "5.7.30")}
    assert store.messages == []


# ---- the deliverer: the next MX -----------------------------------------------------------------------------------

class TwoHops:
    def route(self, domain: str) -> Any:
        return succeed([Hop("mx1.example.net", "192.0.2.1", 25), Hop("mx2.example.net", "192.0.2.2", 25)])


def test_requiretls_refused_by_one_mx_goes_to_the_next() -> None:
    refused = Outcome.local(550, "5.7.30", "REQUIRETLS support required: no")
    sent: list[str] = []

    def send(reactor: Any, endpoint: Any, message: Message, open_content: Any, options: ClientOptions, *,
             indexes: list[int], host: str) -> Any:
        sent.append(host)
        first = host.startswith("mx1")
        return succeed(Attempt(host, {i: refused if first else OK for i in indexes}, False))

    deliverer = Deliverer(Clock(), TwoHops(), ClientOptions(), send=send, endpoint_for=lambda hop: None)
    results: list[Any] = []
    deliverer.deliver(make_message(requiretls=True), [0, 1], lambda: None).addCallback(results.append)
    assert results == [{0: OK, 1: OK}] and len(sent) == 2
    sent.clear()
    results.clear()
    deliverer.deliver(make_message(), [0, 1], lambda: None).addCallback(results.append)
    assert results == [{0: refused, 1: refused}] and len(sent) == 1  # only a REQUIRETLS message moves on


def test_requiretls_refused_by_every_mx_is_final() -> None:
    refused = Outcome.local(550, "5.7.30", "REQUIRETLS support required: no")

    def send(reactor: Any, endpoint: Any, message: Message, open_content: Any, options: ClientOptions, *,
             indexes: list[int], host: str) -> Any:
        return succeed(Attempt(host, {i: refused for i in indexes}, True))

    deliverer = Deliverer(Clock(), TwoHops(), ClientOptions(), send=send, endpoint_for=lambda hop: None)
    results: list[Any] = []
    deliverer.deliver(make_message(requiretls=True), [0], lambda: None).addCallback(results.append)
    assert results == [{0: refused}]


# ---- the queue runner ---------------------------------------------------------------------------------------------

def attempts(queue: Queue, id: str = "M1") -> int:
    """How many times the deliverer was given message ``id`` (the notices go through it too)."""
    return sum(1 for call in queue.deliverer.calls if call.message_id == id)


def test_requiretls_bounce_is_sent_with_requiretls() -> None:
    queue = Queue({"bob@example.net": [Outcome.local(550, "5.7.30", "REQUIRETLS support required: no")]})
    queue.add("bob@example.net", requiretls=True)
    [(notice, data)] = queue.notices()
    assert notice.requiretls
    _, _, [block] = report(data)
    assert block["Status"] == "5.7.30"
    queue.finish()


def test_by_mode_r_past_its_deadline_is_returned_without_an_attempt() -> None:
    queue = Queue({"bob@example.net": [Outcome.local(451, "4.4.1", "refused")]})
    queue.add("bob@example.net", deliver_by=By(800, "R"))
    assert attempts(queue) == 1
    message = queue.store.messages["M1"]
    assert message.next_attempt == message.arrived + 300  # the schedule's first retry, before the deadline
    queue.run_for(300)
    assert attempts(queue) == 2
    assert queue.store.messages["M1"].next_attempt == message.arrived + 800  # capped at the deadline (not +900)
    queue.run_for(500)
    assert attempts(queue) == 2 and "M1" not in queue.store.messages
    [(notice, data)] = queue.notices()
    _, _, [block] = report(data)
    assert block["Status"] == "5.4.7" and block["Action"] == "failed"
    assert "BY time" in block["Diagnostic-Code"]
    queue.finish()


def test_by_mode_n_late_gets_a_delay_notice_and_goes_on() -> None:
    later = Outcome.local(451, "4.4.1", "refused")
    queue = Queue({"bob@example.net": [later, later, OK]})
    queue.add("bob@example.net", deliver_by=By(100, "N"))
    assert queue.notices() == []  # not late yet
    queue.run_for(300)
    assert attempts(queue) == 2
    [(notice, data)] = queue.notices()
    _, _, [block] = report(data)
    assert block["Action"] == "delayed"
    queue.run_for(600)
    assert attempts(queue) == 3 and len(queue.notices()) == 1 and "M1" not in queue.store.messages
    queue.finish()


def test_memory_store_takes_the_higher_priority_first() -> None:
    queue = Queue()
    queue.runner.stop()
    for id, priority in (("A", None), ("B", 5), ("C", -4), ("D", 9)):
        queue.add("bob@example.net", id=id, priority=priority)
    queue.store.concurrency = 1
    queue.runner.start()
    queue.run_for(1)
    assert [call.message_id for call in queue.deliverer.calls] == ["D", "B", "A", "C"]
    queue.finish()


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[tuple[SpoolStore, Clock]]:
    """A spool store (inline file work) on a clock at the real time, one message at a time; stopped at the end."""
    clock = Clock()
    clock.advance(time.time())
    store = SpoolStore(str(tmp_path / "spool"), reactor=clock, concurrency=1, scan_interval=60)
    yield store, clock
    stopped: list[Any] = []
    store.stop().addBoth(stopped.append)
    assert stopped == [None] and clock.getDelayedCalls() == []


def test_spool_store_takes_the_higher_priority_first(spool: tuple[SpoolStore, Clock]) -> None:
    store, clock = spool
    now = clock.seconds()
    old = commit(store, clock, next_attempt=now - 30)
    urgent = commit(store, clock, next_attempt=now - 10, priority=7)
    low = commit(store, clock, next_attempt=now - 40, priority=-1)
    normal = commit(store, clock, next_attempt=now - 20, priority=0)
    worker = Worker()
    store.start(worker)
    for _ in range(4):
        worker.deliver()
    assert worker.ids == [urgent, old, normal, low]
    assert worker.calls[0][0].priority == 7


def test_spool_store_offers_a_new_message_by_priority(spool: tuple[SpoolStore, Clock]) -> None:
    store, clock = spool
    worker = Worker()
    store.start(worker)
    busy = commit(store, clock, next_attempt=clock.seconds())
    plain = commit(store, clock, next_attempt=clock.seconds())
    urgent = commit(store, clock, next_attempt=clock.seconds(), priority=2)
    for _ in range(3):
        worker.deliver()
    assert worker.ids == [busy, urgent, plain]
