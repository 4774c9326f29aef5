"""SPF, DKIM, DMARC and ARC verdicts of `MailAuth` against a private authoritative DNS server on 127.0.0.1
(`tests.authzone`'s world of test domains), on the real reactor with pytest-twisted."""

from __future__ import annotations

import io
import random
from typing import Any, Iterator

import authres
import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address, IPv6Address

from esmtpkit.core.session import Session
from esmtpkit.mailauth import MailAuth
from esmtpkit.mailauth.lookups import DNSTempError, Lookups
from esmtpkit.mailauth.verdicts import AuthVerdicts, DmarcVerdict, SpfVerdict
from tests.authzone import (AUTHSERV, MESSAGE, SELECTOR, AuthWorld, Key, arc_seal, auth_zones, dkim_sign, mail_auths,
                            world_dns)
from tests.mailnet import PrivateDNS

CLIENT = "127.0.0.5"

def message(author: str = "alice@good.test", *extra_from: str) -> bytes:
    """`MESSAGE` written by ``author`` (and by more From: fields, one per ``extra_from``)."""
    fields = b"".join(f"From: {a}\r\n".encode() for a in extra_from)
    return MESSAGE.replace(b"From: Alice <alice@good.test>\r\n",
                           f"From: {author}\r\n".encode() + fields)


def world() -> AuthWorld:
    """`auth_zones` plus the names only these tests need."""
    w = auth_zones()
    good = w.keys["good.test"]
    z = w.zones
    z["sub.strict.test"] = {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]}
    z[f"{SELECTOR}._domainkey.sub.strict.test"] = {"TXT": [[good.record[:200], good.record[200:]]]}
    z["pct0.test"] = {"TXT": ["v=spf1 -all"]}
    z["_dmarc.pct0.test"] = {"TXT": ["v=DMARC1; p=reject; pct=0"]}
    z["pct50.test"] = {"TXT": ["v=spf1 -all"]}
    z["_dmarc.pct50.test"] = {"TXT": ["v=DMARC1; p=reject; pct=50"]}
    z["co.uk"] = {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]}
    z[f"{SELECTOR}._domainkey.co.uk"] = {"TXT": [good.record]}
    z["_dmarc.co.uk"] = {"TXT": ["v=DMARC1; p=reject"]}
    z["servfail.test"] = {"TXT": ["v=spf1 -all"]}
    z["_dmarc.spaced.test"] = {"TXT": ["v = DMARC1; p = reject"]}
    z["_dmarc.dmarc2.test"] = {"TXT": ["v=DMARC2; p=reject"]}
    z["_dmarc.dmarc1x.test"] = {"TXT": ["v=DMARC1x; p=reject"]}
    return w


@pytest.fixture
def zones() -> AuthWorld:
    return world()


@pytest.fixture
def dns(zones: AuthWorld) -> Iterator[PrivateDNS]:
    with world_dns(zones, servfail=["servfail.test"]) as server:
        yield server


@pytest.fixture
def make(dns: PrivateDNS) -> Iterator[Any]:
    """``make(**options)`` -> a MailAuth asking ``dns``; each is closed after the test."""
    with mail_auths(dns.servers, timeout=(0.3,), rng=random.Random(1)) as build:
        yield build


@pytest.fixture
def checks(make: Any) -> MailAuth:
    return make()


@pytest.fixture
def keys(zones: AuthWorld) -> dict[str, Key]:
    return zones.keys


def session(helo: str = "helo.good.test", ip: str = CLIENT) -> Session:
    peer = IPv6Address("TCP", ip, 1000) if ":" in ip else IPv4Address("TCP", ip, 1000)
    return Session(hostname=AUTHSERV, peer=peer, helo=helo)


def head_of(content: bytes) -> bytes:
    return content.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"


async def sender(checks: MailAuth, mailfrom: str, helo: str = "helo.good.test", ip: str = CLIENT) -> AuthVerdicts:
    return await checks.check_sender(session(helo, ip), mailfrom)


async def full(checks: MailAuth, content: bytes, mailfrom: str = "alice@good.test",
               helo: str = "helo.good.test", ip: str = CLIENT) -> AuthVerdicts:
    """SPF for ``mailfrom``, then the message checks for ``content``."""
    s = session(helo, ip)
    verdicts = await checks.check_sender(s, mailfrom)
    return await checks.check_message(s, verdicts, head_of(content), lambda: io.BytesIO(content))


def parsed(verdicts: AuthVerdicts) -> Any:
    """The Authentication-Results field as authres reads it back (unfolded first)."""
    text = verdicts.field(AUTHSERV).decode("utf-8")
    assert text.endswith("\r\n")
    return authres.AuthenticationResultsHeader.parse(text[:-2].replace("\r\n\t", " "))


def dmarc_of(verdicts: AuthVerdicts) -> DmarcVerdict:
    """The DMARC verdict, which every message checked with DMARC on gets."""
    assert verdicts.dmarc is not None
    return verdicts.dmarc


def props(result: Any) -> dict[str, str]:
    return {f"{p.type}.{p.name}": p.value for p in result.properties}


# ---- SPF ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mailfrom, result", [
    ("a@good.test", "pass"),
    ("a@quarantine.test", "fail"),
    ("a@soft.test", "softfail"),
    ("a@neutral.test", "neutral"),
    ("a@none.test", "none"),
    ("a@slow.test", "temperror"),
    ("a@broken.test", "permerror"),
])
@pytest_twisted.ensureDeferred
async def test_spf_mailfrom(checks: MailAuth, mailfrom: str, result: str) -> None:
    verdicts = await sender(checks, mailfrom)
    v = verdicts.spf_mailfrom
    assert v is not None
    assert (v.result, v.scope, v.identity, v.domain) == (result, "mailfrom", mailfrom, mailfrom.split("@")[1])
    if result == "temperror":
        assert "slow.test" in v.explanation
    if result == "permerror":
        assert "frobnicate" in v.explanation


@pytest_twisted.ensureDeferred
async def test_spf_helo_pass(checks: MailAuth) -> None:
    verdicts = await sender(checks, "a@good.test", ip="127.0.0.1")
    assert verdicts.spf_helo == SpfVerdict("pass", "helo", "helo.good.test", "helo.good.test", "")
    assert verdicts.spf_mailfrom is not None and verdicts.spf_mailfrom.result == "pass"


@pytest_twisted.ensureDeferred
async def test_spf_helo_fail_is_separate_from_mailfrom(checks: MailAuth) -> None:
    verdicts = await sender(checks, "a@good.test")
    assert verdicts.spf_helo is not None
    assert (verdicts.spf_helo.result, verdicts.spf_helo.scope) == ("fail", "helo")
    assert verdicts.spf_mailfrom is not None and verdicts.spf_mailfrom.result == "pass"


@pytest_twisted.ensureDeferred
async def test_spf_helo_not_checked_when_off(make: Any) -> None:
    verdicts = await sender(make(check_helo=False), "a@good.test")
    assert verdicts.spf_helo is None
    assert verdicts.spf_mailfrom is not None and verdicts.spf_mailfrom.result == "pass"


@pytest_twisted.ensureDeferred
async def test_spf_null_sender_uses_postmaster_at_helo(checks: MailAuth) -> None:
    passing = await sender(checks, "", ip="127.0.0.1")
    assert passing.spf_mailfrom == SpfVerdict("pass", "mailfrom", "postmaster@helo.good.test", "helo.good.test")
    failing = await sender(checks, "")
    assert failing.spf_mailfrom is not None
    assert (failing.spf_mailfrom.result, failing.spf_mailfrom.identity) == ("fail", "postmaster@helo.good.test")


@pytest_twisted.ensureDeferred
async def test_spf_address_literal_helo_has_no_helo_verdict(checks: MailAuth) -> None:
    verdicts = await sender(checks, "a@good.test", helo="[127.0.0.5]")
    assert verdicts.spf_helo is None
    assert verdicts.spf_mailfrom is not None and verdicts.spf_mailfrom.result == "pass"
    null = await sender(checks, "", helo="[127.0.0.5]")
    assert null.spf_helo is None
    assert null.spf_mailfrom is not None and null.spf_mailfrom.result == "none"


@pytest_twisted.ensureDeferred
async def test_spf_ipv4_mapped_client_is_ipv4(checks: MailAuth) -> None:
    verdicts = await sender(checks, "a@good.test", ip="::ffff:127.0.0.5")
    assert verdicts.spf_mailfrom is not None and verdicts.spf_mailfrom.result == "pass"
    assert verdicts.remote_ip == "::ffff:127.0.0.5"


# ---- DKIM -----------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_dkim_pass(checks: MailAuth, keys: dict[str, Key]) -> None:
    verdicts = await full(checks, dkim_sign(message(), "good.test", keys["good.test"]))
    [v] = verdicts.dkim
    assert (v.result, v.domain, v.selector, v.algorithm, v.reason) == ("pass", "good.test", SELECTOR,
                                                                       "rsa-sha256", "")
    assert v.identity == "@good.test" and len(v.b) == 8


@pytest_twisted.ensureDeferred
async def test_dkim_changed_body_fails(checks: MailAuth, keys: dict[str, Key]) -> None:
    signed = dkim_sign(message(), "good.test", keys["good.test"])
    verdicts = await full(checks, signed.replace(b"Hello, Bob.", b"Hello, Eve."))
    [v] = verdicts.dkim
    assert v.result == "fail"
    assert "body hash" in v.reason


@pytest_twisted.ensureDeferred
async def test_dkim_rsa_sha1_never_passes(checks: MailAuth, keys: dict[str, Key]) -> None:
    """RFC 8301 §3.1: a verifier must not consider an rsa-sha1 signature valid, even one that verifies."""
    import dkim

    content = message()
    signature = dkim.sign(content, SELECTOR.encode(), b"good.test", keys["good.test"].private,
                          signature_algorithm=b"rsa-sha1")
    verdicts = await full(checks, signature + content)
    [v] = verdicts.dkim
    assert (v.result, v.algorithm, v.reason) == ("fail", "rsa-sha1", "rsa-sha1 is not accepted (RFC 8301)")
    assert verdicts.dmarc is not None and verdicts.dmarc.dkim_aligned is False


@pytest_twisted.ensureDeferred
async def test_dkim_hash_the_key_record_does_not_allow_fails(checks: MailAuth, keys: dict[str, Key],
                                                             dns: PrivateDNS) -> None:
    """A key record's h= lists the hashes it may be used with (RFC 6376 §3.6.1)."""
    name = f"{SELECTOR}._domainkey.good.test"
    [chunks] = dns.zones[name]["TXT"]
    dns.zones[name] = {"TXT": [["v=DKIM1; h=sha1; " + "".join(chunks)[len("v=DKIM1; "):]]]}
    verdicts = await full(checks, dkim_sign(message(), "good.test", keys["good.test"]))
    [v] = verdicts.dkim
    assert (v.result, v.reason) == ("fail", "the key does not allow sha256")


@pytest_twisted.ensureDeferred
async def test_dkim_changed_signed_header_fails(checks: MailAuth, keys: dict[str, Key]) -> None:
    signed = dkim_sign(message(), "good.test", keys["good.test"])
    verdicts = await full(checks, signed.replace(b"Subject: hello", b"Subject: urgent"))
    [v] = verdicts.dkim
    assert (v.result, v.domain) == ("fail", "good.test")
    assert "body hash" not in v.reason


@pytest_twisted.ensureDeferred
async def test_dkim_no_key_is_permerror(checks: MailAuth, keys: dict[str, Key]) -> None:
    verdicts = await full(checks, dkim_sign(message(), "none.test", keys["good.test"]))
    [v] = verdicts.dkim
    assert (v.result, v.domain, v.reason) == ("permerror", "none.test", "no key")


@pytest_twisted.ensureDeferred
async def test_dkim_silent_key_is_temperror(checks: MailAuth, keys: dict[str, Key]) -> None:
    verdicts = await full(checks, dkim_sign(message(), "slow.test", keys["good.test"]))
    [v] = verdicts.dkim
    assert (v.result, v.domain) == ("temperror", "slow.test")


@pytest_twisted.ensureDeferred
async def test_dkim_malformed_signature_is_permerror(checks: MailAuth) -> None:
    broken = b"DKIM-Signature: v=1; a=rsa-sha256; d=good.test; this is not a tag list\r\n" + message()
    verdicts = await full(checks, broken)
    [v] = verdicts.dkim
    assert v.result == "permerror"
    assert [r.result for r in parsed(verdicts).results if r.method == "dkim"] == ["permerror"]


@pytest_twisted.ensureDeferred
async def test_dkim_two_signatures_both_reported(checks: MailAuth, keys: dict[str, Key]) -> None:
    signed = dkim_sign(dkim_sign(message(), "good.test", keys["good.test"]), "other.test", keys["other.test"])
    verdicts = await full(checks, signed)
    assert [(v.result, v.domain) for v in verdicts.dkim] == [("pass", "other.test"), ("pass", "good.test")]
    dkim = [r for r in parsed(verdicts).results if r.method == "dkim"]
    assert [(r.result, props(r)["header.d"]) for r in dkim] == [("pass", "other.test"), ("pass", "good.test")]


@pytest_twisted.ensureDeferred
async def test_dkim_signatures_beyond_the_limit_are_not_checked(make: Any, dns: PrivateDNS,
                                                                keys: dict[str, Key]) -> None:
    checks = make(max_signatures=2)
    content = message()
    for selector in ("s5", "s4", "s3", "s2", "s1"):
        content = dkim_sign(content, "good.test", keys["good.test"], selector=selector)
    dns.queries.clear()
    verdicts = await full(checks, content)
    assert [(v.selector, v.result) for v in verdicts.dkim] == [("s1", "pass"), ("s2", "permerror")]
    asked = {name for name, kind in dns.queries if "._domainkey." in name}
    assert asked == {"s1._domainkey.good.test", "s2._domainkey.good.test"}


@pytest_twisted.ensureDeferred
async def test_dkim_unsigned_is_none(checks: MailAuth) -> None:
    verdicts = await full(checks, message())
    assert verdicts.dkim == () and verdicts.dkim_checked
    assert [r.result for r in parsed(verdicts).results if r.method == "dkim"] == ["none"]
    assert b"dkim=none" in verdicts.field(AUTHSERV)


# ---- DMARC ----------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_dmarc_pass_by_aligned_dkim(checks: MailAuth, keys: dict[str, Key]) -> None:
    verdicts = await full(checks, dkim_sign(message(), "good.test", keys["good.test"]), mailfrom="a@other.test")
    assert verdicts.spf_mailfrom is not None and verdicts.spf_mailfrom.result == "fail"
    v = dmarc_of(verdicts)
    assert (v.result, v.domain, v.policy, v.disposition) == ("pass", "good.test", "reject", "none")
    assert (v.dkim_aligned, v.spf_aligned) == (True, False)


@pytest_twisted.ensureDeferred
async def test_dmarc_pass_by_aligned_spf_only(checks: MailAuth) -> None:
    v = dmarc_of(await full(checks, message(), mailfrom="a@good.test"))
    assert (v.result, v.spf_aligned, v.dkim_aligned) == ("pass", True, False)


@pytest_twisted.ensureDeferred
async def test_dmarc_other_organization_dkim_does_not_align(checks: MailAuth, keys: dict[str, Key]) -> None:
    signed = dkim_sign(message(), "other.test", keys["other.test"])
    verdicts = await full(checks, signed, mailfrom="a@other.test")
    assert [(d.result, d.domain) for d in verdicts.dkim] == [("pass", "other.test")]
    v = dmarc_of(verdicts)
    assert (v.result, v.dkim_aligned, v.disposition) == ("fail", False, "reject")


@pytest_twisted.ensureDeferred
async def test_dmarc_relaxed_alignment_passes(checks: MailAuth, keys: dict[str, Key]) -> None:
    signed = dkim_sign(message("x@sub.good.test"), "good.test", keys["good.test"])
    v = dmarc_of(await full(checks, signed, mailfrom="a@other.test"))
    assert (v.result, v.domain, v.dkim_aligned) == ("pass", "sub.good.test", True)


@pytest_twisted.ensureDeferred
async def test_dmarc_strict_dkim_alignment_fails_for_a_subdomain(checks: MailAuth, keys: dict[str, Key]) -> None:
    signed = dkim_sign(message("x@strict.test"), "sub.strict.test", keys["strict.test"])
    verdicts = await full(checks, signed, mailfrom="a@other.test")
    assert [(d.result, d.domain) for d in verdicts.dkim] == [("pass", "sub.strict.test")]
    v = dmarc_of(verdicts)
    assert (v.result, v.domain, v.policy, v.disposition, v.dkim_aligned) == ("fail", "strict.test", "reject",
                                                                               "reject", False)


@pytest_twisted.ensureDeferred
async def test_dmarc_strict_spf_alignment_fails_for_a_subdomain(checks: MailAuth) -> None:
    verdicts = await full(checks, message("x@strict.test"), mailfrom="a@sub.strict.test")
    assert verdicts.spf_mailfrom is not None and verdicts.spf_mailfrom.result == "pass"
    v = dmarc_of(verdicts)
    assert (v.result, v.spf_aligned) == ("fail", False)


@pytest_twisted.ensureDeferred
async def test_dmarc_no_record_is_none(checks: MailAuth) -> None:
    v = dmarc_of(await full(checks, message("x@none.test"), mailfrom="a@none.test"))
    assert (v.result, v.domain) == ("none", "none.test")


@pytest_twisted.ensureDeferred
async def test_dmarc_falls_back_to_the_organizational_domain(checks: MailAuth, dns: PrivateDNS) -> None:
    dns.queries.clear()
    v = dmarc_of(await full(checks, message("x@sub.good.test"), mailfrom="a@other.test"))
    assert (v.result, v.domain, v.policy, v.disposition) == ("fail", "sub.good.test", "reject", "reject")
    asked = [name for name, kind in dns.queries if name.startswith("_dmarc.")]
    assert asked == ["_dmarc.sub.good.test", "_dmarc.good.test"]


@pytest_twisted.ensureDeferred
async def test_dmarc_broken_record_is_permerror(checks: MailAuth) -> None:
    v = dmarc_of(await full(checks, message("x@broken.test"), mailfrom="a@other.test"))
    assert (v.result, v.domain) == ("permerror", "broken.test")


@pytest.mark.parametrize("domain, result, policy", [
    ("spaced.test", "fail", "reject"),  # "v = DMARC1": RFC 7489 §6.4 allows whitespace around "="
    ("dmarc2.test", "none", ""),
    ("dmarc1x.test", "none", ""),
])
@pytest_twisted.ensureDeferred
async def test_dmarc_record_version(checks: MailAuth, domain: str, result: str, policy: str) -> None:
    v = dmarc_of(await full(checks, message(f"x@{domain}"), mailfrom="a@other.test"))
    assert (v.result, v.domain, v.policy) == (result, domain, policy)


@pytest_twisted.ensureDeferred
async def test_dmarc_silent_dns_is_temperror(checks: MailAuth) -> None:
    v = dmarc_of(await full(checks, message("x@slow.test"), mailfrom="a@other.test"))
    assert (v.result, v.domain) == ("temperror", "slow.test")


@pytest_twisted.ensureDeferred
async def test_dmarc_quarantine_disposition(checks: MailAuth) -> None:
    verdicts = await full(checks, message("x@quarantine.test"), mailfrom="a@quarantine.test")
    v = dmarc_of(verdicts)
    assert (v.result, v.policy, v.disposition) == ("fail", "quarantine", "quarantine")
    [result] = [r for r in parsed(verdicts).results if r.method == "dmarc"]
    assert (result.result, props(result)) == ("fail", {"header.from": "quarantine.test"})
    assert b"dmarc=fail (p=quarantine dis=quarantine) header.from=quarantine.test" in verdicts.field(AUTHSERV)


@pytest_twisted.ensureDeferred
async def test_dmarc_pct_zero_takes_the_next_policy_down(checks: MailAuth) -> None:
    v = dmarc_of(await full(checks, message("x@pct0.test"), mailfrom="a@pct0.test"))
    assert (v.result, v.policy, v.disposition) == ("fail", "reject", "quarantine")


@pytest_twisted.ensureDeferred
async def test_dmarc_pct_sampling_follows_the_rng(make: Any) -> None:
    seed = 4
    checks = make(rng=random.Random(seed))
    replica = random.Random(seed)
    expected = ["reject" if replica.randrange(100) < 50 else "quarantine" for _ in range(8)]
    assert set(expected) == {"reject", "quarantine"}
    got = []
    s = session()
    for _ in expected:
        content = message("x@pct50.test")
        verdicts = await checks.check_message(s, AuthVerdicts(remote_ip=CLIENT), head_of(content),
                                              lambda: io.BytesIO(content))
        assert verdicts.dmarc is not None and verdicts.dmarc.result == "fail"
        got.append(verdicts.dmarc.disposition)
    assert got == expected


@pytest_twisted.ensureDeferred
async def test_dmarc_multiple_from_fields_is_permerror(checks: MailAuth, keys: dict[str, Key]) -> None:
    signed = dkim_sign(message("alice@good.test", "mallory@other.test"), "good.test", keys["good.test"])
    v = dmarc_of(await full(checks, signed))
    assert v.result == "permerror"


@pytest_twisted.ensureDeferred
async def test_dmarc_public_suffix_dkim_domain_never_aligns(checks: MailAuth, keys: dict[str, Key]) -> None:
    signed = dkim_sign(message("x@co.uk"), "co.uk", keys["good.test"])
    verdicts = await full(checks, signed, mailfrom="a@other.test")
    assert [(d.result, d.domain) for d in verdicts.dkim] == [("pass", "co.uk")]
    v = dmarc_of(verdicts)
    assert (v.result, v.dkim_aligned) == ("fail", False)


# ---- ARC ------------------------------------------------------------------------------------------------------

async def sealed_message(checks: MailAuth, keys: dict[str, Key]) -> bytes:
    signed = dkim_sign(message(), "good.test", keys["good.test"])
    first = await full(checks, signed)
    return arc_seal(first.field(AUTHSERV) + signed, "other.test", keys["other.test"], AUTHSERV)


@pytest_twisted.ensureDeferred
async def test_arc_sealed_message_passes(checks: MailAuth, keys: dict[str, Key]) -> None:
    verdicts = await full(checks, await sealed_message(checks, keys))
    v = verdicts.arc
    assert v is not None
    assert (v.result, v.instances, v.as_domain, v.ams_domain, v.oldest_pass) == ("pass", 1, "other.test",
                                                                                  "other.test", 0)
    [result] = [r for r in parsed(verdicts).results if r.method == "arc"]
    assert result.result == "pass"
    assert props(result)["header.as-d"] == "other.test"
    assert props(result)["smtp.remote-ip"] == CLIENT


@pytest_twisted.ensureDeferred
async def test_arc_changed_after_sealing_fails(checks: MailAuth, keys: dict[str, Key]) -> None:
    sealed = await sealed_message(checks, keys)
    verdicts = await full(checks, sealed.replace(b"Hello, Bob.", b"Hello, Eve."))
    assert verdicts.arc is not None and verdicts.arc.result == "fail"


@pytest_twisted.ensureDeferred
async def test_arc_none_without_a_chain(checks: MailAuth, keys: dict[str, Key]) -> None:
    verdicts = await full(checks, dkim_sign(message(), "good.test", keys["good.test"]))
    assert verdicts.arc is not None and verdicts.arc.result == "none"
    assert b"arc=none" in verdicts.field(AUTHSERV)


# ---- refusals -------------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_refusal_at_mail_with_spf_reject(make: Any) -> None:
    checks = make(spf_reject=True)
    failed = checks.refusal_at_mail(await sender(checks, "a@quarantine.test"))
    assert failed is not None
    assert (failed.code, failed.enhanced) == (550, "5.7.23")
    assert "quarantine.test" in " ".join(failed.lines)
    temporary = checks.refusal_at_mail(await sender(checks, "a@slow.test"))
    assert temporary is not None
    assert (temporary.code, temporary.enhanced) == (451, "4.7.24")
    for passing in ("a@good.test", "a@soft.test", "a@neutral.test", "a@none.test", "a@broken.test"):
        assert checks.refusal_at_mail(await sender(checks, passing)) is None, passing


@pytest_twisted.ensureDeferred
async def test_no_refusal_at_mail_without_spf_reject(checks: MailAuth) -> None:
    for sender_text in ("a@quarantine.test", "a@slow.test"):
        assert checks.refusal_at_mail(await sender(checks, sender_text)) is None


@pytest_twisted.ensureDeferred
async def test_refusal_at_end_with_dmarc_reject(make: Any, keys: dict[str, Key]) -> None:
    checks = make(dmarc_reject=True)
    rejected = checks.refusal_at_end(await full(checks, message("x@good.test"), mailfrom="a@other.test"))
    assert rejected is not None
    assert (rejected.code, rejected.enhanced) == (550, "5.7.26")
    quarantined = await full(checks, message("x@quarantine.test"), mailfrom="a@quarantine.test")
    assert checks.refusal_at_end(quarantined) is None
    sampled_out = await full(checks, message("x@pct0.test"), mailfrom="a@pct0.test")
    assert checks.refusal_at_end(sampled_out) is None
    signed = await full(checks, dkim_sign(message(), "good.test", keys["good.test"]), mailfrom="a@other.test")
    assert checks.refusal_at_end(signed) is None


@pytest_twisted.ensureDeferred
async def test_no_refusal_at_end_without_dmarc_reject(checks: MailAuth) -> None:
    verdicts = await full(checks, message("x@good.test"), mailfrom="a@other.test")
    assert verdicts.dmarc is not None and verdicts.dmarc.disposition == "reject"
    assert checks.refusal_at_end(verdicts) is None


# ---- Authentication-Results -----------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_authentication_results_round_trip(checks: MailAuth, keys: dict[str, Key]) -> None:
    verdicts = await full(checks, dkim_sign(message(), "good.test", keys["good.test"]), mailfrom="alice@good.test")
    header = parsed(verdicts)
    assert header.authserv_id == AUTHSERV
    got = [(r.method, r.result, props(r)) for r in header.results]
    assert [(m, r) for m, r, _ in got] == [("spf", "pass"), ("spf", "fail"), ("dkim", "pass"), ("dmarc", "pass"),
                                           ("arc", "none")]
    assert got[0][2] == {"smtp.mailfrom": "alice@good.test"}
    assert got[1][2] == {"smtp.helo": "helo.good.test"}
    assert got[2][2]["header.d"] == "good.test"
    assert got[2][2]["header.s"] == SELECTOR
    assert got[2][2]["header.i"] == "@good.test"
    assert got[3][2] == {"header.from": "good.test"}
    assert b"dmarc=pass (p=reject dis=none)" in verdicts.field(AUTHSERV)


@pytest_twisted.ensureDeferred
async def test_authentication_results_reason_round_trips(checks: MailAuth, keys: dict[str, Key]) -> None:
    signed = dkim_sign(message(), "good.test", keys["good.test"])
    verdicts = await full(checks, signed.replace(b"Hello, Bob.", b"Hello, Eve."))
    [dkim] = [r for r in parsed(verdicts).results if r.method == "dkim"]
    assert (dkim.result, props(dkim)["header.d"]) == ("fail", "good.test")
    assert "body hash" in dkim.reason


# ---- Lookups --------------------------------------------------------------------------------------------------

@pytest.fixture
def lookups(dns: PrivateDNS) -> Lookups:
    from twisted.internet import reactor

    return Lookups(reactor, servers=dns.servers, timeout=(0.3,))


@pytest_twisted.ensureDeferred
async def test_lookups_nxdomain_is_none(lookups: Lookups) -> None:
    assert await lookups.txt("nowhere.test") is None
    assert await lookups.records("nowhere.good.test", "A") is None


@pytest_twisted.ensureDeferred
async def test_lookups_nodata_is_empty(lookups: Lookups) -> None:
    assert await lookups.txt("mx.good.test") == []
    assert await lookups.records("good.test", "AAAA") == []


@pytest_twisted.ensureDeferred
async def test_lookups_servfail_is_temporary(lookups: Lookups) -> None:
    with pytest.raises(DNSTempError, match="server failure"):
        await lookups.txt("servfail.test")


@pytest_twisted.ensureDeferred
async def test_lookups_silence_is_temporary(lookups: Lookups) -> None:
    with pytest.raises(DNSTempError, match="timed out"):
        await lookups.txt("slow.test")


@pytest_twisted.ensureDeferred
async def test_lookups_joins_multi_string_txt(lookups: Lookups, keys: dict[str, Key]) -> None:
    assert await lookups.txt(f"{SELECTOR}._domainkey.sub.strict.test") == [keys["good.test"].record.encode()]
    assert await lookups.txt(f"{SELECTOR}._domainkey.good.test") == [keys["good.test"].record.encode()]
    assert await lookups.txt("good.test") == [b"v=spf1 ip4:127.0.0.0/8 -all"]


@pytest_twisted.ensureDeferred
async def test_lookups_spf_answers_shape(lookups: Lookups) -> None:
    assert await lookups.spf_answers("good.test", "MX") == [(("good.test", "MX"), (10, "mx.good.test"))]
    assert await lookups.spf_answers("mx.good.test", "A") == [(("mx.good.test", "A"), "127.0.0.9")]


@pytest_twisted.ensureDeferred
async def test_authentication_results_quoted_local_part_round_trips(checks: MailAuth) -> None:
    verdicts = await sender(checks, '"a;b (c)"@good.test')
    assert verdicts.spf_mailfrom is not None and verdicts.spf_mailfrom.result == "pass"
    [mailfrom, helo] = parsed(verdicts).results
    assert (mailfrom.result, props(mailfrom)) == ("pass", {"smtp.mailfrom": '"a;b (c)"@good.test'})
    assert (helo.result, props(helo)) == ("fail", {"smtp.helo": "helo.good.test"})


@pytest_twisted.ensureDeferred
async def test_authentication_results_without_a_mailfrom_domain(checks: MailAuth) -> None:
    verdicts = await sender(checks, "", helo="[127.0.0.5]")
    [result] = parsed(verdicts).results
    assert (result.method, result.result, props(result)) == ("spf", "none", {})


@pytest.mark.parametrize("domain, organization", [
    ("sub.good.test", "good.test"), ("Good.Test.", "good.test"), ("test", "test"), ("a.b.co.uk", "b.co.uk"),
    ("co.uk", "co.uk"), ("x.github.io", "x.github.io"), ("a.b.example.com", "example.com")])
def test_organizational_domain_is_one_label_below_the_public_suffix(domain: str, organization: str) -> None:
    from esmtpkit.mailauth.dmarc import organizational_domain
    assert organizational_domain(domain) == organization


@pytest_twisted.ensureDeferred
async def test_a_client_without_an_ip_address_gets_no_spf_verdict(checks: MailAuth, dns: PrivateDNS) -> None:
    """A client on a UNIX socket has no address SPF could check: no verdict, no query, and nothing to refuse."""
    from twisted.internet.address import UNIXAddress

    local = Session(hostname=AUTHSERV, peer=UNIXAddress(b"/run/esmtpkit.sock"), helo="helo.good.test")
    verdicts = await checks.check_sender(local, "alice@other.test")
    assert (verdicts.spf_mailfrom, verdicts.spf_helo, verdicts.remote_ip) == (None, None, "")
    assert dns.queries == []
    checks.spf_reject = True
    assert checks.refusal_at_mail(verdicts) is None


@pytest_twisted.ensureDeferred
async def test_dkim_bare_line_end_in_the_header_section_is_permerror(checks: MailAuth, keys: dict[str, Key]) -> None:
    """A bare LF splits fields differently for dkimpy than for us: no signature there can pass, even a good one."""
    signed = dkim_sign(message(), "good.test", keys["good.test"])
    verdicts = await full(checks, b"X-Junk: a\nb\r\n" + signed)
    [v] = verdicts.dkim
    assert (v.result, v.domain, v.reason) == ("permerror", "good.test", "bare CR or LF in the header section")
    assert verdicts.dmarc is not None and verdicts.dmarc.dkim_aligned is False
