"""DKIM signing and ARC sealing on the way out (`esmtpkit.mailauth.signing`): the key settings, which key signs
which author, signatures that dkimpy and esmtpkit's own DKIM check verify (and that break when the message is
changed), ARC sets on the mail this server checked, and the Relay and the queue runner signing what they send to
real servers on loopback, with the keys published by a private DNS server (`tests.authzone`, `tests.mailnet`)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.internet import threads
from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail
from twisted.internet.endpoints import TCP4ServerEndpoint

import dkim

from esmtpkit.core.session import Session
from esmtpkit.handlers import Queue
from esmtpkit.mailauth import MailAuth
from esmtpkit.mailauth.signing import DEFAULT_HEADERS, SigningKey, Signer, parse_headers, parse_keys, signer_for
from esmtpkit.queue.service import QueueConfig, QueueService
from esmtpkit.queue.spool_admin import SpoolAdmin
from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.server.policy import Policy

from .authzone import OUTBOUND, SELECTOR, AuthWorld, Key, auth_zones, dkim_sign, key_files, txt_lookup
from .mailnet import PrivateDNS, ScriptedMX, listen_all, stop_all, until
from .support import RawClient, relay_to_sink, smtp_send

AUTHSERV = "mx.test"

MESSAGE = OUTBOUND

CHECKED = (f"Authentication-Results: {AUTHSERV}; spf=pass smtp.mailfrom=alice@good.test;\r\n"
           "\tdkim=pass header.d=good.test\r\n").encode() + MESSAGE


#: `MESSAGE` with a bare CR and a bare LF in its body, as a server with ``bare_newline="allow"`` takes it.
BARE = MESSAGE.replace(b"Hello, Bob.\r\n", b"Hello\r, Bob.\nBye.\r\n")
#: `BARE` as the client sends it: CRLF for each bare CR and LF.
SENT = MESSAGE.replace(b"Hello, Bob.\r\n", b"Hello\r\n, Bob.\r\nBye.\r\n")


def authored(author: str, message: bytes = MESSAGE) -> bytes:
    return message.replace(b"From: Alice <alice@good.test>", f"From: {author}".encode())


# ---- the test world ---------------------------------------------------------------------------------------------

@pytest.fixture
def world() -> AuthWorld:
    return auth_zones()


@pytest.fixture
def keyfiles(world: AuthWorld, tmp_path: Path) -> dict[str, str]:
    """The private keys of good.test and other.test as PEM files."""
    return key_files(world, tmp_path)


def signing_key(world: AuthWorld, domain: str = "good.test") -> SigningKey:
    return SigningKey(domain, SELECTOR, world.keys[domain].private)


def signatures(message: bytes, name: bytes = b"dkim-signature") -> list[bytes]:
    """The ``name`` fields in the header section of ``message``, each whole (folded lines included)."""
    fields: list[bytes] = []
    for line in message.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return [f for f in fields if f.lower().startswith(name + b":")]


def tags(field: bytes) -> dict[str, str]:
    """The tags of a DKIM-Signature field, unfolded."""
    value = field.split(b":", 1)[1].decode().replace("\r\n", "").replace("\t", "").replace(" ", "")
    return dict(part.split("=", 1) for part in value.split(";") if part)


# ---- parse_keys ----------------------------------------------------------------------------------------------------

def test_parse_keys_reads_each_entry(keyfiles: dict[str, str], world: AuthWorld) -> None:
    [key] = parse_keys(f"Good.Test.:s1:{keyfiles['good.test']}")
    assert key == SigningKey("good.test", "s1", world.keys["good.test"].private)
    assert "PRIVATE" not in repr(key)


def test_parse_keys_reads_several_domains(keyfiles: dict[str, str]) -> None:
    text = f"good.test:s1:{keyfiles['good.test']}, other.test:s2:{keyfiles['other.test']}"
    assert [(k.domain, k.selector) for k in parse_keys(text)] == [("good.test", "s1"), ("other.test", "s2")]
    listed = parse_keys([f"good.test:s1:{keyfiles['good.test']}", f" other.test:s2:{keyfiles['other.test']} "])
    assert [(k.domain, k.selector) for k in listed] == [("good.test", "s1"), ("other.test", "s2")]
    assert parse_keys("") == ()


@pytest.mark.parametrize("entry", ["good.test", "good.test:s1", "good.test:s1:", "good.test::{key}", ":s1:{key}",
                                   "localhost:s1:{key}"])
def test_parse_keys_refuses_a_malformed_entry(entry: str, keyfiles: dict[str, str]) -> None:
    entry = entry.format(key=keyfiles["good.test"])
    with pytest.raises(ValueError) as caught:
        parse_keys(entry)
    assert str(caught.value) == f"{entry!r} is not DOMAIN:SELECTOR:KEYFILE"


def test_parse_keys_says_why_a_file_cannot_be_read(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match=rf"^good\.test:s1:{missing}: cannot read the key: no such file"):
        parse_keys(f"good.test:s1:{missing}")
    with pytest.raises(ValueError, match=r"cannot read the key: is a directory"):
        parse_keys(f"good.test:s1:{tmp_path}")


def test_parse_keys_refuses_what_is_not_a_usable_private_key(tmp_path: Path, world: AuthWorld) -> None:
    text = tmp_path / "text.pem"
    text.write_text("not a key\n")
    with pytest.raises(ValueError, match=rf"^good\.test:s1:{text}: not a PEM private key without a passphrase"):
        parse_keys(f"good.test:s1:{text}")
    public = tmp_path / "public.pem"
    public.write_text(world.keys["good.test"].record)
    with pytest.raises(ValueError, match="not a PEM private key"):
        parse_keys(f"good.test:s1:{public}")
    locked = tmp_path / "locked.pem"
    key = serialization.load_pem_private_key(world.keys["good.test"].private, password=None)
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ValueError, match="not a PEM private key without a passphrase"):
        parse_keys(f"good.test:s1:{locked}")


def test_parse_keys_refuses_a_key_dkimpy_cannot_sign_with(tmp_path: Path) -> None:
    """An Ed25519 key in PEM loads, but dkimpy cannot sign with it: refused at once rather than mail going out
    unsigned at every attempt."""
    path = tmp_path / "ed.pem"
    path.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(ValueError, match=rf"^good\.test:s1:{path}: not an RSA key"):
        parse_keys(f"good.test:s1:{path}")


def test_parse_keys_refuses_two_keys_for_one_domain(keyfiles: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="^one key per signing domain$"):
        parse_keys(f"good.test:s1:{keyfiles['good.test']},GOOD.test:s2:{keyfiles['other.test']}")


def test_arc_needs_an_authserv_id(world: AuthWorld) -> None:
    with pytest.raises(ValueError, match="authserv-id"):
        Signer(arc=signing_key(world))


def test_signer_for_shares_one_signer_per_setting(keyfiles: dict[str, str]) -> None:
    setting = f"good.test:s1:{keyfiles['good.test']}"
    assert signer_for(None) is None and signer_for("", "") is None
    one = signer_for(setting)
    assert one is not None and signer_for(setting) is one
    assert signer_for(setting, authserv_id="other") is not one
    with pytest.raises(ValueError, match="cannot read the key"):
        signer_for("good.test:s1:/nonexistent/key.pem")


@pytest.mark.parametrize("text, names", [
    (None, DEFAULT_HEADERS), ("", DEFAULT_HEADERS), ("Subject:To", (b"from", b"subject", b"to")),
    ("from, Subject  list-id", (b"from", b"subject", b"list-id")), (["To", "TO"], (b"from", b"to"))])
def test_parse_headers_reads_the_names_with_from_first(text: Any, names: tuple[bytes, ...]) -> None:
    assert parse_headers(text) == names


@pytest.mark.parametrize("text", ["Subject;x", "Sub ject\x00", "Tö"])
def test_parse_headers_refuses_what_is_not_a_field_name(text: str) -> None:
    with pytest.raises(ValueError, match="is not a header field name"):
        parse_headers(text)


def test_only_the_fields_named_are_signed(world: AuthWorld, keyfiles: dict[str, str]) -> None:
    signer = signer_for(f"good.test:s1:{keyfiles['good.test']}", headers="Subject")
    assert signer is not None and signer is not signer_for(f"good.test:s1:{keyfiles['good.test']}")
    added = signer.fields(MESSAGE)
    assert sorted(tags(signatures(added)[0])["h"].lower().split(":")) == ["from", "from", "subject", "subject"]
    lookup = txt_lookup(world)
    assert dkim.verify(added + MESSAGE, dnsfunc=lookup)
    assert dkim.verify(added + MESSAGE.replace(b"To: ", b"To: eve@example.net, "), dnsfunc=lookup)
    assert not dkim.verify(added + MESSAGE.replace(b"Subject: hello", b"Subject: pay now"), dnsfunc=lookup)


def test_the_queue_checks_the_fields_to_sign_at_start(keyfiles: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dkim_headers: 'a;b' is not a header field name"):
        QueueConfig.from_options(spool=str(tmp_path / "q"), dkim_sign=f"good.test:s1:{keyfiles['good.test']}",
                                 dkim_headers="a;b")


# ---- which key signs ---------------------------------------------------------------------------------------------

def test_the_key_is_the_authors_domain_or_its_nearest_parent(world: AuthWorld) -> None:
    good, other = signing_key(world), signing_key(world, "other.test")
    sub = SigningKey("news.good.test", "s9", world.keys["other.test"].private)
    signer = Signer([good, other, sub])
    assert signer.key_for("good.test") is good
    assert signer.key_for("GOOD.test.") is good
    assert signer.key_for("news.good.test") is sub
    assert signer.key_for("a.b.news.good.test") is sub
    assert signer.key_for("mail.good.test") is good
    assert signer.key_for("other.test") is other
    for stranger in ("notgood.test", "good.test.example", "test", "example.net"):
        assert signer.key_for(stranger) is None, stranger


@pytest.mark.parametrize("author, domain", [("alice@good.test", "good.test"),
                                            ("News <news@news.good.test>", "good.test"),
                                            ("carol@other.test", "other.test")])
def test_the_signature_is_by_the_authors_organization(world: AuthWorld, author: str, domain: str) -> None:
    signer = Signer([signing_key(world), signing_key(world, "other.test")])
    message = authored(author)
    added = signer.fields(message)
    [field] = signatures(added)
    assert (tags(field)["d"], tags(field)["s"]) == (domain, SELECTOR)
    assert dkim.verify(added + message, dnsfunc=txt_lookup(world))


@pytest.mark.parametrize("author", ["dave@example.net", "eve@notgood.test", "undisclosed-recipients:;"])
def test_mail_from_a_domain_without_key_is_not_signed(world: AuthWorld, author: str) -> None:
    assert Signer([signing_key(world)]).fields(authored(author)) == b""


def test_mail_without_from_is_not_signed(world: AuthWorld) -> None:
    assert Signer([signing_key(world)]).fields(b"Subject: no author\r\n\r\nbody\r\n") == b""


# ---- what the signature covers ------------------------------------------------------------------------------------

def test_the_signature_verifies_and_breaks_when_the_body_changes(world: AuthWorld) -> None:
    signed = Signer([signing_key(world)]).fields(MESSAGE) + MESSAGE
    lookup = txt_lookup(world)
    assert dkim.verify(signed, dnsfunc=lookup)
    assert not dkim.verify(signed.replace(b"Hello, Bob.", b"Hello, Eve."), dnsfunc=lookup)
    assert not dkim.verify(signed + b"P.S. send money\r\n", dnsfunc=lookup)
    assert not dkim.verify(signed.replace(b"Subject: hello", b"Subject: hellO"), dnsfunc=lookup)


def test_each_signed_field_is_oversigned(world: AuthWorld) -> None:
    """h= names each field present once more than it appears, so one added later (above the signed one, where
    a plain signature would not notice) breaks the signature."""
    message = MESSAGE.replace(b"Subject: hello\r\n", b"Subject: hello\r\nReply-To: alice@good.test\r\n")
    added = Signer([signing_key(world)]).fields(message)
    signed_fields = tags(signatures(added)[0])["h"].lower().split(":")
    for name in ("from", "to", "subject", "date", "message-id", "reply-to"):
        assert signed_fields.count(name) == 2, (name, signed_fields)
    assert "received" not in signed_fields and "cc" not in signed_fields
    lookup = txt_lookup(world)
    assert dkim.verify(added + message, dnsfunc=lookup)
    for extra in (b"Subject: pay now\r\n", b"From: ceo@good.test\r\n", b"Cc: everyone@example.net\r\n"):
        if extra.startswith(b"Cc"):
            assert dkim.verify(extra + added + message, dnsfunc=lookup)  # not present when signed: not covered
        else:
            assert not dkim.verify(extra + added + message, dnsfunc=lookup), extra
    plain = dkim_sign(message, "good.test", world.keys["good.test"])
    assert dkim.verify(b"Subject: pay now\r\n" + plain, dnsfunc=lookup)  # the control: without oversigning


@pytest_twisted.ensureDeferred
async def test_esmtpkits_own_dkim_check_passes_the_signature(world: AuthWorld) -> None:
    """The signature checked as a receiving esmtpkit checks it: MailAuth asking the private DNS server."""
    signer = Signer([signing_key(world)])
    dns = PrivateDNS(world.zones).start()
    checks = MailAuth(dns_servers=dns.servers, authserv_id=AUTHSERV, timeout=(2.0,), arc=False)
    try:
        results = {}
        for name, content in (("signed", signer.fields(MESSAGE) + MESSAGE),
                              ("changed", (signer.fields(MESSAGE) + MESSAGE).replace(b"Bob.", b"Eve."))):
            session = Session(hostname=AUTHSERV, peer=IPv4Address("TCP", "127.0.0.5", 1000), helo="helo.good.test")
            verdicts = await checks.check_sender(session, "alice@good.test")
            head = content.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
            verdicts = await checks.check_message(session, verdicts, head, lambda c=content: io.BytesIO(c))
            results[name] = verdicts
    finally:
        checks.close()
        await dns.stop()
    [good] = results["signed"].dkim
    assert (good.result, good.domain, good.selector) == ("pass", "good.test", SELECTOR)
    assert results["signed"].dmarc is not None and results["signed"].dmarc.dkim_aligned
    [bad] = results["changed"].dkim
    assert bad.result == "fail"
    assert results["changed"].dmarc is not None and not results["changed"].dmarc.dkim_aligned


# ---- ARC ----------------------------------------------------------------------------------------------------------

def test_mail_checked_here_gets_an_arc_set_that_verifies(world: AuthWorld) -> None:
    signer = Signer([signing_key(world)], arc=signing_key(world, "other.test"), authserv_id="MX.test")
    added = signer.fields(CHECKED)
    names = [line.split(b":", 1)[0].lower() for line in added.split(b"\r\n") if line and line[:1] not in b" \t"]
    assert names == [b"dkim-signature", b"arc-seal", b"arc-message-signature", b"arc-authentication-results"]
    sealed = added + CHECKED
    cv, _, reason = dkim.arc_verify(sealed, dnsfunc=txt_lookup(world))
    assert cv == b"pass", reason
    [seal] = signatures(added, b"arc-seal")
    assert b"i=1" in seal and b"cv=none" in seal and b"d=other.test" in seal
    assert dkim.verify(sealed, dnsfunc=txt_lookup(world))
    cv, _, _ = dkim.arc_verify(sealed.replace(b"Hello, Bob.", b"Hello, Eve."), dnsfunc=txt_lookup(world))
    assert cv == b"fail"


def test_only_mail_with_this_servers_results_is_sealed(world: AuthWorld) -> None:
    signer = Signer(arc=signing_key(world, "other.test"), authserv_id=AUTHSERV)
    assert signer.fields(MESSAGE) == b""
    theirs = CHECKED.replace(f"Authentication-Results: {AUTHSERV};".encode(),
                             b"Authentication-Results: mx.test.evil;")
    assert signer.fields(theirs) == b""
    prefix = CHECKED.replace(f"Authentication-Results: {AUTHSERV};".encode(),
                             f"Authentication-Results: x{AUTHSERV};".encode())
    assert signer.fields(prefix) == b""
    assert signatures(signer.fields(CHECKED), b"arc-seal")
    assert signatures(signer.fields(CHECKED), b"dkim-signature") == []  # an ARC key alone signs nothing else


# ---- prepare: the content to send ---------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_prepare_puts_the_fields_on_top_of_the_content(world: AuthWorld) -> None:
    signer = Signer([signing_key(world)])
    opened: list[int] = []

    def open_content() -> io.BytesIO:
        opened.append(1)
        return io.BytesIO(MESSAGE)

    try:
        opener = await signer.prepare(open_content)
        with opener() as first:
            signed = first.read()
        with opener() as again:
            assert again.read() == signed
        unsigned = await signer.prepare(lambda: io.BytesIO(authored("dave@example.net")))
        with unsigned() as stream:
            assert stream.read() == authored("dave@example.net")
    finally:
        signer.close()
    assert signed.endswith(b"\r\n" + MESSAGE) and len(signatures(signed)) == 1
    assert dkim.verify(signed, dnsfunc=txt_lookup(world))
    assert len(opened) == 3  # once to sign, once per reading


@pytest_twisted.ensureDeferred
async def test_prepare_fails_only_when_the_content_cannot_be_read(world: AuthWorld) -> None:
    signer = Signer([signing_key(world)])

    def unreadable() -> io.BytesIO:
        raise OSError("gone")

    try:
        with pytest.raises(OSError, match="gone"):
            await signer.prepare(unreadable)
        broken = b"From: alice@good.test\r\nbroken header line\r\n\r\nbody\r\n"
        opener = await signer.prepare(lambda: io.BytesIO(broken))
        with opener() as stream:
            assert stream.read() == broken  # dkimpy refuses it: it goes unsigned, as documented
    finally:
        signer.close()


# ---- the Relay ----------------------------------------------------------------------------------------------------

def _send(port: int, content: bytes) -> tuple[int, bytes]:
    return smtp_send(port, "alice@good.test", content, ("bob@example.net",), "client.test", 30)

def _raw_send(port: int, content: bytes) -> list[bytes]:
    client = RawClient(("127.0.0.1", port))
    try:
        replies = client.send(b"EHLO client.test\r\nMAIL FROM:<alice@good.test>\r\nRCPT TO:<bob@example.net>\r\n"
                              b"DATA\r\n", 4)
        return replies + client.send(content + b".\r\n")
    finally:
        client.close()

def _raw_bdat(port: int, content: bytes) -> list[bytes]:
    client = RawClient(("127.0.0.1", port))
    try:
        client.send(b"EHLO client.test\r\n")
        return client.send(b"MAIL FROM:<alice@good.test> BODY=BINARYMIME\r\nRCPT TO:<bob@example.net>\r\n"
                           b"BDAT %d LAST\r\n" % len(content) + content, 3)
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_the_relay_signs_what_it_sends(world: AuthWorld, keyfiles: dict[str, str]) -> None:
    async with relay_to_sink(dkim_sign=f"good.test:{SELECTOR}:{keyfiles['good.test']}") as relay:
        assert (await threads.deferToThread(_send, relay.port, MESSAGE))[0] == 250
        assert (await threads.deferToThread(_send, relay.port, authored("dave@example.net")))[0] == 250
        signed = await relay.store.next_message()
        unsigned = await relay.store.next_message()
    [field] = signatures(signed.data)
    assert signed.data.startswith(field + b"\r\nReceived: from client.test")
    assert signed.data.endswith(b"\r\n" + MESSAGE)
    assert dkim.verify(signed.data, dnsfunc=txt_lookup(world))
    assert not dkim.verify(signed.data.replace(b"Hello, Bob.", b"Hello, Eve."), dnsfunc=txt_lookup(world))
    assert signatures(unsigned.data) == [] and unsigned.data.endswith(b"\r\n" + authored("dave@example.net"))


@pytest_twisted.ensureDeferred
async def test_the_relay_answers_451_when_it_cannot_sign(world: AuthWorld, keyfiles: dict[str, str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The content cannot be prepared for sending: the client keeps the message (451), nothing goes upstream."""
    monkeypatch.setattr(Signer, "prepare", lambda self, open_content, **kw: fail(OSError("spool lost")))
    async with relay_to_sink(dkim_sign=f"good.test:{SELECTOR}:{keyfiles['good.test']}") as relay:
        code, text = await threads.deferToThread(_send, relay.port, MESSAGE)
    assert code == 451
    assert text.startswith(b"4.4.1 Upstream 127.0.0.1:")
    assert relay.store.messages == []


# ---- the queue ----------------------------------------------------------------------------------------------------

@pytest.fixture
def dns(world: AuthWorld) -> Iterator[PrivateDNS]:
    zones = dict(world.zones)
    zones["example.net"] = {"MX": [(10, "mx1.example.net")]}
    zones["mx1.example.net"] = {"A": ["127.0.0.2"]}
    server = PrivateDNS(zones).start()
    yield server
    pytest_twisted.blockon(server.stop())


def _spooled(spool: Path) -> dict[str, bytes]:
    folder = spool / "messages"
    return {name[:-4]: (folder / name).read_bytes() for name in os.listdir(folder) if name.endswith(".eml")}


@pytest.mark.parametrize("body", ["data", "binarymime"])
@pytest_twisted.ensureDeferred
async def test_the_queue_signs_each_attempt_and_keeps_the_spool_copy_unsigned(
        world: AuthWorld, keyfiles: dict[str, str], dns: PrivateDNS, tmp_path: Path, body: str) -> None:
    """The MX answers the first attempt 451 and takes the second: each attempt carries one fresh signature over
    the content as spooled, which stays as received (no signature piles up from one attempt to the next). The
    content has a bare CR and a bare LF (the server allows them): the signature covers them as sent, CRLF after
    DATA, as they are with BODY=BINARYMIME."""
    from twisted.internet import reactor

    eom = [(451, "4.3.0 try again later")]
    mx = ScriptedMX("127.0.0.2", name="mx1.example.net", eom=lambda: eom.pop() if eom else 250)
    mx_port = listen_all([mx])
    spool = tmp_path / "queue"
    setting = f"good.test:{SELECTOR}:{keyfiles['good.test']}"
    config = QueueConfig.from_options(spool=str(spool), dns=f"127.0.0.1:{dns.port}", port=str(mx_port),
                                      min_backoff="1h", max_backoff="2h", hostname="queue.test", dkim_sign=setting)
    service = QueueService(config)
    factory = ESMTPFactory(lambda: Queue(service=service), policy=Policy(hostname="queue.test", bare_newline="allow"))
    service.startService()
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    try:
        said = await threads.deferToThread(_raw_send if body == "data" else _raw_bdat, port.getHost().port, BARE)
        assert said[-1].startswith(b"250 "), said
        await until(lambda: mx.transactions and mx.transactions[0].reply, "the first attempt")
        [(queue_id, kept)] = _spooled(spool).items()
        admin = SpoolAdmin(str(spool))
        await until(lambda: admin.get(queue_id).attempts == 1, "the first attempt to be saved")
        assert _spooled(spool) == {queue_id: kept}
        await threads.deferToThread(admin.flush)  # the retry is an hour away otherwise: the copy stays till then
        await until(lambda: mx.messages, "the retry")
        await until(lambda: not _spooled(spool), "the spool to empty")
    finally:
        await port.stopListening()
        await factory.shutdown(timeout=0)
        await service.stopService()
        await stop_all([mx])
        signer = signer_for(setting, reactor=service.reactor)
        assert signer is not None
        signer.close()
    assert signatures(kept) == [] and kept.endswith(b"\r\n" + BARE)
    assert kept.startswith(b"Received: from client.test")
    assert [t.reply.code if t.reply else None for t in mx.transactions] == [451, 250]
    for transaction in mx.transactions:
        assert len(signatures(transaction.content)) == 1
        assert transaction.content.startswith(b"DKIM-Signature:")
        assert transaction.content.endswith(b"\r\n" + kept.replace(BARE, SENT if body == "data" else BARE))
        assert transaction.mail_params.get("BODY") == ("BINARYMIME" if body == "binarymime" else None)
        assert dkim.verify(transaction.content, dnsfunc=txt_lookup(world))



@pytest_twisted.ensureDeferred
async def test_the_relay_signs_the_line_ends_it_sends(world: AuthWorld, keyfiles: dict[str, str]) -> None:
    """A server that allows bare CR and LF in content (``bare_newline="allow"``) passes them to the Relay, whose
    client sends each as CRLF: the signature must cover the content as sent, so the next hop can verify it."""
    async with relay_to_sink(Policy(hostname="relay.test", bare_newline="allow"),
                             dkim_sign=f"good.test:{SELECTOR}:{keyfiles['good.test']}") as relay:
        replies = await threads.deferToThread(_raw_send, relay.port, BARE)
        relayed = (await relay.store.next_message()).data
    assert replies[-1].startswith(b"250 "), replies
    assert relayed.endswith(b"\r\n" + SENT)
    assert dkim.verify(relayed, dnsfunc=txt_lookup(world))


def test_a_binary_body_is_signed_as_it_is(world: AuthWorld) -> None:
    """BODY=BINARYMIME goes without any change to its line ends: so is it signed. Otherwise a bare CR or LF is
    signed as the CRLF the client sends for it."""
    signer = Signer([signing_key(world)])
    lookup = txt_lookup(world)
    as_is = signer.fields(BARE, binary=True) + BARE
    assert dkim.verify(as_is, dnsfunc=lookup)
    sent = signer.fields(BARE) + SENT
    assert dkim.verify(sent, dnsfunc=lookup)
    assert not dkim.verify(signer.fields(BARE) + BARE, dnsfunc=lookup)



@pytest_twisted.ensureDeferred
async def test_the_relay_signs_binarymime_content_as_it_is(world: AuthWorld, keyfiles: dict[str, str]) -> None:
    """BODY=BINARYMIME content goes upstream octet for octet (bare CR and LF kept): so is it signed."""
    async with relay_to_sink(trace=False, dkim_sign=f"good.test:{SELECTOR}:{keyfiles['good.test']}") as relay:
        said = await threads.deferToThread(_raw_bdat, relay.port, BARE)
        relayed = await relay.store.next_message()
    assert [reply[:3] for reply in said] == [b"250", b"250", b"250"], said
    assert relayed.mail_params.get("BODY") == "BINARYMIME"
    [field] = signatures(relayed.data)
    assert relayed.data == field + b"\r\n" + BARE
    assert dkim.verify(relayed.data, dnsfunc=txt_lookup(world))
