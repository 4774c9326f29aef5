"""DMARC (RFC 7489): the author domain, its policy record found through twisted.names, and the verdict from the
``dmarc`` package's evaluator, with the public suffix list publicsuffix2 ships for organizational domains.

The ``dmarc`` package is a pure evaluator (it takes a record and identifiers, does no I/O), which is what lets
the record be fetched asynchronously here; its ``publicsuffix2`` list gives the organizational domain (§3.2).
"""

from __future__ import annotations

import random
import re
from email.utils import getaddresses
from typing import Iterable

import dmarc as evaluator
from dmarc.psl import load as load_public_suffixes
from twisted.internet.defer import Deferred

from esmtpkit.mailauth.lookups import DNSTempError, Lookups
from esmtpkit.mailauth.verdicts import DkimVerdict, DmarcVerdict, SpfVerdict

__all__ = ["author_domain", "public_suffix", "organizational_domain", "check", "evaluate"]

_suffixes = None


def _psl():
    global _suffixes
    if _suffixes is None:
        _suffixes = load_public_suffixes(None)
    return _suffixes


def public_suffix(domain: str) -> str:
    """The public suffix of ``domain``: the longest listed one, else its last label (a TLD the list does not
    know, such as ``.test``, is still a public suffix, never part of an organization)."""
    domain = domain.lower().rstrip(".")
    return _psl().get_tld(domain, strict=True) or domain.rpartition(".")[2]


def organizational_domain(domain: str) -> str:
    """The organizational domain of ``domain`` (RFC 7489 §3.2): one label below its public suffix."""
    domain = domain.lower().rstrip(".")
    suffix = public_suffix(domain)
    if domain == suffix or not domain.endswith("." + suffix):
        return domain
    return domain[: -len(suffix) - 1].rpartition(".")[2] + "." + suffix


def _is_public_suffix(domain: str) -> bool:
    return public_suffix(domain) == domain.lower().rstrip(".")


class _Organizations:
    """What the ``dmarc`` evaluator asks its public suffix list for: its relaxed alignment check calls
    ``get_public_suffix`` and means the organizational domain."""

    @staticmethod
    def get_public_suffix(domain: str) -> str:
        return organizational_domain(domain)


def author_domain(from_values: Iterable[str]) -> str | None:
    """The domain of the one author in the From: field(s) given; None unless there is exactly one From: field
    with exactly one address whose domain is a domain name (RFC 7489 §6.6.1)."""
    values = list(from_values)
    if len(values) != 1:
        return None
    addresses = [a for _, a in getaddresses(values) if a]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    domain = addresses[0].rpartition("@")[2].strip().rstrip(".").lower()
    if not domain or "." not in domain or domain.startswith("["):
        return None
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return domain if _HOSTNAME.fullmatch(domain) else None  # a%b.test is no domain: nothing to look up


#: A domain name DNS can be asked about: labels of letters, digits, hyphens (and underscores), at most 63 each.
_HOSTNAME = re.compile(r"(?=.{1,253}$)(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)+[a-z0-9-]{1,63}")

#: The start of a DMARC policy record: its version tag, with the whitespace RFC 7489 §6.4 allows around ``=``.
_VERSION = re.compile(r"v[ \t]*=[ \t]*DMARC1(?=[ \t;]|$)")


def _records(texts: list[bytes] | None) -> list[str]:
    """The TXT strings that are DMARC records (they start with ``v=DMARC1``, ``v = DMARC1`` too)."""
    found = []
    for text in texts or ():
        value = text.decode("utf-8", "replace").strip()
        if _VERSION.match(value):
            found.append(value)
    return found


async def _discover(lookups: Lookups, domain: str) -> tuple[str | None, str | None]:
    """The policy record for ``domain`` and the organizational domain it came from (None when it was the
    domain's own), by RFC 7489 §6.6.3; DNSTempError when DNS could not answer."""
    own = _records(await lookups.txt(f"_dmarc.{domain}"))
    if len(own) == 1:
        return own[0], None
    if own:
        return None, None  # more than one record: no policy
    org = organizational_domain(domain)
    if org == domain:
        return None, None
    found = _records(await lookups.txt(f"_dmarc.{org}"))
    return (found[0], org) if len(found) == 1 else (None, None)


def evaluate(record: str, domain: str, org: str | None, spf: SpfVerdict | None, dkim: Iterable[DkimVerdict],
             rng: random.Random) -> DmarcVerdict:
    """The verdict for a message from ``domain`` under ``record`` (found at ``org`` when not the domain's own)."""
    try:
        policy = evaluator.DMARCPolicy(record=record, domain=domain, org_domain=org, publicsuffix=_Organizations(),
                                       strict=False)
    except evaluator.RecordSyntaxError as e:
        return DmarcVerdict("permerror", domain, reason=f"bad record: {e}"[:120])
    results: list[evaluator.AuthResult] = []
    if spf is not None and spf.result == "pass" and spf.domain and not _is_public_suffix(spf.domain):
        results.append(evaluator.SPF(spf.domain, evaluator.SPFResult.PASS))
    for signature in dkim:
        if signature.result == "pass" and signature.domain and not _is_public_suffix(signature.domain):
            results.append(evaluator.DKIM(signature.domain, evaluator.DKIMResult.PASS))
    try:
        policy.verify(auth_results=results)
    except evaluator.PolicyError:
        pass
    outcome = policy.result
    published = (policy.policy.sp if org and policy.policy.sp is not evaluator.DMARCDisposition.UNSPECIFIED
                 else policy.policy.p).value
    spf_aligned = outcome.spf is evaluator.DMARCResult.PASS
    dkim_aligned = outcome.dkim is evaluator.DMARCResult.PASS
    if outcome.result is evaluator.DMARCResult.PASS:
        return DmarcVerdict("pass", domain, published, "none", spf_aligned, dkim_aligned)
    disposition = published
    pct = policy.policy.pct
    if pct < 100 and rng.randrange(100) >= pct:
        # §6.6.4: a message outside the sample gets the next policy down.
        disposition = {"reject": "quarantine", "quarantine": "none"}.get(disposition, disposition)
    return DmarcVerdict("fail", domain, published, disposition, spf_aligned, dkim_aligned)


def check(lookups: Lookups, from_values: list[str], spf: SpfVerdict | None, dkim: Iterable[DkimVerdict],
          rng: random.Random) -> "Deferred[DmarcVerdict]":
    """Find the author domain's policy and evaluate it; never fails (DNS trouble is a temperror verdict)."""
    dkim = list(dkim)

    async def run() -> DmarcVerdict:
        domain = author_domain(from_values)
        if domain is None:
            return DmarcVerdict("permerror", "", reason="no single author domain in From:")
        try:
            record, org = await _discover(lookups, domain)
        except DNSTempError as e:
            return DmarcVerdict("temperror", domain, reason=str(e)[:120])
        if record is None:
            return DmarcVerdict("none", domain)
        return evaluate(record, domain, org, spf, dkim, rng)

    return Deferred.fromCoroutine(run())
