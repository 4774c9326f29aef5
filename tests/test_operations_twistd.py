"""Operating a real ``twistd esmtpkit``: the JSON event log and the Prometheus endpoint after known exchanges,
with one process and with a supervisor of two workers.
"""

from __future__ import annotations

import json
import re
import smtplib
import subprocess
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from esmtpkit.core.ids import ID_LENGTH

from .support import TWISTD, _env, needs_proc, terminate, wait_for

PASSWORD = "Corr3ct-h0rse-battery"
WRONG = "wr0ng-Passw0rd-guess"
ACCEPTED = b"Subject: hello\r\n\r\nan ordinary message body\r\n"
REFUSED = b"Subject: offer\r\n\r\nbuy SPAM now, this body text stays private\r\n"


class Server:
    """``twistd -n esmtpkit --log-format json --metrics tcp:0`` on loopback; its log is JSON lines in a file."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.log = cwd / "events.json"
        self.maildir = cwd / "Maildir"
        passwd = cwd / "passwd"
        passwd.write_text(f"alice:{PASSWORD}\n")
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "--logfile", str(self.log), "esmtpkit", "--log-format", "json",
             "--metrics", "tcp:0:interface=127.0.0.1", "--handler", "tests.refusing_handler.RefusingMaildir",
             "--maildir", str(self.maildir), "--hostname", "mx.test", "--auth", f"file:{passwd}",
             "--auth-over-plaintext", "--listen", "tcp:0:interface=127.0.0.1", *args],
            cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def events(self) -> list[dict[str, Any]]:
        """Every event logged so far, one JSON object per line."""
        if self.process.poll() is not None:
            out = self.process.stdout.read().decode() if self.process.stdout else ""
            raise AssertionError(f"twistd exited: {out}")
        if not self.log.exists():
            return []
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def port_of(self, factory: str) -> int:
        def find() -> int | None:
            for event in self.events():
                match = re.fullmatch(rf"{factory} starting on (\d+)", event.get("text", ""))
                if match:
                    return int(match.group(1))
            return None

        return int(wait_for(find, f"{factory} to listen"))

    def scrape(self, port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The metrics endpoint's samples, by (name, sorted labels)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            text = response.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def stop(self) -> None:
        terminate(self.process, 60)


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    started = Server(tmp_path, *getattr(request, "param", ()))
    yield started
    started.stop()


def exchange(port: int) -> list[tuple[int, bytes]]:
    """One session: a wrong password, the right one, an accepted message, a refused one, QUIT."""
    results = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.user, client.password = "alice", WRONG
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.auth("PLAIN", client.auth_plain)  # login() would go on to try every mechanism
        client.password = PASSWORD
        assert client.auth("PLAIN", client.auth_plain)[0] == 235
        for content in (ACCEPTED, REFUSED):
            client.mail("sender@example.com")
            client.rcpt("one@example.net")
            client.rcpt("two@example.net")
            results.append(client.data(content))
    return results


def test_json_log_events_and_metrics(server: Server) -> None:
    """The JSON log has the documented events with ids matching the replies; the metrics count the exchange
    exactly; no password and no body text reaches the log."""
    port = server.port_of("ESMTPFactory")
    metrics_port = server.port_of("Site")
    (ok_code, ok_text), (no_code, no_text) = exchange(port)
    assert (ok_code, no_code) == (250, 554)
    queued = re.fullmatch(rb"2\.0\.0 Ok: queued as (\S+)", ok_text)
    assert queued, ok_text
    message_id = queued.group(1).decode()
    assert len(message_id) == ID_LENGTH

    closed = wait_for(lambda: [e for e in server.events() if e.get("event") == "connection.closed"],
                      "connection.closed")
    events = [e for e in server.events() if e.get("log_namespace") == "esmtpkit.events"]
    names = [e["event"] for e in events]
    assert names == ["connection.opened", "auth.failed", "reply.error", "auth.succeeded", "message.accepted",
                     "message.rejected", "reply.error", "connection.closed"], names
    conn = closed[0]["conn"]
    assert {e["conn"] for e in events} == {conn}
    assert closed[0]["reason"] == "QUIT" and closed[0]["messages"] == 2 and closed[0]["user"] == "alice"

    [accepted] = [e for e in events if e["event"] == "message.accepted"]
    assert (accepted["id"], accepted["sender"], accepted["recipients"], accepted["size"]) == \
        (message_id, "sender@example.com", 2, len(ACCEPTED))
    assert accepted["log_level"]["name"] == "info" and accepted["text"].startswith(f"message {message_id} accepted")
    [rejected] = [e for e in events if e["event"] == "message.rejected"]
    assert (rejected["code"], rejected["enhanced"], rejected["text"].split(":")[0]) == \
        (554, "5.7.1", f"message {rejected['id']} rejected")
    assert rejected["id"] != message_id and len(rejected["id"]) == ID_LENGTH
    [failed] = [e for e in events if e["event"] == "auth.failed"]
    assert (failed["mechanism"], failed["user"], failed["code"]) == ("PLAIN", "alice", 535)

    # The accepted message is in the Maildir under its id; the refused one is nowhere.
    [delivered] = list((server.maildir / "new").iterdir())
    assert f"I{message_id}." in delivered.name
    assert f"id {message_id}".encode() in delivered.read_bytes()
    assert list((server.maildir / "tmp").iterdir()) == []

    log = server.log.read_text()
    for secret in (PASSWORD, WRONG, "this body text stays private", "ordinary message body"):
        assert secret not in log

    samples = server.scrape(metrics_port)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("esmtpkit_connections_total") == 1
    assert value("esmtpkit_connections_current") == 0
    assert value("esmtpkit_messages_total", outcome="accepted") == 1
    assert value("esmtpkit_messages_total", outcome="rejected") == 1
    assert value("esmtpkit_messages_total", outcome="aborted") == 0
    assert value("esmtpkit_auth_total", mechanism="PLAIN", result="ok") == 1
    assert value("esmtpkit_auth_total", mechanism="PLAIN", result="failed") == 1
    assert value("esmtpkit_replies_total", verb="MAIL", **{"class": "2xx"}) == 2
    assert value("esmtpkit_replies_total", verb="RCPT", **{"class": "2xx"}) == 4
    assert value("esmtpkit_replies_total", verb="DATA", **{"class": "3xx"}) == 2
    assert value("esmtpkit_replies_total", verb="DATA", **{"class": "2xx"}) == 1
    assert value("esmtpkit_replies_total", verb="DATA", **{"class": "5xx"}) == 1
    assert value("esmtpkit_replies_total", verb="AUTH", **{"class": "5xx"}) == 1
    assert value("esmtpkit_replies_total", verb="QUIT", **{"class": "2xx"}) == 1
    assert value("esmtpkit_message_size_bytes_count") == 1
    assert value("esmtpkit_message_size_bytes_sum") == len(ACCEPTED)
    assert value("esmtpkit_received_bytes_total") == len(ACCEPTED) + len(REFUSED)
    assert value("esmtpkit_handler_seconds_count", verb="eom") == 2
    assert value("esmtpkit_timeouts_total") == 0


@needs_proc
@pytest.mark.parametrize("server", [("--workers", "2")], indirect=True)
def test_workers_metrics_are_summed(server: Server) -> None:
    """Under --workers 2 the supervisor serves one endpoint with the sum of what every worker counted, and
    writes the workers' events into its JSON log."""
    port = int(wait_for(lambda: next((int(m.group(1)) for e in server.events()
                                      for m in [re.search(r"listening on 127\.0\.0\.1:(\d+) for the workers",
                                                          e.get("text", ""))] if m), None), "the shared port"))
    metrics_port = server.port_of("Site")
    wait_for(lambda: len({e.get("worker_pid") for e in server.events()
                          if re.fullmatch(r"ESMTPFactory starting on \d+", e.get("text", ""))}) == 2,
             "both workers listening")
    sessions = 6
    for _ in range(sessions):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.login("alice", PASSWORD)
            client.sendmail("sender@example.com", ["one@example.net"], ACCEPTED)
    wait_for(lambda: len([e for e in server.events() if e.get("event") == "connection.closed"]) == sessions,
             "every session closed")
    accepted = [e for e in server.events() if e.get("event") == "message.accepted"]
    assert len(accepted) == sessions and all(e["worker_pid"] for e in accepted)
    samples = server.scrape(metrics_port)
    assert samples[("esmtpkit_connections_total", ())] == sessions
    assert samples[("esmtpkit_messages_total", (("outcome", "accepted"),))] == sessions
    assert samples[("esmtpkit_connections_current", ())] == 0
