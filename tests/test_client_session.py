"""esmtpkit's client: one session with one server, in memory (exact wire bytes, every timeout on a Clock) and over
loopback against esmtpkit's own server (STARTTLS with certificate checks, AUTH, BDAT, SMTPUTF8, DSN, LMTP, and a
message too big to hold in memory); and the example of docs/client.md.
"""

from __future__ import annotations

import base64
import hashlib
import io
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import IO, Any

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from esmtpkit.client.options import ClientOptions, Timeouts
from esmtpkit.client.protocol import CHUNK_SIZE, QUIT_TIMEOUT
from esmtpkit.client.session import Attempt, host_name, send, tls_creator
from esmtpkit.core.dsn import Notify, OriginalRecipient, Ret
from esmtpkit.core.outbound import Message, Outcome, Status
from esmtpkit.core.reply import Reply
from esmtpkit.handlers.base import MessageHandler
from esmtpkit.handlers.collecting import MessageStore
from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.server.interfaces import ContentMode, ILMTPHandler
from esmtpkit.server.policy import Policy
from esmtpkit.server.sasl import portal_from_strings
from esmtpkit.server.tls import ServerTLS
from esmtpkit.testing import RecordingHandler, serve

from .certs import make_tls_files, serve_implicit_tls
from .docblocks import ROOT, TIMEOUT, blocks, reader_environment
from .support import (CLIENT_CONTENT, PEER_GREETING, PEER_HOST, Client, Wire, collecting, deliver, make_message,
                      reactor_)

#: An EHLO reply offering everything the client can use.
EHLO_ALL = (b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n"
            b"250-CHUNKING\r\n250-BINARYMIME\r\n250 ENHANCEDSTATUSCODES\r\n")
#: An EHLO reply offering no PIPELINING.
EHLO_SERIAL = b"250-mx.test\r\n250-8BITMIME\r\n250 SIZE 1000000\r\n"
ENVELOPE = (b"MAIL FROM:<a@example.org> SIZE=34\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\n"
            b"DATA\r\n")
STUFFED = b"Subject: test\r\n\r\n..dot line\r\nbody\r\n.\r\n"
OK = b"250 2.0.0 ok\r\n"
GO_AHEAD = b"354 go ahead\r\n"
QUEUED = b"250 2.0.0 queued as Q1\r\n"
TIMEOUTS = Timeouts(connect=1, greeting=2, ehlo=3, mail=4, rcpt=5, data_init=6, block=7, data_end=8)


def up_to_mail(client: Client, ehlo: bytes = EHLO_ALL) -> bytes:
    """Greet and answer EHLO; what the client sent next."""
    assert client.said(PEER_GREETING) == b"EHLO client.test\r\n"
    return client.said(ehlo)


# ---- the usual transaction ------------------------------------------------------------------------------------

def test_pipelined_transaction() -> None:
    """MAIL, every RCPT and DATA go in one write (RFC 2920); the content is dot-stuffed; QUIT ends it."""
    client = Client()
    assert up_to_mail(client) == ENVELOPE
    assert client.wire.writes[-1] == ENVELOPE
    assert client.said(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n") == b""
    assert client.said(GO_AHEAD) == STUFFED
    assert client.said(QUEUED) == b"QUIT\r\n"
    assert not client.protocol.finished.called
    assert client.said(b"221 2.0.0 bye\r\n") == b""
    assert client.result() == {0: Outcome(250, "2.0.0", "queued as Q1", PEER_HOST, dsn=True),
                               1: Outcome(250, "2.0.0", "queued as Q1", PEER_HOST, dsn=True)}
    assert not client.failed
    assert client.opened[0].closed


def test_replies_split_anywhere_give_the_same_session() -> None:
    """The server's replies arriving one octet at a time (bare LF line ends too) change nothing."""
    script = PEER_GREETING + EHLO_ALL.replace(b"\r\n", b"\n") + OK * 3 + GO_AHEAD + QUEUED + b"221 bye\r\n"
    client = Client()
    for i in range(len(script)):
        client.said(script[i:i + 1])
    assert client.wire.value() == b"EHLO client.test\r\n" + ENVELOPE + STUFFED + b"QUIT\r\n"
    assert client.codes() == {0: (250, "2.0.0"), 1: (250, "2.0.0")}


def test_without_pipelining_one_command_at_a_time() -> None:
    client = Client()
    assert up_to_mail(client, EHLO_SERIAL) == b"MAIL FROM:<a@example.org> SIZE=34\r\n"
    assert client.said(OK) == b"RCPT TO:<b@example.net>\r\n"
    assert client.said(OK) == b"RCPT TO:<c@example.net>\r\n"
    assert client.said(OK) == b"DATA\r\n"
    assert client.said(GO_AHEAD) == STUFFED
    assert client.said(QUEUED) == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.codes() == {0: (250, "2.0.0"), 1: (250, "2.0.0")}


def test_only_the_recipients_asked_for() -> None:
    message = make_message("b@example.net", "c@example.net", "d@example.net")
    message.recipients[0].status = Status.DELIVERED
    client = Client(message, indexes=[2])
    assert up_to_mail(client) == b"MAIL FROM:<a@example.org> SIZE=34\r\nRCPT TO:<d@example.net>\r\nDATA\r\n"
    client.said(OK * 2 + GO_AHEAD + QUEUED + b"221 bye\r\n")
    assert client.codes() == {2: (250, "2.0.0")}


def test_no_recipient_no_transaction() -> None:
    client = Client(indexes=[])
    assert up_to_mail(client) == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.result() == {} and not client.failed


def test_bare_line_ends_in_content_go_as_crlf() -> None:
    client = Client(content=b"a\nb\rc\r\n.")
    up_to_mail(client)
    client.said(OK * 3)
    assert client.said(GO_AHEAD) == b"a\r\nb\r\nc\r\n..\r\n.\r\n"


def test_helo_when_ehlo_is_unknown() -> None:
    """EHLO refused with 502: HELO, and then no ESMTP parameter at all."""
    client = Client(make_message(ret="FULL", envid="e1"))
    assert up_to_mail(client, b"502 5.5.1 what?\r\n") == b"HELO client.test\r\n"
    assert client.said(b"250 mx.test\r\n") == b"MAIL FROM:<a@example.org>\r\n"


@pytest.mark.parametrize("ehlo", [EHLO_SERIAL.replace(b"250-8BITMIME\r\n", b""), b"502 5.5.1 what?\r\n"])
def test_8bit_content_never_goes_to_a_server_without_8bitmime(ehlo: bytes) -> None:
    """RFC 6152 §3: no MAIL at all, a permanent 5.6.3 for every recipient (esmtpkit converts nothing)."""
    client = Client(make_message(body="8BITMIME"))
    sent = up_to_mail(client, ehlo)
    if sent == b"HELO client.test\r\n":
        sent = client.said(b"250 mx.test\r\n")
    assert sent == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.codes() == {0: (554, "5.6.3"), 1: (554, "5.6.3")}
    assert not client.failed and client.opened == []


@pytest.mark.parametrize("options, enhanced", [({"tls": "required"}, "4.7.4"),
                                               ({"tls": "opportunistic", "username": "u", "password": "p"},
                                                "4.7.0")])
def test_no_helo_when_tls_or_auth_is_required(options: dict[str, Any], enhanced: str) -> None:
    client = Client(**options)
    assert up_to_mail(client, b"500 5.5.2 syntax error\r\n") == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.codes() == {0: (454, enhanced), 1: (454, enhanced)}
    assert client.failed


# ---- replies that end it --------------------------------------------------------------------------------------

def test_421_greeting() -> None:
    """421 at the greeting: the server is closing, so no QUIT; a temporary session failure."""
    client = Client()
    assert client.said(b"421 4.3.2 mx.test busy\r\n") == b""
    assert client.result() == {0: Outcome(421, "4.3.2", "mx.test busy", PEER_HOST),
                               1: Outcome(421, "4.3.2", "mx.test busy", PEER_HOST)}
    assert client.failed


def test_554_greeting_is_taken_as_temporary() -> None:
    """RFC 5321 §3.1: a server refusing service at the greeting; another server (or a later try) may serve."""
    client = Client()
    assert client.said(b"554 5.7.1 no service for you\r\n") == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.result()[0] == Outcome(454, "4.7.1", "no service for you", PEER_HOST)
    assert client.failed


def test_421_mid_session() -> None:
    client = Client()
    up_to_mail(client)
    assert client.said(b"250 ok\r\n421 4.4.2 timeout, closing\r\n") == b""
    assert client.codes() == {0: (421, "4.4.2"), 1: (421, "4.4.2")}
    assert client.failed


def test_recipients_with_mixed_replies() -> None:
    client = Client(make_message("b@example.net", "c@example.net", "d@example.net"))
    up_to_mail(client)
    client.said(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n450 4.2.1 try later\r\n")
    assert client.said(GO_AHEAD) == STUFFED
    client.said(QUEUED + b"221 bye\r\n")
    assert client.result() == {0: Outcome(250, "2.0.0", "queued as Q1", PEER_HOST, dsn=True),
                               1: Outcome(550, "5.1.1", "no such user", PEER_HOST),
                               2: Outcome(450, "4.2.1", "try later", PEER_HOST)}
    assert not client.failed


@pytest.mark.parametrize("data_reply", [b"554 5.5.1 no valid recipients\r\n", GO_AHEAD])
def test_every_recipient_refused(data_reply: bytes) -> None:
    """No content follows; a DATA that was accepted anyway gets an empty message (RFC 2920 §3.1)."""
    client = Client()
    up_to_mail(client)
    client.said(b"250 ok\r\n550 5.1.1 no\r\n551 5.1.6 moved\r\n")
    if data_reply == GO_AHEAD:
        assert client.said(GO_AHEAD) == b".\r\n"
        assert client.said(b"554 5.5.1 no recipients\r\n") == b"QUIT\r\n"
    else:
        assert client.said(data_reply) == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.codes() == {0: (550, "5.1.1"), 1: (551, "5.1.6")}
    assert not client.failed


@pytest.mark.parametrize("reply, failed", [(b"451 4.3.0 try later\r\n", True), (b"550 5.7.1 go away\r\n", False)])
def test_mail_refused(reply: bytes, failed: bool) -> None:
    """Pipelined: the RCPT and DATA replies after a refused MAIL are read and change nothing."""
    client = Client()
    up_to_mail(client)
    client.said(reply + b"503 5.5.1 need MAIL\r\n" * 2)
    assert client.said(b"503 5.5.1 need RCPT\r\n") == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    code = int(reply[:3])
    assert {o.code for o in client.result().values()} == {code}
    assert client.failed is failed


def test_mail_refused_without_pipelining() -> None:
    client = Client()
    up_to_mail(client, EHLO_SERIAL)
    assert client.said(b"550 5.7.1 go away\r\n") == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.codes() == {0: (550, "5.7.1"), 1: (550, "5.7.1")}


@pytest.mark.parametrize("reply, failed", [(b"451 4.3.0 later\r\n", True), (b"554 5.0.0 never\r\n", False)])
def test_data_refused(reply: bytes, failed: bool) -> None:
    client = Client(make_message("b@example.net", "c@example.net"))
    up_to_mail(client)
    client.said(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n")
    assert client.said(reply) == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.codes() == {0: (int(reply[:3]), reply[4:9].decode()), 1: (550, "5.1.1")}
    assert client.failed is failed


@pytest.mark.parametrize("reply, failed", [(b"452 4.3.1 disk full\r\n", True), (b"552 5.3.4 too big\r\n", False)])
def test_end_of_data_refused(reply: bytes, failed: bool) -> None:
    client = Client()
    up_to_mail(client)
    client.said(OK * 3 + GO_AHEAD)
    assert client.said(reply) == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert {(o.code, o.remote) for o in client.result().values()} == {(int(reply[:3]), PEER_HOST)}
    assert client.failed is failed


def test_server_ending_the_data_early() -> None:
    """A refusal while the content is still going out: it is the answer, and the connection is closed."""
    client = Client(wire=Wire(pause=True), content=b"x" * (3 * CHUNK_SIZE))
    up_to_mail(client)
    client.said(OK * 3 + GO_AHEAD)
    assert client.said(b"552 5.3.4 message too big\r\n") == b""
    assert client.codes() == {0: (552, "5.3.4"), 1: (552, "5.3.4")}
    assert not client.failed


def test_connection_lost_during_the_data() -> None:
    client = Client(wire=Wire(pause=True), content=b"x" * (3 * CHUNK_SIZE))
    up_to_mail(client)
    client.said(OK * 2 + b"550 5.1.1 no\r\n" + GO_AHEAD)
    client.protocol.connectionLost(Failure(ConnectionDone()))
    assert client.result() == {
        0: Outcome(451, "4.4.2", f"lost connection with {PEER_HOST} while sending the message content"),
        1: Outcome(550, "5.1.1", "no", PEER_HOST)}
    assert client.failed
    assert client.opened[0].closed


def test_content_that_cannot_be_read() -> None:
    def broken() -> IO[bytes]:
        raise OSError("disk on fire")

    client = Client(opener=broken)
    up_to_mail(client)
    client.said(OK * 3 + GO_AHEAD)
    assert client.wire.aborted
    assert client.codes() == {0: (451, "4.3.0"), 1: (451, "4.3.0")}
    assert "disk on fire" in client.result()[0].text


def test_quit_not_answered() -> None:
    client = Client()
    up_to_mail(client)
    client.said(OK * 3 + GO_AHEAD + QUEUED)
    client.clock.advance(QUIT_TIMEOUT)
    assert client.wire.aborted
    assert client.codes() == {0: (250, "2.0.0"), 1: (250, "2.0.0")}
    assert not client.failed


# ---- what the server cannot take ------------------------------------------------------------------------------

def test_too_big_for_the_server_is_not_sent() -> None:
    client = Client(make_message(size=5000))
    assert up_to_mail(client, b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 4999\r\n") == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.result()[0] == Outcome(552, "5.3.4", f"message size 5000 exceeds the server's limit of 4999 "
                                                       f"({PEER_HOST})")
    assert not client.failed
    assert client.opened == []


def test_smtputf8_not_offered() -> None:
    client = Client(make_message(smtputf8=True))
    assert up_to_mail(client, EHLO_SERIAL) == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.codes() == {0: (553, "5.6.7"), 1: (553, "5.6.7")}
    assert not client.failed


def test_smtputf8_offered() -> None:
    client = Client(make_message("ü@example.net", sender="jörg@example.org", smtputf8=True))
    assert up_to_mail(client) == ("MAIL FROM:<jörg@example.org> SIZE=34 SMTPUTF8\r\n"
                                  "RCPT TO:<ü@example.net>\r\nDATA\r\n").encode()


def test_dsn_parameters() -> None:
    message = make_message(ret="HDRS", envid="Q 1")
    message.recipients[0].notify = ("SUCCESS", "FAILURE")
    message.recipients[0].orcpt = "rfc822;b@example.net"
    client = Client(message)
    assert up_to_mail(client) == (b"MAIL FROM:<a@example.org> SIZE=34 RET=HDRS ENVID=Q+201\r\n"
                                  b"RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.net\r\n"
                                  b"RCPT TO:<c@example.net>\r\nDATA\r\n")


@pytest.mark.parametrize("ehlo, dsn", [(EHLO_ALL, True), (EHLO_ALL.replace(b"250-DSN\r\n", b""), False)])
def test_a_server_offering_dsn_takes_the_notices_on(ehlo: bytes, dsn: bool) -> None:
    """RFC 3461 §5.2.1: NOTIFY and ORCPT went along, so a 2xx from a DSN server makes its notices its own."""
    message = make_message("b@example.net", "c@example.net", "d@example.net")
    message.recipients[0].notify = ("SUCCESS",)
    message.recipients[0].orcpt = "rfc822;b@example.net"
    client = Client(message)
    up_to_mail(client, ehlo)
    client.said(OK * 2 + b"550 5.1.1 no such user\r\n" + OK + GO_AHEAD + QUEUED + b"221 bye\r\n")
    outcomes = client.result()
    assert [(o.code, o.dsn) for _, o in sorted(outcomes.items())] == [(250, dsn), (550, False), (250, dsn)]


def test_lmtp_outcomes_say_whether_dsn_went_along() -> None:
    client = Client(lmtp=True)
    client.said(PEER_GREETING + EHLO_ALL + OK * 3 + GO_AHEAD + b"250 2.0.0 delivered\r\n"
                + b"452 4.2.2 mailbox full\r\n221 bye\r\n")
    assert [(o.code, o.dsn) for _, o in sorted(client.result().items())] == [(250, True), (452, False)]


def test_552_to_rcpt_is_the_recipient_limit() -> None:
    """RFC 5321 §4.5.3.1.10: 552 to RCPT is taken as 452 ("too many recipients"), the server's text kept."""
    client = Client(make_message("b@example.net", "c@example.net", "d@example.net"))
    up_to_mail(client)
    client.said(OK * 2 + b"552 5.5.3 too many recipients\r\n552 mailbox over quota\r\n" + GO_AHEAD)
    client.said(QUEUED + b"221 bye\r\n")
    assert client.result()[1] == Outcome(452, "4.5.3", "too many recipients", PEER_HOST)
    assert client.result()[2] == Outcome(452, "4.0.0", "mailbox over quota", PEER_HOST)
    assert client.codes()[0] == (250, "2.0.0") and not client.failed


# ---- BDAT -----------------------------------------------------------------------------------------------------

def chunks(content: bytes) -> list[bytes]:
    pieces = [content[i:i + CHUNK_SIZE] for i in range(0, len(content), CHUNK_SIZE)] or [b""]
    return [b"BDAT %d%s\r\n" % (len(p), b" LAST" if n == len(pieces) - 1 else b"") + p for n, p in enumerate(pieces)]


def test_bdat_pipelined() -> None:
    content = b"0123456789abcdef" * 9600  # 153600 octets: three chunks, the last one short
    client = Client(make_message(size=len(content)), content, chunking=True)
    assert up_to_mail(client) == (b"MAIL FROM:<a@example.org> SIZE=153600\r\nRCPT TO:<b@example.net>\r\n"
                                  b"RCPT TO:<c@example.net>\r\n")
    assert client.said(OK * 3) == b"".join(chunks(content))
    assert client.said(b"250 2.0.0 chunk ok\r\n" * 2) == b""
    assert client.said(b"250 2.0.0 all of it\r\n") == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.result()[0] == Outcome(250, "2.0.0", "all of it", PEER_HOST, dsn=True)


def test_text_content_with_bdat_gets_crlf_line_ends() -> None:
    """Only binary content may hold a bare CR or LF (RFC 3030 §3); the queue may hold some from a lenient server."""
    content = b"a\nb" + b"c" * (CHUNK_SIZE - 4) + b"\r" + b"\nd\r"
    client = Client(make_message(size=len(content), body="8BITMIME"), content, chunking=True)
    up_to_mail(client)
    first = b"a\r\nb" + b"c" * (CHUNK_SIZE - 4) + b"\r"
    assert client.said(OK * 3) == b"BDAT %d\r\n%s" % (len(first), first) + b"BDAT 4 LAST\r\n\nd\r\n"


def test_bdat_without_pipelining_waits_for_each_chunk() -> None:
    content = b"y" * (CHUNK_SIZE + 10)
    client = Client(make_message(size=len(content)), content, chunking=True)
    up_to_mail(client, b"250-mx.test\r\n250 CHUNKING\r\n")
    client.said(OK)
    client.said(OK)
    first, last = chunks(content)
    assert client.said(OK) == first
    assert client.clock.getDelayedCalls()[0].getTime() == 180.0  # the block timeout, as the reply is awaited
    assert client.said(OK) == last
    assert client.said(QUEUED) == b"QUIT\r\n"


def test_bdat_refused_chunk_stops_the_content() -> None:
    """RFC 3030 §2: no chunk after a refused one; QUIT instead."""
    content = b"z" * (2 * CHUNK_SIZE + 1)
    client = Client(make_message(size=len(content)), content, chunking=True)
    up_to_mail(client, b"250-mx.test\r\n250 CHUNKING\r\n")
    client.said(OK * 2)
    assert client.said(OK) == chunks(content)[0]
    assert client.said(b"452 4.3.1 no room\r\n") == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.codes() == {0: (452, "4.3.1"), 1: (452, "4.3.1")}
    assert client.failed


def test_binary_content_goes_with_bdat() -> None:
    content = b"\x00\xff\nbinary\r.\r\n"
    client = Client(make_message(size=len(content), body="BINARYMIME"), content)
    assert up_to_mail(client) == (b"MAIL FROM:<a@example.org> SIZE=13 BODY=BINARYMIME\r\n"
                                  b"RCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\n")
    assert client.said(OK * 3) == b"BDAT 13 LAST\r\n" + content


def test_binary_content_without_binarymime() -> None:
    client = Client(make_message(body="BINARYMIME"))
    assert up_to_mail(client, b"250-mx.test\r\n250-CHUNKING\r\n250 PIPELINING\r\n") == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.codes()[0] == (554, "5.6.3")


def test_empty_content_with_bdat() -> None:
    client = Client(make_message(size=0), b"", chunking=True)
    up_to_mail(client)
    assert client.said(OK * 3) == b"BDAT 0 LAST\r\n"


# ---- LMTP -----------------------------------------------------------------------------------------------------

def test_lmtp_answers_each_recipient() -> None:
    """RFC 2033 §4.2: LHLO, then one reply per accepted recipient after the content."""
    client = Client(make_message("b@example.net", "c@example.net", "d@example.net"), lmtp=True)
    assert client.said(PEER_GREETING) == b"LHLO client.test\r\n"
    client.said(EHLO_ALL)
    client.said(b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n250 ok\r\n")
    assert client.said(GO_AHEAD) == STUFFED
    assert client.said(b"250 2.0.0 <b@example.net> delivered\r\n") == b""
    assert client.said(b"452 4.2.2 <d@example.net> mailbox full\r\n") == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.codes() == {0: (250, "2.0.0"), 1: (550, "5.1.1"), 2: (452, "4.2.2")}
    assert not client.failed


def test_lmtp_connection_lost_between_replies() -> None:
    client = Client(lmtp=True)
    client.said(PEER_GREETING + EHLO_ALL + OK * 3 + GO_AHEAD + b"250 2.0.0 delivered\r\n")
    client.protocol.connectionLost(Failure(ConnectionDone()))
    assert client.codes() == {0: (250, "2.0.0"), 1: (451, "4.4.2")}
    assert client.failed


def test_lmtp_never_says_helo() -> None:
    client = Client(lmtp=True)
    client.said(PEER_GREETING)
    assert client.said(b"500 5.5.2 what\r\n") == b"QUIT\r\n"


# ---- STARTTLS and AUTH ----------------------------------------------------------------------------------------

EHLO_TLS = b"250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
EHLO_AUTH = b"250-mx.test\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN\r\n"


def test_starttls_and_nothing_read_from_before_it() -> None:
    """What the server sent in clear after its 220 is thrown away, not read as the reply to the new EHLO."""
    client = Client(tls="opportunistic")
    assert up_to_mail(client, EHLO_TLS) == b"STARTTLS\r\n"
    assert client.said(b"220 2.0.0 go ahead\r\n250 injected\r\n") == b"EHLO client.test\r\n"
    assert client.wire.tls == "tls settings"
    assert client.said(EHLO_ALL).startswith(b"MAIL FROM:")


@pytest.mark.parametrize("tls, sent", [("opportunistic", b"MAIL FROM:<a@example.org>\r\n"), ("required", b"QUIT\r\n")])
def test_starttls_not_offered(tls: str, sent: bytes) -> None:
    client = Client(tls=tls)
    assert up_to_mail(client, EHLO_SERIAL.replace(b"250 SIZE 1000000", b"250 HELP")) == sent
    if tls == "required":
        client.said(b"221 bye\r\n")
        assert client.result()[0] == Outcome(454, "4.7.4", f"TLS is required, but was not offered by {PEER_HOST}")
        assert client.failed


@pytest.mark.parametrize("tls, sent", [("opportunistic", b"MAIL FROM:<a@example.org>\r\n"), ("required", b"QUIT\r\n")])
def test_starttls_refused(tls: str, sent: bytes) -> None:
    client = Client(tls=tls)
    up_to_mail(client, b"250-mx.test\r\n250 STARTTLS\r\n")
    assert client.said(b"554 5.7.3 no TLS today\r\n") == sent
    if tls == "required":
        client.said(b"221 bye\r\n")
        assert client.codes()[0] == (454, "4.7.3")


def test_starttls_handshake_failure() -> None:
    client = Client(tls="required")
    up_to_mail(client, EHLO_TLS)
    client.said(b"220 go ahead\r\n")
    client.protocol.connectionLost(Failure(SSL.Error([("SSL routines", "", "certificate verify failed")])))
    outcome = client.result()[0]
    assert (outcome.code, outcome.enhanced) == (454, "4.7.5")
    assert outcome.text.startswith(f"TLS handshake with {PEER_HOST} failed: ")
    assert client.failed and client.protocol.tls_failed


def test_implicit_tls_handshake_failure() -> None:
    client = Client(tls="implicit")
    client.protocol.connectionLost(Failure(SSL.Error([])))
    assert client.codes()[0] == (454, "4.7.5")
    assert client.protocol.tls_failed


def test_verify_makes_tls_required() -> None:
    """With verify, "opportunistic" means "required": stripping STARTTLS from the EHLO reply gets nothing sent."""
    assert ClientOptions(tls="opportunistic", verify=True).tls == "required"
    assert ClientOptions(tls="implicit", verify=True).tls == "implicit"
    assert ClientOptions(tls="opportunistic").tls == "opportunistic"
    with pytest.raises(ValueError, match="verify needs TLS"):
        ClientOptions(tls="none", verify=True)
    stripped = Client(tls="opportunistic", verify=True)
    assert up_to_mail(stripped, EHLO_SERIAL) == b"QUIT\r\n"
    stripped.said(b"221 bye\r\n")
    assert stripped.codes() == {0: (454, "4.7.4"), 1: (454, "4.7.4")} and stripped.failed
    refused = Client(tls="opportunistic", verify=True)
    up_to_mail(refused, EHLO_TLS)
    assert refused.said(b"454 4.7.0 TLS not available\r\n") == b"QUIT\r\n"
    refused.said(b"221 bye\r\n")
    assert refused.codes()[0] == (454, "4.7.0")
    assert b"MAIL" not in stripped.wire.value() + refused.wire.value()


def tls_then(client: Client, ehlo: bytes) -> bytes:
    up_to_mail(client, EHLO_TLS)
    client.said(b"220 go ahead\r\n")
    client.protocol.handshakeCompleted()
    return client.said(ehlo)


def test_auth_plain() -> None:
    client = Client(tls="required", username="alice", password="sécret")
    token = base64.b64encode("\0alice\0sécret".encode())
    assert tls_then(client, EHLO_AUTH) == b"AUTH PLAIN " + token + b"\r\n"
    assert client.said(b"235 2.7.0 ok\r\n").startswith(b"MAIL FROM:<a@example.org>\r\nRCPT TO:")


def test_auth_login() -> None:
    client = Client(tls="required", username="alice", password="secret")
    assert tls_then(client, EHLO_AUTH.replace(b"PLAIN LOGIN", b"LOGIN CRAM-MD5")) == b"AUTH LOGIN\r\n"
    assert client.said(b"334 VXNlcm5hbWU6\r\n") == b"YWxpY2U=\r\n"
    assert client.said(b"334 UGFzc3dvcmQ6\r\n") == b"c2VjcmV0\r\n"
    assert client.said(b"235 2.7.0 ok\r\n").startswith(b"MAIL FROM:")


def test_auth_refused_is_temporary() -> None:
    """Wrong credentials are for us to fix: the mail waits (4.7.8) rather than bouncing."""
    client = Client(tls="implicit", username="alice", password="wrong")
    client.said(PEER_GREETING)
    assert client.said(EHLO_AUTH).startswith(b"AUTH PLAIN ")
    assert client.said(b"535 5.7.8 bad credentials\r\n") == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.result()[0] == Outcome(435, "4.7.8", "bad credentials", PEER_HOST)
    assert client.failed


@pytest.mark.parametrize("ehlo, enhanced", [(EHLO_SERIAL, "4.7.10"), (EHLO_TLS, "4.7.0")])
def test_no_credentials_without_tls_or_a_mechanism(ehlo: bytes, enhanced: str) -> None:
    client = Client(tls="opportunistic", username="alice", password="secret")
    if ehlo == EHLO_TLS:
        assert tls_then(client, b"250-mx.test\r\n250 AUTH CRAM-MD5\r\n") == b"QUIT\r\n"
    else:
        assert up_to_mail(client, ehlo) == b"QUIT\r\n"
    client.said(b"221 bye\r\n")
    assert client.codes()[0] == (454, enhanced)
    assert b"secret" not in client.wire.value() and base64.b64encode(b"secret") not in client.wire.value()


# ---- timeouts and bad replies ---------------------------------------------------------------------------------

#: For each wait: what the server says before it falls silent, whether writes fill the buffer, and the text.
STEPS = {
    "greeting": (b"", False, "while waiting for the greeting"),
    "ehlo": (PEER_GREETING, False, "while waiting for the reply to EHLO"),
    "mail": (PEER_GREETING + EHLO_SERIAL, False, "while waiting for the reply to MAIL FROM"),
    "rcpt": (PEER_GREETING + EHLO_SERIAL + OK, False, "while waiting for the reply to RCPT TO"),
    "data_init": (PEER_GREETING + EHLO_SERIAL + OK * 3, False, "while waiting for the reply to DATA"),
    "block": (PEER_GREETING + EHLO_SERIAL + OK * 3 + GO_AHEAD, True, "while sending the message content"),
    "data_end": (PEER_GREETING + EHLO_SERIAL + OK * 3 + GO_AHEAD, False,
                 "while waiting for the reply to the end of the data"),
}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_each_timeout(step: str) -> None:
    """RFC 5321 §4.5.3.2: each wait has its own timeout; when it runs out the connection is dropped (4.4.2)."""
    script, pause, doing = STEPS[step]
    client = Client(wire=Wire(pause=pause), timeouts=TIMEOUTS)
    client.said(script)
    limit = getattr(TIMEOUTS, step)
    client.clock.advance(limit - 0.5)
    assert not client.protocol.finished.called
    client.clock.advance(0.5)
    assert client.wire.aborted
    assert client.result()[0] == Outcome(451, "4.4.2", f"conversation with {PEER_HOST} timed out {doing}")
    assert client.failed


@pytest.mark.parametrize("junk, why", [
    (b"hello there\r\n", "not an SMTP reply line"),
    (b"220-mx.test\r\n250 changed\r\n", "reply code changed"),
    (b"220-more\r\n" * 101, "longer than 100 lines"),
    (b"220 " + b"x" * 5000, "longer than 2048 octets"),
    (b"220 " + b"x" * 3000 + b"\r\n", "longer than 2048 octets"),
    (PEER_GREETING + b"354 go on\r\n", "unexpected reply 354 go on to EHLO"),
])
def test_bad_replies_end_the_session(junk: bytes, why: str) -> None:
    client = Client()
    client.said(junk)
    assert client.wire.aborted or client.wire.value().endswith(b"QUIT\r\n")
    if not client.protocol.finished.called:
        client.said(b"221 bye\r\n")
    outcome = client.result()[0]
    assert (outcome.code, outcome.enhanced) == (451, "4.5.0"), outcome
    assert why in outcome.text
    assert client.failed


def test_a_positive_reply_where_none_fits_never_counts_as_delivered() -> None:
    client = Client()
    up_to_mail(client)
    client.said(OK * 3)
    client.said(b"250 2.0.0 sure\r\n")  # DATA answered 250, not 354
    client.said(b"221 bye\r\n")
    assert {o.code for o in client.result().values()} == {451}


# ---- send(): connecting, and the attempt as a whole ------------------------------------------------------------

@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Connects each factory to a new Wire (``wires``), or gives ``failures`` first / never answers."""

    def __init__(self, *failures: Any) -> None:
        self.failures = list(failures)
        self.wires: list[Wire] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.failures:
            failure = self.failures.pop(0)
            return Deferred() if failure is None else fail(failure)
        protocol = factory.buildProtocol(None)
        wire = Wire()
        wire.protocol = protocol
        self.wires.append(wire)
        protocol.makeConnection(wire)
        return succeed(protocol)


def sending(endpoint: Any, clock: Clock, message: Message | None = None, *, host: str = PEER_HOST,
            indexes: list[int] | None = None, **options: Any) -> list[Attempt]:
    options.setdefault("helo", "client.test")
    options.setdefault("tls", "none")
    got: list[Attempt] = []
    send(clock, endpoint, message or make_message(), lambda: io.BytesIO(CLIENT_CONTENT), ClientOptions(**options),
         indexes=indexes, host=host).addCallback(got.append)
    return got


def test_send_connection_refused() -> None:
    clock = Clock()
    [attempt] = sending(FakeEndpoint(ConnectionRefusedError()), clock)
    assert attempt == Attempt(PEER_HOST, {0: Outcome(451, "4.4.1", f"connection refused by {PEER_HOST}"),
                                     1: Outcome(451, "4.4.1", f"connection refused by {PEER_HOST}")}, True)
    assert clock.getDelayedCalls() == []


def test_send_connect_timeout() -> None:
    clock = Clock()
    got = sending(FakeEndpoint(None), clock, timeouts=TIMEOUTS)
    assert got == []
    clock.advance(TIMEOUTS.connect)
    [attempt] = got
    assert attempt.outcomes[0] == Outcome(451, "4.4.1", f"connection to {PEER_HOST} timed out")
    assert attempt.session_failed


def test_send_nothing_to_send() -> None:
    clock = Clock()
    endpoint = FakeEndpoint()
    assert sending(endpoint, clock, indexes=[]) == [Attempt(PEER_HOST, {}, False)]
    assert endpoint.wires == []


def test_send_a_whole_session() -> None:
    clock = Clock()
    endpoint = FakeEndpoint()
    message = make_message("b@example.net", "c@example.net")
    message.recipients[1].status = Status.FAILED
    got = sending(endpoint, clock, message)
    [wire] = endpoint.wires
    wire.protocol.dataReceived(PEER_GREETING + EHLO_ALL + OK * 2 + GO_AHEAD + QUEUED + b"221 bye\r\n")
    assert got == [Attempt(PEER_HOST, {0: Outcome(250, "2.0.0", "queued as Q1", PEER_HOST, dsn=True)}, False)]
    assert clock.getDelayedCalls() == []


def test_send_opportunistic_tls_failing_tries_again_in_clear() -> None:
    clock = Clock()
    endpoint = FakeEndpoint()
    got = sending(endpoint, clock, tls="opportunistic")
    first = endpoint.wires[0]
    first.protocol.dataReceived(PEER_GREETING + EHLO_TLS + b"220 go ahead\r\n")
    assert first.tls is not None
    first.protocol.connectionLost(Failure(SSL.Error([])))
    assert got == []
    second = endpoint.wires[1]
    second.protocol.dataReceived(PEER_GREETING + EHLO_TLS)
    assert b"STARTTLS" not in second.value()
    second.protocol.dataReceived(OK * 3 + GO_AHEAD + QUEUED + b"221 bye\r\n")
    [attempt] = got
    assert {o.code for o in attempt.outcomes.values()} == {250} and not attempt.session_failed


def test_send_verified_tls_failing_never_goes_in_clear() -> None:
    clock = Clock()
    endpoint = FakeEndpoint()
    got = sending(endpoint, clock, tls="opportunistic", verify=True)
    [wire] = endpoint.wires
    wire.protocol.dataReceived(PEER_GREETING + EHLO_TLS + b"220 go ahead\r\n")
    wire.protocol.connectionLost(Failure(SSL.Error([("SSL routines", "", "certificate verify failed")])))
    [attempt] = got
    assert {o.enhanced for o in attempt.outcomes.values()} == {"4.7.5"} and attempt.session_failed
    assert len(endpoint.wires) == 1 and clock.getDelayedCalls() == []


def fired(d: "Deferred[Any]") -> Any:
    """The result ``d`` has fired with already (a failure fails the test)."""
    got: list[Any] = []
    d.addBoth(got.append)
    assert got and not isinstance(got[0], Failure), got
    return got[0]


def cancelled(text: str) -> Outcome:
    return Outcome.local(451, "4.4.2", f"attempt timed out ({PEER_HOST}, {text})")


def test_cancel_aborts_the_session_and_keeps_the_answers_given() -> None:
    """A cancelled send fires at once with the Attempt as it stands, never with CancelledError."""
    clock = Clock()
    endpoint = FakeEndpoint()
    d = send(clock, endpoint, make_message(), lambda: io.BytesIO(CLIENT_CONTENT), ClientOptions(tls="none"),
             host=PEER_HOST)
    [wire] = endpoint.wires
    wire.protocol.dataReceived(PEER_GREETING + EHLO_ALL + OK + b"550 5.1.1 no such user\r\n")
    d.cancel()
    assert wire.aborted
    assert fired(d) == Attempt(PEER_HOST, {
        0: Outcome(550, "5.1.1", "no such user", PEER_HOST), 1: cancelled("while waiting for the reply to RCPT TO")},
        True)
    assert clock.getDelayedCalls() == []


def test_cancel_after_the_data_was_taken_keeps_the_delivery() -> None:
    clock = Clock()
    endpoint = FakeEndpoint()
    d = send(clock, endpoint, make_message(), lambda: io.BytesIO(CLIENT_CONTENT), ClientOptions(tls="none"),
             host=PEER_HOST)
    [wire] = endpoint.wires
    wire.protocol.dataReceived(PEER_GREETING + EHLO_ALL + OK * 3 + GO_AHEAD + QUEUED)
    assert wire.value().endswith(b"QUIT\r\n")
    d.cancel()
    attempt = fired(d)
    assert {(o.code, o.dsn) for o in attempt.outcomes.values()} == {(250, True)}
    assert wire.aborted and clock.getDelayedCalls() == []


def test_cancel_while_connecting() -> None:
    clock = Clock()
    endpoint = FakeEndpoint(None)
    d = send(clock, endpoint, make_message(), lambda: io.BytesIO(CLIENT_CONTENT), ClientOptions(tls="none"),
             host=PEER_HOST)
    d.cancel()
    timed_out = cancelled("while connecting")
    assert fired(d) == Attempt(PEER_HOST, {0: timed_out, 1: timed_out}, True)
    assert clock.getDelayedCalls() == [] and endpoint.wires == []


def test_send_with_unusable_tls_settings(tmp_path: Path) -> None:
    clock = Clock()
    [no_name] = sending(FakeEndpoint(), clock, host="", tls="required", verify=True)
    assert no_name.outcomes[0].enhanced == "4.3.5" and "needs its name" in no_name.outcomes[0].text
    missing = str(tmp_path / "missing.pem")
    [no_file] = sending(FakeEndpoint(), clock, tls="required", verify=True, ca_file=missing)
    assert no_file.outcomes[0].enhanced == "4.3.5" and no_file.session_failed


def test_host_names_and_options() -> None:
    assert host_name("mx.example.net[192.0.2.1]") == "mx.example.net"
    assert host_name("[192.0.2.1]") == "192.0.2.1"
    assert host_name("localhost") == "localhost"
    with pytest.raises(ValueError, match="tls must be"):
        ClientOptions(tls="starttls")
    with pytest.raises(ValueError, match="needs TLS"):
        ClientOptions(tls="none", username="alice")
    with pytest.raises(ValueError, match="helo"):
        ClientOptions(helo="two words")
    assert tls_creator(ClientOptions()) is not None


# ---- against esmtpkit's own server on 127.0.0.1 ----------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_loopback_plain() -> Any:
    store = MessageStore()
    server = yield serve(collecting(store))
    try:
        attempt = yield deliver(server, make_message(), CLIENT_CONTENT, tls="none")
    finally:
        yield server.stop()
    assert not attempt.session_failed
    assert {(o.code, o.enhanced, o.remote) for o in attempt.outcomes.values()} == {(250, "2.0.0",
                                                                                  "localhost[127.0.0.1]")}
    [got] = store.messages
    assert (got.sender, got.recipients, got.data) == ("a@example.org", ("b@example.net", "c@example.net"),
                                                      CLIENT_CONTENT)
    assert got.mail_params == {"SIZE": len(CLIENT_CONTENT)} and not got.tls


@pytest_twisted.inlineCallbacks
def test_loopback_starttls_verified(tmp_path: Path) -> Any:
    """STARTTLS required, the certificate checked against the test CA and the name localhost; and refused when
    the name is another one (nothing is sent then)."""
    files = make_tls_files(tmp_path)
    store = MessageStore()
    server = yield serve(collecting(store, tls_context=ServerTLS(files.cert, files.key)))
    try:
        good = yield deliver(server, make_message(), CLIENT_CONTENT, tls="required", verify=True, ca_file=str(files.ca))
        wrong = yield deliver(server, make_message(), CLIENT_CONTENT, tls="opportunistic", verify=True,
                              ca_file=str(files.ca), tls_hostname="mx.example.net")
        untrusted = yield deliver(server, make_message(), CLIENT_CONTENT, tls="required", verify=True,
                                  ca_file=str(make_tls_files(tmp_path / "other").ca))
    finally:
        yield server.stop()
    assert {o.code for o in good.outcomes.values()} == {250}
    [got] = store.messages
    assert got.tls and got.data == CLIENT_CONTENT
    for failed in (wrong, untrusted):
        assert failed.session_failed
        assert {(o.code, o.enhanced) for o in failed.outcomes.values()} == {(454, "4.7.5")}, failed


@pytest_twisted.inlineCallbacks
def test_loopback_implicit_tls(tmp_path: Path) -> Any:
    files = make_tls_files(tmp_path)
    store = MessageStore()
    server = yield serve_implicit_tls(collecting(store), files.cert, files.key)
    try:
        attempt = yield deliver(server, make_message(), CLIENT_CONTENT, tls="implicit", verify=True,
                                ca_file=str(files.ca))
    finally:
        yield server.stop()
    assert {o.code for o in attempt.outcomes.values()} == {250}
    assert store.messages[0].tls


@pytest_twisted.inlineCallbacks
def test_loopback_auth_plain_over_tls(tmp_path: Path) -> Any:
    files = make_tls_files(tmp_path)
    store = MessageStore()
    server = yield serve(collecting(store, tls_context=ServerTLS(files.cert, files.key),
                                    portal=portal_from_strings(["memory:alice:s3cret"]), auth_failure_delay=0))
    try:
        good = yield deliver(server, make_message(), CLIENT_CONTENT, tls="required", username="alice",
                             password="s3cret")
        bad = yield deliver(server, make_message(), CLIENT_CONTENT, tls="required", username="alice", password="nope")
    finally:
        yield server.stop()
    assert {o.code for o in good.outcomes.values()} == {250}
    assert store.messages[0].authenticated == "alice" and len(store.messages) == 1
    assert bad.session_failed and {o.enhanced for o in bad.outcomes.values()} == {"4.7.8"}


@pytest_twisted.inlineCallbacks
def test_loopback_binarymime_smtputf8_and_dsn() -> Any:
    """Binary content arrives octet for octet through BDAT; SMTPUTF8 paths and the DSN parameters arrive as
    the handler's parsed parameters."""
    binary = b"Subject: binary\r\n\r\n" + bytes(range(256)) * 700 + b"\r\n.\r\n\n\r"
    store = MessageStore()
    server = yield serve(collecting(store, dsn=True))
    message = make_message("ü@example.net", "c@example.net", sender="jörg@example.org", smtputf8=True,
                           body="BINARYMIME", size=len(binary), ret="HDRS", envid="env id+1")
    message.recipients[0].notify = ("SUCCESS", "FAILURE")
    message.recipients[0].orcpt = "utf-8;\\x{FC}@example.net"
    message.recipients[1].notify = ("NEVER",)
    try:
        attempt = yield deliver(server, message, binary, tls="none")
    finally:
        yield server.stop()
    assert {o.code for o in attempt.outcomes.values()} == {250}, attempt
    [got] = store.messages
    assert got.data == binary
    assert (got.sender, got.recipients) == ("jörg@example.org", ("ü@example.net", "c@example.net"))
    assert got.mail_params == {"SIZE": len(binary), "BODY": "BINARYMIME", "SMTPUTF8": True, "RET": Ret.HDRS,
                               "ENVID": "env id+1"}
    assert got.rcpt_params == ({"NOTIFY": Notify(success=True, failure=True),
                                "ORCPT": OriginalRecipient("utf-8", "ü@example.net")},
                               {"NOTIFY": Notify()})


class Digest(MessageHandler):
    """Keeps only the length and SHA-256 of each message's content."""

    content_mode = ContentMode.RAW
    results: list[tuple[int, str]] = []

    def data(self) -> Any:
        self._hash = hashlib.sha256()
        self._size = 0
        return super().data()

    def body(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self._size += len(chunk)

    def eom(self) -> Any:
        self.results.append((self._size, self._hash.hexdigest()))
        return super().eom()


class ReadSizes(io.FileIO):
    """A content file noting the size of every read."""

    sizes: list[int] = []

    def read(self, size: int = -1) -> bytes:
        self.sizes.append(size)
        return super().read(size)


@pytest_twisted.inlineCallbacks
def test_loopback_big_message_from_a_file(tmp_path: Path) -> Any:
    """20 MiB read 64 KiB at a time as the connection takes it: never the whole content in memory."""
    path = tmp_path / "content"
    digest = hashlib.sha256()
    line = b"0123456789abcdefghijklmnopqrstuvwxyz.\r\n" * 1680
    with open(path, "wb") as f:
        for n in range(322):
            piece = b"Subject: big\r\n\r\n" if n == 0 else line[:65536]
            f.write(piece)
            digest.update(piece)
    size = path.stat().st_size
    Digest.results, ReadSizes.sizes = [], []
    server = yield serve(ESMTPFactory(Digest, policy=Policy(hostname="mx.test"), clock=reactor_()))
    tracemalloc.start()
    try:
        attempt = yield deliver(server, make_message(size=size), lambda: ReadSizes(path), tls="none")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        yield server.stop()
    assert {o.code for o in attempt.outcomes.values()} == {250}, attempt
    assert Digest.results == [(size, digest.hexdigest())]
    assert size > 20 * 1024 * 1024 - 65536 and max(ReadSizes.sizes) == CHUNK_SIZE
    assert peak < 8 * 1024 * 1024, peak


@implementer(ILMTPHandler)
class Mailboxes(RecordingHandler):
    """An LMTP delivery agent: alice's mailbox takes the message, bob's is full."""

    def eom_per_recipient(self) -> Any:
        self.eom()
        assert self.session is not None
        return [Reply.of(250, f"<{r}> delivered", enhanced="2.0.0") if r.local_part == "alice"
                else Reply.of(452, f"<{r}> mailbox full", enhanced="4.2.2")
                for r in self.session.envelope.recipients]


@pytest_twisted.inlineCallbacks
@pytest.mark.parametrize("chunking", [False, True])
def test_loopback_lmtp(chunking: bool) -> Any:
    handlers: list[Mailboxes] = []

    def make() -> Mailboxes:
        handlers.append(Mailboxes())
        return handlers[-1]

    server = yield serve(ESMTPFactory(make, policy=Policy(hostname="mx.test", lmtp=True), clock=reactor_()))
    try:
        attempt = yield deliver(server, make_message("alice@example.org", "bob@example.org"), CLIENT_CONTENT,
                                tls="none", lmtp=True, chunking=chunking)
    finally:
        yield server.stop()
    assert attempt == Attempt("localhost[127.0.0.1]", {
        0: Outcome(250, "2.0.0", "<alice@example.org> delivered", "localhost[127.0.0.1]"),
        1: Outcome(452, "4.2.2", "<bob@example.org> mailbox full", "localhost[127.0.0.1]")}, False)
    [handler] = handlers
    assert handler.messages[0]["body"] == b".dot line\r\nbody\r\n"
    assert "lhlo" not in handler.verbs and "ehlo" in handler.verbs


# ---- the documentation ----------------------------------------------------------------------------------------

def test_client_page_prints_what_it_says(tmp_path: Path) -> None:
    """docs/client.md's first example, run from an empty folder, prints the output the page shows under it."""
    page = [b for b in blocks(ROOT / "docs" / "client.md") if b.language in ("python", "text")]
    example, shown = page[0], page[1]
    assert (example.language, shown.language) == ("python", "text")
    run = subprocess.run([sys.executable, "-"], input=example.text, capture_output=True, text=True, cwd=tmp_path,
                         env=reader_environment(), timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr
    assert run.stdout == shown.text
