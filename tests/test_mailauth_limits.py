"""What a message or a slow DNS server cannot make the mail-authentication checks do: query DNS without bound
(ARC fields by the thousand), or keep the server from stopping while a check waits on DNS."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactor

from esmtpkit.core.session import Session
from esmtpkit.mailauth import MailAuth
from esmtpkit.mailauth.checks import DMARC_DEFERRED, DMARC_REJECTED
from esmtpkit.mailauth.lookups import Lookups
from esmtpkit.mailauth.dkim import MAX_ARC_KEYS, signers
from esmtpkit.mailauth.verdicts import AuthVerdicts, DkimVerdict, DmarcVerdict, SpfVerdict
from tests.authzone import AUTHSERV, MESSAGE, SELECTOR, arc_seal, auth_zones, dkim_sign, mail_auths
from tests.mailnet import PrivateDNS
from tests.support import Twistd, read_reply

def arc_fields(count: int, *, same_instance: bool = False, kind: bytes = b"ARC-Seal") -> bytes:
    """``count`` ARC fields, each naming a key of its own (instance 1 every time when ``same_instance``)."""
    return b"".join(kind + b": i=%d; a=rsa-sha256; cv=none; d=d%d.test; s=s; b=AAAA\r\n"
                    % (1 if same_instance else n, n) for n in range(1, count + 1))


def arc_names(found: Any) -> set[str]:
    return {name for name in found.names if not name.endswith("good.test")}


# ---- what the header section makes the checks look up -----------------------------------------------------------

def test_thousands_of_arc_fields_ask_for_no_key() -> None:
    found = signers(arc_fields(5000) + MESSAGE)
    assert arc_names(found) == set()
    assert found.arc_problem == "ARC instance 51 out of range"


def test_a_repeated_instance_fails_the_chain_without_lookups() -> None:
    found = signers(arc_fields(3000, same_instance=True) + MESSAGE)
    assert found.names == set()
    assert found.arc_problem == "more than one arc-seal with i=1"
    assert found.any_arc


def test_more_keys_than_a_chain_has_fails_without_lookups() -> None:
    head = arc_fields(MAX_ARC_KEYS + 1) + arc_fields(MAX_ARC_KEYS + 1, kind=b"ARC-Message-Signature")
    found = signers(head + MESSAGE)
    assert found.names == set()
    assert found.arc_problem == f"more than {MAX_ARC_KEYS} ARC keys"


@pytest.mark.parametrize("instance", [b"0", b"51", b"99999999999", b"x"])
def test_an_instance_out_of_range_fails_the_chain(instance: bytes) -> None:
    found = signers(b"ARC-Seal: i=" + instance + b"; a=rsa-sha256; cv=none; d=a.test; s=s; b=AAAA\r\n" + MESSAGE)
    assert found.names == set()
    assert found.arc_problem and found.any_arc


def test_without_arc_no_arc_field_is_read() -> None:
    found = signers(arc_fields(10) + MESSAGE, arc=False)
    assert (found.names, found.arc_problem, found.any_arc) == (set(), "", False)


def test_dkim_signatures_are_bounded_too() -> None:
    signatures = b"".join(b"DKIM-Signature: v=1; a=rsa-sha256; d=d%d.test; s=s; h=from; bh=AA; b=AA\r\n" % n
                          for n in range(1000))
    found = signers(signatures + MESSAGE, max_signatures=5)
    assert len(found.names) == len(found.dkim) == 5


def test_a_real_chain_is_looked_up() -> None:
    world = auth_zones()
    checked = b"Authentication-Results: fwd.good.test; spf=pass smtp.mailfrom=alice@good.test\r\n" + MESSAGE
    sealed = arc_seal(checked, "good.test", world.keys["good.test"], "fwd.good.test")
    found = signers(sealed)
    assert (found.arc_problem, found.arc_sets) == ("", 1)
    assert found.names == {f"{SELECTOR}._domainkey.good.test"}


# ---- the same on the wire: what the private DNS server is asked ------------------------------------------------

def session(ip: str = "127.0.0.5") -> Session:
    return Session(hostname=AUTHSERV, peer=IPv4Address("TCP", ip, 40000), helo="helo.good.test")


def reader(content: bytes) -> Any:
    import io

    return lambda: io.BytesIO(content)


@pytest.fixture
def dns(auth_dns: PrivateDNS) -> PrivateDNS:
    return auth_dns


@pytest.fixture
def make(dns: PrivateDNS) -> Iterator[Any]:
    with mail_auths(dns.servers, timeout=(0.5,)) as build:
        yield build


def domainkey_queries(dns: PrivateDNS) -> list[str]:
    return [name for name, kind in dns.queries if "._domainkey." in name]


@pytest_twisted.ensureDeferred
async def test_a_message_full_of_arc_fields_costs_no_queries(make: Any, dns: PrivateDNS) -> None:
    content = arc_fields(2000) + MESSAGE
    verdicts = await make().check_message(session(), AuthVerdicts(), content, reader(content))
    assert verdicts.arc is not None and verdicts.arc.result == "fail"
    assert domainkey_queries(dns) == []


@pytest_twisted.ensureDeferred
async def test_with_arc_off_arc_fields_cost_no_queries(make: Any, dns: PrivateDNS) -> None:
    content = arc_fields(10) + MESSAGE
    verdicts = await make(arc=False, dmarc=False).check_message(session(), AuthVerdicts(), content,
                                                                reader(content))
    assert verdicts.arc is None
    assert domainkey_queries(dns) == []


# ---- stopping while SPF waits on DNS -------------------------------------------------------------------------------

async def asked(dns: PrivateDNS, name: str) -> None:
    """Wait until ``dns`` has been asked about ``name``."""
    while not any(queried == name for queried, _ in dns.queries):
        await task.deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_draining_ends_a_check_waiting_on_dns_as_temperror(make: Any, dns: PrivateDNS) -> None:
    checks: MailAuth = make(timeout=(120,), dmarc=False)
    pending = checks.check_sender(session(), "alice@slow.test")
    await asked(dns, "slow.test")
    await checks.drain()
    verdicts = await pending
    assert verdicts.spf_mailfrom is not None
    assert verdicts.spf_mailfrom.result == "temperror"
    assert "stopping" in verdicts.spf_mailfrom.explanation


def open_transaction(port: int) -> socket.socket:
    """A client that has said EHLO and MAIL FROM:<alice@slow.test>, whose SPF check then waits on DNS."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    read_reply(sock)
    sock.sendall(b"EHLO client.test\r\n")
    assert read_reply(sock).startswith(b"250")
    sock.sendall(b"MAIL FROM:<alice@slow.test>\r\n")
    return sock


def stop_during_check(process: subprocess.Popen[bytes], sock: socket.socket) -> tuple[bytes, int | None]:
    """SIGTERM ``process`` while the client's MAIL FROM waits on its SPF check; the reply the client then gets,
    and the exit status once the client has quit (None when it has not stopped after a minute)."""
    process.send_signal(signal.SIGTERM)
    reply = read_reply(sock)
    sock.sendall(b"QUIT\r\n")
    read_reply(sock)
    try:
        return reply, process.wait(60)
    except subprocess.TimeoutExpired:
        return reply, None


@pytest_twisted.ensureDeferred
async def test_twistd_stops_while_an_spf_check_waits_on_dns(tmp_path: Path, dns: PrivateDNS) -> None:
    server = Twistd(tmp_path / "run", "--maildir", str(tmp_path / "Maildir"), "--verify", "spf",
                    "--dns-server", f"127.0.0.1:{dns.port}", "--authserv-id", "mx.test", "--dns-timeout", "600")
    try:
        sock = await threads.deferToThread(open_transaction, server.port)
        with sock:
            await asked(dns, "slow.test")
            reply, status = await threads.deferToThread(stop_during_check, server.process, sock)
        assert status is not None, "twistd did not stop while an SPF check waited on DNS:\n" + server.log_text()
        assert reply.startswith(b"250"), reply
        log = server.log_text()
        assert "spf.mailfrom=temperror domain=slow.test" in log and "Server Shut Down." in log, log
    finally:
        server.stop()


# ---- --dmarc-reject when a check could not complete ---------------------------------------------------------------

def failed_dmarc(spf: str = "fail", *dkim: tuple[str, str], sender: str = "a@bank.test") -> AuthVerdicts:
    """Verdicts of a message from bank.test that failed DMARC under p=reject, with SPF's result ``spf`` for
    ``sender`` and signatures ``(result, domain)``."""
    return AuthVerdicts(spf_mailfrom=SpfVerdict(spf, "mailfrom", sender, sender.rpartition("@")[2]),
                        dkim=tuple(DkimVerdict(result, domain, "s1") for result, domain in dkim),
                        dmarc=DmarcVerdict("fail", "bank.test", "reject", "reject"))


@pytest.mark.parametrize("verdicts, reply", [
    (failed_dmarc(), DMARC_REJECTED),
    (failed_dmarc("temperror"), DMARC_DEFERRED),
    (failed_dmarc("temperror", sender="a@mail.bank.test"), DMARC_DEFERRED),
    (failed_dmarc("temperror", sender="spoofer@attacker.example"), DMARC_REJECTED),
    (failed_dmarc("fail", ("temperror", "mail.bank.test")), DMARC_DEFERRED),
    (failed_dmarc("fail", ("temperror", "elsewhere.test"), ("fail", "bank.test")), DMARC_REJECTED),
    (failed_dmarc("softfail", ("permerror", "bank.test")), DMARC_REJECTED),
])
def test_dmarc_reject_defers_what_a_temporary_error_may_explain(verdicts: AuthVerdicts, reply: Any) -> None:
    checks = MailAuth(MemoryReactor(), dmarc_reject=True, lookups=Lookups(MemoryReactor(), resolver=object()))
    assert checks.refusal_at_end(verdicts) == reply


def test_dmarc_deferred_reply() -> None:
    assert (DMARC_DEFERRED.code, DMARC_DEFERRED.enhanced) == (451, "4.7.26")


# ---- what DMARC looks up for an author ----------------------------------------------------------------------------

@pytest.mark.parametrize("author, domain", [
    ("x@good.test", "good.test"), ("x@Sub.Good.Test.", "sub.good.test"), ("x@bücher.test", "xn--bcher-kva.test"),
    ("x@a%b.test", None), ("x@a!b.test", None), ("x@-a.test", None), ("x@[192.0.2.1]", None), ("x@localhost", None),
])
def test_only_a_domain_name_is_an_author_domain(author: str, domain: str | None) -> None:
    from esmtpkit.mailauth.dmarc import author_domain

    assert author_domain([author]) == domain


# ---- what stopping calls off -----------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_draining_calls_off_the_key_lookups_too(make: Any, dns: PrivateDNS, auth_world: Any) -> None:
    checks: MailAuth = make(timeout=(120,), dmarc=False, arc=False)
    signed = dkim_sign(MESSAGE.replace(b"good.test", b"slow.test"), "slow.test", auth_world.keys["good.test"])
    pending = checks.check_message(session(), AuthVerdicts(), signed, reader(signed))
    await asked(dns, f"{SELECTOR}._domainkey.slow.test")
    draining = checks.drain()
    assert checks.lookups._queries == set()  # every query in flight was called off at once
    await draining
    verdicts = await pending
    assert [v.result for v in verdicts.dkim] == ["temperror"]


class QueuedCalls:
    """A reactor whose callFromThread only queues the call, for the test to run later."""

    def __init__(self) -> None:
        self.queued: list[Any] = []

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.queued.append((f, args))


class Asked:
    def __init__(self) -> None:
        self.queries: list[Any] = []

    def query(self, query: Any, timeout: Any = None) -> Deferred[Any]:
        self.queries.append(query)
        return Deferred()


def test_a_worker_that_gave_up_asks_nothing_later() -> None:
    import threading

    from esmtpkit.mailauth.lookups import DNSTempError

    resolver = Asked()
    lookups = Lookups(QueuedCalls(), resolver=resolver, timeout=(0.05,))
    failed: list[Any] = []

    def worker() -> None:
        try:
            lookups.answer_from_worker("x.test", "TXT", timeout=0.05)
        except DNSTempError as e:
            failed.append(e)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(10)
    assert len(failed) == 1
    for f, args in lookups.reactor.queued:
        f(*args)
    assert resolver.queries == [] and lookups._queries == set()
