"""XCLIENT and XFORWARD (Postfix's XCLIENT_README and XFORWARD_README) driven in memory: offered and allowed only
to trusted clients, every attribute, bad syntax, phases, the new greeting after XCLIENT, and the client the trace
header, the relay rule and the session then see."""

from __future__ import annotations

from typing import Any

import pytest

from esmtpkit.core.rules import Phase
from esmtpkit.core.trace import received_header
from esmtpkit.core.xclient import ClientAddress, Forwarded, XClient, XForward, forwarded_client
from esmtpkit.handlers.access import DEFAULT_NETWORKS, may_relay, parse_networks
from esmtpkit.server.extensions import resolve
from esmtpkit.testing import Conversation, RecordingHandler

from .support import policy

XCLIENT_KEYWORD = "XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT"
XFORWARD_KEYWORD = "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE"
TRUSTED = ("127.0.0.0/8",)


class TraceHandler(RecordingHandler):
    """Records, at DATA, the Received: field a delivering handler would write (unfolded, CRLF dropped), and whether
    the client may relay."""

    def __init__(self) -> None:
        super().__init__()
        self.traces: list[str] = []
        self.relay: list[bool] = []

    def data(self) -> Any:
        field = received_header(self.session, id="T1", timestamp=0).decode()
        self.traces.append(field.removesuffix("\r\n").replace("\r\n\t", " "))
        self.relay.append(may_relay(self.session, parse_networks(DEFAULT_NETWORKS)))
        return super().data()


def talk(peer: str = "127.0.0.1", handler: Any = None, trusted: tuple[str, ...] = TRUSTED,
         extensions: tuple[Any, ...] = (XClient(), XForward())) -> Conversation:
    return Conversation(handler if handler is not None else TraceHandler(),
                        policy(extensions=extensions, trusted_networks=trusted), peer=(peer, 40000))


def expect(conversation: Conversation, line: str, code: int, enhanced: str | None = None,
           text: str | None = None) -> Any:
    reply = conversation.send(line)
    assert reply is not None, line
    assert (reply.code, reply.enhanced) == (code, enhanced), (line, reply)
    if text is not None:
        assert reply.text == text, (line, reply)
    return reply


def send_message(conversation: Conversation, recipient: str = "bob@example.org") -> None:
    for line, code in (("MAIL FROM:<alice@example.org>", 250), (f"RCPT TO:<{recipient}>", 250), ("DATA", 354)):
        assert conversation.send(line).code == code, line
    assert conversation.send("Subject: x\r\n\r\nbody\r\n.").code == 250


def session(conversation: Conversation) -> Any:
    return conversation.protocol.session


# ---- offered, and allowed, to trusted clients only ------------------------------------------------------------------

def test_keywords_offered_to_trusted_clients_only() -> None:
    trusted = talk()
    assert trusted.send("EHLO proxy.test").lines[-2:] == (XCLIENT_KEYWORD, XFORWARD_KEYWORD)
    assert session(trusted).trusted
    stranger = talk("192.0.2.1")
    assert not any(line.startswith("X") for line in stranger.send("EHLO stranger.test").lines)
    nobody = talk(trusted=())  # no trusted networks at all: nobody is offered either
    assert not any(line.startswith("X") for line in nobody.send("EHLO proxy.test").lines)


@pytest.mark.parametrize("line", ["XCLIENT ADDR=192.0.2.7", "XCLIENT", "XCLIENT FOO=bar", "XFORWARD ADDR=192.0.2.7",
                                  "XFORWARD", "xforward name=x"])
def test_untrusted_client_is_refused(line: str) -> None:
    """Known to every client, refused (550 5.7.0, as Postfix) to those not on the trusted networks, whatever the
    syntax; the session is unchanged."""
    stranger = talk("192.0.2.1")
    assert stranger.send(line).code == 550  # before EHLO: no enhanced code on the wire
    stranger.send("EHLO stranger.test")
    expect(stranger, line, 550, "5.7.0", "Insufficient authorization")
    assert session(stranger).peer.host == "192.0.2.1" and session(stranger).forwarded is None
    assert not stranger.closed


def test_without_the_extensions_the_verbs_are_unknown() -> None:
    plain = talk(extensions=())
    plain.send("EHLO proxy.test")
    expect(plain, "XCLIENT ADDR=192.0.2.7", 500, "5.5.2")
    assert plain.handler.calls[-1].verb == "unknown"


def test_built_in_names() -> None:
    assert isinstance(resolve("xclient"), XClient) and isinstance(resolve("XFORWARD"), XForward)


# ---- XCLIENT ------------------------------------------------------------------------------------------------------

def test_xclient_restarts_with_a_new_greeting() -> None:
    """220 with the server's name (no enhanced code: it is a greeting), then the client must greet again."""
    proxy = talk()
    proxy.send("EHLO proxy.test")
    before = len(proxy.transport.value())
    proxy.write("XCLIENT ADDR=127.0.0.9 NAME=client.example.org\r\n")
    assert proxy.transport.value()[before:] == b"220 mx.test ESMTP Mail Server\r\n"
    proxy.replies()
    assert proxy.protocol.phase is Phase.CONNECTED
    assert session(proxy).helo is None
    expect(proxy, "MAIL FROM:<alice@example.org>", 503)  # not greeted: no enhanced codes either
    assert proxy.send("EHLO real-client.example.org").code == 250
    assert session(proxy).helo == "real-client.example.org" and session(proxy).esmtp
    assert proxy.handler.verbs.count("ehlo") == 2 and proxy.handler.verbs.count("connect") == 1


def test_xclient_then_greeting_pipelined() -> None:
    """nginx sends XCLIENT and the client's EHLO back to back: each gets its reply, in order."""
    proxy = talk()
    proxy.write("EHLO proxy.test\r\nXCLIENT ADDR=192.0.2.7\r\nEHLO client.example.org\r\nMAIL FROM:<a@example.org>\r\n")
    assert [reply.code for reply in proxy.replies()] == [250, 220, 250, 250]


def test_xclient_every_attribute() -> None:
    proxy = talk(handler=TraceHandler())
    proxy.send("EHLO proxy.test")
    expect(proxy, "XCLIENT NAME=mail.example.org ADDR=192.0.2.7 PORT=4242 PROTO=ESMTP HELO=helo.example.org "
                  "LOGIN=j+C3+B6rg+2Bmail DESTADDR=IPV6:2001:DB8:0:0::25 DESTPORT=587", 220)
    s = session(proxy)
    assert s.peer == ClientAddress("TCP", "192.0.2.7", 4242) and s.peer_ip == "192.0.2.7"
    assert s.client_name == "mail.example.org"
    assert s.authenticated == "jörg+mail" and s.auth_mechanism is None
    assert s.host == ClientAddress("TCP", "2001:db8::25", 587)
    assert not s.trusted  # judged again, from the new address
    proxy.send("EHLO helo.example.org")
    send_message(proxy)
    [trace] = proxy.handler.traces
    assert trace.startswith("Received: from helo.example.org (mail.example.org [192.0.2.7])"
                            " by mx.test with ESMTPA (authenticated as j?rg+mail) id T1 for <bob@example.org>;")
    assert proxy.handler.relay == [True]  # LOGIN: an authenticated client may relay


def test_xclient_address_decides_relay_and_trust() -> None:
    """Without LOGIN the relay rule sees the new address: 192.0.2.7 may not relay (the proxy at 127.0.0.1 could)."""
    proxy = talk()
    proxy.send("EHLO proxy.test")
    proxy.send("XCLIENT ADDR=192.0.2.7")
    assert session(proxy).peer == ClientAddress("TCP", "192.0.2.7", None)  # a new address: its port is unknown
    assert proxy.send("EHLO client.example.org").lines[-1] == "BINARYMIME"  # no XCLIENT for it
    expect(proxy, "XCLIENT ADDR=127.0.0.1", 550, "5.7.0")  # nor may the client behind the proxy send one
    expect(proxy, "XFORWARD ADDR=127.0.0.1", 550, "5.7.0")
    send_message(proxy, "bob@example.net")
    assert proxy.handler.relay == [False]
    assert proxy.handler.traces[0].startswith("Received: from client.example.org (192.0.2.7 [192.0.2.7])")


def test_xclient_trusted_address_stays_trusted() -> None:
    proxy = talk()
    proxy.send("XCLIENT ADDR=127.0.0.5 PORT=1")  # before EHLO too: outside a transaction is enough
    assert session(proxy).trusted
    proxy.send("EHLO proxy.test")
    expect(proxy, "XCLIENT NAME=second.example.org", 220)  # a second one, still allowed
    s = session(proxy)
    assert (s.peer, s.client_name) == (ClientAddress("TCP", "127.0.0.5", 1), "second.example.org")


def test_xclient_ipv6_and_unavailable_values() -> None:
    proxy = talk()
    proxy.send("EHLO proxy.test")
    proxy.send("XCLIENT ADDR=IPV6:2001:db8::7 NAME=[TEMPUNAVAIL] LOGIN=[UNAVAILABLE]")
    s = session(proxy)
    assert (s.peer.host, s.peer.port, s.client_name, s.authenticated) == ("2001:db8::7", None, None, None)
    proxy.send("EHLO client.test")
    send_message(proxy)
    assert proxy.handler.traces[0].startswith("Received: from client.test (2001:db8::7 [IPv6:2001:db8::7])")
    unknown = talk()
    unknown.send("XCLIENT ADDR=[UNAVAILABLE] NAME=[UNAVAILABLE] PORT=[UNAVAILABLE] PROTO=[UNAVAILABLE] "
                  "HELO=[UNAVAILABLE] DESTADDR=[UNAVAILABLE] DESTPORT=[UNAVAILABLE]")
    s = session(unknown)
    assert (s.peer_ip, s.peer.port, s.client_name, s.host) == ("", None, None, ClientAddress("TCP", "", None))
    assert not s.trusted
    unknown.send("EHLO client.test")
    send_message(unknown)
    assert unknown.handler.traces[0].startswith("Received: from client.test by mx.test with ESMTP id T1")


def test_xclient_port_alone_keeps_the_address_and_a_new_address_drops_the_port() -> None:
    proxy = talk()
    proxy.send("XCLIENT PORT=2525 DESTPORT=26")
    s = session(proxy)
    assert (s.peer, s.host) == (ClientAddress("TCP", "127.0.0.1", 2525), ClientAddress("TCP", "127.0.0.1", 26))
    assert s.trusted
    proxy.send("XCLIENT DESTADDR=192.0.2.25")  # a new address without a port: the port is unknown
    assert (s.peer.port, s.host) == (2525, ClientAddress("TCP", "192.0.2.25", None))


@pytest.mark.parametrize("argument, text", [
    ("", "Syntax: XCLIENT attribute=value..."),
    ("ADDR", "Bad XCLIENT attribute name: ADDR"),
    ("FOO=bar", "Bad XCLIENT attribute name: FOO"),
    ("IDENT=abc", "Bad XCLIENT attribute name: IDENT"),
    ("=x", "Bad XCLIENT attribute name"),
    ("ADDR=", "Bad XCLIENT ADDR syntax"),
    ("ADDR=192.0.2.300", "Bad XCLIENT ADDR syntax"),
    ("ADDR=2001:db8::1", "Bad XCLIENT ADDR syntax"),  # IPv6 only after IPV6:
    ("ADDR=IPV6:192.0.2.1", "Bad XCLIENT ADDR syntax"),
    ("ADDR=[192.0.2.1]", "Bad XCLIENT ADDR syntax"),
    ("DESTADDR=host.example", "Bad XCLIENT DESTADDR syntax"),
    ("PORT=65536", "Bad XCLIENT PORT syntax"),
    ("PORT=-1", "Bad XCLIENT PORT syntax"),
    ("DESTPORT=x", "Bad XCLIENT DESTPORT syntax"),
    ("PROTO=LMTP", "Bad XCLIENT PROTO syntax"),
    ("NAME=bad_name!", "Bad XCLIENT NAME syntax"),
    ("NAME=" + "a" * 64 + ".example", "Bad XCLIENT NAME syntax"),
    ("NAME=[TEMPUNAVAIL]x", "Bad XCLIENT NAME syntax"),
    ("HELO=" + "h" * 256, "Bad XCLIENT HELO syntax"),
    ("HELO=a+20b", "Bad XCLIENT HELO syntax"),  # a space, once decoded
    ("LOGIN=a+0Ab", "Bad XCLIENT LOGIN syntax"),  # a line feed, once decoded
    ("LOGIN=a+2", "Bad XCLIENT LOGIN syntax"),  # not xtext
    ("LOGIN=a+c3", "Bad XCLIENT LOGIN syntax"),  # xtext's hex digits are upper case
    ("LOGIN=+FF", "Bad XCLIENT LOGIN syntax"),  # not UTF-8
    ("NAME=ok.example ADDR=bad", "Bad XCLIENT ADDR syntax"),
])
def test_xclient_bad_syntax(argument: str, text: str) -> None:
    """501 5.5.4; nothing of a bad command is used, not even its good attributes."""
    proxy = talk()
    proxy.send("EHLO proxy.test")
    expect(proxy, f"XCLIENT {argument}".rstrip(), 501, "5.5.4", text)
    s = session(proxy)
    assert (s.peer.host, s.client_name, s.trusted, s.helo) == ("127.0.0.1", None, True, "proxy.test")
    assert proxy.protocol.phase is Phase.GREETED


def test_xclient_attribute_names_are_case_insensitive() -> None:
    proxy = talk()
    expect(proxy, "xclient addr=192.0.2.7 Name=Mail.Example.Org", 220)
    assert (session(proxy).peer_ip, session(proxy).client_name) == ("192.0.2.7", "Mail.Example.Org")


def test_xclient_not_inside_a_transaction() -> None:
    proxy = talk()
    proxy.send("EHLO proxy.test")
    proxy.send("MAIL FROM:<alice@example.org>")
    expect(proxy, "XCLIENT ADDR=192.0.2.7", 503, "5.5.1")
    proxy.send("RCPT TO:<bob@example.org>")
    expect(proxy, "XCLIENT ADDR=192.0.2.7", 503, "5.5.1")
    assert session(proxy).peer_ip == "127.0.0.1"
    proxy.send("RSET")
    expect(proxy, "XCLIENT ADDR=192.0.2.7", 220)


def test_long_lines() -> None:
    """Every attribute at its longest fits in one command (512 + 1024 octets); a longer line does not."""
    name = ".".join(["n" * 63] * 3) + "." + "n" * 61  # 253 characters
    login = "+C3+B6" * 85  # 85 characters, 6 octets each in xtext
    line = (f"XCLIENT NAME={name} ADDR=IPV6:2001:db8:1:2:3:4:5:6 PORT=65535 PROTO=ESMTP HELO={name} "
            f"LOGIN={login} DESTADDR=IPV6:2001:db8:1:2:3:4:5:7 DESTPORT=65535")
    assert 1024 < len(line) < 512 + 1024 - 2
    proxy = talk()
    expect(proxy, line, 220)
    assert (session(proxy).client_name, session(proxy).authenticated) == (name, "\u00f6" * 85)
    forward = talk()
    forward.send("EHLO filter.test")
    expect(forward, f"XFORWARD NAME={name} HELO={name} IDENT={'i' * 255} ADDR=192.0.2.7", 250, "2.0.0")
    too_long = talk()
    too_long.send("EHLO proxy.test")
    expect(too_long, "XCLIENT NAME=a " + "x" * 1536, 500, "5.5.2", "Line too long")


# ---- XFORWARD -----------------------------------------------------------------------------------------------------

def test_xforward_names_the_client_of_the_next_message() -> None:
    """Incremental attributes, 250 2.0.0 Ok; the Received: field shows the forwarded client for that message
    only; the relay rule still judges the connection's client (the filter)."""
    filter_ = talk()
    filter_.send("EHLO filter.test")
    expect(filter_, "XFORWARD NAME=mail.example.org ADDR=192.0.2.7 PROTO=ESMTP HELO=client.example.org", 250,
           "2.0.0", "Ok")
    expect(filter_, "XFORWARD PORT=4242 IDENT=4AbC12 SOURCE=remote", 250, "2.0.0")
    s = session(filter_)
    assert forwarded_client(s) is None  # no message yet
    assert s.forwarded == Forwarded("mail.example.org", "192.0.2.7", 4242, "ESMTP", "client.example.org",
                                    "4AbC12", "REMOTE", transaction=1)
    send_message(filter_, "bob@example.net")
    send_message(filter_, "bob@example.net")
    first, second = filter_.handler.traces
    assert first.startswith("Received: from client.example.org (mail.example.org [192.0.2.7])"
                            " by mx.test with ESMTP id T1 for <bob@example.net>;"), first
    assert second.startswith("Received: from filter.test (127.0.0.1 [127.0.0.1])"), second
    assert filter_.handler.relay == [True, True]
    assert s.peer_ip == "127.0.0.1" and s.trusted  # the connection's own client is unchanged


def test_xforward_partial_and_unavailable() -> None:
    """What XFORWARD does not say about the forwarded client is unknown (not the filter's own values)."""
    filter_ = talk()
    filter_.send("EHLO filter.test")
    filter_.send("XFORWARD ADDR=IPV6:2001:db8::7 NAME=[UNAVAILABLE] HELO=[UNAVAILABLE] PROTO=SMTP")
    send_message(filter_)
    assert filter_.handler.traces[0].startswith("Received: from unknown (2001:db8::7 [IPv6:2001:db8::7])"
                                                " by mx.test with SMTP id T1")
    other = talk()
    other.send("EHLO filter.test")
    other.send("XFORWARD ADDR=local-socket NAME=[TEMPUNAVAIL] PROTO=[UNAVAILABLE]")  # a non-IP address is allowed
    send_message(other)
    assert other.handler.traces[0].startswith("Received: from unknown (local-socket [local-socket])"
                                              " by mx.test with ESMTP id T1")


def test_xforward_forgotten_after_an_abandoned_transaction() -> None:
    filter_ = talk()
    filter_.send("EHLO filter.test")
    filter_.send("XFORWARD ADDR=192.0.2.7")
    expect(filter_, "MAIL FROM:<a b@example.org>", 501, "5.1.7")  # refused: the attributes wait
    filter_.send("MAIL FROM:<alice@example.org>")
    assert forwarded_client(session(filter_)).addr == "192.0.2.7"
    filter_.send("RSET")
    filter_.send("XFORWARD HELO=later.example.org")  # a new message: the old ADDR does not carry over
    assert session(filter_).forwarded == Forwarded(helo="later.example.org", transaction=2)
    send_message(filter_)
    assert filter_.handler.traces[0].startswith("Received: from later.example.org by mx.test")


def test_xclient_forgets_xforward() -> None:
    both = talk()
    both.send("EHLO filter.test")
    both.send("XFORWARD ADDR=192.0.2.7")
    both.send("XCLIENT NAME=proxy.example.org")
    assert session(both).forwarded is None


@pytest.mark.parametrize("argument, text", [
    ("", "Syntax: XFORWARD attribute=value..."),
    ("LOGIN=bob", "Bad XFORWARD attribute name: LOGIN"),
    ("NAME", "Bad XFORWARD attribute name: NAME"),
    ("ADDR=IPV6:nope", "Bad XFORWARD ADDR syntax"),
    ("ADDR=a+20b", "Bad XFORWARD ADDR syntax"),
    ("PORT=70000", "Bad XFORWARD PORT syntax"),
    ("PROTO=" + "P" * 65, "Bad XFORWARD PROTO syntax"),
    ("SOURCE=ELSEWHERE", "Bad XFORWARD SOURCE syntax"),
    ("IDENT=" + "i" * 256, "Bad XFORWARD IDENT syntax"),
    ("HELO=a+0Db", "Bad XFORWARD HELO syntax"),
    ("NAME=ok ADDR=192.0.2.7 PORT=x", "Bad XFORWARD PORT syntax"),
])
def test_xforward_bad_syntax(argument: str, text: str) -> None:
    filter_ = talk()
    filter_.send("EHLO filter.test")
    expect(filter_, f"XFORWARD {argument}".rstrip(), 501, "5.5.4", text)
    assert session(filter_).forwarded is None


def test_xforward_not_inside_a_transaction() -> None:
    filter_ = talk()
    filter_.send("EHLO filter.test")
    filter_.send("MAIL FROM:<alice@example.org>")
    expect(filter_, "XFORWARD ADDR=192.0.2.7", 503, "5.5.1")
    assert session(filter_).forwarded is None
    filter_.send("RSET")
    expect(filter_, "XFORWARD ADDR=192.0.2.7", 250, "2.0.0")


def test_the_monitor_hears_the_client_replaced() -> None:
    """The log keeps the proxy's address: XCLIENT reports it with the client it named (`client.replaced`)."""
    from esmtpkit.server.monitor import Monitor

    class Heard(Monitor):
        def __init__(self) -> None:
            self.calls: list[tuple[str, str, str]] = []

        def client_replaced(self, session: Any, verb: str, previous: str) -> None:
            self.calls.append((verb, previous, session.peer_ip))

    heard = Heard()
    conversation = Conversation(TraceHandler(), policy(extensions=(XClient(),), trusted_networks=TRUSTED),
                                peer=("127.0.0.5", 40000), monitor=heard)
    conversation.send("EHLO proxy.example")
    expect(conversation, "XCLIENT ADDR=192.0.2.7 NAME=mail.example.org", 220)
    assert heard.calls == [("XCLIENT", "127.0.0.5", "192.0.2.7")]
    conversation.send("EHLO client.example")
    expect(conversation, "XCLIENT ADDR=192.0.2.8", 550, "5.7.0")  # 192.0.2.7 is not trusted: nothing more heard
    assert len(heard.calls) == 1


def test_a_new_address_forgets_the_proxys_login() -> None:
    conversation = talk()
    conversation.protocol.session.authenticated = "proxy-user"
    conversation.send("EHLO proxy.example")
    expect(conversation, "XCLIENT ADDR=127.0.0.9", 220)
    assert conversation.protocol.session.authenticated is None
    conversation.send("EHLO proxy.example")
    expect(conversation, "XCLIENT ADDR=127.0.0.10 LOGIN=alice", 220)
    assert conversation.protocol.session.authenticated == "alice"


def test_keep_trust_lets_a_proxy_split_its_attributes() -> None:
    """Postfix keeps the proxy's authorization for the connection; XClient(keep_trust=True) does too."""
    kept = talk(extensions=(XClient(keep_trust=True),))
    kept.send("EHLO proxy.example")
    expect(kept, "XCLIENT NAME=mail.example.org ADDR=192.0.2.7", 220)
    expect(kept, "XCLIENT HELO=mail.example.org PROTO=ESMTP", 220)
    assert (kept.protocol.session.peer_ip, kept.protocol.session.client_name) == ("192.0.2.7", "mail.example.org")
    judged = talk()
    judged.send("EHLO proxy.example")
    expect(judged, "XCLIENT NAME=mail.example.org ADDR=192.0.2.7", 220)
    judged.send("EHLO mail.example.org")
    expect(judged, "XCLIENT HELO=mail.example.org PROTO=ESMTP", 550, "5.7.0")
