"""The verdicts of the checks, as values a handler can read, and the ``Authentication-Results:`` field (RFC 8601)
they make, written with authres.

Results are RFC 8601's words in lower case: ``pass``, ``fail``, ``softfail``, ``neutral``, ``none``,
``temperror``, ``permerror`` (and ``policy`` for DKIM signatures left unchecked by a limit).

Much of what the field shows comes from the message or from the sender's DNS (a signature's ``d=``, ``s=``,
``i=``, the ``From:`` domain, an SPF explanation), and authres writes values as it is given them. So every value
is made safe here first (`pvalue`, `reason_text`, `comment_text`): a property keeps its value only when that is
a valid token, domain name or address for it (RFC 8601 §2.2), quoted where the grammar asks, else the property
is left out; reasons and comments keep printable ASCII only, with no quote, backslash or parenthesis, and are cut
short. The field then reads back (with authres, or any RFC 8601 parser) as exactly the results decided here.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Final

import authres
import authres.arc
import authres.dmarc

__all__ = ["SpfVerdict", "DkimVerdict", "DmarcVerdict", "ArcVerdict", "AuthVerdicts", "fold", "pvalue",
           "reason_text", "comment_text", "RESULTS", "MAX_REASON"]

#: The results a field may show; any other word is shown as ``permerror``.
RESULTS: Final = frozenset(("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy"))
#: The longest reason or comment written, in characters (a longer one is cut, and ends in ``...``).
MAX_REASON: Final = 120

#: RFC 2045 §5.1 token: printable ASCII but space and tspecials.
_TOKEN: Final = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+")
_LABEL: Final = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
#: A domain name as DNS has it (RFC 1035 labels, underscores allowed for selectors and such), 253 octets at most.
_DOMAIN_NAME: Final = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*", re.ASCII)
#: RFC 5322 dot-atom (an unquoted local part).
_ATEXT: Final = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_DOT_ATOM: Final = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
#: A quoted local part whose quoted pairs and text are printable ASCII (RFC 5322 quoted-string, no folding).
_QUOTED: Final = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])+"')
#: The longest local part written (RFC 5321 §4.5.3.1.1 allows 64 octets; quoting may add some).
_MAX_LOCAL: Final = 130
#: DKIM's b= prefix (RFC 6008): base64 characters.
_BASE64: Final = re.compile(r"[A-Za-z0-9+/]{1,64}")
_KEYWORD: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}")
#: What a reason or a comment may keep: printable ASCII but the quote, the backslash, the parentheses and the
#: semicolon (inside quotes it is harmless to RFC 8601, but a reader that splits the field at each ``;`` is fooled).
_UNSAFE_TEXT: Final = re.compile(r'[^\x20\x21\x23-\x27\x2a-\x3a\x3c-\x5b\x5d-\x7e]')


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
        """The verdicts as authres results, in the order the field lists them, every value made safe (see the
        module). A quoted value (a ``b=`` prefix with a ``/``, an IPv6 address) comes last in its result, where
        authres's own parser can read it back."""
        results: list[authres.BaseAuthenticationResult] = []
        if self.spf_mailfrom is not None:
            v = self.spf_mailfrom
            results.append(_made(authres.SPFAuthenticationResult, v.result, v.explanation, None, [
                ("smtp", "mailfrom", pvalue(v.identity, "address") or pvalue(v.domain, "domain"))]))
        if self.spf_helo is not None:
            v = self.spf_helo
            results.append(_made(authres.SPFAuthenticationResult, v.result, "", None, [
                ("smtp", "helo", pvalue(v.identity, "domain"))]))
        if self.dkim_checked and not self.dkim:
            results.append(authres.DKIMAuthenticationResult(result="none"))
        for s in self.dkim:
            results.append(_made(authres.DKIMAuthenticationResult, s.result, s.reason, None, [
                ("header", "d", pvalue(s.domain, "domain")), ("header", "i", pvalue(s.identity, "identity")),
                ("header", "a", pvalue(s.algorithm, "keyword")), ("header", "s", pvalue(s.selector, "domain")),
                ("header", "b", pvalue(s.b, "base64"))]))
        if self.dmarc is not None:
            v = self.dmarc
            policy, disposition = pvalue(v.policy, "keyword"), pvalue(v.disposition, "keyword")
            comment = f"p={policy} dis={disposition}" if policy and disposition else ""
            results.append(_made(authres.dmarc.DMARCAuthenticationResult, v.result, v.reason, comment, [
                ("header", "from", pvalue(v.domain, "domain"))]))
        if self.arc is not None:
            v = self.arc
            oldest = str(v.oldest_pass) if v.instances and v.result == "pass" else ""
            results.append(_made(authres.arc.ARCAuthenticationResult, v.result, v.reason, None, [
                ("header", "ams-d", pvalue(v.ams_domain, "domain")),
                ("header", "ams-s", pvalue(v.ams_selector, "domain")),
                ("header", "as-d", pvalue(v.as_domain, "domain")), ("header", "as-s", pvalue(v.as_selector, "domain")),
                ("header", "oldest-pass", pvalue(oldest, "keyword")),
                ("smtp", "remote-ip", pvalue(self.remote_ip, "ip"))]))
        return results

    def field(self, authserv_id: str) -> bytes:
        """The ``Authentication-Results:`` field for these verdicts, folded, with its CRLF."""
        header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=self.results())
        return fold(str(header)).encode("utf-8") + b"\r\n"


class _Written(str):
    """A value already in its written form (made safe, quoted if need be): authres writes it as it is."""

    def quote_if_needed(self) -> str:
        return str(self)


def _made(kind: type, result: str, reason: str | None, comment: str | None,
          properties: list[tuple[str, str, str | None]]) -> authres.BaseAuthenticationResult:
    """An authres result of ``kind`` with only safe text: the properties whose value survived `pvalue` (quoted
    ones last), the reason and the comment made safe."""
    made = kind(result=result if result in RESULTS else "permerror", result_comment=comment_text(comment) or None)
    kept = [(ptype, name, value) for ptype, name, value in properties if value]
    for ptype, name, value in sorted(kept, key=lambda p: p[2].startswith('"')):  # type: ignore[union-attr]
        prop = authres.AuthenticationResultProperty(ptype, name)
        prop.value = _Written(value)
        made.properties.append(prop)
    why = reason_text(reason)
    made.reason = _Written(why if _TOKEN.fullmatch(why) else f'"{why}"') if why else None
    return made


def _domain(text: str) -> str | None:
    name = text.strip().rstrip(".")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return name if _DOMAIN_NAME.fullmatch(name) else None


def _local(text: str) -> str | None:
    """A local part as it can be written: a dot-atom, a quoted-string of printable ASCII, or printable ASCII
    quoted here; None for anything else (8-bit text, control characters) or too long."""
    if _DOT_ATOM.fullmatch(text) or _QUOTED.fullmatch(text):
        written = text
    elif re.fullmatch(r"[\x20-\x7e]+", text):
        written = '"' + re.sub(r'(["\\])', r"\\\1", text) + '"'
    else:
        return None
    return written if len(written) <= _MAX_LOCAL else None


def pvalue(text: str | None, kind: str) -> str | None:
    """``text`` as it can stand as a property's value of ``kind`` (RFC 8601 §2.2: ``value / [[local-part] "@"]
    domain-name``), or None when it cannot, and the property is better left out.

    ``domain``: a domain name (a U-label becomes its A-label); ``address``: ``local@domain``, the local part quoted
    if it must be, or the domain alone when the local part cannot be written; ``identity`` (DKIM's ``i=``):
    ``[local]@domain``; ``keyword``: a short token such as ``rsa-sha256``; ``base64``: DKIM's ``b=`` prefix;
    ``ip``: an IP address. A value that needs quoting comes quoted."""
    if not text:
        return None
    text = text.strip()
    if kind == "domain":
        return _domain(text)
    if kind in ("address", "identity"):
        local, at, domain = text.rpartition("@")
        host = _domain(domain)
        if not at or host is None:
            return host if kind == "address" and not at else None
        if not local:
            return "@" + host
        written = _local(local)
        if written is not None:
            return f"{written}@{host}"
        return host if kind == "address" else "@" + host
    if kind == "keyword":
        return text if _KEYWORD.fullmatch(text) and _TOKEN.fullmatch(text) else None
    if kind == "base64":
        text = text.rstrip("=")
        if not _BASE64.fullmatch(text):
            return None
        return text if _TOKEN.fullmatch(text) else f'"{text}"'
    if kind == "ip":
        try:
            address = str(ipaddress.ip_address(text))
        except ValueError:
            return None
        return address if _TOKEN.fullmatch(address) else f'"{address}"'
    raise ValueError(f"no such kind of value: {kind}")


def _safe_text(text: str | None) -> str:
    if not text:
        return ""
    text = " ".join(_UNSAFE_TEXT.sub("?", " ".join(text.split())).split())
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 3].rstrip() + "..."


def reason_text(text: str | None) -> str:
    """``text`` as a reason can hold it: printable ASCII, whitespace made single spaces, a quote, backslash,
    parenthesis, semicolon, ``=`` (no ``dkim=pass`` for a reader that searches the field) or anything else made
    ``?``, at most `MAX_REASON` characters (a quoted-string unless it is a token)."""
    return _safe_text(text).replace("=", "?")


def comment_text(text: str | None) -> str:
    """``text`` as a comment can hold it (what `reason_text` keeps: no parenthesis can open or close one)."""
    return _safe_text(text)


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
