"""Whose mail is DKIM-signed: only this server's own users' (OpenDKIM's InternalHosts rule), decided when the message
is accepted. The Relay and the Queue on real loopback sockets (127.0.0.x addresses stand for different clients):
a client on this host, an outsider, an outsider who authenticated; the decision kept with the queued message
(spool, AMQP form) and the notices the queue writes; ARC sealing for anyone; the ``--dkim-sign-from`` option.
Also: oversigning (each signed field once more than it appears), the Relay's failed send logged as one, and the
mail-auth monitor that ``makeService`` sets guarded."""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Any, Iterator

import dkim
import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail, succeed
from twisted.logger import globalLogPublisher

from esmtpkit.cli import tap
from esmtpkit.core.outbound import Message, Outcome, Recipient
from esmtpkit.core.session import Session
from esmtpkit.handlers import Collecting, MessageStore, Queue, Relay
from esmtpkit.handlers import relay as relay_module
from esmtpkit.mailauth.signing import DEFAULT_SIGN_FROM, SigningKey, Signer, parse_sign_from, signer_for
from esmtpkit.queue import amqp
from esmtpkit.queue.service import QueueConfig, QueueService
from esmtpkit.queue.spool_admin import SpoolAdmin
from esmtpkit.server.monitor import Monitor
from esmtpkit.server.policy import Policy
from esmtpkit.server.sasl import portal_from_strings
from esmtpkit.testing import serve

from . import authzone
from .authzone import OUTBOUND, SELECTOR, AuthWorld, auth_zones, txt_lookup
from .mailnet import until
from .support import Queue as RunnerQueue
from .support import QUEUE_CONTENT, tap_mistake, tap_options

AUTHSERV = "mx.test"

MESSAGE = OUTBOUND

CHECKED = (f"Authentication-Results: {AUTHSERV}; spf=pass smtp.mailfrom=alice@good.test\r\n").encode() + MESSAGE


@pytest.fixture
def world() -> AuthWorld:
    return auth_zones()


@pytest.fixture
def key_files(world: AuthWorld, tmp_path: Path) -> dict[str, str]:
    """The private keys of good.test and other.test as PEM files."""
    return authzone.key_files(world, tmp_path)


@pytest.fixture
def setting(key_files: dict[str, str]) -> Iterator[str]:
    """The ``dkim_sign`` setting for good.test; its shared signer's threads are stopped after the test."""
    text = f"good.test:{SELECTOR}:{key_files['good.test']}"
    yield text
    signer = signer_for(text)
    assert signer is not None
    signer.close()


def field_names(content: bytes) -> list[bytes]:
    """The names of the header fields of ``content``, lower case, in order."""
    head = content.split(b"\r\n\r\n", 1)[0]
    return [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n") if line and line[:1] not in b" \t"]


def signed(content: bytes) -> bool:
    return b"dkim-signature" in field_names(content)


PORTAL_USERS = ["memory:alice:secret"]


def policy(name: str) -> Policy:
    """A server that offers AUTH in clear (loopback tests only)."""
    return Policy(hostname=name, portal=portal_from_strings(PORTAL_USERS), auth_require_tls=False)


def send_from(source: str, port: int, content: bytes = MESSAGE, login: bool = False) -> Any:
    """Send ``content`` to the server on 127.0.0.1:``port`` from the address ``source``, logged in or not."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30,
                      source_address=(source, 0)) as client:
        if login:
            client.ehlo()
            client.login("alice", "secret")
        return client.sendmail("alice@good.test", ["bob@example.net"], content)


# ---- the setting ------------------------------------------------------------------------------------------------

def test_parse_sign_from() -> None:
    assert [str(n) for n in parse_sign_from(None)] == ["127.0.0.0/8", "::1/128"]
    assert parse_sign_from(None) == parse_sign_from(DEFAULT_SIGN_FROM)
    assert parse_sign_from("none") == parse_sign_from("NONE") == ()
    assert [str(n) for n in parse_sign_from("192.0.2.7, 10.0.0.0/8 2001:db8::/32")] == [
        "192.0.2.7/32", "10.0.0.0/8", "2001:db8::/32"]
    with pytest.raises(ValueError, match="'10.0.0.300' is not an IP address or network"):
        parse_sign_from("127.0.0.1,10.0.0.300")
    with pytest.raises(ValueError, match="'none' is not"):
        parse_sign_from("127.0.0.1,none")


def test_the_queue_and_relay_check_the_setting_at_start(setting: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^dkim_sign_from: 'mail\.example' is not an IP address or network"):
        QueueConfig.from_options(spool=str(tmp_path / "q"), hostname="queue.test", dkim_sign_from="mail.example")
    with pytest.raises(ValueError, match=r"^dkim_sign_from: '300\.1\.1\.1' is not"):
        Relay(dkim_sign=setting, dkim_sign_from="300.1.1.1")
    config = QueueConfig.from_options(spool=str(tmp_path / "q"), hostname="queue.test")
    assert config.dkim_sign_from == DEFAULT_SIGN_FROM
    other = QueueConfig.from_options(spool=str(tmp_path / "q"), hostname="queue.test", dkim_sign_from="none")
    assert other == config  # judged by the handler: no second queue on the same spool for it


RELAY = ["--handler", "esmtpkit.handlers.relay.Relay"]


def test_the_option_reaches_the_handler(key_files: dict[str, str]) -> None:
    key = f"good.test:s1:{key_files['good.test']}"
    options = tap_options(*RELAY, "--dkim-sign", key, "--dkim-sign-from", "127.0.0.1,192.0.2.0/24")
    assert options["handler-kwargs"]["dkim_sign_from"] == "127.0.0.1,192.0.2.0/24"
    options = tap_options(*RELAY, "--dkim-sign", key)
    assert "dkim_sign_from" not in options["handler-kwargs"]  # the handler's default: this host


def test_a_bad_network_is_one_line(key_files: dict[str, str]) -> None:
    key = f"good.test:s1:{key_files['good.test']}"
    text = tap_mistake(*RELAY, "--dkim-sign", key, "--dkim-sign-from", "127.0.0.1,10.0.0.0/33")
    assert text.startswith("--dkim-sign-from: '10.0.0.0/33' is not an IP address or network"), text
    assert tap_mistake(*RELAY, "--dkim-sign-from", "none").startswith("--dkim-sign-from needs --dkim-sign")


# ---- the Relay ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source, sign_from, login, expected", [
    ("127.0.0.1", None, False, True),  # this host: the default
    ("127.0.0.2", "127.0.0.1", False, False),  # an outsider (still allowed to relay: networks is 127.0.0.0/8)
    ("127.0.0.2", "127.0.0.1", True, True),  # an outsider who authenticated
    ("127.0.0.1", "none", False, False),
    ("127.0.0.1", "none", True, True),
])
@pytest_twisted.ensureDeferred
async def test_the_relay_signs_only_its_own_users_mail(world: AuthWorld, setting: str, source: str,
                                                       sign_from: str | None, login: bool, expected: bool) -> None:
    from twisted.internet import reactor

    store = MessageStore()
    upstream = await serve(Collecting.factory(store), reactor=reactor, policy=Policy(hostname="up.test"))
    relay = await serve(lambda: Relay(port=upstream.port, timeout=10, dkim_sign=setting, dkim_sign_from=sign_from),
                        reactor=reactor, policy=policy("relay.test"))
    try:
        assert await threads.deferToThread(send_from, source, relay.port, MESSAGE, login) == {}
        relayed = (await store.next_message()).data
    finally:
        await relay.stop()
        await upstream.stop()
    assert f"from client.test ({source} [{source}])".encode() in relayed  # the client the case says
    assert signed(relayed) is expected
    assert relayed.endswith(b"\r\n" + MESSAGE)
    if expected:
        assert dkim.verify(relayed, dnsfunc=txt_lookup(world))


@pytest_twisted.ensureDeferred
async def test_the_relay_seals_an_outsiders_checked_mail_without_signing_it(world: AuthWorld, setting: str,
                                                                           key_files: dict[str, str]) -> None:
    """ARC sealing is not for this server's users only: it vouches for the checks made here, for anyone."""
    from twisted.internet import reactor

    seal = f"other.test:{SELECTOR}:{key_files['other.test']}"
    store = MessageStore()
    upstream = await serve(Collecting.factory(store), reactor=reactor, policy=Policy(hostname="up.test"))
    relay = await serve(lambda: Relay(port=upstream.port, timeout=10, trace=False, dkim_sign=setting,
                                      arc_seal=seal, authserv_id=AUTHSERV, dkim_sign_from="127.0.0.1"),
                        reactor=reactor, policy=policy("relay.test"))
    try:
        assert await threads.deferToThread(send_from, "127.0.0.2", relay.port, CHECKED) == {}
        relayed = (await store.next_message()).data
    finally:
        await relay.stop()
        await upstream.stop()
        sealer = signer_for(setting, seal, AUTHSERV)
        assert sealer is not None
        sealer.close()
    assert field_names(relayed)[:3] == [b"arc-seal", b"arc-message-signature", b"arc-authentication-results"]
    assert not signed(relayed)
    cv, _, reason = dkim.arc_verify(relayed, dnsfunc=txt_lookup(world))
    assert cv == b"pass", reason


@pytest_twisted.ensureDeferred
async def test_a_failed_send_is_logged_as_a_send_failure(setting: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The send itself fails (not the signing): the client keeps the message (451) and the log says what failed."""
    from twisted.internet import reactor

    monkeypatch.setattr(relay_module, "send", lambda *args, **kwargs: fail(RuntimeError("client broke")))
    events: list[dict[str, Any]] = []
    relay = await serve(lambda: Relay(port=9, timeout=10, dkim_sign=setting), reactor=reactor,
                        policy=Policy(hostname="relay.test"))
    globalLogPublisher.addObserver(events.append)
    try:
        with pytest.raises(smtplib.SMTPDataError) as caught:
            await threads.deferToThread(send_from, "127.0.0.1", relay.port)
    finally:
        globalLogPublisher.removeObserver(events.append)
        await relay.stop()
    assert caught.value.smtp_code == 451
    failures = [e for e in events if "log_failure" in e and e.get("log_namespace", "").endswith("relay.Relay")]
    assert [e["log_format"] for e in failures] == ["cannot send the message to {where}"]
    assert failures[0]["log_failure"].check(RuntimeError)


# ---- the Queue ----------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_the_queue_decides_at_acceptance_keeps_it_in_the_spool_and_signs_accordingly(
        world: AuthWorld, setting: str, tmp_path: Path) -> None:
    """Three messages reach the queue before its runner starts: from this host's 127.0.0.1 (in dkim_sign_from),
    from 127.0.0.2 (not), and from 127.0.0.2 logged in. The spool keeps each decision; the runner, started
    afterwards, signs the first and the third only."""
    from twisted.internet import reactor

    store = MessageStore()
    upstream = await serve(Collecting.factory(store), reactor=reactor, policy=Policy(hostname="up.test"))
    spool = tmp_path / "queue"
    options = dict(spool=str(spool), relayhost=f"[127.0.0.1]:{upstream.port}", tls="none", hostname="queue.test",
                   dkim_sign=setting, dkim_sign_from="127.0.0.1")
    service = QueueService(QueueConfig.from_options(**options))
    server = await serve(lambda: Queue(service=service, **options), reactor=reactor, policy=policy("queue.test"))
    sent = [("127.0.0.1", False), ("127.0.0.2", False), ("127.0.0.2", True)]
    try:
        for number, (source, login) in enumerate(sent):
            content = MESSAGE.replace(b"<1@good.test>", f"<{number}@good.test>".encode())
            assert await threads.deferToThread(send_from, source, server.port, content, login) == {}
        kept = [(m.received_from, m.sign) for m in SpoolAdmin(str(spool)).list()]
        service.startService()
        await until(lambda: len(store.messages) == 3, "the three deliveries")
    finally:
        await server.stop()
        await service.stopService()
        await upstream.stop()
    assert sorted(kept) == sorted([("dns; client.test (127.0.0.1)", True), ("dns; client.test (127.0.0.2)", False),
                                   ("dns; client.test (127.0.0.2)", True)])
    by_number = {int(m.data.split(b"Message-ID: <", 1)[1][:1]): m.data for m in store.messages}
    assert [signed(by_number[n]) for n in range(3)] == [True, False, True]
    for n in (0, 2):
        assert dkim.verify(by_number[n], dnsfunc=txt_lookup(world))


class RecordingSigner:
    """A signer that only records what it was asked to do."""

    def __init__(self, arc: bool = False) -> None:
        self.arc = object() if arc else None
        self.keys = {"good.test": object()}
        self.asked: list[bool] = []

    def acts_on(self, *, sign: bool = True) -> bool:
        return self.arc is not None or sign

    def prepare(self, open_content: Any, *, binary: bool = False, sign: bool = True) -> Any:
        self.asked.append(sign)
        return succeed(open_content)


@pytest.mark.parametrize("flag, arc, asked", [(True, False, [True]), (False, False, []), (False, True, [False])])
def test_the_runner_signs_only_a_message_marked_so(flag: bool, arc: bool, asked: list[bool]) -> None:
    """Unmarked without an ARC key: the signer is not even asked (nothing to read); with one, only to seal."""
    q = RunnerQueue()
    signer = q.runner.signer = RecordingSigner(arc)
    q.add("bob@example.net", sign=flag)
    assert signer.asked == asked
    q.finish()


def test_the_notices_the_queue_writes_are_its_own_mail() -> None:
    q = RunnerQueue({"bob@example.net": [Outcome(550, "5.1.1", "No such user", "mx.example.net[192.0.2.1]")]})
    q.runner.signer = RecordingSigner()
    q.add("bob@example.net", sign=False)
    [(notice, _)] = q.notices()
    assert notice.sign is True
    q.finish()


# ---- the flag, stored ---------------------------------------------------------------------------------------------

def test_the_flag_survives_the_json_and_amqp_forms_and_an_old_envelope_has_none() -> None:
    message = Message("Q1", "alice@good.test", [Recipient("bob@example.net")], size=10, sign=True)
    data = message.to_json()
    assert data["sign"] is True
    assert Message.from_json(data).sign is True
    back, content = amqp.decode(amqp.encode(message, b"content"))
    assert (back.sign, content) == (True, b"content")
    old = Message("Q1", "alice@good.test", [Recipient("bob@example.net")]).to_json()
    assert "sign" not in old and Message.from_json(old).sign is False
    assert message.copy().sign is True


def test_the_spool_keeps_the_flag(tmp_path: Path) -> None:
    from twisted.internet.task import Clock

    from esmtpkit.queue.spool import SpoolStore

    store = SpoolStore(str(tmp_path / "queue"), reactor=Clock())
    for id, flag in (("S1", True), ("S2", False)):
        entry = store.open_entry()
        entry.write(QUEUE_CONTENT)
        done = entry.commit(Message(id, "alice@good.test", [Recipient("bob@example.net")], size=len(QUEUE_CONTENT),
                                    sign=flag))
        assert done.called, done
    admin = SpoolAdmin(str(tmp_path / "queue"))
    assert (admin.get("S1").sign, admin.get("S2").sign) == (True, False)


# ---- oversigning --------------------------------------------------------------------------------------------------

def test_a_field_present_twice_is_signed_three_times(world: AuthWorld) -> None:
    """Two To: fields: h= names To three times, so a third added on top breaks the signature (dkimpy picks
    instances from the bottom up; with To named twice, the added one would go unseen)."""
    message = MESSAGE.replace(b"To: bob@example.net\r\n", b"To: bob@example.net\r\nTo: carol@example.net\r\n")
    signer = Signer([SigningKey("good.test", SELECTOR, world.keys["good.test"].private)])
    added = signer.fields(message)
    h = added.split(b"h=", 1)[1].split(b";", 1)[0].replace(b"\r\n", b"").replace(b" ", b"").replace(b"\t", b"")
    assert h.lower().split(b":").count(b"to") == 3
    assert h.lower().split(b":").count(b"from") == 2
    txt = txt_lookup(world)
    assert dkim.verify(added + message, dnsfunc=txt)
    assert not dkim.verify(b"To: mallory@example.net\r\n" + added + message, dnsfunc=txt)


# ---- makeService's mail-auth monitor ------------------------------------------------------------------------------

class Failing(Monitor):
    def __init__(self) -> None:
        self.heard: list[str] = []

    def checked(self, session: Session, method: str, result: str, domain: str, seconds: float) -> None:
        self.heard.append(method)
        raise RuntimeError("monitor broke")


def test_a_failing_monitor_cannot_break_the_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.internet.testing import MemoryReactor

    failing = Failing()
    monkeypatch.setattr(tap, "build_monitor", lambda options: failing)
    options = tap.Options()
    options.parseOptions(["--handler", "esmtpkit.handlers.base.MessageHandler", "--verify", "spf"])
    try:
        tap.makeService(options, reactor=MemoryReactor())
        session = Session(hostname=AUTHSERV, peer=IPv4Address("TCP", "127.0.0.5", 1000))
        options["mail-auth"].monitor.checked(session, "spf.mailfrom", "pass", "good.test", 0.01)
    finally:
        options["mail-auth"].close()
    assert failing.heard == ["spf.mailfrom"]
