"""``twistd esmtpkit --verify ...``: the mail-authentication options as `esmtpkit.cli.tap.Options` parses them and
the policy it builds from them, then one real twistd process checking a signed message against a private name
server on 127.0.0.1 (`tests.authzone`'s world), and a mistake on its command line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pytest
import pytest_twisted
from twisted.internet import threads

from esmtpkit.cli import tap
from esmtpkit.handlers.mailauth import MailAuthFront
from esmtpkit.mailauth import MailAuth
from esmtpkit.mailauth.checks import CHECKS
from esmtpkit.testing import RecordingHandler

from .authzone import AuthWorld, auth_zones, dkim_sign, make_key
from .mailnet import PrivateDNS
from .support import Twistd, run_twistd, smtp_send, tap_mistake as mistake, tap_options as parse

BASE = ["--handler", "esmtpkit.handlers.base.MessageHandler"]
RELAY = ["--handler", "esmtpkit.handlers.relay.Relay"]
HINT = "see twistd esmtpkit --help"


def checks_of(options: tap.Options) -> MailAuth:
    """The `MailAuth` in front of the handlers of the policy the options built (there must be exactly one front)."""
    policy = options["policy"]
    assert len(policy.fronts) == 1, policy.fronts
    front = policy.fronts[0](RecordingHandler())
    assert isinstance(front, MailAuthFront)
    assert front.checks is options["mail-auth"]
    return front.checks


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.pem"
    path.write_bytes(auth_zones().keys["good.test"].private)
    return path


# ---- parsing ------------------------------------------------------------------------------------------------------

def test_without_verify_there_is_no_front() -> None:
    options = parse(*BASE)
    assert options["mail-auth"] is None and options["policy"].fronts == ()


@pytest.mark.parametrize("argv, enabled", [
    (["--verify", "all"], CHECKS),
    (["--verify", "ALL"], CHECKS),
    (["--verify", "spf,dkim"], ("spf", "dkim")),
    (["--verify", "spf", "--verify", "arc"], ("spf", "arc")),
    (["--verify", " dkim , arc "], ("dkim", "arc")),
    (["--verify", "dmarc"], CHECKS[:3]),  # DMARC needs the SPF and DKIM verdicts
])
def test_verify_chooses_the_checks(argv: list[str], enabled: tuple[str, ...]) -> None:
    checks = checks_of(parse(*BASE, *argv))
    assert checks.enabled == enabled
    assert (checks.spf_reject, checks.dmarc_reject) == (False, False)


@pytest.mark.parametrize("value", ["bogus", "spf,bogus", "spf;dkim", ",", ""])
def test_verify_unknown_check(value: str) -> None:
    text = mistake(*BASE, "--verify", value)
    assert text.startswith("--verify"), text
    if "bogus" in value:
        assert "'bogus'" in text and "spf, dkim, dmarc, arc, all" in text


def test_good_options_make_one_front_as_asked() -> None:
    options = parse(*BASE, "--verify", "all", "--spf-reject", "--dmarc-reject", "--authserv-id", "mx.test",
                    "--dns-server", "127.0.0.1:5353", "--dns-server", "[::1]:5354", "--dns-server", "127.0.0.2",
                    "--dns-timeout", "2")
    checks = checks_of(options)
    assert checks.enabled == CHECKS
    assert (checks.spf_reject, checks.dmarc_reject) == (True, True)
    assert checks.authserv_id == "mx.test"
    assert checks.lookups.resolver.servers == [("127.0.0.1", 5353), ("::1", 5354), ("127.0.0.2", 53)]
    assert sum(checks.lookups.timeout) == pytest.approx(2.0)
    assert all(t > 0 for t in checks.lookups.timeout)


def test_the_default_timeout_and_name() -> None:
    checks = checks_of(parse(*BASE, "--verify", "spf", "--hostname", "mx.example.org"))
    assert checks.authserv_id == "mx.example.org"
    assert sum(checks.lookups.timeout) == pytest.approx(4.0)
    assert checks_of(parse(*BASE, "--verify", "spf", "--hostname", "a.test", "--authserv-id", "b.test")
                     ).authserv_id == "b.test"


def test_spf_reject_goes_with_dmarc_too() -> None:
    """DMARC runs SPF, so --spf-reject is meaningful with --verify dmarc."""
    assert checks_of(parse(*BASE, "--verify", "dmarc", "--spf-reject")).spf_reject


def test_the_policy_of_the_service_has_the_front() -> None:
    from twisted.internet.testing import MemoryReactor

    options = parse(*BASE, "--verify", "spf", "--listen", "tcp:2525:interface=127.0.0.1")
    service = tap.makeService(options, reactor=MemoryReactor())
    assert isinstance(service.factory.make_handler(), MailAuthFront)
    assert options["mail-auth"].monitor is service.factory.monitor


@pytest.mark.parametrize("argv, start", [
    (["--spf-reject"], "--spf-reject needs --verify spf"),
    (["--verify", "dkim", "--spf-reject"], "--spf-reject needs --verify spf"),
    (["--dmarc-reject"], "--dmarc-reject needs --verify dmarc"),
    (["--verify", "spf,dkim", "--dmarc-reject"], "--dmarc-reject needs --verify dmarc"),
    (["--dns-server", "127.0.0.1"], "--dns-server"),
    (["--authserv-id", "mx.test"], "--dns-server and --authserv-id"),
    (["--verify", "all", "--dns-server", "127.0.0.1:notaport"], "--dns-server"),
    (["--verify", "all", "--dns-server", "127.0.0.1:70000"], "--dns-server"),
    (["--verify", "all", "--dns-server", "127.0.0.1:0"], "--dns-server"),
    (["--verify", "all", "--dns-server", ""], "--dns-server"),
    (["--verify", "all", "--dns-server", "[::1]x"], "--dns-server"),
    (["--verify", "all", "--dns-server", "localhost"], "--dns-server"),
    (["--verify", "all", "--dns-timeout", "0"], "--dns-timeout"),
    (["--verify", "all", "--dns-timeout", "-1"], "--dns-timeout"),
    (["--verify", "all", "--dns-timeout", "soon"], "--dns-timeout"),
    (["--verify", "all", "--dns-timeout", "inf"], "--dns-timeout"),
    (["--verify", "all", "--dns-timeout", "nan"], "--dns-timeout"),
    (["--verify", "all", "--authserv-id", "mx test"], "--authserv-id"),
    (["--verify", "all", "--authserv-id", "mx.test;"], "--authserv-id"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_option_mistakes(argv: list[str], start: str) -> None:
    text = mistake(*BASE, *argv)
    assert text.startswith(start), text
    assert "Parameter type enforcement" not in text


def test_arc_seal_needs_verify_arc(key_file: Path) -> None:
    text = mistake(*RELAY, "--verify", "spf,dkim,dmarc", "--arc-seal", f"good.test:s1:{key_file}")
    assert text.startswith("--arc-seal needs --verify arc"), text


@pytest.mark.parametrize("entry, words", [
    ("good.test:s1:{missing}", ["cannot read the key", "no such file"]),
    ("good.test:s1", ["good.test:s1"]),
    ("good.test", ["good.test"]),
    ("good.test:s1:{not_pem}", ["not a PEM private key"]),
    (":s1:{key}", [":s1:"]),
    ("good.test::{key}", ["good.test::"]),
])
@pytest.mark.parametrize("option", ["--dkim-sign", "--arc-seal"])
def test_bad_signing_keys(tmp_path: Path, key_file: Path, option: str, entry: str, words: list[str]) -> None:
    not_pem = tmp_path / "key.txt"
    not_pem.write_text("this is not a key\n")
    value = entry.format(missing=tmp_path / "missing.pem", not_pem=not_pem, key=key_file)
    verify = ["--verify", "all"] if option == "--arc-seal" else []
    text = mistake(*RELAY, *verify, option, value)
    assert text.startswith(f"{option}: "), text
    for word in words:
        assert word.lower() in text.lower(), text


def test_signing_keys_reach_a_handler_that_signs(key_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.pem"
    other.write_bytes(make_key().private)
    options = parse(*RELAY, "--verify", "all", "--hostname", "mx.test", "--dkim-sign", f"good.test:s1:{key_file}",
                    "--dkim-sign", f"other.test:s2:{other}", "--arc-seal", f"good.test:s1:{key_file}")
    kwargs = options["handler-kwargs"]
    assert kwargs["dkim_sign"] == f"good.test:s1:{key_file},other.test:s2:{other}"
    assert kwargs["arc_seal"] == f"good.test:s1:{key_file}"
    assert kwargs["authserv_id"] == "mx.test"


def test_the_fields_to_sign_reach_the_handler(key_file: Path) -> None:
    options = parse(*RELAY, "--dkim-sign", f"good.test:s1:{key_file}", "--dkim-headers", "Subject:List-Id")
    assert options["handler-kwargs"]["dkim_headers"] == "Subject:List-Id"
    assert "dkim_headers" not in parse(*RELAY, "--dkim-sign", f"good.test:s1:{key_file}")["handler-kwargs"]


@pytest.mark.parametrize("extra, expected", [
    ((), "--dkim-headers needs --dkim-sign"),
    (("--dkim-sign", "good.test:s1:{key}"), "--dkim-headers: 'a;b' is not a header field name")])
def test_bad_fields_to_sign(key_file: Path, extra: tuple[str, ...], expected: str) -> None:
    text = mistake(*RELAY, *(e.format(key=key_file) for e in extra), "--dkim-headers", "a;b")
    assert text.startswith(expected), text


@pytest.mark.parametrize("option", ["--dkim-sign", "--arc-seal"])
def test_signing_options_for_a_handler_that_does_not_send_mail_on(key_file: Path, option: str) -> None:
    text = mistake("--verify", "all", option, f"good.test:s1:{key_file}")
    assert text.startswith(f"{option}: esmtpkit.handlers.maildir.Maildir does not send mail on"), text


# ---- a real twistd ------------------------------------------------------------------------------------------------

GOOD = (b"From: Alice <alice@good.test>\r\n"
        b"To: bob@example.test\r\n"
        b"Subject: hello\r\n"
        b"Date: Sun, 6 Dec 2026 07:00:00 +0000\r\n"
        b"Message-ID: <twistd-1@good.test>\r\n"
        b"\r\n"
        b"Hello, Bob.\r\n")


@pytest.fixture
def twistd(tmp_path: Path, auth_dns: PrivateDNS) -> Iterator[Twistd]:
    server = Twistd(tmp_path / "run", "--maildir", str(tmp_path / "Maildir"), "--verify", "all",
                    "--dns-server", f"127.0.0.1:{auth_dns.port}", "--authserv-id", "mx.test", "--dns-timeout", "3")
    yield server
    server.stop()


@pytest_twisted.ensureDeferred
async def test_twistd_verifies_and_stores_the_results(tmp_path: Path, auth_world: AuthWorld,
                                                      twistd: Twistd) -> None:
    signed = dkim_sign(GOOD, "good.test", auth_world.keys["good.test"])
    code, text = await threads.deferToThread(smtp_send, twistd.port, "alice@good.test", signed)
    assert code == 250, text
    stored = list((tmp_path / "Maildir" / "new").iterdir())
    assert len(stored) == 1, twistd.log_text()
    text = stored[0].read_text()
    head = text.split("\n\n", 1)[0]
    fields = re.split(r"\n(?![ \t])", head)
    [field] = [f for f in fields if f.startswith("Authentication-Results:")]
    assert field.startswith("Authentication-Results: mx.test;"), field
    results = [part.split()[0] for part in re.sub(r"\s+", " ", field).split(";")[1:]]
    assert results[:4] == ["spf=pass", "spf=pass", "dkim=pass", "dmarc=pass"], field
    assert "smtp.mailfrom=alice@good.test" in field and "header.d=good.test" in field
    assert text.endswith(signed.decode().replace("\r\n", "\n").split("\n\n", 1)[1])


def test_twistd_verify_mistake_is_one_line(tmp_path: Path) -> None:
    run = run_twistd(tmp_path, "--verify", "bogus")
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert run.stdout == "" and "Traceback" not in run.stderr
    assert run.stderr.splitlines() == [
        "twistd esmtpkit: --verify: unknown check 'bogus' (known: spf, dkim, dmarc, arc, all)", HINT]


@pytest.mark.parametrize("argv, start", [
    (["--spf-reject"], "--spf-reject needs --verify spf"),
    (["--verify", "all", "--dns-timeout", "0"], "--dns-timeout"),
    (["--verify", "all", "--dns-server", "localhost"], "--dns-server"),
    (["--verify", "all", "--dkim-sign", "good.test:s1:missing.pem"], "--dkim-sign"),
])
def test_twistd_mail_auth_mistakes(tmp_path: Path, argv: list[str], start: str) -> None:
    run = run_twistd(tmp_path, *argv)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert run.stdout == "" and "Traceback" not in run.stderr
    error, hint = run.stderr.splitlines()
    assert error.startswith(f"twistd esmtpkit: {start}"), error
    assert hint == HINT
