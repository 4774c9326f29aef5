"""A test world for mail authentication: DKIM keys made in the test, and the SPF, DKIM, DMARC and ARC records of a
few domains, served by `tests.mailnet.PrivateDNS` on loopback.

Domains (all under ``.test``): ``good.test`` (SPF ``-all`` allowing 127.0.0.0/8, a DKIM key, DMARC p=reject),
``soft.test`` (``~all``), ``neutral.test`` (``?all``), ``none.test`` (no records), ``broken.test`` (an SPF
record with an unknown mechanism, and a DMARC record without p=), ``slow.test`` (DNS never answers),
``strict.test`` (DMARC adkim=s aspf=s), ``sub.good.test`` (a subdomain, for relaxed alignment), ``other.test``
(a different organization with its own key), ``quarantine.test`` (p=quarantine).

`world_dns` serves a world while a block runs; `mail_auths` makes `MailAuth` checks that ask such a server, and
closes them; `MESSAGE` is a plain message from alice@good.test. The fixtures ``auth_world`` and ``auth_dns``
(tests/conftest.py) give a test the world and its server.
"""

from __future__ import annotations

import base64
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from esmtpkit.mailauth import MailAuth

from .mailnet import PrivateDNS

__all__ = ["Key", "make_key", "auth_zones", "key_files", "txt_lookup", "SELECTOR", "AUTHSERV", "MESSAGE", "OUTBOUND",
           "dkim_sign", "arc_seal", "world_dns", "mail_auths"]

SELECTOR = "s1"
#: The authserv-id the tests' checks write their results under.
AUTHSERV = "mx.test"
#: A message written by alice@good.test to bob@example.test, unsigned.
MESSAGE = (b"From: Alice <alice@good.test>\r\n"
           b"To: bob@example.test\r\n"
           b"Subject: hello\r\n"
           b"Date: Sun, 6 Dec 2026 07:00:00 +0000\r\n"
           b"Message-ID: <1@good.test>\r\n"
           b"\r\n"
           b"Hello, Bob.\r\n")
#: `MESSAGE` to bob@example.net, outside the test zones: the mail the signing tests sign and send out.
OUTBOUND = MESSAGE.replace(b"To: bob@example.test", b"To: bob@example.net")


@dataclass
class Key:
    """An RSA key pair: ``private`` PEM for dkimpy, ``record`` the DKIM key record for DNS."""

    private: bytes
    record: str


_keys: dict[int, list[Key]] = {}


def make_key(bits: int = 1024) -> Key:
    """A fresh RSA key (1024 bits: dkimpy's minimum, and quick to make)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return Key(private, "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode())


def _chunks(text: str) -> list[str]:
    return [text[i:i + 250] for i in range(0, len(text), 250)]


@dataclass
class AuthWorld:
    """The zones and the keys that sign for them."""

    keys: dict[str, Key] = field(default_factory=dict)
    zones: dict[str, dict[str, Any]] = field(default_factory=dict)
    silent: list[str] = field(default_factory=list)


def auth_zones() -> AuthWorld:
    """A fresh world: new keys each time (made once per process and reused: key generation is the slow part)."""
    keys = _keys.setdefault(0, [make_key(), make_key()])
    good, other = keys
    world = AuthWorld(keys={"good.test": good, "other.test": other, "strict.test": good, "quarantine.test": good})
    z = world.zones
    z["good.test"] = {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"], "A": ["127.0.0.9"], "MX": [(10, "mx.good.test")]}
    z["mx.good.test"] = {"A": ["127.0.0.9"]}
    z["helo.good.test"] = {"TXT": ["v=spf1 a:helo.good.test -all"], "A": ["127.0.0.1"]}
    z["_dmarc.good.test"] = {"TXT": ["v=DMARC1; p=reject; rua=mailto:dmarc@good.test"]}
    z[f"{SELECTOR}._domainkey.good.test"] = {"TXT": [_chunks(good.record)]}
    z["sub.good.test"] = {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]}
    z["soft.test"] = {"TXT": ["v=spf1 ~all"]}
    z["neutral.test"] = {"TXT": ["v=spf1 ?all"]}
    z["none.test"] = {"A": ["127.0.0.9"]}
    z["broken.test"] = {"TXT": ["v=spf1 ip4:127.0.0.1 frobnicate:x -all"]}
    z["_dmarc.broken.test"] = {"TXT": ["v=DMARC1; adkim=s"]}
    z["strict.test"] = {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]}
    z["_dmarc.strict.test"] = {"TXT": ["v=DMARC1; p=reject; adkim=s; aspf=s"]}
    z[f"{SELECTOR}._domainkey.strict.test"] = {"TXT": [_chunks(good.record)]}
    z["quarantine.test"] = {"TXT": ["v=spf1 -all"]}
    z["_dmarc.quarantine.test"] = {"TXT": ["v=DMARC1; p=quarantine"]}
    z["other.test"] = {"TXT": ["v=spf1 -all"]}
    z[f"{SELECTOR}._domainkey.other.test"] = {"TXT": [_chunks(other.record)]}
    z["_dmarc.other.test"] = {"TXT": ["v=DMARC1; p=none"]}
    z["slow.test"] = {"TXT": ["v=spf1 -all"]}
    world.silent = ["slow.test", f"{SELECTOR}._domainkey.slow.test", "_dmarc.slow.test"]
    return world


def key_files(world: AuthWorld, folder: Path) -> dict[str, str]:
    """The private keys of good.test and other.test written as PEM files in ``folder``; domain -> path."""
    paths = {}
    for domain in ("good.test", "other.test"):
        path = folder / f"{domain}.pem"
        path.write_bytes(world.keys[domain].private)
        paths[domain] = str(path)
    return paths


def txt_lookup(world: AuthWorld) -> Callable[..., bytes | None]:
    """dkimpy's TXT lookup (its ``dnsfunc``) answered from ``world``'s zones."""
    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        records = world.zones.get(name.decode().rstrip(".").lower(), {}).get("TXT")
        if not records:
            return None
        first = records[0]
        return ("".join(first) if isinstance(first, list) else first).encode()

    return lookup


def dkim_sign(message: bytes, domain: str, key: Key, selector: str = SELECTOR,
              headers: tuple[bytes, ...] = (b"from", b"to", b"subject", b"date", b"message-id")) -> bytes:
    """``message`` with a DKIM-Signature by ``domain`` on top (dkimpy)."""
    import dkim

    signature = dkim.sign(message, selector.encode(), domain.encode(), key.private, include_headers=list(headers))
    return signature + message


def arc_seal(message: bytes, domain: str, key: Key, srv_id: str, selector: str = SELECTOR) -> bytes:
    """``message`` with an ARC set by ``domain`` on top (it must carry an Authentication-Results by ``srv_id``)."""
    import dkim

    fields = dkim.arc_sign(message, selector.encode(), domain.encode(), key.private, srv_id.encode())
    return b"".join(fields) + message


@contextmanager
def world_dns(world: AuthWorld, **options: Any) -> Iterator[PrivateDNS]:
    """``world``'s zones served on 127.0.0.1 while the block runs, its silent names never answered (``options``:
    more `PrivateDNS` keywords, such as ``servfail``). Use it from a fixture run by pytest-twisted."""
    server = PrivateDNS(world.zones, silent=world.silent, **options).start()
    try:
        yield server
    finally:
        pytest_twisted.blockon(server.stop())


@contextmanager
def mail_auths(dns_servers: Sequence[tuple[str, int]], **defaults: Any) -> Iterator[Callable[..., MailAuth]]:
    """``make(**options)``: a `MailAuth` asking ``dns_servers`` (authserv-id `AUTHSERV`, then ``defaults``, unless
    ``options`` say otherwise); every one made is closed on leaving, so that no thread pool outlives the test."""
    made: list[MailAuth] = []

    def make(**options: Any) -> MailAuth:
        checks = MailAuth(dns_servers=dns_servers, **{"authserv_id": AUTHSERV, **defaults, **options})
        made.append(checks)
        return checks

    try:
        yield make
    finally:
        for checks in made:
            checks.close()
