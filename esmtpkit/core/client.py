"""The client role's share of the core: reading replies, reading an EHLO reply, and writing MAIL and RCPT.

Pure core: no Twisted, no I/O. `ReplyParser` turns reply lines into `Reply` values with bounded memory;
`Extensions` is what a server's EHLO (or LHLO) reply offers; `mail_command` and `rcpt_command` write the commands
for a queued `Message`, with each ESMTP parameter only when the server offers its extension; `check_offer` says
when a message cannot go to a server at all, before anything is sent, and `check_recipient` when one recipient
cannot (RRVS without ``;C`` to a server that does not offer RRVS).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from esmtpkit.core.deliverby import MAX_BY_TIME
from esmtpkit.core.dsn import xtext_encode
from esmtpkit.core.outbound import Message, Outcome, Recipient
from esmtpkit.core.reply import Reply, strip_enhanced

__all__ = ["ReplyError", "ReplyParser", "Extensions", "mail_command", "rcpt_command", "check_offer",
           "check_recipient", "needs_smtputf8", "requiretls_refusal", "by_expired", "MAX_REPLY_LINES",
           "MAX_REPLY_LINE_LENGTH"]

#: At most this many lines in one reply (an EHLO reply has a dozen); more is a misbehaving server.
MAX_REPLY_LINES: Final = 100
#: At most this many octets in one reply line (RFC 5321 §4.5.3.1.5 says 512; servers are given room).
MAX_REPLY_LINE_LENGTH: Final = 2048

_LINE: Final = re.compile(rb"([2-5][0-9][0-9])([ -]?)(.*)", re.DOTALL)
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_KEYWORD: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")


class ReplyError(ValueError):
    """The server's reply is not an SMTP reply (bad line, code changing within a reply, or too long)."""


class ReplyParser:
    """Collects the lines of one reply at a time (RFC 5321 §4.2): ``250-...`` lines until the ``250 ...`` one.

    Lines are given without their line end. Text is read as UTF-8 (undecodable octets and control characters
    become U+FFFD and ``?``), and the enhanced status code of each line (RFC 2034 §3) is taken off.
    """

    def __init__(self) -> None:
        self._code: bytes | None = None
        self._lines: list[str] = []

    @property
    def pending(self) -> bool:
        """True while the lines of an unfinished reply are held."""
        return self._code is not None

    def feed(self, line: bytes) -> Reply | None:
        """Take one line; the whole Reply once its last line came, else None. ReplyError on a bad line."""
        if len(line) > MAX_REPLY_LINE_LENGTH:
            raise ReplyError(f"reply line longer than {MAX_REPLY_LINE_LENGTH} octets")
        match = _LINE.fullmatch(line)
        if match is None:
            raise ReplyError(f"not an SMTP reply line: {line[:80]!r}")
        code, separator, text = match.groups()
        if text and not separator:
            raise ReplyError(f"not an SMTP reply line: {line[:80]!r}")
        if self._code is not None and code != self._code:
            raise ReplyError(f"reply code changed from {self._code.decode()} to {code.decode()} within one reply")
        if len(self._lines) >= MAX_REPLY_LINES:
            raise ReplyError(f"reply longer than {MAX_REPLY_LINES} lines")
        self._code = code
        self._lines.append(_CONTROL.sub("?", text.decode("utf-8", "replace")))
        if separator == b"-":
            return None
        lines, self._lines, self._code = self._lines, [], None
        return strip_enhanced(Reply(int(code), tuple(lines)))


@dataclass(frozen=True)
class Extensions:
    """What a server offers in its EHLO or LHLO reply (RFC 5321 §4.1.1.1): keywords, upper-cased, with their
    parameters. A HELO session offers nothing (``Extensions()``)."""

    keywords: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def parse(cls, reply: Reply) -> "Extensions":
        """Read the keyword lines of an EHLO reply (the first line is the server's greeting). ``AUTH=...``, an
        old form of the AUTH line, counts when no AUTH line is given; lines that are no keyword are skipped."""
        keywords: dict[str, tuple[str, ...]] = {}
        legacy: dict[str, tuple[str, ...]] = {}
        for line in reply.lines[1:]:
            words = line.split()
            if not words:
                continue
            name, equals, first = words[0].partition("=")
            if not _KEYWORD.match(name):
                continue
            if equals:
                legacy[name.upper()] = tuple(([first] if first else []) + words[1:])
            else:
                keywords.setdefault(name.upper(), tuple(words[1:]))
        for name, params in legacy.items():
            keywords.setdefault(name, params)
        return cls(keywords)

    def offers(self, name: str) -> bool:
        """Whether the server offers the extension ``name`` (any case)."""
        return name.upper() in self.keywords

    @property
    def size_limit(self) -> int | None:
        """The SIZE limit in octets (RFC 1870 §4), or None when SIZE is not offered or gives no (or 0) limit."""
        params = self.keywords.get("SIZE")
        if not params or not params[0].isdigit() or len(params[0]) > 20:
            return None
        return int(params[0]) or None

    @property
    def auth_mechanisms(self) -> tuple[str, ...]:
        """The SASL mechanisms offered with AUTH (RFC 4954 §3), upper-cased."""
        return tuple(name.upper() for name in self.keywords.get("AUTH", ()))


def needs_smtputf8(message: Message, recipients: list[Recipient] | None = None) -> bool:
    """Whether the message can go only to a server offering SMTPUTF8 (RFC 6531 §3.2): it was received with
    SMTPUTF8, or one of its paths is not ASCII."""
    chosen = message.recipients if recipients is None else recipients
    return message.smtputf8 or not message.sender.isascii() or not all(r.address.isascii() for r in chosen)


def _path(address: str) -> str:
    return f"<{address}>"


def _encode(text: str, utf8: bool) -> bytes:
    return text.encode("utf-8") if utf8 else text.encode("ascii")


def mail_command(message: Message, ext: Extensions, *, auth: str | None = None, now: float = 0.0) -> bytes:
    """``MAIL FROM:<sender>`` and the parameters the server offers (no line end): SIZE (RFC 1870), BODY (RFC
    6152, 3030), SMTPUTF8 (RFC 6531), RET and ENVID (RFC 3461 §4.3-4.4), given ``auth``, AUTH (RFC 4954 §5,
    ``""`` for ``AUTH=<>``), REQUIRETLS (RFC 8689 §4.2), MT-PRIORITY (RFC 6710 §4) and BY with the by-time left
    at ``now`` (RFC 2852 §4). Call `check_offer` first: a path that is not ASCII needs SMTPUTF8.
    """
    words = [f"MAIL FROM:{_path(message.sender)}"]
    if ext.offers("SIZE") and message.size > 0:
        words.append(f"SIZE={message.size}")
    if message.body == "BINARYMIME" and ext.offers("BINARYMIME"):
        words.append("BODY=BINARYMIME")
    elif message.body == "8BITMIME" and ext.offers("8BITMIME"):
        words.append("BODY=8BITMIME")
    utf8 = needs_smtputf8(message) and ext.offers("SMTPUTF8")
    if utf8:
        words.append("SMTPUTF8")
    if ext.offers("DSN"):
        if message.ret:
            words.append(f"RET={message.ret.upper()}")
        if message.envid:
            words.append(f"ENVID={xtext_encode(message.envid)}")
    if auth is not None and ext.offers("AUTH"):
        words.append(f"AUTH={xtext_encode(auth) if auth else '<>'}")
    if message.requiretls and ext.offers("REQUIRETLS"):
        words.append("REQUIRETLS")
    if message.priority is not None and ext.offers("MT-PRIORITY"):
        words.append(f"MT-PRIORITY={message.priority}")
    if message.deliver_by is not None and ext.offers("DELIVERBY"):
        left = message.deliver_by.remaining(message.arrived, now)
        words.append(f"BY={message.deliver_by.param(max(-MAX_BY_TIME, min(MAX_BY_TIME, left)))}")
    return _encode(" ".join(words), utf8)


def rcpt_command(recipient: Recipient, ext: Extensions) -> bytes:
    """``RCPT TO:<address>`` and, when the server offers DSN, NOTIFY and ORCPT (RFC 3461 §4.1-4.2), no line end.

    ORCPT goes on as it was received (already encoded); a path that is not ASCII is sent as UTF-8, which only a
    server offering SMTPUTF8 may be sent (`check_offer`).
    """
    words = [f"RCPT TO:{_path(recipient.address)}"]
    if ext.offers("DSN"):
        if recipient.notify:
            words.append(f"NOTIFY={','.join(n.upper() for n in recipient.notify)}")
        if recipient.orcpt:
            words.append(f"ORCPT={recipient.orcpt}")
    if recipient.rrvs is not None and ext.offers("RRVS"):
        words.append(f"RRVS={recipient.rrvs.param()}")
    text = " ".join(words)
    return _encode(text, not text.isascii())


def requiretls_refusal(why: str) -> Outcome:
    """The permanent outcome of a REQUIRETLS message that cannot go on (RFC 8689 §4.2.1, §5): 550 5.7.30."""
    return Outcome.local(550, "5.7.30", f"REQUIRETLS support required: {why}")


def by_expired(why: str) -> Outcome:
    """The permanent outcome of a BY mode R message whose time is up (RFC 2852 §4.1, RFC 3463): 554 5.4.7."""
    return Outcome.local(554, "5.4.7", f"Delivery time expired: {why}")


def check_offer(message: Message, ext: Extensions, recipients: list[Recipient] | None = None, *,
                now: float = 0.0) -> Outcome | None:
    """A permanent Outcome when ``message`` cannot go to this server at all, before any command is sent; None
    when it can. SMTPUTF8 needed but not offered: 5.6.7 (RFC 6531 §3.2); binary content without CHUNKING and
    BINARYMIME, or 8-bit content without 8BITMIME: 5.6.3 (RFC 3030 §3, RFC 6152 §3: nothing is down-converted);
    over the server's SIZE limit: 5.3.4 (RFC 1870 §6); REQUIRETLS not offered: 5.7.30 (RFC 8689 §4.2.1; the
    caller checks the TLS itself); BY mode R whose time is up at ``now``, or a server without DELIVERBY or whose
    minimum by-time exceeds what is left: 5.4.7 (RFC 2852 §4.1). ``recipients``: those being sent (default:
    all)."""
    if message.requiretls and not ext.offers("REQUIRETLS"):
        return requiretls_refusal("the server does not offer REQUIRETLS")
    by = message.deliver_by
    if by is not None and by.mode == "R":
        left = by.remaining(message.arrived, now)
        if left <= 0:
            return by_expired(f"the BY time of {by.seconds} seconds has passed")
        if not ext.offers("DELIVERBY"):
            return by_expired("BY with mode R, and the server does not offer DELIVERBY")
        minimum = ext.keywords.get("DELIVERBY", ())
        if minimum and minimum[0].isdigit() and len(minimum[0]) <= 9 and left < int(minimum[0]):
            return by_expired(f"{left} seconds left, below the server's minimum BY time of {minimum[0]}")
    if needs_smtputf8(message, recipients) and not ext.offers("SMTPUTF8"):
        return Outcome.local(553, "5.6.7", "SMTPUTF8 is required, but was not offered by the server")
    if message.body == "BINARYMIME" and not (ext.offers("CHUNKING") and ext.offers("BINARYMIME")):
        return Outcome.local(554, "5.6.3", "binary content (BODY=BINARYMIME) needs CHUNKING and BINARYMIME, "
                                           "which the server does not offer")
    if message.body == "8BITMIME" and not ext.offers("8BITMIME"):
        return Outcome.local(554, "5.6.3", "8-bit content (BODY=8BITMIME) needs 8BITMIME, which the server does "
                                           "not offer (no conversion is made)")
    limit = ext.size_limit
    if limit is not None and message.size > limit:
        return Outcome.local(552, "5.3.4", f"message size {message.size} exceeds the server's limit of {limit}")
    return None


def check_recipient(recipient: Recipient, ext: Extensions) -> Outcome | None:
    """A permanent Outcome when ``recipient`` cannot be offered to this server, else None: RRVS without ``;C``
    to a server that does not offer RRVS gets 550 5.7.19 (RFC 7293 §3.3: the check cannot be made on); with
    ``;C`` the parameter is dropped and the recipient goes on."""
    if recipient.rrvs is not None and not recipient.rrvs.may_continue and not ext.offers("RRVS"):
        return Outcome.local(550, "5.7.19", "RRVS test cannot be completed: the server does not offer RRVS")
    return None
