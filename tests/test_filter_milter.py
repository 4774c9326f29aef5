"""The milter client: the codec (framing, negotiation, replies, the header section), and each stage's packets
byte for byte over a StringTransport, the protocol flags that leave steps out, every reply, malformed and unasked
packets, and cancellation (with `task.Clock`, no network)."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from esmtpkit.core.address import parse_path
from esmtpkit.core.reply import Reply
from esmtpkit.core.session import Session
from esmtpkit.filters import Action, FilterChain, HeaderEdit, HeldMessage, Verdict
from esmtpkit.filters import milter_codec as mc
from esmtpkit.filters.milter import REJECTED, TEMPFAILED, MilterFilter, MilterProtocol, MilterSession, from_spec
from esmtpkit.filters.milter_codec import MilterProtocolError, packet

from .docblocks import ROOT, Reader, blocks

OPTNEG = b"O" + struct.pack(">III", 6, 0x131, 0x1FF7FF)


class Endpoint:
    """Connects at once to a StringTransport (or fails with ``error``); ``pending``: never connects."""

    def __init__(self, error: Exception | None = None, pending: bool = False) -> None:
        self.error = error
        self.pending = pending
        self.protocol: MilterProtocol | None = None
        self.transport = StringTransport()
        self.attempt: Deferred[Any] | None = None

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.error is not None:
            return fail(self.error)
        if self.pending:
            self.attempt = Deferred()
            return self.attempt
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)


class Milter:
    """A session of `MilterFilter` on a fake endpoint, and the milter's side of the conversation."""

    def __init__(self, session: Session | None = None, **endpoint: Any) -> None:
        self.endpoint = Endpoint(**endpoint)
        self.filter = MilterFilter(self.endpoint, name="test")
        self.session: Session = session or make_session()
        self.milter: MilterSession = self.filter.start(self.session)

    @property
    def protocol(self) -> MilterProtocol:
        assert self.endpoint.protocol is not None
        return self.endpoint.protocol

    def sent(self) -> list[bytes]:
        """The packets sent since the last call, each as command + data."""
        data = self.endpoint.transport.value()
        self.endpoint.transport.clear()
        return [command + payload for command, payload in mc.Decoder().feed(data)]

    def answer(self, *replies: bytes) -> None:
        """The milter sends ``replies`` (each command + data)."""
        self.protocol.dataReceived(b"".join(struct.pack(">I", len(r)) + r for r in replies))

    def connected(self, actions: int = 0x31, protocol: int = 0, lists: bytes = b"") -> Verdict:
        """Negotiate (the milter asks for ``actions`` and ``protocol``) and pass the connect step."""
        d = self.milter.connect()
        assert self.sent() == [OPTNEG]
        self.answer(b"O" + struct.pack(">III", 6, actions, protocol) + lists)
        if not protocol & (mc.SMFIP_NOCONNECT | mc.SMFIP_NR_CONN):
            self.sent()
            self.answer(b"c")
        return result(d)


def make_session() -> Session:
    session = Session(hostname="mx.test", peer=IPv4Address("TCP", "192.0.2.7", 40000),
                      host=IPv4Address("TCP", "192.0.2.1", 25), helo="client.test", client_name="client.test")
    session.envelope.id = "Q1"
    session.envelope.sender = parse_path("<alice@good.test>")
    session.envelope.recipients.append(parse_path("<bob@example.net>"))
    return session


def held(session: Session, content: bytes) -> HeldMessage:
    return HeldMessage(session, content.split(b"\r\n\r\n", 1)[0], len(content), lambda: io.BytesIO(content))


def result(d: Deferred[Any]) -> Any:
    """What ``d`` fired with (it must have fired); raises its failure."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def pending(d: Deferred[Any]) -> None:
    assert not d.called, "the Deferred has fired"


CONTENT = (b"From: Alice <alice@good.test>\r\n"
           b"Subject: one\r\n"
           b"\ttwo\r\n"
           b"\r\n"
           b"Body\r\n")


# ---- codec -----------------------------------------------------------------------------------------------------------

def test_packets_round_trip_through_the_decoder_in_any_pieces() -> None:
    wire = packet(b"c") + packet(b"h", b"X\0y\0") + packet(b"y", b"550 5.7.1 no\0")
    decoder = mc.Decoder()
    out = []
    for i in range(len(wire)):
        out += decoder.feed(wire[i:i + 1])
    assert out == [(b"c", b""), (b"h", b"X\0y\0"), (b"y", b"550 5.7.1 no\0")]
    assert packet(b"c") == b"\0\0\0\x01c"


@pytest.mark.parametrize("length", [0, mc.MAX_PACKET - 3, 0xFFFFFFFF])
def test_a_packet_of_length_0_or_above_the_bound_is_refused_before_it_is_read(length: int) -> None:
    with pytest.raises(MilterProtocolError):
        mc.Decoder().feed(struct.pack(">I", length))


def test_the_largest_packet_is_taken() -> None:
    data = b"x" * (mc.MAX_PACKET - 5)
    assert mc.Decoder().feed(packet(b"h", data)) == [(b"h", data)]


def test_option_negotiation_round_trips_with_macro_lists() -> None:
    assert mc.optneg() == packet(b"O", OPTNEG[1:])
    answer = struct.pack(">III", 6, 0x21, 0x80) + struct.pack(">I", 2) + b"{auth_authen} i\0" + struct.pack(
        ">I", 5) + b"i\0"
    got = mc.parse_optneg(answer)
    assert (got.version, got.actions, got.protocol) == (6, 0x21, 0x80)
    assert got.macros == {b"M": ("{auth_authen}", "i"), b"E": ("i",)}
    assert got.has(mc.SMFIP_NR_HDR) and not got.has(mc.SMFIP_NOHELO)


@pytest.mark.parametrize("answer", [
    struct.pack(">II", 6, 0),  # short
    struct.pack(">III", 7, 0, 0),  # a version esmtpkit does not speak
    struct.pack(">III", 1, 0, 0),
    struct.pack(">III", 2, 0, 0),  # older versions: fewer commands than esmtpkit sends
    struct.pack(">III", 5, 0, 0),
    struct.pack(">III", 6, 0, mc.SMFIP_RCPT_REJ),  # a protocol flag not offered
    struct.pack(">III", 6, 0, 0) + struct.pack(">I", 9) + b"i\0",  # an unknown macro stage
    struct.pack(">III", 6, 0, 0) + struct.pack(">I", 0) + b"j",  # no NUL
    struct.pack(">III", 6, 0, 0) + b"\0\0",  # a stage cut short
])
def test_option_negotiation_fails_on_what_was_not_offered_or_is_malformed(answer: bytes) -> None:
    with pytest.raises(MilterProtocolError):
        mc.parse_optneg(answer)


@pytest.mark.parametrize("version", [2, 3, 4, 5])
def test_a_milter_of_an_older_version_fails_negotiation_clearly(version: int) -> None:
    with pytest.raises(MilterProtocolError, match=f"version {version}; esmtpkit speaks version 6 only"):
        mc.parse_optneg(struct.pack(">III", version, mc.SMFIF_ADDHDRS, 0))


def test_actions_not_offered_are_masked_off() -> None:
    """rspamd's proxy answers with what it was offered plus recipient and body changes: it is held to the
    offer."""
    extra = mc.SMFIF_ADDRCPT | mc.SMFIF_DELRCPT | mc.SMFIF_CHGBODY | mc.SMFIF_CHGFROM | mc.SMFIF_ADDRCPT_PAR
    got = mc.parse_optneg(struct.pack(">III", 6, mc.OFFERED_ACTIONS | extra, mc.SMFIP_NR_HDR))
    assert got.actions == mc.OFFERED_ACTIONS
    assert mc.parse_optneg(struct.pack(">III", 6, 0xFFFFFFFF, 0)).actions == mc.OFFERED_ACTIONS


def test_header_changes_become_header_edits() -> None:
    assert mc.parse_edit(b"h", b"X-Spam\0yes\0") == HeaderEdit("add", "X-Spam", "yes")
    assert mc.parse_edit(b"i", struct.pack(">I", 0) + b"DKIM-Signature\0v=1;\n\ta=rsa\0") == HeaderEdit(
        "insert", "DKIM-Signature", "v=1;\n\ta=rsa", 0)
    assert HeaderEdit("add", "DKIM-Signature", "v=1;\n\ta=rsa").line == b"DKIM-Signature: v=1;\r\n\ta=rsa\r\n"
    assert mc.parse_edit(b"h", b"X\0caf\xc3\xa9 \xff\x01\0") == HeaderEdit("add", "X", "caf\u00e9 \udcff ")
    assert mc.parse_edit(b"m", struct.pack(">I", 2) + b"Subject\0new\0") == HeaderEdit("change", "Subject", "new", 2)
    assert mc.parse_edit(b"m", struct.pack(">I", 1) + b"Subject\0\0") == HeaderEdit("delete", "Subject", index=1)
    assert mc.parse_edit(b"m", struct.pack(">I", 0) + b"Subject\0\0") == HeaderEdit("delete", "Subject", index=1)
    assert mc.parse_edit(b"h", b"X\0 spaced\0", leading_space=True) == HeaderEdit("add", "X", "spaced")
    assert mc.parse_edit(b"h", b"X\0a\r\nb\0c\0".replace(b"\0c", b"")) == HeaderEdit("add", "X", "ab")


@pytest.mark.parametrize("command,data", [
    (b"h", b"X\0y"), (b"h", b"X\0"), (b"h", b"X\0y\0z\0"), (b"h", b"Bad Name\0y\0"), (b"h", b"\0y\0"),
    (b"m", b"\0\0"), (b"i", b"X\0y\0"),
])
def test_malformed_header_changes_are_protocol_errors(command: bytes, data: bytes) -> None:
    with pytest.raises(MilterProtocolError):
        mc.parse_edit(command, data)


def test_reply_codes_become_safe_replies() -> None:
    assert mc.parse_replycode(b"550 5.7.0 Go away\0") == Reply(550, ("Go away",), "5.7.0")
    assert mc.parse_replycode(b"451 Busy\0") == Reply(451, ("Busy",), "4.7.1")
    assert mc.parse_replycode(b"554-5.7.1 one\r\n554 5.7.1 two\0") == Reply(554, ("one", "two"), "5.7.1")
    assert mc.parse_replycode(b"550 5.7.1 a\x1bb\0").lines == ("a b",)
    assert mc.parse_replycode(b"550 " + b"x" * 2000 + b"\0").lines == ("x" * mc.MAX_REPLY_TEXT,)


@pytest.mark.parametrize("data", [
    b"250 OK\0", b"354 go\0", b"550 no", b"550 a\0b\0", b"55 short\0", b"550-one\r\n551 two\0",
    b"550-one\0", b"550 one\r\n550 two\0", b"hello\0", b"\r\n".join([b"550-x"] * 11) + b"\r\n550 x\0",
])
def test_bad_reply_codes_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(MilterProtocolError):
        mc.parse_replycode(data)


def test_the_header_reader_gives_each_field_then_the_body() -> None:
    reader = mc.HeaderReader(io.BytesIO(CONTENT))
    assert list(reader.fields()) == [(b"From", b" Alice <alice@good.test>"), (b"Subject", b" one\n\ttwo")]
    assert b"".join(reader.chunks()) == b"Body\r\n"


def test_a_line_that_is_not_a_field_starts_the_body() -> None:
    reader = mc.HeaderReader(io.BytesIO(b"A: 1\r\nnot a field\r\nB: 2\r\n"))
    assert list(reader.fields()) == [(b"A", b" 1")]
    assert b"".join(reader.chunks(4)) == b"not a field\r\nB: 2\r\n"
    reader = mc.HeaderReader(io.BytesIO(b" starts folded\r\n\r\n"))
    assert list(reader.fields()) == []
    assert b"".join(reader.chunks()) == b" starts folded\r\n\r\n"


def test_a_bare_lf_is_part_of_its_line_as_the_server_reads_it() -> None:
    reader = mc.HeaderReader(io.BytesIO(b"A: 1\nB: 2\r\nC: 3\r\n\nnot the end\r\n\r\nbody"))
    assert list(reader.fields()) == [(b"A", b" 1\nB: 2"), (b"C", b" 3")]
    assert b"".join(reader.chunks()) == b"\nnot the end\r\n\r\nbody"


def test_a_long_field_is_cut_and_the_rest_read_past() -> None:
    content = b"A: " + b"x" * 300 + b"\r\n\t" + b"y" * 300 + b"\r\nB : 2\r\n\r\nbody"
    reader = mc.HeaderReader(io.BytesIO(content), limit=100)
    fields = list(reader.fields())
    assert fields == [(b"A", b" " + b"x" * 97), (b"B", b" 2")]
    assert list(reader.chunks()) == [b"body"]


def test_the_body_comes_in_chunks_of_at_most_65535_octets() -> None:
    reader = mc.HeaderReader(io.BytesIO(b"A: 1\r\n\r\n" + b"z" * 150000))
    list(reader.fields())
    assert [len(c) for c in reader.chunks()] == [65535, 65535, 18930]


def test_a_header_field_is_cut_to_fit_one_packet() -> None:
    [(command, data)] = mc.Decoder().feed(mc.header(b"X", b"v" * 100000))
    assert command == b"L" and len(data) == mc.MAX_CHUNK and data.endswith(b"v\0")


def test_mail_and_rcpt_packets_carry_the_esmtp_parameters() -> None:
    assert mc.envelope(b"M", "", {"BODY": "8BITMIME", "SMTPUTF8": True}) == packet(
        b"M", b"<>\0BODY=8BITMIME\0SMTPUTF8\0")
    assert mc.connect("client.test", b"U", 0, "") == packet(b"C", b"client.test\0U")


# ---- the conversation ----------------------------------------------------------------------------------------------

def test_connect_negotiates_then_sends_the_connect_macros_and_the_client() -> None:
    m = Milter()
    d = m.milter.connect()
    assert m.sent() == [OPTNEG]
    m.answer(b"O" + struct.pack(">III", 6, 0x31, 0))
    assert m.sent() == [
        b"DCj\0mx.test\0{daemon_name}\0mx.test\0{daemon_addr}\x00192.0.2.1\0v\0esmtpkit 0.1.0\0"
        b"_\0client.test [192.0.2.7]\0{client_addr}\x00192.0.2.7\0{client_port}\00040000\0"
        b"{client_name}\0client.test\0",
        b"Cclient.test\0" + b"4" + struct.pack(">H", 40000) + b"192.0.2.7\0"]
    pending(d)
    m.answer(b"c")
    assert result(d).action is Action.CONTINUE


def test_an_ipv6_client_and_a_client_without_an_ip_address() -> None:
    m = Milter()
    m.session.peer = IPv4Address("TCP", "2001:db8::1", 25)
    m.session.client_name = None
    d = m.milter.connect()
    m.sent()
    m.answer(b"O" + struct.pack(">III", 6, 0, mc.SMFIP_NR_CONN))
    macros, connect = m.sent()
    assert b"_\0unknown [2001:db8::1]\0" in macros and b"{client_name}\0unknown\0" in macros
    assert connect == b"C[2001:db8::1]\0" + b"6" + struct.pack(">H", 25) + b"2001:db8::1\0"
    assert result(d).action is Action.CONTINUE
    m = Milter()
    m.session.peer = UNIXAddress("/run/s.sock")
    d = m.milter.connect()
    m.sent()
    m.answer(b"O" + struct.pack(">III", 6, 0, mc.SMFIP_NR_CONN))
    assert m.sent()[-1] == b"Cclient.test\0L\0\0/run/s.sock\0"
    assert result(d).action is Action.CONTINUE


def test_the_stages_of_a_message_byte_for_byte() -> None:
    m = Milter()
    m.connected()
    d = m.milter.helo("client.test")
    assert m.sent() == [b"Hclient.test\0"]  # no TLS: no HELO macros
    m.answer(b"c")
    assert result(d) is not None
    m.session.authenticated, m.session.auth_mechanism = "alice", "PLAIN"
    d = m.milter.mail("alice@good.test", {"BODY": "8BITMIME", "AUTH": "alice@good.test"})
    assert m.sent() == [
        b"DMi\0Q1\0{auth_type}\0PLAIN\0{auth_authen}\0alice\0{auth_author}\0alice@good.test\0"
        b"{mail_addr}\0alice@good.test\0{mail_host}\0good.test\0{mail_mailer}\0smtp\0",
        b"M<alice@good.test>\0BODY=8BITMIME\0AUTH=alice@good.test\0"]
    m.answer(b"c")
    d = m.milter.rcpt("bob@example.net", {})
    assert m.sent() == [b"DRi\0Q1\0{rcpt_addr}\0bob@example.net\0{rcpt_host}\0example.net\0{rcpt_mailer}\0smtp\0",
                        b"R<bob@example.net>\0"]
    m.answer(b"c")
    assert result(d).action is Action.CONTINUE

    d = m.milter.message(held(m.session, CONTENT))
    assert m.sent() == [b"DTi\0Q1\0", b"T"]
    m.answer(b"c")
    assert m.sent() == [b"LFrom\0Alice <alice@good.test>\0"]
    m.answer(b"c")
    assert m.sent() == [b"LSubject\0one\n\ttwo\0"]
    m.answer(b"c")
    assert m.sent() == [b"DNi\0Q1\0", b"N"]
    m.answer(b"c")
    assert m.sent() == [b"BBody\r\n"]
    m.answer(b"c")
    assert m.sent() == [b"DEi\0Q1\0", b"E"]
    pending(d)
    m.answer(b"p", b"h" + b"X-Milter\0seen\0", b"p", b"c")
    assert result(d) == Verdict(Action.CONTINUE, edits=(HeaderEdit("add", "X-Milter", "seen"),))
    m.milter.reset()
    assert m.sent() == []  # the milter ended the transaction with its answer
    m.milter.close()
    assert m.sent() == [b"Q"] and m.endpoint.transport.disconnecting
    assert m.endpoint.transport.producer is None  # a paused producer would keep the connection open


def test_helo_macros_with_tls() -> None:
    m = Milter()
    m.session.tls, m.session.tls_info = True, {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384",
                                               "bits": "256"}
    m.connected()
    m.milter.helo("client.test")
    assert m.sent()[0] == (b"DH{tls_version}\0TLSv1.3\0{cipher}\0TLS_AES_256_GCM_SHA384\0{cipher_bits}\x00256\0")


def test_the_milters_macro_lists_replace_the_defaults() -> None:
    m = Milter()
    lists = struct.pack(">I", 0) + b"{client_addr} j {unknown}\0" + struct.pack(">I", 2) + b"\0"
    d = m.milter.connect()
    m.sent()
    m.answer(b"O" + struct.pack(">III", 6, 0x131, 0) + lists)
    assert m.sent()[0] == b"DC{client_addr}\x00192.0.2.7\0j\0mx.test\0"  # in the milter's order, unknown left out
    m.answer(b"c")
    result(d)
    m.milter.mail("", {})
    assert m.sent() == [b"M<>\0"]  # an empty list: no macros


def test_a_large_body_goes_in_chunks_each_answered() -> None:
    m = Milter()
    m.connected(protocol=mc.SMFIP_NOHDRS | mc.SMFIP_NODATA | mc.SMFIP_NOEOH)
    d = m.milter.message(held(m.session, b"A: 1\r\n\r\n" + b"z" * 140000))
    for size in (65535, 65535, 8930):
        [chunk] = m.sent()
        assert chunk == b"B" + b"z" * size
        m.answer(b"c")
    assert m.sent() == [b"DEi\0Q1\0", b"E"]
    m.answer(b"a")
    assert result(d).action is Action.ACCEPT


def test_skip_ends_the_body_early() -> None:
    m = Milter()
    m.connected(protocol=mc.SMFIP_NOHDRS | mc.SMFIP_NODATA | mc.SMFIP_NOEOH | mc.SMFIP_SKIP)
    d = m.milter.message(held(m.session, b"A: 1\r\n\r\n" + b"z" * 140000))
    assert len(m.sent()) == 1
    m.answer(b"s")
    assert m.sent() == [b"DEi\0Q1\0", b"E"]
    m.answer(b"c")
    assert result(d).action is Action.CONTINUE


def test_skip_in_the_body_without_smfip_skip_fails() -> None:
    m = Milter()
    m.connected(protocol=mc.SMFIP_NOHDRS | mc.SMFIP_NODATA | mc.SMFIP_NOEOH)
    d = m.milter.message(held(m.session, b"A: 1\r\n\r\n" + b"z" * 140000))
    assert len(m.sent()) == 1
    m.answer(b"s")
    with pytest.raises(MilterProtocolError, match="where it may not"):
        result(d)
    assert m.endpoint.transport.disconnecting


def test_skip_is_no_answer_outside_the_body() -> None:
    m = Milter()
    m.connected()
    d = m.milter.helo("x")
    m.answer(b"s")
    with pytest.raises(MilterProtocolError):
        result(d)
    assert m.endpoint.transport.disconnecting


ALL_NO = (mc.SMFIP_NOHELO | mc.SMFIP_NOMAIL | mc.SMFIP_NORCPT | mc.SMFIP_NODATA | mc.SMFIP_NOHDRS
          | mc.SMFIP_NOEOH | mc.SMFIP_NOBODY)


def test_steps_the_milter_does_not_want_are_not_sent() -> None:
    m = Milter()
    m.connected(protocol=ALL_NO | mc.SMFIP_NOCONNECT)
    assert m.sent() == []
    for d in (m.milter.helo("x"), m.milter.mail("a@b.test", {}), m.milter.rcpt("c@d.test", {})):
        assert result(d).action is Action.CONTINUE
    assert m.sent() == []
    d = m.milter.message(held(m.session, CONTENT))
    assert m.sent() == [b"DEi\0Q1\0", b"E"]
    m.answer(b"c")
    assert result(d).action is Action.CONTINUE


NR_ALL = (mc.SMFIP_NR_HELO | mc.SMFIP_NR_MAIL | mc.SMFIP_NR_RCPT | mc.SMFIP_NR_DATA | mc.SMFIP_NR_HDR
          | mc.SMFIP_NR_EOH | mc.SMFIP_NR_BODY)


def test_steps_the_milter_does_not_answer_are_not_waited_for() -> None:
    m = Milter()
    m.connected(protocol=NR_ALL | mc.SMFIP_NR_CONN)
    for d in (m.milter.helo("x"), m.milter.mail("a@b.test", {}), m.milter.rcpt("c@d.test", {})):
        assert result(d).action is Action.CONTINUE
    m.sent()
    d = m.milter.message(held(m.session, CONTENT))
    assert m.sent() == [b"DTi\0Q1\0", b"T", b"LFrom\0Alice <alice@good.test>\0", b"LSubject\0one\n\ttwo\0",
                        b"DNi\0Q1\0", b"N", b"BBody\r\n", b"DEi\0Q1\0", b"E"]
    m.answer(b"c")
    assert result(d).action is Action.CONTINUE


def test_unanswered_body_chunks_wait_while_the_connection_is_full() -> None:
    m = Milter()
    m.connected(protocol=NR_ALL | mc.SMFIP_NOHDRS | mc.SMFIP_NODATA | mc.SMFIP_NOEOH)
    m.protocol.pauseProducing()
    d = m.milter.message(held(m.session, b"A: 1\r\n\r\n" + b"z" * 140000))
    assert [len(p) for p in m.sent()] == [65536]
    m.protocol.resumeProducing()
    assert [len(p) for p in m.sent()] == [65536, 8931, 7, 1]
    m.answer(b"c")
    assert result(d).action is Action.CONTINUE


def test_leading_spaces_are_sent_when_the_milter_asks() -> None:
    m = Milter()
    m.connected(protocol=mc.SMFIP_HDR_LEADSPC | mc.SMFIP_NODATA | mc.SMFIP_NR_HDR)
    m.milter.message(held(m.session, CONTENT))
    assert m.sent()[:2] == [b"LFrom\0 Alice <alice@good.test>\0", b"LSubject\0 one\n\ttwo\0"]


@pytest.mark.parametrize("answer,verdict", [
    (b"c", Verdict()),
    (b"a", Verdict(Action.ACCEPT, reason="accepted by the milter")),
    (b"r", Verdict(Action.REJECT, REJECTED, reason="rejected by the milter")),
    (b"t", Verdict(Action.TEMPFAIL, TEMPFAILED, reason="tempfail from the milter")),
    (b"d", Verdict(Action.DISCARD, reason="discarded by the milter")),
    (b"y550 5.7.0 Not you\0", Verdict(Action.REJECT, Reply(550, ("Not you",), "5.7.0"),
                                      reason="reject from the milter: 550")),
    (b"y421 4.3.2 Closing\0", Verdict(Action.TEMPFAIL, Reply(421, ("Closing",), "4.3.2"),
                                      reason="tempfail from the milter: 421")),
])
@pytest.mark.parametrize("stage", ["connect", "helo", "mail", "rcpt", "message"])
def test_every_decision_at_every_stage(stage: str, answer: bytes, verdict: Verdict) -> None:
    m = Milter()
    if stage == "connect":
        d = m.milter.connect()
        m.answer(b"O" + struct.pack(">III", 6, 0x31, 0))
    else:
        m.connected(protocol=mc.SMFIP_NODATA | mc.SMFIP_NOHDRS | mc.SMFIP_NOEOH | mc.SMFIP_NOBODY)
        d = {"helo": lambda: m.milter.helo("x"), "mail": lambda: m.milter.mail("a@b.test", {}),
             "rcpt": lambda: m.milter.rcpt("c@d.test", {}),
             "message": lambda: m.milter.message(held(m.session, CONTENT))}[stage]()
    pending(d)
    m.answer(answer)
    assert result(d) == verdict


def test_a_decision_before_the_end_ends_the_message_and_reset_aborts() -> None:
    m = Milter()
    m.connected()
    m.milter.mail("a@b.test", {})
    m.answer(b"c")
    d = m.milter.message(held(m.session, CONTENT))
    m.answer(b"c")  # DATA
    m.sent()
    m.answer(b"y550 5.7.1 Bad From\0")
    assert result(d).action is Action.REJECT
    assert m.sent() == []
    m.milter.reset()
    assert m.sent() == [b"A"]
    m.milter.reset()
    assert m.sent() == []


def test_every_change_at_the_end_of_the_message() -> None:
    m = Milter()
    m.connected(actions=mc.SMFIF_ADDHDRS | mc.SMFIF_CHGHDRS | mc.SMFIF_QUARANTINE, protocol=ALL_NO)
    d = m.milter.message(held(m.session, CONTENT))
    m.sent()
    m.answer(b"h" + b"X-A\0one\0", b"i" + struct.pack(">I", 1) + b"X-B\0two\0",
             b"m" + struct.pack(">I", 1) + b"Subject\0three\0", b"m" + struct.pack(">I", 2) + b"Received\0\0",
             b"q" + b"looks odd\0", b"c")
    assert result(d) == Verdict(Action.QUARANTINE, reason="looks odd", edits=(
        HeaderEdit("add", "X-A", "one"), HeaderEdit("insert", "X-B", "two", 1),
        HeaderEdit("change", "Subject", "three", 1), HeaderEdit("delete", "Received", index=2)))


def test_changes_are_dropped_when_the_message_is_refused() -> None:
    m = Milter()
    m.connected(protocol=ALL_NO)
    d = m.milter.message(held(m.session, CONTENT))
    m.answer(b"hX\0y\0", b"t")
    assert result(d) == Verdict(Action.TEMPFAIL, TEMPFAILED, reason="tempfail from the milter")


@pytest.mark.parametrize("actions,change", [
    (mc.SMFIF_CHGHDRS, b"hX\0y\0"),
    (mc.SMFIF_ADDHDRS, b"m\0\0\0\1X\0y\0"),
    (mc.SMFIF_ADDHDRS, b"qreason\0"),
])
def test_a_change_the_milter_did_not_negotiate_fails(actions: int, change: bytes) -> None:
    m = Milter()
    m.connected(actions=actions, protocol=ALL_NO)
    d = m.milter.message(held(m.session, CONTENT))
    m.answer(change, b"c")
    with pytest.raises(MilterProtocolError):
        result(d)
    assert m.endpoint.transport.disconnecting


def test_too_many_changes_fail() -> None:
    m = Milter()
    m.connected(protocol=ALL_NO)
    d = m.milter.message(held(m.session, CONTENT))
    m.answer(*[b"hX\0y\0"] * 1001)
    with pytest.raises(MilterProtocolError):
        result(d)


@pytest.mark.parametrize("answer", [b"hX\0y\0", b"qwhy\0", b"x", b"b" + b"new body", b"+<eve@evil.test>\0",
                                    b"eevil@evil.test\0", b"4", b"O" + OPTNEG[1:]])
def test_a_reply_that_is_not_allowed_at_a_step_fails_it(answer: bytes) -> None:
    m = Milter()
    m.connected()
    d = m.milter.rcpt("c@d.test", {})
    m.answer(answer)
    with pytest.raises(MilterProtocolError):
        result(d)
    assert m.endpoint.transport.disconnecting
    with pytest.raises(Exception):
        result(m.milter.rcpt("e@f.test", {}))


def test_an_unasked_reply_fails_the_next_step() -> None:
    m = Milter()
    m.connected(protocol=mc.SMFIP_NR_HELO)
    result(m.milter.helo("x"))
    m.answer(b"c")
    assert m.endpoint.transport.disconnecting
    with pytest.raises(MilterProtocolError):
        result(m.milter.mail("a@b.test", {}))


def test_an_oversized_packet_fails_the_step() -> None:
    m = Milter()
    m.connected()
    d = m.milter.helo("x")
    m.protocol.dataReceived(struct.pack(">I", 1 << 24) + b"h")
    with pytest.raises(MilterProtocolError):
        result(d)


def test_a_milter_that_asks_for_more_actions_goes_on_with_those_offered() -> None:
    """As rspamd's proxy does: the extra actions are masked off, and the conversation goes on."""
    m = Milter()
    extra = mc.SMFIF_ADDRCPT | mc.SMFIF_DELRCPT | mc.SMFIF_CHGBODY
    assert m.connected(actions=mc.OFFERED_ACTIONS | extra, protocol=ALL_NO).action is Action.CONTINUE
    assert m.milter.negotiated is not None and m.milter.negotiated.actions == mc.OFFERED_ACTIONS
    d = m.milter.message(held(m.session, CONTENT))
    assert m.sent() == [b"DEi\0Q1\0", b"E"]
    m.answer(b"hX-Spam\0no\0", b"c")
    assert result(d).edits == (HeaderEdit("add", "X-Spam", "no"),)


@pytest.mark.parametrize("change", [b"+<eve@evil.test>\0", b"-<bob@example.net>\0", b"bnew body\r\n",
                                    b"eevil@evil.test\0"])
def test_a_milter_that_uses_an_action_it_asked_for_but_was_not_offered_fails(change: bytes) -> None:
    m = Milter()
    m.connected(actions=0x1FF, protocol=ALL_NO)
    d = m.milter.message(held(m.session, CONTENT))
    m.answer(change, b"c")
    with pytest.raises(MilterProtocolError):
        result(d)
    assert m.endpoint.transport.disconnecting


def test_a_milter_that_closes_the_connection_fails_the_step() -> None:
    m = Milter()
    m.connected()
    d = m.milter.helo("x")
    m.protocol.connectionLost(None)
    with pytest.raises(Exception, match="closed"):
        result(d)


def test_a_refused_connection_fails_connect_and_stages_before_connect_fail() -> None:
    m = Milter(error=ConnectionRefusedError())
    with pytest.raises(ConnectionRefusedError):
        result(m.milter.connect())
    with pytest.raises(MilterProtocolError):
        result(Milter().milter.helo("x"))
    m.milter.reset()
    m.milter.close()


def test_close_while_connecting_stops_connecting() -> None:
    m = Milter(pending=True)
    d = m.milter.connect()
    m.milter.close()
    assert m.endpoint.attempt is not None and m.endpoint.attempt.called
    with pytest.raises(CancelledError):
        result(d)


def test_cancelling_a_step_closes_the_connection() -> None:
    m = Milter()
    m.connected()
    d = m.milter.mail("a@b.test", {})
    d.cancel()
    with pytest.raises(CancelledError):
        result(d)
    assert m.endpoint.transport.disconnecting
    m.milter.close()
    assert m.sent()[-1:] != [b"Q"]  # no QUIT on an aborted connection


def test_cancelling_the_message_mid_body_closes_the_file_and_the_connection() -> None:
    m = Milter()
    m.connected(protocol=mc.SMFIP_NOHDRS | mc.SMFIP_NODATA | mc.SMFIP_NOEOH)
    opened: list[io.BytesIO] = []

    def opener() -> io.BytesIO:
        opened.append(io.BytesIO(b"A: 1\r\n\r\n" + b"z" * 140000))
        return opened[-1]

    d = m.milter.message(HeldMessage(m.session, b"A: 1", 140008, opener))
    assert [len(p) for p in m.sent()] == [65536]
    d.cancel()
    with pytest.raises(CancelledError):
        result(d)
    assert opened[0].closed and m.endpoint.transport.disconnecting
    m.milter.reset()
    m.milter.close()
    assert m.sent() == []


def test_a_chain_timeout_cancels_a_hanging_milter_and_closes_its_connection() -> None:
    clock = Clock()
    endpoint = Endpoint()
    chain = FilterChain([MilterFilter(endpoint, timeout=5)], reactor=clock)
    session = chain.start(make_session())
    d = Deferred.fromCoroutine(session.stage("connect"))
    assert endpoint.transport.value() == packet(b"O", OPTNEG[1:])
    clock.advance(5)
    verdict = result(d)
    assert verdict.action is Action.TEMPFAIL
    assert endpoint.transport.disconnecting


def test_from_spec() -> None:
    clock = Clock()
    one = from_spec("tcp:127.0.0.1:8891", {}, reactor=clock)
    assert (one.name, one.timeout, one.on_failure, one.stateless) == ("milter", None, None, False)
    two = from_spec("unix:/run/opendkim/opendkim.sock", {"name": "opendkim", "timeout": "2.5",
                                                        "on-failure": "accept"}, reactor=clock)
    assert (two.name, two.timeout, two.on_failure) == ("opendkim", 2.5, Action.ACCEPT)
    for target in ("tcp:host=127.0.0.1:port=8891:timeout=3", "tcp:127.0.0.1:65535:bindAddress=127.0.0.2",
                   "tcp:localhost:1", "unix:path=/run/x.sock:timeout=2"):
        assert from_spec(target, {}, reactor=clock).endpoint is not None
    assert clock.getDelayedCalls() == []


def test_from_spec_without_a_reactor_installs_none() -> None:
    """Options are parsed before twistd installs its reactor: the milter's endpoint looks it up at connect."""
    script = ("import sys\n"
              "from esmtpkit.filters.milter import from_spec\n"
              "made = from_spec('tcp:127.0.0.1:8891', {})\n"
              "assert 'twisted.internet.reactor' not in sys.modules, 'from_spec installed a reactor'\n"
              "assert made.endpoint.target == 'tcp:127.0.0.1:8891'\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("target,options,message", [
    ("", {}, "no target"),
    ("nonsense:1", {}, "not a client endpoint"),
    ("tcp:127.0.0.1", {}, "not a client endpoint"),
    ("unix:", {}, "names no socket path"),
    ("tcp:127.0.0.1:99999999", {}, "the port is a number from 1 to 65535, not '99999999'"),
    ("tcp:127.0.0.1:-5", {}, "the port is a number from 1 to 65535, not '-5'"),
    ("tcp:127.0.0.1:0", {}, "the port is a number from 1 to 65535"),
    ("tcp:127.0.0.1:1:bindAddress=zzz", {}, "bindAddress is an IP address, not 'zzz'"),
    ("unix:/run/x.sock:checkPID=1", {}, "'checkPID' is not one of path, timeout"),
    ("unix:/run/x.sock:timeout=1.5", {}, "timeout is a whole number of seconds above 0, not '1.5'"),
    ("tcp:127.0.0.1:8891", {"size": "1"}, "unknown option 'size'"),
    ("tcp:127.0.0.1:8891", {"timeout": "0"}, "timeout"),
    ("tcp:127.0.0.1:8891", {"timeout": "soon"}, "timeout"),
    ("tcp:127.0.0.1:8891", {"timeout": "inf"}, "timeout"),
    ("tcp:127.0.0.1:8891", {"on-failure": "reject"}, "tempfail or accept"),
])
def test_from_spec_refuses_in_one_sentence(target: str, options: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        from_spec(target, options, reactor=Clock())
    assert "\n" not in str(raised.value) and "milter" not in str(raised.value)  # the registry names the kind


def test_the_pages_python_example_runs(tmp_path: Path) -> None:
    """docs/filters/milter.md's example builds a chain without connecting anywhere."""
    page = blocks(ROOT / "docs" / "filters" / "milter.md")
    with Reader(tmp_path / "reader", tmp_path / "logs") as reader:
        reader.follow(page)
    [python] = [block for block in page if block.language == "python"]
    assert reader.output(python).strip() == "('opendkim',) 10.0"
    assert [block.not_run for block in page if block.language == "sh"] == ["needs a milter listening on "
                                                                            "127.0.0.1:8891"]
