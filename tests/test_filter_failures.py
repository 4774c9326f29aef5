"""A filter that is down, silent, or stopped mid-message, in front of a real ``twistd esmtpkit``: the client gets
the configured outcome (``451 4.7.1`` by default, or the message goes on unfiltered), and nothing is lost."""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Any, Iterator

import pytest

from .support import BrokenPeer, Twistd, smtp_client, smtp_transaction

MESSAGE = (b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hello\r\n\r\n"
           + b"A line of the body that goes on for a while.\r\n" * 8000)


@pytest.fixture
def peer(request: Any) -> Iterator[BrokenPeer]:
    mode, after = getattr(request, "param", ("silent", 1))
    server = BrokenPeer(mode, after)
    yield server
    server.stop()


def start(tmp_path: Path, *options: str) -> Twistd:
    return Twistd(tmp_path / "run", "--maildir", str(tmp_path / "Maildir"), "--filter-timeout", "2", *options)


def delivered(tmp_path: Path) -> list[bytes]:
    folder = tmp_path / "Maildir" / "new"
    return [p.read_bytes() for p in folder.iterdir()] if folder.exists() else []


def send(port: int) -> tuple[int, bytes]:
    with smtp_client(port) as client:
        return smtp_transaction(client, "a@example.org", MESSAGE, ["b@example.net"])


@pytest.mark.parametrize("kind", ["clamd", "spamd"])
def test_a_silent_filter_defers_the_message(tmp_path: Path, peer: BrokenPeer, kind: str) -> None:
    server = start(tmp_path, "--filter", f"{kind}:tcp:127.0.0.1:{peer.port}")
    try:
        code, text = send(server.port)
        assert (code, text[:5]) == (451, b"4.7.1"), text
        assert delivered(tmp_path) == []
        assert f"filter {kind} message=tempfail" in server.log_text()
    finally:
        server.stop()


def test_a_silent_filter_that_may_be_skipped_lets_the_message_through(tmp_path: Path, peer: BrokenPeer) -> None:
    server = start(tmp_path, "--filter", f"clamd:tcp:127.0.0.1:{peer.port}", "--filter-failure", "accept")
    try:
        assert send(server.port)[0] == 250
        [stored] = delivered(tmp_path)
        assert stored.endswith(MESSAGE)
    finally:
        server.stop()


@pytest.mark.parametrize("peer", [("hang-up", 64 * 1024)], indirect=True)
def test_a_filter_stopped_mid_message_defers_it(tmp_path: Path, peer: BrokenPeer) -> None:
    server = start(tmp_path, "--filter", f"clamd:tcp:127.0.0.1:{peer.port}", "--filter-timeout", "30")
    try:
        code, text = send(server.port)
        assert (code, text[:5]) == (451, b"4.7.1"), text
        assert 0 < peer.received < len(MESSAGE)
        assert delivered(tmp_path) == []
    finally:
        server.stop()


def test_a_filter_that_is_down_defers_at_once(tmp_path: Path) -> None:
    closed = BrokenPeer()
    closed.stop()
    port = closed.port
    server = start(tmp_path, "--filter", f"spamd:tcp:127.0.0.1:{port}", "--filter-timeout", "30")
    try:
        code, text = send(server.port)
        assert (code, text[:5]) == (451, b"4.7.1"), text
        assert delivered(tmp_path) == []
    finally:
        server.stop()


def test_a_silent_milter_defers_the_connection(tmp_path: Path, peer: BrokenPeer) -> None:
    server = start(tmp_path, "--filter", f"milter:tcp:127.0.0.1:{peer.port}")
    try:
        with pytest.raises(smtplib.SMTPConnectError) as caught:
            smtp_client(server.port)
        assert caught.value.smtp_code == 421
        assert delivered(tmp_path) == []
    finally:
        server.stop()


def test_a_silent_milter_that_may_be_skipped_is_left_out_of_the_connection(tmp_path: Path,
                                                                          peer: BrokenPeer) -> None:
    server = start(tmp_path, "--filter", f"milter:tcp:127.0.0.1:{peer.port},on-failure=accept")
    try:
        assert send(server.port)[0] == 250
        assert len(delivered(tmp_path)) == 1
        assert peer.connections == 1
    finally:
        server.stop()
