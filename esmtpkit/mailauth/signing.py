"""DKIM signing (RFC 6376) and ARC sealing (RFC 8617) of mail on its way out, with dkimpy.

A `Signer` holds this server's keys: one per signing domain (``example.org:s1:/etc/dkim/s1.pem``), chosen by
the author's domain (the From: field) or the nearest parent domain that has one, so mail from
``news.example.org`` is signed by ``example.org`` (relaxed DMARC alignment). Mail from a domain with no key goes
unsigned. With an ARC key, a message that carries this server's own ``Authentication-Results:`` (it was
received and checked here, and is being forwarded) is also sealed. Signing reads and hashes the whole message,
so it runs in a worker thread; the content sent is the signature fields followed by the stored content.
Only this server's users' own mail is DKIM-signed (OpenDKIM's InternalHosts rule): the handler decides when it
accepts a message (an authenticated session, or a client inside `parse_sign_from`'s networks) and passes
``sign=False`` for any other; ARC sealing does not depend on it.
"""

from __future__ import annotations

import io
import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterable, Sequence

import dkim
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from esmtpkit.mailauth.dkim import header_section
from esmtpkit.mailauth.dmarc import author_domain

__all__ = ["SigningKey", "Signer", "parse_keys", "parse_headers", "parse_sign_from", "signer_for", "oversigned",
           "DEFAULT_HEADERS", "DEFAULT_SIGN_FROM"]

#: The fields signed when present (RFC 6376 §5.4.1's recommendations, From: always): each listed once more than
#: it appears ("oversigning"), so none can be added after signing without breaking the signature.
DEFAULT_HEADERS: tuple[bytes, ...] = (
    b"from", b"reply-to", b"subject", b"date", b"to", b"cc", b"message-id", b"in-reply-to", b"references",
    b"mime-version", b"content-type", b"content-transfer-encoding", b"list-id", b"list-unsubscribe",
    b"list-unsubscribe-post",
)

#: The clients whose mail is DKIM-signed without authenticating (OpenDKIM's InternalHosts default): this host.
DEFAULT_SIGN_FROM = "127.0.0.0/8,::1"

#: A line end as the client sends it: every bare CR and bare LF goes as CRLF (`esmtpkit.core.stuffing`).
_LINE_END = re.compile(rb"\r\n?|\n")


@dataclass(frozen=True)
class SigningKey:
    """A domain's signing key: the ``domain`` (d=), the ``selector`` (s=) and the private key in PEM."""

    domain: str
    selector: str
    private: bytes = field(repr=False)


#: A header field name as DKIM's h= can list it: RFC 5322's printable ASCII but the colon, and not the semicolon
#: that ends a DKIM tag.
_FIELD_NAME = re.compile(rb"[!-9<-~]+")


def parse_headers(text: str | Iterable[str] | None) -> tuple[bytes, ...]:
    """The header fields to sign from comma-, colon- or space-separated names (``From:To:Subject``), lower case,
    From first whether listed or not (RFC 6376 §5.4: it must be signed); `DEFAULT_HEADERS` for None or empty.
    ValueError names a name that cannot be one."""
    if not text:
        return DEFAULT_HEADERS
    words = text.replace(",", " ").replace(":", " ").split() if isinstance(text, str) else list(text)
    names: list[bytes] = [b"from"]
    for word in words:
        name = word.strip().lower().encode("ascii", "replace")
        if not word.strip().isascii() or not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"{word!r} is not a header field name")
        if name not in names:
            names.append(name)
    return tuple(names)


def parse_sign_from(text: str | Iterable[str] | None) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """The client networks whose mail is signed without authenticating, from IPs and CIDRs (comma- or
    space-separated text, or a list); `DEFAULT_SIGN_FROM` for None, none at all for ``none``. ValueError names
    an entry that is not an IP address or network."""
    if text is None:
        text = DEFAULT_SIGN_FROM
    words = text.replace(",", " ").split() if isinstance(text, str) else [str(t).strip() for t in text]
    items = [word for word in words if word]
    if [item.lower() for item in items] == ["none"]:
        return ()
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network (give IPs and CIDRs, or none)") from None
    return tuple(networks)


def oversigned(names: Sequence[bytes], head: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    """dkimpy's ``include_headers`` for signing ``names`` in a header section ``head``: each name once more than
    it appears (RFC 6376 §5.4.2, §8.15), so that none of its instances can be added without breaking the
    signature (dkimpy picks instances from the bottom up, then a missing one, which a field added later fills)."""
    counts = Counter(n.lower() for n, _ in head)
    return [name for name in names for _ in range(counts[name] + 1)]


def parse_keys(text: str | Iterable[str]) -> tuple[SigningKey, ...]:
    """Keys from ``DOMAIN:SELECTOR:KEYFILE`` entries (comma- or space-separated text, or a list of them), each
    file a PEM RSA private key (dkimpy signs Ed25519 only from a raw key, with pynacl); ValueError saying which
    entry is wrong and why."""
    entries = text.replace(",", " ").split() if isinstance(text, str) else [t.strip() for t in text]
    keys = []
    for entry in entries:
        domain, _, rest = entry.partition(":")
        selector, _, path = rest.partition(":")
        domain = domain.strip().rstrip(".").lower()
        if not domain or "." not in domain or not selector or not path:
            raise ValueError(f"{entry!r} is not DOMAIN:SELECTOR:KEYFILE")
        try:
            with open(path, "rb") as f:
                private = f.read()
        except OSError as e:
            raise ValueError(f"{entry}: cannot read the key: {(e.strerror or str(e)).lower()}") from None
        try:
            loaded = load_pem_private_key(private, password=None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{entry}: not a PEM private key without a passphrase ({e})") from None
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise ValueError(f"{entry}: not an RSA key (only RSA keys sign here)")
        keys.append(SigningKey(domain, selector, private))
    domains = [k.domain for k in keys]
    if len(set(domains)) != len(domains):
        raise ValueError("one key per signing domain")
    return tuple(keys)


class _Prefixed(io.RawIOBase):
    """``first`` then what ``rest`` holds, as one readable binary file."""

    def __init__(self, first: bytes, rest: IO[bytes]) -> None:
        self._first = first
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._first:
            n = min(len(buffer), len(self._first))
            buffer[:n] = self._first[:n]
            self._first = self._first[n:]
            return n
        data = self._rest.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._rest.close()
        super().close()


class Signer:
    """Signs outgoing mail with ``keys`` (`SigningKey` values) and, with ``arc``, seals the messages this server
    forwards (those with an ``Authentication-Results:`` by ``authserv_id``). ``headers``: the fields to sign."""

    log = Logger()

    def __init__(self, keys: Sequence[SigningKey] = (), *, arc: SigningKey | None = None,
                 authserv_id: str | None = None, headers: Sequence[bytes] = DEFAULT_HEADERS,
                 reactor: Any = None, threads: int = 2) -> None:
        if arc is not None and not authserv_id:
            raise ValueError("ARC sealing needs the authserv-id of this server's Authentication-Results")
        self.keys = {k.domain: k for k in keys}
        self.arc = arc
        self.authserv_id = (authserv_id or "").lower()
        self.headers = tuple(h.lower() for h in headers)
        self.reactor = reactor
        self.threads = threads
        self._pool: ThreadPool | None = None

    def key_for(self, domain: str) -> SigningKey | None:
        """The key for mail from ``domain``: its own, or its nearest parent domain's."""
        labels = domain.lower().rstrip(".").split(".")
        for start in range(len(labels) - 1):
            key = self.keys.get(".".join(labels[start:]))
            if key is not None:
                return key
        return None

    def acts_on(self, *, sign: bool = True) -> bool:
        """Whether `prepare` may add anything: an ARC set (with an ARC key), or a DKIM-Signature (with keys, for a
        message that ``sign`` says may be signed)."""
        return self.arc is not None or (sign and bool(self.keys))

    def fields(self, message: bytes, *, binary: bool = False, sign: bool = True) -> bytes:
        """The fields to put on top of ``message``: an ARC set (when forwarding and sealing), then a
        DKIM-Signature (when ``sign`` and its author domain has a key). Blocking (hashing). Unless ``binary``
        (BODY=BINARYMIME, sent as it is), the message is signed with CRLF for each bare CR and LF, as it is sent.
        ``sign`` false: the message is not this server's users' own (see ``dkim_sign_from``), only sealed."""
        if not binary:
            message = _LINE_END.sub(b"\r\n", message)
        head = header_section(message[:message.find(b"\r\n\r\n") + 2] if b"\r\n\r\n" in message else message)
        authors = [v.decode("utf-8", "replace") for n, v in head if n.lower() == b"from"]
        added = b""
        if self.arc is not None and self._checked_here(head):
            sealed = dkim.arc_sign(message, self.arc.selector.encode(), self.arc.domain.encode(), self.arc.private,
                                   self.authserv_id.encode())
            added = b"".join(sealed)
        domain = author_domain(authors) if sign else None
        key = self.key_for(domain) if domain else None
        if key is not None:
            present = {n.lower() for n, _ in head}
            signed = [h for h in self.headers if h in present] or [b"from"]
            signature = dkim.sign(added + message, key.selector.encode(), key.domain.encode(), key.private,
                                  include_headers=oversigned(signed, header_section(added) + head))
            added = signature + added
        return added

    def _checked_here(self, head: list[tuple[bytes, bytes]]) -> bool:
        ours = self.authserv_id.encode()
        return any(n.lower() == b"authentication-results" and v.split(b";", 1)[0].strip().lower() == ours
                   for n, v in head)

    @property
    def pool(self) -> ThreadPool:
        if self._pool is None:
            reactor = self.reactor
            if reactor is None:
                from twisted.internet import reactor as default

                reactor = self.reactor = default
            self._pool = ThreadPool(minthreads=0, maxthreads=self.threads, name="esmtpkit-signing")
            self._pool.start()
            reactor.addSystemEventTrigger("during", "shutdown", self.close)
        return self._pool

    def close(self) -> None:
        """Stop the worker threads (the reactor's shutdown does it)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

    def prepare(self, open_content: Callable[[], IO[bytes]], *, binary: bool = False,
                sign: bool = True) -> "Deferred[Callable[[], IO[bytes]]]":
        """An opener of the content to send: the signature fields on top of what ``open_content`` opens (the
        same opener when nothing is added). ``binary``, ``sign``: see `fields`. Fails only if the content cannot
        be read."""
        def compute() -> bytes:
            with open_content() as stream:
                message = stream.read()
            try:
                return self.fields(message, binary=binary, sign=sign)
            except Exception:  # a message dkimpy cannot sign (broken header fields) still goes, unsigned
                self.log.failure("not signed: dkimpy could not sign the message")
                return b""

        pool = self.pool

        def opener(added: bytes) -> Callable[[], IO[bytes]]:
            if not added:
                return open_content
            return lambda: io.BufferedReader(_Prefixed(added, open_content()))

        return deferToThreadPool(self.reactor, pool, compute).addCallback(opener)


_signers: dict[tuple[Any, ...], Signer] = {}


def signer_for(dkim_sign: str | None, arc_seal: str | None = None, authserv_id: str | None = None,
               reactor: Any = None, headers: str | None = None) -> Signer | None:
    """The process's `Signer` for these settings (``DOMAIN:SELECTOR:KEYFILE`` text, as handlers take them, and
    the fields to sign as `parse_headers` reads them), made once and shared by every handler given the same;
    None when there is nothing to sign with."""
    if not dkim_sign and not arc_seal:
        return None
    key = (dkim_sign or "", arc_seal or "", (authserv_id or "").lower(), parse_headers(headers))
    found = _signers.get(key)
    if found is None:
        arc = parse_keys(arc_seal)[0] if arc_seal else None
        found = _signers[key] = Signer(parse_keys(dkim_sign or ""), arc=arc, authserv_id=authserv_id,
                                       headers=key[3], reactor=reactor)
    return found
