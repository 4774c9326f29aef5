"""Trace header fields for a message we take in: ``Received:`` (RFC 5321 §4.4) and ``Return-Path:``.

Pure functions of a `Session`: no I/O, no clock unless no time is given. The result is wire bytes (CRLF line ends,
folded under 78 characters where the parts allow, RFC 5322 §2.1.1), ready to be written before the message.
"""

from __future__ import annotations

import ipaddress
import re
from email.utils import formatdate
from typing import Sequence

from ..address import Address
from ..session import Session

__all__ = ["received_header", "return_path_header", "address_literal"]

#: Longest line we aim for, CRLF excluded (RFC 5322 §2.1.1 SHOULD).
FOLD_AT = 78

# A HELO name is client text: keep what a domain or address literal may hold, replace the rest (no comment breaking).
_NOT_DOMAINISH = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
# Comment text (RFC 5322 §3.2.2): printable ASCII except the parentheses and backslash that would end it early.
_NOT_CTEXT = re.compile(r"[^\x21-\x27\x2a-\x5b\x5d-\x7e ]")


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

    ``from`` names the client's HELO/EHLO name and, in the comment, its reverse-DNS name (or IP) and address
    literal; ``with`` is the RFC 3848 keyword (ESMTPS/ESMTPSA after TLS/AUTH), followed by comments naming the
    TLS version and cipher and, with ``show_user``, the authenticated identity. ``for`` is given only when the
    message has exactly one recipient, so one copy never reveals the others. ``recipients`` defaults to the
    session's envelope. The date is RFC 5322 local time (``email.utils.formatdate``).
    """
    helo = _NOT_DOMAINISH.sub("?", session.helo) if session.helo else "unknown"
    ip = session.peer_ip
    if ip:
        shown = _NOT_DOMAINISH.sub("?", rdns or ip)
        clauses = [f"from {helo}", f"({shown} {address_literal(ip)})"]
    else:
        clauses = [f"from {helo}"]
    clauses.append(f"by {_NOT_DOMAINISH.sub('?', session.hostname) or 'localhost'}")
    clauses.append(f"with {session.with_protocol}")
    tls = _tls_comment(session)
    if tls:
        clauses.append(tls)
    if session.authenticated and show_user:
        clauses.append("(authenticated as " + _NOT_CTEXT.sub("?", session.authenticated) + ")")
    clauses.append(f"id {id}")
    rcpts = list(session.envelope.recipients if recipients is None else recipients)
    if len(rcpts) == 1:
        clauses.append(f"for <{rcpts[0]}>")
    clauses[-1] += ";"
    clauses.append(formatdate(timestamp, localtime=True))
    return _fold("Received", clauses).encode("utf-8", "surrogateescape")


def return_path_header(sender: Address | str) -> bytes:
    """``Return-Path: <sender>`` (RFC 5321 §4.4), added at final delivery; ``<>`` for the null sender."""
    return f"Return-Path: <{sender}>\r\n".encode("utf-8", "surrogateescape")
