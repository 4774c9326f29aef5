"""SMTP smuggling through the Relay, end to end: what a next hop offering only 8BITMIME receives.

A recording next hop (`tests.processes.RecordingNextHop`) reads DATA as hops open to smuggling do (a dot line
between any mix of CR, LF and CRLF ends it) or strictly (only CRLF.CRLF). Clients send, octet for octet, the
payloads that smuggle a second message past a lenient hop: a bare-LF dot line in DATA (the relay server runs with
``bare_newline="allow"``), BDAT content ending without CRLF, and ``BODY=BINARYMIME``. Each time the hop must see
exactly one message per accepted one, no bare CR or LF anywhere, and CRLF before the terminating dot; binary
content, which this hop cannot take, is not sent to it at all (the client gets 554 5.6.3 after BDAT LAST). The same
runs against an in-process server and against a real ``twistd esmtpkit --handler esmtpkit.handlers.relay.Relay``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import threads

from esmtpkit.core.content import python_has_bare_newline
from esmtpkit.handlers import Relay
from esmtpkit.server.policy import Policy
from esmtpkit.testing import serve

from .support import RawClient, RecordingNextHop, Twistd

ENVELOPE = b"MAIL FROM:<alice@example.com>%s\r\nRCPT TO:<bob@example.net>\r\n"

#: A forged second message after a dot line, with each line-end mix a lenient next hop may take for the end of data.
SEPARATORS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n"]
#: Binary content (any octet goes with BODY=BINARYMIME) hiding the same kind of second message.
BINARY = b"hi\n.\nMAIL FROM:<ceo@bank.example>\nRCPT TO:<victim@example.net>\nDATA\n\npay now\n.\n"


def forged(separator: bytes) -> bytes:
    """Content whose ``separator`` hides a second transaction from a forged sender."""
    nl = separator[-1:]
    return (b"Subject: hello\r\n\r\nhello" + separator + b"MAIL FROM:<ceo@bank.example>" + nl
            + b"RCPT TO:<victim@example.net>" + nl + b"DATA" + nl + b"Subject: forged" + nl + nl + b"pay now" + nl
            + separator[1:])


def code(reply: bytes) -> bytes:
    """``"250 2.0.0"`` style: the reply code and, if any, the enhanced code of a reply's last line."""
    last = reply.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
    match = re.match(rb"\d{3} (?:\d\.\d{1,3}\.\d{1,3})?", last)
    assert match is not None, reply
    return match.group(0).strip()


def send_payloads(address: tuple[str, int]) -> dict[str, list[bytes]]:
    """Every smuggling payload, one session each; by name, the replies that matter (runs in a thread)."""
    finals: dict[str, list[bytes]] = {}

    def session(name: str, steps: Callable[[RawClient], list[bytes]]) -> None:
        client = RawClient(address)
        try:
            client.send(b"EHLO client.test\r\n")
            finals[name] = steps(client)
        finally:
            client.close()

    def data(content: bytes) -> Callable[[RawClient], list[bytes]]:
        def steps(client: RawClient) -> list[bytes]:
            assert client.send(ENVELOPE % b"" + b"DATA\r\n", 3)[-1].startswith(b"354")
            return client.send(content + b"\r\n.\r\n")
        return steps

    def bdat(content: bytes, body: bytes = b" BODY=8BITMIME") -> Callable[[RawClient], list[bytes]]:
        def steps(client: RawClient) -> list[bytes]:
            return client.send(ENVELOPE % body + b"BDAT %d LAST\r\n" % len(content) + content, 3)
        return steps

    for n, separator in enumerate(SEPARATORS):
        session(f"data-{n}", data(forged(separator)))
    session("bdat-no-line-end", bdat(b"Subject: bdat\r\n\r\nhello\n.\nMAIL FROM:<ceo@bank.example>"))
    session("bdat-bare-lf-end", bdat(b"Subject: bdat\r\n\r\nhello\r\n.\n"))
    session("bdat-bare-cr-end", bdat(b"Subject: bdat\r\n\r\nhello\r"))
    session("binarymime", bdat(BINARY, b" BODY=BINARYMIME"))
    return finals


def check_next_hop(hop: RecordingNextHop, finals: dict[str, list[bytes]]) -> None:
    """One message at the hop per accepted one, each from the real sender; the wire clean; binary content never
    sent to a hop without BINARYMIME (its session: EHLO and QUIT), the client told so after BDAT LAST."""
    accepted = len(finals) - 1
    assert [(m.sender, m.recipients) for m in hop.messages] == [("alice@example.com", ("bob@example.net",))] * accepted
    assert len(hop.sessions) == accepted + 1
    *sessions, binary = hop.sessions
    assert bytes(binary) == b"EHLO relay.test\r\nQUIT\r\n", binary
    for raw in sessions:
        wire = bytes(raw)
        assert not python_has_bare_newline(wire), wire
        data = wire[wire.index(b"\r\nDATA\r\n") + 8:]
        assert data.endswith(b"\r\n.\r\nQUIT\r\n") or data.endswith(b"\r\n.\r\nRSET\r\nQUIT\r\n"), wire
        assert data.count(b"\r\n.\r\n") == 1, wire
    for message in hop.messages:
        assert message.data.endswith(b"\r\n")
    assert [code(reply) for reply in finals.pop("binarymime")] == [b"250 2.1.0", b"250 2.1.5", b"554 5.6.3"]
    assert {name: code(replies[-1]) for name, replies in finals.items()} == {name: b"250 2.0.0" for name in finals}


@pytest_twisted.inlineCallbacks
@pytest.mark.parametrize("lenient", [True, False], ids=["lenient-hop", "strict-hop"])
def test_relay_server_passes_on_nothing_smuggled(lenient: bool) -> Any:
    """An esmtpkit server with the Relay handler and ``bare_newline="allow"``, in this process."""
    from twisted.internet import reactor

    hop = yield RecordingNextHop(lenient=lenient).listen(reactor)
    relay = yield serve(lambda: Relay(port=hop.port, timeout=10), reactor=reactor,
                        policy=Policy(hostname="relay.test", bare_newline="allow"))
    try:
        finals = yield threads.deferToThread(send_payloads, relay.address)
    finally:
        yield relay.stop()
        yield hop.stop()
    check_next_hop(hop, finals)


@pytest_twisted.inlineCallbacks
def test_twistd_relay_passes_on_nothing_smuggled(tmp_path: Path) -> Any:
    """A real ``twistd -n esmtpkit --handler esmtpkit.handlers.relay.Relay --bare-newline allow`` process."""
    from twisted.internet import reactor

    hop = yield RecordingNextHop(lenient=True).listen(reactor)
    server = None
    try:
        server = yield threads.deferToThread(
            Twistd, tmp_path, "--hostname", "relay.test", "--bare-newline", "allow",
            "--handler", "esmtpkit.handlers.relay.Relay", "--handler-option", "host=127.0.0.1",
            "--handler-option", f"port={hop.port}", "--handler-option", "timeout=10")
        finals = yield threads.deferToThread(send_payloads, ("127.0.0.1", server.port))
    finally:
        if server is not None:
            yield threads.deferToThread(server.stop)
        yield hop.stop()
    check_next_hop(hop, finals)
    assert "Traceback" not in server.log_text()
