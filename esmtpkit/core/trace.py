"""Trace header fields for a message we take in: ``Received:`` (RFC 5321 §4.4) and ``Return-Path:``.

Pure functions of a `Session`: no I/O, no clock unless no time is given. The result is wire bytes (CRLF line ends,
folded under 78 characters where the parts allow, RFC 5322 §2.1.1), ready to be written before the message.
Client text cannot change a field's structure: the HELO name and identity are cut down to what their place may
hold, a recipient is named in ``for`` only when its address is plain, and ``Return-Path:`` quotes canonically.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from email.utils import formatdate
from typing import Sequence

from esmtpkit.core.address import Address
from esmtpkit.core.escape import UNSAFE
from esmtpkit.core.session import Session
from esmtpkit.core.xclient import forwarded_client

__all__ = ["received_header", "return_path_header", "address_literal"]

#: Longest line we aim for, CRLF excluded (RFC 5322 §2.1.1 SHOULD).
FOLD_AT = 78

# A HELO name is client text: keep what a domain or address literal may hold, replace the rest (no comment breaking).
_NOT_DOMAINISH = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
# A protocol name XFORWARD gave, for ``with``: an atom of letters, digits and hyphens (RFC 5321 §4.4 Protocol).
_NOT_PROTOCOL = re.compile(r"[^A-Za-z0-9\-]")
# Comment text (RFC 5322 §3.2.2): printable ASCII except the parentheses and backslash that would end it early.
_NOT_CTEXT = re.compile(r"[^\x21-\x27\x2a-\x5b\x5d-\x7e ]")
# A mailbox ``for`` may name: a dot-atom at a host name or an IP address literal. Nothing a reader of the field
# could take for structure (``;`` before the date, comments, quotes, backslashes) fits in it.
_PLAIN_MAILBOX = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.\x80-\U0010ffff]+"
                            r"@(?:[A-Za-z0-9.\-\x80-\U0010ffff]+|\[(?:[Ii][Pp][Vv]6:)?[0-9A-Fa-f.:]+\])\Z")


def address_literal(ip: str) -> str:
    """The RFC 5321 §4.1.3 address literal for an IP: ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``."""
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        return f"[{_NOT_DOMAINISH.sub('?', ip)}]"
    if parsed.version == 6:
        return f"[IPv6:{parsed.compressed}]"
    return f"[{parsed}]"


def _tls_comment(session: Session) -> str | None:
    if not session.tls:
        return None
    info = session.tls_info
    version = info.get("protocol") or info.get("version")
    cipher = info.get("cipher")
    if version and cipher:
        text = f"using {version} with cipher {cipher}"
    elif version or cipher:
        text = f"using {version or cipher}"
    else:
        return None
    return "(" + _NOT_CTEXT.sub("?", text) + ")"


def _fold(header: str, clauses: list[str]) -> str:
    """Join clauses with spaces, starting a new tab-indented line before a clause that would pass FOLD_AT."""
    lines = [f"{header}: {clauses[0]}"]
    for clause in clauses[1:]:
        if len(lines[-1]) + 1 + len(clause) <= FOLD_AT:
            lines[-1] += " " + clause
        else:
            lines.append("\t" + clause)
    return "\r\n".join(lines) + "\r\n"


def received_header(session: Session, *, id: str, recipients: Sequence[str] | None = None,
                    timestamp: float | None = None, rdns: str | None = None, show_user: bool = True) -> bytes:
    """The ``Received:`` field for a message taken in on ``session`` (RFC 5321 §4.4), as wire bytes.

    ``from`` names the client's HELO/EHLO name and, in the comment, its reverse-DNS name (``rdns``, else the
    name XCLIENT gave, else the IP) and address literal; ``with`` is the RFC 3848 keyword (ESMTPS/ESMTPSA after
    TLS/AUTH), followed by comments naming the TLS version and cipher and, with ``show_user``, the authenticated
    identity. The client XFORWARD named for this message, if any, takes the place of the connection's (its name,
    address, HELO name and protocol, as Postfix does; ``rdns`` is then not used). ``for`` is given only when the
    message has exactly one recipient, so one copy never reveals the others, and only when that address is plain
    (a dot-atom at a host name or IP address literal): the clause is optional (RFC 5321 §4.4), and a quoted local
    part such as ``"x; <a date> (authenticated as root)"`` would read as part of the field. ``recipients``
    defaults to the session's envelope.
    The date is RFC 5322 local time (``email.utils.formatdate``).
    """
    forwarded = forwarded_client(session)
    if forwarded is None:
        helo_name, ip, name, protocol = session.helo, session.peer_ip, session.client_name, session.with_protocol
    else:  # the client the upstream MTA received this message from (XFORWARD)
        helo_name, ip, name, rdns = forwarded.helo, forwarded.addr or "", forwarded.name, None
        protocol = _NOT_PROTOCOL.sub("?", forwarded.proto) if forwarded.proto else session.with_protocol
    helo = _NOT_DOMAINISH.sub("?", helo_name) if helo_name else "unknown"
    if ip:
        shown = _NOT_DOMAINISH.sub("?", rdns or name or ip)
        clauses = [f"from {helo}", f"({shown} {address_literal(ip)})"]
    else:
        clauses = [f"from {helo}"]
    clauses.append(f"by {_NOT_DOMAINISH.sub('?', session.hostname) or 'localhost'}")
    clauses.append(f"with {protocol}")
    tls = _tls_comment(session)
    if tls:
        clauses.append(tls)
    if session.authenticated and show_user:
        clauses.append("(authenticated as " + _NOT_CTEXT.sub("?", session.authenticated) + ")")
    clauses.append(f"id {id}")
    rcpts = list(session.envelope.recipients if recipients is None else recipients)
    if len(rcpts) == 1:
        mailbox = _plain(rcpts[0])
        if mailbox is not None:
            clauses.append(f"for <{mailbox}>")
    clauses[-1] += ";"
    clauses.append(formatdate(timestamp, localtime=True))
    return _fold("Received", clauses).encode("utf-8", "surrogateescape")


def _plain(recipient: str) -> str | None:
    """The recipient as ``for`` may name it (quoting as little as RFC 5321 §4.1.2 asks), or None when even then
    it is not a dot-atom at a host name or address literal whose non-ASCII characters are letters, marks or
    digits (a full-width semicolon or parenthesis looks like structure to a reader)."""
    mailbox = (recipient if isinstance(recipient, Address) else Address(recipient)).canonical()
    if not _PLAIN_MAILBOX.match(mailbox):
        return None
    if not mailbox.isascii() and any(unicodedata.category(c)[0] not in "LMN" for c in mailbox if ord(c) > 0x7f):
        return None
    return mailbox


def return_path_header(sender: Address | str) -> bytes:
    """``Return-Path: <sender>`` (RFC 5321 §4.4), added at final delivery; ``<>`` for the null sender.

    The sender is kept exactly, in its canonical form (`Address.canonical`): one well-formed angle-addr
    (RFC 5322 §3.4.1). ValueError for a control character, which no parsed path holds (`escape.UNSAFE`).
    """
    mailbox = (sender if isinstance(sender, Address) else Address(sender)).canonical()
    if UNSAFE.search(mailbox):
        raise ValueError(f"the sender {mailbox!r} has a control character: no Return-Path can hold it")
    return f"Return-Path: <{mailbox}>\r\n".encode("utf-8", "surrogateescape")
