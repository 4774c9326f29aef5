"""SPF (RFC 7208) with pyspf, for the MAIL FROM identity and the HELO identity (§2.3, §2.4).

pyspf evaluates a record recursively and asks DNS synchronously, so it runs in a worker thread; its queries go
back to the reactor's twisted.names resolver (`esmtpkit.mailauth.lookups.in_worker`). RFC 7208 §4.6.4's limits
are pyspf's: ten DNS-querying terms, two void lookups, and ``querytime`` seconds for the whole evaluation.
"""

from __future__ import annotations

import ipaddress
import re

import spf

from esmtpkit.mailauth.verdicts import SpfVerdict

__all__ = ["evaluate", "RESULTS"]

#: The results pyspf may give, as RFC 7208 §2.6 names them.
RESULTS = frozenset(("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"))

#: A name SPF can check (§4.3: a multi-label domain name): at least one dot, not an address literal, nor a
#: dotted quad (no top-level domain is all digits, RFC 3696 §2).
_DOMAIN = re.compile(r"(?=.{1,253}\Z)(?!.*\.[0-9]+\.?\Z)"
                     r"([A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)+[A-Za-z0-9-]{1,63}\.?\Z")


def _one(ip: str, sender: str, helo: str, querytime: float) -> tuple[str, str]:
    try:
        result, _code, explanation = spf.query(i=ip, s=sender, h=helo, querytime=querytime).check()
    except spf.TempError as e:
        return "temperror", str(e)
    except spf.PermError as e:
        return "permerror", str(e)
    result = str(result).lower()
    if result not in RESULTS:
        return "permerror", f"unexpected result {result}"
    return result, str(explanation) if result in ("fail", "softfail", "temperror", "permerror") else ""


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _client_ip(ip: str) -> str:
    """The client's address as SPF compares it: an IPv4-mapped IPv6 address as IPv4."""
    try:
        value = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(value, ipaddress.IPv6Address) and value.ipv4_mapped is not None:
        return str(value.ipv4_mapped)
    return str(value)


def evaluate(ip: str, sender: str, helo: str, *, check_helo: bool = True,
             querytime: float = 20.0) -> tuple[SpfVerdict | None, SpfVerdict]:
    """The HELO verdict (None when ``check_helo`` is off or the name is not a domain, such as an address literal)
    and the MAIL FROM verdict for a client at ``ip``. For ``<>`` the identity is postmaster@HELO (§2.4); when the
    HELO name is not a domain either, there is nothing to check: ``none``, with no identity or domain (so the
    field shows no ``smtp.mailfrom``). Blocking: call it in a worker thread (see the module)."""
    ip = _client_ip(ip)
    helo = (helo or "").strip()
    helo_ok = bool(_DOMAIN.match(helo))
    helo_verdict = None
    if check_helo and helo_ok:
        result, explanation = _one(ip, f"postmaster@{helo.rstrip('.')}", helo, querytime)
        helo_verdict = SpfVerdict(result, "helo", helo.rstrip("."), helo.rstrip(".").lower(), explanation)
    if sender:
        identity = sender
    elif helo_ok:
        identity = f"postmaster@{helo.rstrip('.')}"
    else:
        return helo_verdict, SpfVerdict("none", "mailfrom", "", "", "no domain to check")
    domain = _domain_of(identity)
    if "@" not in identity or not _DOMAIN.match(domain):
        return helo_verdict, SpfVerdict("none", "mailfrom", identity, domain, "not a domain SPF can check")
    result, explanation = _one(ip, identity, helo if helo_ok else domain, querytime)
    return helo_verdict, SpfVerdict(result, "mailfrom", identity, domain, explanation)
