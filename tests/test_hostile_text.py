"""Client text with control characters: refused in addresses, escaped in every log event, text and JSON."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.logger import Logger, LogLevel, eventAsText, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core.escape import UNSAFE
from esmtpkit.handlers.base import MessageHandler
from esmtpkit.ops.logformat import json_lines_observer
from esmtpkit.server.monitor import EventLog
from esmtpkit.server.policy import Policy
from esmtpkit.core.reply import SMTPReply
from esmtpkit.server.sasl import portal_from_strings
from esmtpkit.testing import Conversation

#: What a hostile client puts in its text: clear the screen, form feed, the separators ``splitlines`` breaks on.
ESC = "\x1b[2J\x0c\x1c\x1d\x1e"
#: The same text as a log line shows it.
SHOWN = "\\x1b[2J\\x0c\\x1c\\x1d\\x1e"


class EchoingHandler(MessageHandler):
    """Refuses with replies that quote what the client sent, as many real handlers do."""

    def ehlo(self, domain: str) -> Any:
        if domain != "client.test":
            raise SMTPReply(550, f"5.7.1 {domain} is not a host name")
        return super().ehlo(domain)

    def vrfy(self, argument: str) -> Any:
        raise SMTPReply(550, f"5.1.1 {argument}: no such user")


def talk(handler: Any = None, monitor: Any = None, peer: str = "192.0.2.1", **policy: Any) -> Conversation:
    policy.setdefault("hostname", "mx.test")
    return Conversation(handler or MessageHandler(), Policy(**policy), monitor=monitor, peer=(peer, 40000))


class AddressRefusalTests(SynchronousTestCase):
    """MAIL and RCPT refuse control characters in paths with the reply for bad address syntax (RFC 5321 §4.1.2)."""

    def setUp(self) -> None:
        self.t = talk()

    def tearDown(self) -> None:
        self.t.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.t.clock.getDelayedCalls(), [])

    def exchange(self, *lines: str) -> bytes:
        start = len(self.t.transport.value())
        for line in lines:
            self.t.write(line.encode("utf-8") + b"\r\n")
        return self.t.transport.value()[start:]

    def test_rcpt_with_escape_sequence(self) -> None:
        got = self.exchange("EHLO client.test", "MAIL FROM:<a@example.org>", f"RCPT TO:<x{ESC}@example.com>",
                            'RCPT TO:<"x\x1b[2J"@example.com>', "RCPT TO:<ok@example.com>")
        self.assertEqual(got.split(b"\r\n")[-5:], [
            b"250 2.1.0 <a@example.org>, sender ok",
            b"501 5.1.3 Bad address syntax: character U+001B not allowed in an address",
            b"501 5.1.3 Bad address syntax: character U+001B not allowed in an address",
            b"250 2.1.5 <ok@example.com>, recipient ok",
            b""])
        self.assertEqual(self.t.protocol.session.envelope.recipients, ["ok@example.com"])

    def test_mail_with_escape_sequence(self) -> None:
        got = self.exchange("EHLO client.test", f"MAIL FROM:<x{ESC}@example.com>")
        self.assertTrue(got.endswith(
            b"\r\n501 5.1.7 Bad address syntax: character U+001B not allowed in an address\r\n"), got)
        self.assertIsNone(self.t.protocol.session.envelope.sender)

    def test_smtputf8_line_separator_and_c1_controls(self) -> None:
        """SMTPUTF8 admits UTF-8 mailboxes (RFC 6531), not U+2028, C1 controls or bidirectional overrides."""
        got = self.exchange("EHLO client.test", "MAIL FROM:<j\u00f6rg@example.org> SMTPUTF8",
                            "RCPT TO:<x\u2028Received: forged@example.com>", 'RCPT TO:<"x\u0085y"@example.com>',
                            "RCPT TO:<moc.elpmaxe@\u202ex>", "RCPT TO:<\u00fcn\u00efcode@example.net>")
        self.assertEqual(got.decode("utf-8").split("\r\n")[-6:], [
            "250 2.1.0 <j\u00f6rg@example.org>, sender ok",
            "501 5.1.3 Bad address syntax: character U+2028 not allowed in an address",
            "501 5.1.3 Bad address syntax: character U+0085 not allowed in an address",
            "501 5.1.3 Bad address syntax: character U+202E not allowed in an address",
            "250 2.1.5 <\u00fcn\u00efcode@example.net>, recipient ok",
            ""])


def _strings(value: Any) -> list[str]:
    """Every string inside an event value (nested lists and dicts too)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(k) + _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


class LogEventTests(SynchronousTestCase):
    """A hostile EHLO name, address, AUTH user and unknown command leave no raw control in any event."""

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.monitor = EventLog(Logger(namespace="esmtpkit.events", observer=self.events.append))

    def hostile_session(self, peer: str = "192.0.2.1") -> Conversation:
        t = talk(EchoingHandler(), self.monitor, peer, portal=portal_from_strings(["memory:alice:secret"]),
                 auth_require_tls=False)
        for line in (f"EHLO evil{ESC}.example", "EHLO client.test",
                     "AUTH PLAIN " + base64.b64encode(f"\0al{ESC}ice\u2028\0wrong".encode()).decode(),
                     f"MAIL FROM:<x{ESC}@example.com>", "MAIL FROM:<a@example.org>",
                     f"RCPT TO:<\"x{ESC}\"@example.com>", f"VRFY {ESC}\u202eroot", f"{ESC} unknown"):
            t.write(line.encode("utf-8") + b"\r\n")
        t.write(b"QUIT\r\n")
        t.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(t.clock.getDelayedCalls(), [])
        return t

    def check_clean(self) -> None:
        self.assertTrue(self.events)
        for event in self.events:
            for text in _strings({k: v for k, v in event.items() if k != "log_logger"}) + [formatEvent(event)]:
                self.assertIsNone(UNSAFE.search(text), f"{event.get('event')}: {text!r}")
            self.assertIsNone(UNSAFE.search(eventAsText(event)), event)

    def test_text_format(self) -> None:
        self.hostile_session()
        self.check_clean()
        texts = [formatEvent(e) for e in self.events]
        self.assertIn(f"EHLO answered 550 5.7.1 evil{SHOWN}.example is not a host name", "\n".join(texts))
        self.assertIn(f"VRFY answered 550 5.1.1 {SHOWN}\\u202eroot: no such user", "\n".join(texts))
        self.assertIn("MAIL answered 501 5.1.7 Bad address syntax: character U+001B not allowed", "\n".join(texts))
        [failed] = [e for e in self.events if e["event"] == "auth.failed"]
        self.assertEqual(failed["user"], f"al{SHOWN}ice\\u2028")
        self.assertIn(f"AUTH PLAIN failed for al{SHOWN}ice\\u2028: 535", formatEvent(failed))
        unknown = [e for e in self.events if e["event"] == "reply.error" and e["verb"] == "UNKNOWN"]
        self.assertEqual([e["reply_text"] for e in unknown], [""])

    def test_json_format(self) -> None:
        """``--log-format json`` writes the escaped text: a consumer decoding the JSON gets no control either."""
        self.hostile_session()
        out = io.StringIO()
        observe = json_lines_observer(out)
        for event in self.events:
            observe(event)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), len(self.events))
        for line in lines:
            decoded = json.loads(line)
            for text in _strings(decoded):
                self.assertIsNone(UNSAFE.search(text), text)
        [error] = [json.loads(line) for line in lines if '"verb": "EHLO"' in line]
        self.assertEqual(error["reply_text"], f"evil{SHOWN}.example is not a host name")
        self.assertIn(f"evil{SHOWN}.example", error["text"])

    def test_peer_from_an_unchecked_proxy_header(self) -> None:
        """Twisted's own ``haproxy:`` endpoint takes the peer's address from the header unchecked."""
        self.hostile_session(peer=f"192.0.2.1{ESC}")
        self.check_clean()
        self.assertEqual({e["peer"] for e in self.events}, {f"192.0.2.1{SHOWN}"})


class ProtocolLogTests(SynchronousTestCase):
    """The protocol's own log lines (not events) name the peer escaped too."""

    def test_early_talker(self) -> None:
        seen: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        t = talk(peer=f"192.0.2.1{ESC}", pregreet_delay=1.0)
        t.write(b"EHLO fast.example\r\n")
        t.clock.advance(1.0)
        t.protocol.connectionLost(Failure(ConnectionDone()))
        [event] = [e for e in seen if e.get("log_format") == "early talker {peer} refused"]
        self.assertEqual(formatEvent(event), f"early talker 192.0.2.1{SHOWN} refused")
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(t.clock.getDelayedCalls(), [])
