"""The verdicts of the checks, as values a handler can read, and the ``Authentication-Results:`` field (RFC 8601)
they make, written with authres.

Results are RFC 8601's words in lower case: ``pass``, ``fail``, ``softfail``, ``neutral``, ``none``,
``temperror``, ``permerror`` (and ``policy`` for DKIM signatures left unchecked by a limit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import authres
import authres.arc
import authres.dmarc

__all__ = ["SpfVerdict", "DkimVerdict", "DmarcVerdict", "ArcVerdict", "AuthVerdicts", "fold"]


@dataclass(frozen=True)
class SpfVerdict:
    """SPF (RFC 7208) for one identity: ``scope`` ``"mailfrom"`` (the reverse-path, or postmaster@HELO for
    ``<>``) or ``"helo"``; ``identity`` the address or name checked, ``domain`` its domain."""

    result: str
    scope: str
    identity: str
    domain: str
    explanation: str = ""


@dataclass(frozen=True)
class DkimVerdict:
    """One DKIM-Signature (RFC 6376): the signing ``domain`` (d=), ``selector`` (s=), ``identity`` (i=),
    ``algorithm`` (a=), the first octets of its b= (``b``, as RFC 6008 shows it) and why it did not pass."""

    result: str
    domain: str
    selector: str
    identity: str = ""
    algorithm: str = ""
    b: str = ""
    reason: str = ""


@dataclass(frozen=True)
class DmarcVerdict:
    """DMARC (RFC 7489) for the author domain (``domain``, from the From: field). ``policy`` is the published
    p= (or sp= for a subdomain) and ``disposition`` what it asks for this message after pct= sampling (``none``
    unless the message failed). ``spf_aligned``/``dkim_aligned`` say which passing identifier aligned."""

    result: str
    domain: str
    policy: str = ""
    disposition: str = "none"
    spf_aligned: bool = False
    dkim_aligned: bool = False
    reason: str = ""


@dataclass(frozen=True)
class ArcVerdict:
    """The ARC chain (RFC 8617): ``result`` its validation (``pass``, ``fail``, ``none``), ``instances`` how many
    sets it has, the newest set's signer (``ams_domain``/``ams_selector``, ``as_domain``/``as_selector``) and the
    oldest instance whose message signature still verifies (``oldest_pass``, 0 when all do)."""

    result: str
    instances: int = 0
    ams_domain: str = ""
    ams_selector: str = ""
    as_domain: str = ""
    as_selector: str = ""
    oldest_pass: int = 0
    reason: str = ""


@dataclass
class AuthVerdicts:
    """Everything the checks found for one message (``session.envelope.auth``). A check that did not run is None
    (or, for DKIM, no entries); ``remote_ip`` is the client's address, for ARC's ``smtp.remote-ip``."""

    spf_helo: SpfVerdict | None = None
    spf_mailfrom: SpfVerdict | None = None
    dkim: tuple[DkimVerdict, ...] = ()
    dmarc: DmarcVerdict | None = None
    arc: ArcVerdict | None = None
    remote_ip: str = ""
    dkim_checked: bool = field(default=False)

    def results(self) -> list[authres.BaseAuthenticationResult]:
        """The verdicts as authres results, in the order the field lists them."""
        results: list[authres.BaseAuthenticationResult] = []
        if self.spf_mailfrom is not None:
            v = self.spf_mailfrom
            results.append(authres.SPFAuthenticationResult(
                result=v.result, smtp_mailfrom=v.identity or v.domain, reason=v.explanation or None))
        if self.spf_helo is not None:
            v = self.spf_helo
            results.append(authres.SPFAuthenticationResult(result=v.result, smtp_helo=v.identity))
        if self.dkim_checked and not self.dkim:
            results.append(authres.DKIMAuthenticationResult(result="none"))
        for s in self.dkim:
            results.append(authres.DKIMAuthenticationResult(
                result=s.result, reason=s.reason or None, header_d=s.domain, header_s=s.selector or None,
                header_i=s.identity or None, header_a=s.algorithm or None,
                properties=[authres.AuthenticationResultProperty("header", "b", s.b)] if s.b else None))
        if self.dmarc is not None:
            v = self.dmarc
            results.append(authres.dmarc.DMARCAuthenticationResult(
                result=v.result, result_comment=f"p={v.policy} dis={v.disposition}" if v.policy else None,
                reason=v.reason or None, header_from=v.domain or None))
        if self.arc is not None:
            v = self.arc
            results.append(authres.arc.ARCAuthenticationResult(
                result=v.result, reason=v.reason or None,
                header_ams_d=v.ams_domain or None, header_ams_s=v.ams_selector or None,
                header_as_d=v.as_domain or None, header_as_s=v.as_selector or None,
                header_oldest_pass=str(v.oldest_pass) if v.instances and v.result == "pass" else None,
                smtp_remote_ip=self.remote_ip or None))
        return results

    def field(self, authserv_id: str) -> bytes:
        """The ``Authentication-Results:`` field for these verdicts, folded, with its CRLF."""
        header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=self.results())
        return fold(str(header)).encode("utf-8") + b"\r\n"


def fold(text: str) -> str:
    """An ``Authentication-Results:`` field folded before each result, so no line grows past a result's length."""
    name, _, value = text.partition(": ")
    parts = _split_results(value)
    return f"{name}: " + ";\r\n\t".join(parts)


def _split_results(value: str) -> list[str]:
    """``value`` cut at each ``;`` outside quotes and comments."""
    parts, current, quoted, depth, escaped = [], [], False, 0, False
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"' and not depth:
            quoted = not quoted
        elif char == "(" and not quoted:
            depth += 1
        elif char == ")" and not quoted and depth:
            depth -= 1
        elif char == ";" and not quoted and not depth:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return [p for p in parts if p]
