"""DKIM (RFC 6376) and ARC (RFC 8617) verification with dkimpy, its DNS fetched first through twisted.names.

`signers` reads the signatures' key names from the header section (cheap, in the reactor); `fetch_keys` looks
every key up at once, asynchronously; `verify` then runs dkimpy in a worker thread, its DNS hook answered from
the keys fetched, so the thread never waits on the network. At most ``max_signatures`` DKIM signatures and
`MAX_ARC_KEYS` ARC keys are looked up: a message cannot make the server query DNS without bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Final, IO, Iterable

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value
from twisted.internet.defer import Deferred, DeferredList

from esmtpkit.mailauth.lookups import DNSTempError, Lookups
from esmtpkit.mailauth.verdicts import ArcVerdict, DkimVerdict

__all__ = ["Signers", "signers", "fetch_keys", "verify", "MAX_ARC_SETS", "MAX_ARC_KEYS", "header_section"]

#: RFC 8617 §5.1.1.1: a chain of more than 50 sets fails.
MAX_ARC_SETS: Final = 50

#: The most distinct keys an ARC chain may name; a longer list fails the chain without a lookup (a real chain has
#: one or two per forwarder, and few forwarders).
MAX_ARC_KEYS: Final = 20

_ARC_FIELDS: Final = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")

#: A DKIM-Signature's required tags (RFC 6376 §3.5).
_REQUIRED: Final = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")

_HEADER_LINE = re.compile(rb"^([!-9;-~]+)[ \t]*:(.*)$", re.DOTALL)
_TEMPORARY = object()


def header_section(head: bytes) -> list[tuple[bytes, bytes]]:
    """The fields of a header section (``head``, up to the empty line) as ``(name, value)``, unfolded."""
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if not line:
            break
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b" " + line.strip())
            continue
        match = _HEADER_LINE.match(line)
        if match is None:
            break
        fields.append((match.group(1), match.group(2).strip()))
    return fields


def _tags(value: bytes) -> dict[bytes, bytes] | None:
    try:
        return {k: v for k, v in parse_tag_value(value).items()}
    except (InvalidTagValueList, ValueError):
        return None


def _text(value: bytes | None) -> str:
    return (value or b"").decode("ascii", "replace")


def _key_name(tags: dict[bytes, bytes]) -> str:
    return f"{_text(tags[b's'])}._domainkey.{_text(tags[b'd'])}".rstrip(".").lower()


@dataclass
class Signers:
    """What the header section asks DNS for: each DKIM signature's tags (None when malformed) in order, the ARC
    sets' tags by instance, and the key names to fetch."""

    dkim: list[dict[bytes, bytes] | None] = field(default_factory=list)
    arc_seal: dict[int, dict[bytes, bytes]] = field(default_factory=dict)
    arc_ams: dict[int, dict[bytes, bytes]] = field(default_factory=dict)
    arc_sets: int = 0
    names: set[str] = field(default_factory=set)
    arc_problem: str = ""

    @property
    def any_arc(self) -> bool:
        return self.arc_sets > 0 or bool(self.arc_problem)


def signers(head: bytes, max_signatures: int = 5, *, arc: bool = True) -> Signers:
    """Read the signatures in the header section ``head``: the first ``max_signatures`` DKIM-Signature fields
    and, with ``arc``, the ARC sets. A chain that cannot pass whatever DNS says (a repeated or out-of-range
    instance, more than `MAX_ARC_SETS` sets, more than `MAX_ARC_KEYS` keys) gets ``arc_problem`` and no lookups:
    the fields a message carries never make the server query DNS more than ``max_signatures + MAX_ARC_KEYS``
    times."""
    found = Signers()
    instances: set[int] = set()
    seen: set[tuple[bytes, int]] = set()
    arc_names: set[str] = set()
    for name, value in header_section(head):
        lowered = name.lower()
        if lowered == b"dkim-signature":
            if len(found.dkim) >= max_signatures:
                continue
            tags = _tags(value)
            if tags is not None and all(t in tags for t in _REQUIRED):
                found.names.add(_key_name(tags))
                found.dkim.append(tags)
            else:
                found.dkim.append(None)
        elif not arc or lowered not in _ARC_FIELDS:
            continue
        elif lowered == b"arc-authentication-results":
            match = re.match(rb"\s*i\s*=\s*(\d{1,9})\s*;", value)
            if match is None:
                found.arc_problem = found.arc_problem or "ARC-Authentication-Results without an instance"
                continue
            _note_instance(found, seen, instances, lowered, int(match.group(1)))
        else:
            tags = _tags(value)
            instance_text = tags.get(b"i", b"").strip() if tags is not None else b""
            if not instance_text.isdigit() or len(instance_text) > 9:
                found.arc_problem = found.arc_problem or f"{_text(name)} without a valid instance"
                continue
            instance = int(instance_text)
            if not _note_instance(found, seen, instances, lowered, instance):
                continue
            (found.arc_seal if lowered == b"arc-seal" else found.arc_ams)[instance] = tags
            if b"s" in tags and b"d" in tags:
                arc_names.add(_key_name(tags))
    found.arc_sets = max(instances, default=0)
    if found.arc_sets > MAX_ARC_SETS:
        found.arc_problem = found.arc_problem or f"more than {MAX_ARC_SETS} ARC sets"
    elif len(arc_names) > MAX_ARC_KEYS:
        found.arc_problem = found.arc_problem or f"more than {MAX_ARC_KEYS} ARC keys"
    if not found.arc_problem:
        found.names |= arc_names
    return found


def _note_instance(found: Signers, seen: set[tuple[bytes, int]], instances: set[int], kind: bytes,
                   instance: int) -> bool:
    """Record one ARC field's instance; False (and the chain's problem) when it repeats or is out of range."""
    if not 1 <= instance <= MAX_ARC_SETS:
        instances.add(instance)
        found.arc_problem = found.arc_problem or f"ARC instance {instance} out of range"
        return False
    if (kind, instance) in seen:
        found.arc_problem = found.arc_problem or f"more than one {kind.decode()} with i={instance}"
        return False
    seen.add((kind, instance))
    instances.add(instance)
    return True


def fetch_keys(lookups: Lookups, names: Iterable[str]) -> "Deferred[dict[str, Any]]":
    """Every key record at once: name → the TXT record's text, None (no key), or a marker for a DNS failure."""
    names = sorted(set(names))

    def one(name: str) -> "Deferred[Any]":
        def found(records: list[bytes] | None) -> Any:
            keys = [r for r in records or () if r.strip()]
            return keys[0] if keys else None

        return lookups.txt(name).addCallbacks(found, lambda f: f.trap(DNSTempError) and _TEMPORARY)

    return DeferredList([one(n) for n in names], consumeErrors=True).addCallback(
        lambda results: {name: (value if ok else _TEMPORARY) for name, (ok, value) in zip(names, results)})


class _Notes:
    """A logger for dkimpy that keeps its last complaint, the reason a signature failed."""

    def __init__(self) -> None:
        self.last = ""

    def error(self, message: Any, *args: Any) -> None:
        self.last = str(message) % args if args else str(message)

    warning = error

    def debug(self, *args: Any) -> None:
        pass

    info = debug


class _KeyTemporary(Exception):
    pass


def _dnsfunc(keys: dict[str, Any]) -> Callable[..., bytes | None]:
    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        key = keys.get(text.rstrip(".").lower())
        if key is _TEMPORARY:
            raise _KeyTemporary(text)
        return key

    return lookup


def _short(text: str) -> str:
    """dkimpy's complaint without its details in parentheses (hashes and such), bounded."""
    return text.split(" (", 1)[0].strip()[:120]


def _b(tags: dict[bytes, bytes]) -> str:
    return re.sub(r"\s+", "", _text(tags.get(b"b")))[:8]


def _refused_algorithm(algorithm: str, key: Any) -> str:
    """Why a signature's algorithm cannot pass whatever its hash: rsa-sha1 (RFC 8301 §3.1: verifiers must not
    consider it valid), or a hash the key record's ``h=`` does not allow (RFC 6376 §3.6.1); "" when neither."""
    algorithm = algorithm.strip().lower()
    if algorithm == "rsa-sha1":
        return "rsa-sha1 is not accepted (RFC 8301)"
    hashes = None
    if isinstance(key, (bytes, str)):
        text = key.decode("ascii", "replace") if isinstance(key, bytes) else key
        for tag in text.split(";"):
            name, _, value = tag.partition("=")
            if name.strip().lower() == "h":
                hashes = {h.strip().lower() for h in value.split(":") if h.strip()}
    digest = algorithm.partition("-")[2]
    if hashes is not None and digest and digest not in hashes:
        return f"the key does not allow {digest}"
    return ""


def _one(message: bytes, index: int, tags: dict[bytes, bytes] | None, keys: dict[str, Any],
         minkey: int) -> DkimVerdict:
    if tags is None:
        return DkimVerdict("permerror", "", "", reason="malformed signature")
    common = dict(domain=_text(tags[b"d"]).lower(), selector=_text(tags[b"s"]), identity=_text(tags.get(b"i")),
                  algorithm=_text(tags.get(b"a")), b=_b(tags))
    key = keys.get(_key_name(tags))
    if key is _TEMPORARY:
        return DkimVerdict("temperror", reason="key lookup failed", **common)
    if key is None:
        return DkimVerdict("permerror", reason="no key", **common)
    refused = _refused_algorithm(common["algorithm"], key)
    if refused:
        return DkimVerdict("fail", reason=refused, **common)
    notes = _Notes()
    try:
        ok = dkim.DKIM(message, logger=notes, minkey=minkey).verify(idx=index, dnsfunc=_dnsfunc(keys))
    except _KeyTemporary:
        return DkimVerdict("temperror", reason="key lookup failed", **common)
    except dkim.KeyFormatError as e:
        return DkimVerdict("permerror", reason=_short(f"bad key: {e}"), **common)
    except dkim.ValidationError as e:
        return DkimVerdict("fail", reason=_short(str(e)), **common)
    except dkim.DKIMException as e:
        return DkimVerdict("permerror", reason=_short(str(e)), **common)
    if ok:
        return DkimVerdict("pass", **common)
    return DkimVerdict("fail", reason=_short(notes.last or "signature did not verify"), **common)


def _arc(message: bytes, found: Signers, keys: dict[str, Any]) -> ArcVerdict:
    newest = found.arc_sets
    seal, ams = found.arc_seal.get(newest, {}), found.arc_ams.get(newest, {})
    shown = dict(instances=newest, ams_domain=_text(ams.get(b"d")).lower(), ams_selector=_text(ams.get(b"s")),
                 as_domain=_text(seal.get(b"d")).lower(), as_selector=_text(seal.get(b"s")))
    if found.arc_problem:
        return ArcVerdict("fail", reason=found.arc_problem, **shown)
    try:
        cv, results, reason = dkim.ARC(message, logger=_Notes()).verify(dnsfunc=_dnsfunc(keys))
    except _KeyTemporary:
        return ArcVerdict("fail", reason="key lookup failed (temporary)", **shown)
    except dkim.DKIMException as e:
        return ArcVerdict("fail", reason=_short(str(e)), **shown)
    if cv == dkim.CV_Pass:
        oldest = 0
        for result in sorted(results, key=lambda r: r["instance"]):
            if not result.get("ams-valid"):
                oldest = result["instance"] + 1
        return ArcVerdict("pass", oldest_pass=oldest, **shown)
    if cv == dkim.CV_None:
        return ArcVerdict("none")
    return ArcVerdict("fail", reason=_short(str(reason)), **shown)


def verify(open_message: Callable[[], IO[bytes]], found: Signers, keys: dict[str, Any], *, arc: bool = True,
           minkey: int = 1024) -> tuple[list[DkimVerdict], ArcVerdict | None]:
    """Verify each signature ``found`` with the ``keys`` fetched, and the ARC chain when ``arc``. Blocking (it
    reads the whole message and hashes it): call it in a worker thread."""
    with open_message() as stream:
        message = stream.read()
    end = message.find(b"\r\n\r\n")
    head = (message[:end + 2] if end >= 0 else message).replace(b"\r\n", b"")
    if b"\r" in head or b"\n" in head:
        # dkimpy would split this header section at bare line ends, where ours does not: its fields would not be
        # the ones found here, so no verdict can be trusted.
        broken = [DkimVerdict("permerror", _text(t.get(b"d")).lower() if t else "", _text(t.get(b"s")) if t else "",
                              reason="bare CR or LF in the header section") for t in found.dkim]
        return broken, (ArcVerdict("fail", reason="bare CR or LF in the header section") if arc else None)
    verdicts = [_one(message, index, tags, keys, minkey) for index, tags in enumerate(found.dkim)]
    chain = (_arc(message, found, keys) if found.any_arc else ArcVerdict("none")) if arc else None
    return verdicts, chain
