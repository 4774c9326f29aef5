"""rspamd over its HTTP protocol: the whole message POSTed to ``/checkv2``, its JSON answer made a `Verdict`.

The request streams the held message (a file body producer: never the whole message in memory) with the
headers rspamd's protocol documents: ``IP``, ``Helo``, ``Hostname`` (only when the client's name is known:
without it rspamd looks the name up itself), ``From`` (``<>`` for the null sender), one ``Rcpt`` per recipient,
``Queue-Id``, ``User`` (after AUTH), ``TLS-Cipher``/``TLS-Version`` (after STARTTLS), ``Password`` when
configured and ``Pass: all`` when asked. The client XFORWARD named for the message takes the place of the
connection's, as in the trace field. Everything read on the connection is bounded: the answer's body
(`MAX_ANSWER`) and, besides it, the status line and header fields (`MAX_HEAD`).

The answer's ``action`` becomes: ``reject`` 550 5.7.1, ``soft reject`` 451 4.7.1 (with rspamd's
``messages.smtp_message`` as the text when it gives one, made printable ASCII and bounded), ``greylist`` 451
4.7.1 "Greylisted", ``add header`` CONTINUE with the spam header (``X-Spam: Yes``, any earlier one removed),
``rewrite subject`` CONTINUE with the Subject rspamd gives (else ``***SPAM*** `` put in front), ``discard`` and
``quarantine`` as named, ``no action`` (and any custom action) CONTINUE. The ``milter`` block's
``remove_headers`` and ``add_headers`` become header edits, with the meaning rspamd's own milter proxy gives them
(removals first; an ``order`` below zero counts from the end of the header section).

No ``X-Spamd-Result`` summary is added by this filter: rspamd's proxy adds none of its own either. That field,
like ``X-Rspamd-Server`` and the others, comes from rspamd's milter headers module through the ``milter``
block, so the rspamd configuration decides, as it does for Postfix behind the proxy.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping
from urllib.parse import urlsplit

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.client import (URI, Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, HTTPConnectionPool,
                                ResponseDone, ResponseFailed)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IResponse
from zope.interface import implementer

from esmtpkit.core.reply import Reply
from esmtpkit.core.xclient import forwarded_client
from esmtpkit.filters.base import MessageFilter
from esmtpkit.filters.interfaces import HeldMessage
from esmtpkit.filters.stream import common_options
from esmtpkit.filters.verdict import Action, HeaderEdit, Verdict

__all__ = ["RspamdFilter", "RspamdError", "from_spec", "MAX_ANSWER", "MAX_HEAD"]

#: The most octets of an answer's body read (rspamd's are a few KiB; its URL lists are what grows).
MAX_ANSWER = 2 * 1024 * 1024
#: The most octets read on a connection besides the body: the status line, the header fields, chunk framing.
MAX_HEAD = 64 * 1024
#: The longest reply text taken from rspamd's ``smtp_message``.
MAX_TEXT = 200

REJECT_TEXT = "Spam message rejected"
SOFT_REJECT_TEXT = "Try again later"
GREYLIST_TEXT = "Greylisted, try again later"
SPAM_PREFIX = "***SPAM*** "

_FIELD_NAME = re.compile(r"[!-9;-~]+\Z")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class RspamdError(Exception):
    """rspamd could not give a verdict: an HTTP error, an answer too large, not JSON, or without an action."""


class _BoundedBody(Protocol):
    """Collects a response body of at most ``limit`` octets; a longer one closes the connection and fails.
    Cancelling ``done`` closes the connection too."""

    def __init__(self, limit: int, length: Any) -> None:
        self.limit = limit
        self.length = length
        self.parts: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred(lambda _: self._close())

    def connectionMade(self) -> None:
        if self.length is not UNKNOWN_LENGTH and self.length > self.limit:
            self._fail(f"rspamd's answer is {self.length} octets long, more than the {self.limit} read")

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self._fail(f"rspamd's answer is longer than the {self.limit} octets read")
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)

    def _fail(self, why: str) -> None:
        self.parts = []
        self.done.errback(RspamdError(why))
        self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()


class _Capped(ProtocolWrapper):
    """Passes on at most ``factory.limit`` octets of what the connection brings (Twisted's HTTP client keeps any
    number of header lines); past that it aborts the connection, and the request fails with `RspamdError`."""

    factory: "_CappedFactory"
    received = 0
    cut: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.cut is not None:
            return
        self.received += len(data)
        if self.received > self.factory.limit:
            self.cut = Failure(RspamdError(f"rspamd's answer is longer than the {self.factory.limit} octets read "
                                           "on a connection"))
            self.transport.abortConnection()
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(self.cut or reason)


class _CappedFactory(WrappingFactory):
    protocol = _Capped
    noisy = False  # a connection per message: not worth two log lines each

    def __init__(self, wrapped: IProtocolFactory, limit: int) -> None:
        super().__init__(wrapped)
        self.limit = limit


@implementer(IStreamClientEndpoint)
class _CappedEndpoint:
    """``endpoint``, its connections' protocols wrapped in `_Capped` (the caller gets its own protocol back)."""

    def __init__(self, endpoint: IStreamClientEndpoint, limit: int) -> None:
        self.endpoint = endpoint
        self.limit = limit

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        connecting = self.endpoint.connect(_CappedFactory(factory, self.limit))
        return connecting.addCallback(lambda wrapper: wrapper.wrappedProtocol)


@implementer(IAgentEndpointFactory)
class _CappedEndpoints:
    """The endpoints Twisted's Agent uses by default (TCP, TLS for https), each reading at most ``limit``
    octets."""

    def __init__(self, reactor: Any, limit: int) -> None:
        self.reactor = reactor
        self.limit = limit
        self.policy = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint = HostnameEndpoint(self.reactor, uri.host.decode("ascii").strip("[]"),
                                                           uri.port)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self.policy.creatorForNetloc(uri.host, uri.port), endpoint)
        return _CappedEndpoint(endpoint, self.limit)


def safe_text(text: Any, default: str) -> str:
    """``text`` as one line of printable ASCII (line ends and tabs become spaces, other characters ``?``), at
    most `MAX_TEXT` characters; ``default`` when nothing is left."""
    if not isinstance(text, str):
        return default
    cleaned = " ".join(_NOT_PRINTABLE.sub("?", re.sub(r"[\t\r\n]", " ", text)).split())[:MAX_TEXT].strip()
    return cleaned or default


def _unfold(text: str) -> str:
    """A header field value unfolded, without line ends or NULs."""
    return re.sub(r"[\r\n\0]", " ", _FOLD.sub("", text))


def _value(text: str) -> str:
    """A header field value as rspamd gives it (folded): unfolded, and any surrogate (JSON can escape a lone one,
    which no field could be written with) made U+FFFD."""
    return _unfold(_SURROGATE.sub("\ufffd", text))


def _header_fields(head: bytes) -> list[tuple[str, str]]:
    """The fields of a header section: (name, value unfolded), in order; octets that are not UTF-8 are kept as
    surrogate escapes (`HeaderEdit.line` writes them back as they came)."""
    fields: list[tuple[str, str]] = []
    for line in head.decode("utf-8", "surrogateescape").split("\n"):
        line = line.rstrip("\r")
        if not line:
            break
        if line[0] in " \t":
            if fields:
                fields[-1] = (fields[-1][0], fields[-1][1] + line)
            continue
        name, colon, value = line.partition(":")
        if not colon:
            break
        fields.append((name.strip(), value.lstrip(" \t")))
    return fields


def _edit(kind: str, name: str, value: str = "", index: int = 0) -> HeaderEdit | None:
    try:
        return HeaderEdit(kind, name, value, index)
    except ValueError:
        return None


def milter_edits(block: Any, head: bytes) -> list[HeaderEdit]:
    """The header edits of rspamd's ``milter`` block: ``remove_headers`` ``{name: order}`` (0: every field of
    that name, N: the Nth, -N: the Nth from the end), then ``add_headers`` ``{name: value | {value, order} |
    [{value, order}, ...]}`` (no order: at the end; N: before the Nth field, 0 at the top; -N: counted from the
    end). What rspamd's milter would ignore (a value of the wrong type, a bad field name) is ignored."""
    if not isinstance(block, dict):
        return []
    fields = _header_fields(head)
    edits: list[HeaderEdit | None] = []
    removals = block.get("remove_headers")
    for name, order in (removals.items() if isinstance(removals, dict) else ()):
        if not isinstance(order, int) or isinstance(order, bool):
            continue
        if order < 0:
            order += sum(1 for n, _ in fields if n.lower() == str(name).lower()) + 1
            if order < 1:
                continue
        edits.append(_edit("delete", str(name), index=order))
    additions = block.get("add_headers")
    for name, spec in (additions.items() if isinstance(additions, dict) else ()):
        if isinstance(spec, str):
            edits.append(_edit("add", str(name), _value(spec)))
            continue
        for one in (spec if isinstance(spec, list) else [spec]):
            if not isinstance(one, dict) or not isinstance(one.get("value"), str):
                continue
            order = one.get("order", one.get("index"))
            value = _value(one["value"])
            if not isinstance(order, (int, float)) or isinstance(order, bool):
                edits.append(_edit("add", str(name), value))
                continue
            index = int(order) if order >= 0 else max(len(fields) + int(order) + 1, 0)
            edits.append(_edit("add", str(name), value) if index >= len(fields)
                         else _edit("insert", str(name), value, index))
    return [e for e in edits if e is not None]


def verdict_of(answer: Any, head: bytes, spam_header: str = "X-Spam") -> Verdict:
    """The verdict for rspamd's decoded JSON ``answer`` on a message whose header section is ``head``; raises
    `RspamdError` when it is not an answer (no object, no action)."""
    if not isinstance(answer, dict) or not isinstance(answer.get("action"), str):
        raise RspamdError(f"rspamd's answer has no action: {safe_text(json.dumps(answer)[:MAX_TEXT], '')!r}")
    action = answer["action"].strip().lower()
    score, required = answer.get("score"), answer.get("required_score")
    symbols = answer.get("symbols")
    details: dict[str, Any] = {
        "action": safe_text(action, "?"),
        "score": score if isinstance(score, (int, float)) else None,
        "required_score": required if isinstance(required, (int, float)) else None,
        "symbols": sorted(str(s) for s in symbols) if isinstance(symbols, dict) else [],
    }
    reason = f"rspamd: {details['action']}"
    if details["score"] is not None and details["required_score"] is not None:
        reason += f" ({details['score']:.2f}/{details['required_score']:.2f})"
    reason = safe_text(reason, "rspamd")
    messages = answer.get("messages")
    smtp_message = messages.get("smtp_message") if isinstance(messages, dict) else None
    if action == "reject":
        return Verdict(Action.REJECT, Reply.of(550, safe_text(smtp_message, REJECT_TEXT), enhanced="5.7.1"),
                       reason=reason, details=details)
    if action == "soft reject":
        return Verdict(Action.TEMPFAIL, Reply.of(451, safe_text(smtp_message, SOFT_REJECT_TEXT),
                                                 enhanced="4.7.1"), reason=reason, details=details)
    if action == "greylist":
        return Verdict(Action.TEMPFAIL, Reply.of(451, GREYLIST_TEXT, enhanced="4.7.1"), reason=reason,
                       details=details)
    edits = milter_edits(answer.get("milter"), head)
    if action == "add header":
        edits += [HeaderEdit("delete", spam_header), HeaderEdit("add", spam_header, "Yes")]
    elif action == "rewrite subject":
        edits.append(_subject_edit(answer.get("subject"), head))
    if action == "discard":
        return Verdict(Action.DISCARD, reason=reason, details=details)
    if action == "quarantine":
        return Verdict(Action.QUARANTINE, edits=tuple(edits), reason=reason, details=details)
    return Verdict(Action.CONTINUE, edits=tuple(edits), reason=reason, details=details)


def _subject_edit(subject: Any, head: bytes) -> HeaderEdit:
    old = [value for name, value in _header_fields(head) if name.lower() == "subject"]
    new = _value(subject) if isinstance(subject, str) else SPAM_PREFIX + _unfold(old[0] if old else "")
    return HeaderEdit("change", "Subject", new.rstrip(), 1) if old else HeaderEdit("add", "Subject", new.rstrip())


def _header(value: str) -> bytes:
    """A request header value: UTF-8, control characters as spaces (no header can be injected)."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", value).encode("utf-8")


class RspamdFilter(MessageFilter):
    """Asks the rspamd worker at ``url`` (``http://127.0.0.1:11333``) about each whole message; see the module
    docstring. ``password`` goes in the ``Password`` header (a controller with one), ``header`` names the field
    "add header" adds, ``pass_all`` sends ``Pass: all`` (every rule runs, even after a reject is certain).
    ``client`` is a treq ``HTTPClient`` (by default one with a non-persistent pool on ``reactor``, the global
    reactor when None, that reads at most ``max_answer`` + `MAX_HEAD` octets on a connection). Nothing connects
    before a check."""

    name = "rspamd"

    def __init__(self, url: str, *, password: str | None = None, header: str = "X-Spam", pass_all: bool = False,
                 name: str | None = None, timeout: float | None = None, on_failure: str | Action | None = None,
                 reactor: Any = None, client: Any = None, max_answer: int = MAX_ANSWER) -> None:
        super().__init__(name=name, timeout=timeout, on_failure=on_failure)
        self.url = check_url(url)
        self.endpoint = self.url.rstrip("/") + "/checkv2"
        if not _FIELD_NAME.match(header):
            raise ValueError(f"header {header!r} is not a header field name")
        self.password = password
        self.header = header
        self.pass_all = pass_all
        self.max_answer = max_answer
        self.reactor = reactor
        self._client = client
        self._cooperator: Cooperator | None = None

    def _http(self) -> tuple[Any, Cooperator]:
        """The HTTP client and the cooperator that feeds request bodies, made on first use (the global reactor is
        looked up only then, when none was given)."""
        if self.reactor is None:
            from twisted.internet import reactor as default

            self.reactor = default
        reactor = self.reactor
        if self._cooperator is None:
            self._cooperator = Cooperator(scheduler=lambda step: reactor.callLater(0, step))
        if self._client is None:
            endpoints = _CappedEndpoints(reactor, self.max_answer + MAX_HEAD)
            self._client = HTTPClient(Agent.usingEndpointFactory(
                reactor, endpoints, pool=HTTPConnectionPool(reactor, persistent=False)))
        return self._client, self._cooperator

    def request_headers(self, message: HeldMessage) -> Headers:
        """The protocol headers for ``message`` (see the module docstring)."""
        session = message.session
        forwarded = forwarded_client(session)
        if forwarded is None:
            ip, helo, hostname = session.peer_ip, session.helo, session.client_name
        else:
            ip, helo, hostname = forwarded.addr or "", forwarded.helo, forwarded.name
        pairs: list[tuple[str, str]] = [("IP", ip), ("Helo", helo or ""), ("Hostname", hostname or ""),
                                        ("From", message.sender or "<>"),
                                        *(("Rcpt", r) for r in message.recipients),
                                        ("Queue-Id", session.envelope.id), ("User", session.authenticated or ""),
                                        ("Password", self.password or ""), ("Pass", "all" if self.pass_all else "")]
        if session.tls:
            pairs += [("TLS-Cipher", session.tls_info.get("cipher", "")),
                      ("TLS-Version", session.tls_info.get("version", ""))]
        headers = Headers()
        for key, value in pairs:
            if value:
                headers.addRawHeader(key.encode("ascii"), _header(value))
        return headers

    def check(self, message: HeldMessage) -> Deferred[Verdict]:
        """POST ``message`` to ``/checkv2``; the verdict from the answer. Cancelling it closes the connection."""
        return Deferred.fromCoroutine(self._check(message))

    async def _check(self, message: HeldMessage) -> Verdict:
        client, cooperator = self._http()
        stream = message.open()
        try:
            producer = FileBodyProducer(stream, cooperator=cooperator)
            response: IResponse = await client.request(
                "POST", self.endpoint, headers=self.request_headers(message), data=producer, unbuffered=True,
                allow_redirects=False)
            reader = _BoundedBody(self.max_answer, response.length)
            response.deliverBody(reader)
            body = await reader.done
        except ResponseFailed as failed:
            for reason in failed.reasons:
                if reason.check(RspamdError):
                    raise reason.value from None
            raise
        finally:
            stream.close()
        if response.code != 200:
            raise RspamdError(f"rspamd answered HTTP {response.code}: {_error_text(body)}")
        try:
            answer = json.loads(body)
        except ValueError:
            raise RspamdError(f"rspamd's answer is not JSON: {safe_text(body[:80].decode('latin-1'), '')!r}")
        return verdict_of(answer, message.head, self.header)


def _error_text(body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        error = body[:MAX_TEXT].decode("latin-1")
    return safe_text(error, "(no explanation)")


def check_url(url: str) -> str:
    """``url`` if it can name an rspamd worker (http or https, a host, no query or fragment); else ValueError."""
    try:
        parts = urlsplit(url)
        parts.port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
            or parts.fragment or parts.username or parts.password:
        raise ValueError(f"the target {url!r} is not an http:// or https:// URL with a host "
                         "(e.g. http://127.0.0.1:11333)")
    return url


def from_spec(target: str, options: Mapping[str, str], *, reactor: Any = None) -> RspamdFilter:
    """``--filter rspamd:URL[,password=P][,header=NAME][,pass=all][,name=N][,timeout=S][,on-failure=F]``."""
    common = common_options(options, ("password", "header", "pass"))
    pass_all = options.get("pass", "").strip().lower()
    if pass_all not in ("", "all"):
        raise ValueError(f"pass takes one value, all, not {options['pass']!r}")
    return RspamdFilter(target, password=options.get("password") or None, header=options.get("header", "X-Spam"),
                        pass_all=pass_all == "all", reactor=reactor, **common)
