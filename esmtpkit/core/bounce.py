"""Delivery status notifications: the report a queue sends a sender when mail failed, is late, or was delivered.

A notice is a ``multipart/report; report-type=delivery-status`` message (RFC 3464, RFC 6522): a note for people,
the machine-readable ``message/delivery-status`` part with RFC 3463 status codes and the RFC 3461 parameters
(ENVID, ORCPT), and the returned message or its header. A message that needed SMTPUTF8 is reported with the
RFC 6533 types (``message/global-delivery-status``, ``message/global``, ``message/global-headers``).

Written by hand rather than with `email.generator`: the returned message has to go in octet for octet (the
generator re-folds and re-encodes what it embeds), where lines fold and how long they get must not depend on the
library's version, and the same inputs must give the same bytes. The tests read every notice back with `email`.
Pure core: no I/O and no clock (``now`` and ``new_id`` come from the caller).
"""

from __future__ import annotations

import re
import textwrap
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Final, Sequence

from esmtpkit.core.dsn import XtextError, utf8_addr_decode, utf8_addr_encode, xtext_decode, xtext_encode
from esmtpkit.core.outbound import Message, Outcome, Recipient
from esmtpkit.core.schedule import Schedule

__all__ = ["report", "BOUNCE_SIZE_LIMIT", "ACTIONS", "SUBJECTS"]

#: Largest message returned whole in a failure notice (Postfix's ``bounce_size_limit``); beyond it, the header.
BOUNCE_SIZE_LIMIT: Final = 50000

#: RFC 3464 §2.3.3 actions a notice can report.
ACTIONS: Final = ("failed", "delayed", "delivered", "relayed")

#: The notice's Subject for each action.
SUBJECTS: Final = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
    "relayed": "Relayed Mail Delivery Report",
}

_DEFAULT_STATUS: Final = {"failed": "5.0.0", "delayed": "4.0.0", "delivered": "2.0.0", "relayed": "2.0.0"}
_DEFAULT_TEXT: Final = {
    "failed": "delivery failed",
    "delayed": "delivery is delayed; still trying",
    "delivered": "delivered",
    "relayed": "passed on to a system that does not report delivery",
}
_INTRO: Final = {
    "failed": "Your message could not be delivered to the recipients below.",
    "delayed": "Your message has not been delivered yet to the recipients below. It will be tried until {until}; "
               "you need not send it again.",
    "delivered": "Your message was delivered to the recipients below, as you asked to be told.",
    "relayed": "Your message was passed on for the recipients below to a system that does not report delivery "
               "itself, so no further notice will come for them.",
}

#: Fold header fields before this many characters where a space allows (RFC 5322 §2.1.1 SHOULD).
FOLD_AT: Final = 78
#: Wrap the note for people at this width.
WRAP_AT: Final = 76
#: RFC 5322 §2.1.1 MUST: no line longer than this many octets, CRLF excluded.
MAX_LINE: Final = 998

_PREAMBLE: Final = b"This is a MIME-encapsulated message.\r\n"
_STATUS: Final = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_PRINTABLE: Final = re.compile(r"[\x20-\x7e]*\Z")
_PRINTABLE_BYTES: Final = re.compile(rb"[\x20-\x7e]*\Z")
_NOT_HOST: Final = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_NOT_ID: Final = re.compile(r"[^A-Za-z0-9]")
#: RFC 822 atom, for an ORCPT address type (RFC 3461 §4.2).
_ATOM: Final = re.compile(r"[!#-'*+\-/-9=?A-Z^-~]+\Z")
#: What cannot travel in a 7bit or 8bit MIME part (RFC 2045 §2.7, §2.8): a lone CR or LF, or NUL.
_NOT_CARRIABLE: Final = re.compile(rb"\r(?!\n)|(?<!\r)\n|\x00")


def report(original: Message, indexes: Sequence[int], action: str, *, reporting_mta: str, content: bytes,
           new_id: str, now: float, postmaster: str = "postmaster",
           retry_until: float | None = None) -> tuple[Message, bytes]:
    """The delivery status notice (RFC 3464) telling ``original``'s sender about the recipients at ``indexes``.

    ``action`` is one of `ACTIONS`; each recipient's status and diagnostic come from its ``outcome``.
    ``content`` is the start of the original (at most ``BOUNCE_SIZE_LIMIT + 1`` octets are needed): a failure
    notice returns it whole unless RET=HDRS or it is too large, other notices return only its header (RET
    concerns failures, RFC 3461 §4.3). ``retry_until`` is the Will-Retry-Until of a delay notice (default: the
    arrival plus the default `Schedule` lifetime). ``postmaster`` is the contact named in the note (a bare local
    part gets ``@reporting_mta``). Returns the notice (sender "", sent to the original sender with NOTIFY=NEVER)
    and its bytes; ValueError for an unknown action, no recipients, or a null-sender original.
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
    if original.sender == "":
        raise ValueError("a message with the null sender is never reported on (RFC 5321 §4.5.5)")
    chosen = [original.recipients[i] for i in dict.fromkeys(indexes)]
    if not chosen:
        raise ValueError("no recipients to report on")

    utf8 = (original.smtputf8 or not original.sender.isascii()
            or any(not r.address.isascii() or not (r.orcpt or "").isascii() for r in chosen))
    mta = _host(reporting_mta)
    until = retry_until if retry_until is not None else original.arrived + Schedule().lifetime

    returned_type, returned, returned_note = _returned(original, content, action, utf8)
    note = _note(chosen, action, mta, postmaster, until, returned_note, utf8)
    status = _delivery_status(original, chosen, action, mta, now, until, utf8)

    parts: list[tuple[list[str], bytes]] = [
        (["Content-Description: Notification\r\n",
          f"Content-Type: text/plain; charset={'us-ascii' if note.isascii() else 'utf-8'}\r\n"], note),
        (["Content-Description: Delivery report\r\n",
          f"Content-Type: {'message/global-delivery-status' if utf8 else 'message/delivery-status'}\r\n"],
         status),
    ]
    if returned_type is not None:
        description = "Undelivered Message" if returned_type in ("message/rfc822", "message/global") \
            else "Message Headers"
        parts.append(([f"Content-Description: {description}\r\n", f"Content-Type: {returned_type}\r\n"],
                      returned))
    for headers, data in parts:
        headers.append(f"Content-Transfer-Encoding: {'7bit' if data.isascii() else '8bit'}\r\n")

    boundary = _boundary(new_id, [data for _, data in parts])
    eight_bit = any(not data.isascii() for _, data in parts)
    head = [
        _field("From", f'"Mail Delivery System" <MAILER-DAEMON@{mta}>'),
        _field("To", f"<{_clean(original.sender, utf8)}>"),
        _field("Subject", SUBJECTS[action]),
        _field("Date", _date(now)),
        _field("Message-ID", f"<{_NOT_ID.sub('', new_id) or 'report'}@{mta}>"),
        _field("Auto-Submitted", "auto-replied"),
        _field("MIME-Version", "1.0"),
        _field("Content-Type", f'multipart/report; report-type=delivery-status; boundary="{boundary}"'),
        _field("Content-Transfer-Encoding", "8bit" if eight_bit else "7bit"),
    ]
    out = bytearray("".join(head).encode("utf-8"))
    out += b"\r\n" + _PREAMBLE
    delimiter = b"\r\n--" + boundary.encode("ascii")
    for headers, data in parts:
        out += delimiter + b"\r\n" + "".join(headers).encode("ascii") + b"\r\n" + data
    out += delimiter + b"--\r\n"
    data = bytes(out)

    notice = Message(
        id=new_id, sender="", recipients=[Recipient(original.sender, notify=("NEVER",))], size=len(data),
        body="8BITMIME" if utf8 or eight_bit else None, smtputf8=utf8, arrived=now, next_attempt=now,
    )
    return notice, data


# ---- the three parts ------------------------------------------------------------------------------------------

def _note(chosen: list[Recipient], action: str, mta: str, postmaster: str, until: float, returned_note: str,
          utf8: bool) -> bytes:
    """The part for people: what happened, whom to ask, and one paragraph per recipient."""
    contact = _clean(postmaster, utf8).strip() or "postmaster"
    if "@" not in contact:
        contact = f"{contact}@{mta}"
    paragraphs = [
        f"This is the mail system at {mta}.",
        _INTRO[action].format(until=_date(until)) + " " + returned_note,
        f"For help, write to <{contact}> and include this report.",
    ]
    for r in chosen:
        who = f"<{_clean(r.address, utf8)}>"
        o = r.outcome
        if o is None:
            paragraphs.append(f"{who}: {_DEFAULT_TEXT[action]}")
        elif o.remote:
            paragraphs.append(f"{who}: host {_clean(o.remote, utf8)} said: {_clean(str(o), utf8)}")
        else:
            paragraphs.append(f"{who}: {_clean(str(o), utf8)}")
    lines: list[str] = []
    for n, paragraph in enumerate(paragraphs):
        indent = "    " if n >= 3 else ""  # a recipient's paragraph: its lines after the first are indented
        lines.extend(textwrap.wrap(paragraph, width=WRAP_AT, subsequent_indent=indent, break_long_words=True,
                                   break_on_hyphens=False) or [""])
        lines.append("")
    return "\r\n".join(lines).encode("utf-8")


def _delivery_status(original: Message, chosen: list[Recipient], action: str, mta: str, now: float,
                     until: float, utf8: bool) -> bytes:
    """The ``message/delivery-status`` body (RFC 3464 §2.2, §2.3): per-message fields, then one block per
    recipient, blocks separated by an empty line."""
    fields = []
    if original.envid:
        fields.append(_field("Original-Envelope-Id", _generic(original.envid.encode("utf-8"))))
    fields.append(_field("Reporting-MTA", f"dns; {mta}"))
    if original.received_from:
        fields.append(_field("Received-From-MTA", _clean(original.received_from, utf8)))
    if original.arrived:
        fields.append(_field("Arrival-Date", _date(original.arrived)))
    fields.append(_field("X-Esmtpkit-Queue-ID", _NOT_ID.sub("?", original.id)))
    blocks = ["".join(fields)]
    for r in chosen:
        fields = []
        if r.orcpt:
            fields.append(_field("Original-Recipient", _original_recipient(r.orcpt, utf8)))
        fields.append(_field("Final-Recipient", _final_recipient(r.address, utf8)))
        fields.append(_field("Action", action))
        fields.append(_field("Status", _status(r.outcome, action)))
        o = r.outcome
        if o is not None and o.remote:
            fields.append(_field("Remote-MTA", f"dns; {_remote_name(o.remote)}"))
            fields.append(_field("Diagnostic-Code", f"smtp; {_clean(str(o), utf8)}"))
        elif o is not None and o.text:
            fields.append(_field("Diagnostic-Code", f"X-esmtpkit; {_clean(o.text, utf8)}"))
        if o is not None:
            fields.append(_field("Last-Attempt-Date", _date(now)))
        if action == "delayed":
            fields.append(_field("Will-Retry-Until", _date(until)))
        blocks.append("".join(fields))
    return "\r\n".join(blocks).encode("utf-8")


def _returned(original: Message, content: bytes, action: str, utf8: bool) -> tuple[str | None, bytes, str]:
    """The third part: its type (None: no third part), its body, and a sentence for the note saying what it is."""
    whole_wanted = action == "failed" and original.ret != "HDRS"
    too_large = len(content) > BOUNCE_SIZE_LIMIT or original.size > BOUNCE_SIZE_LIMIT
    if whole_wanted and not too_large and _carriable(content):
        body = content if content.endswith(b"\r\n") else content + b"\r\n"
        return ("message/global" if utf8 else "message/rfc822"), body, "The message is attached below."
    header = _header_block(content)
    if not header or not _carriable(header):
        return None, b"", "The message could not be attached: its header is not in a form mail can carry."
    if not whole_wanted:
        sentence = "Its header is attached below."
    elif too_large:
        sentence = (f"The message was too large to return (over {BOUNCE_SIZE_LIMIT} octets), so only its header "
                    "is attached below.")
    else:
        sentence = ("The message could not be returned as it is (not in a form mail can carry), so only its "
                    "header is attached below.")
    return ("message/global-headers" if utf8 else "text/rfc822-headers"), header, sentence


def _header_block(content: bytes) -> bytes:
    """The header section of a message's start, through the CRLF of its last whole header line."""
    if content.startswith(b"\r\n"):
        return b""
    end = content.find(b"\r\n\r\n")
    if end >= 0:
        return content[:end + 2]
    return content[:content.rfind(b"\r\n") + 2]


def _carriable(data: bytes) -> bool:
    """Whether ``data`` may go in a 7bit or 8bit part: CRLF line ends only, no NUL, no line over 998 octets."""
    if _NOT_CARRIABLE.search(data):
        return False
    return all(len(line) <= MAX_LINE for line in data.split(b"\r\n"))


# ---- field values ---------------------------------------------------------------------------------------------

def _field(name: str, value: str) -> str:
    """``Name: value`` and CRLF, folded at spaces before `FOLD_AT` characters where it can be; a run with no
    space that is too long for one line is cut (unfolding then leaves a space there), so no line passes 998."""
    head = name + ":"
    lines: list[str] = []
    line = head
    for word in value.split(" "):
        size = 900 if word.isascii() else 240
        chunks = [word[i:i + size] for i in range(0, len(word), size)] or [""]
        for n, chunk in enumerate(chunks):
            piece = " " + chunk
            if chunk and line != head and (n > 0 or len(line) + len(piece) > FOLD_AT):
                lines.append(line)
                line = piece
            else:
                line += piece
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _clean(text: str, utf8: bool) -> str:
    """Text safe for one field or line: controls become spaces or ``?``; beyond ASCII only when ``utf8``."""
    text = _CONTROL.sub(lambda m: " " if m.group() in "\t\r\n" else "?", text)
    return text if utf8 else text.encode("ascii", "replace").decode("ascii")


def _host(name: str) -> str:
    return _NOT_HOST.sub("?", name.strip()) or "localhost"


def _date(when: float) -> str:
    """An RFC 5322 date in UTC with a ``+0000`` zone."""
    return format_datetime(datetime.fromtimestamp(when, timezone.utc))


def _generic(raw: bytes) -> str:
    """A decoded value as a DSN field holds it: as it is when printable ASCII, else xtext, so no control or
    8-bit octet reaches the field (RFC 3464 generic-address and envelope-id are ``*text``)."""
    return raw.decode("ascii") if _PRINTABLE_BYTES.match(raw) else xtext_encode(raw)


def _final_recipient(address: str, utf8: bool) -> str:
    """``rfc822; address``, or ``utf-8; address`` (RFC 6533 §3) for a mailbox beyond ASCII."""
    if not address.isascii():
        try:
            return f"utf-8; {utf8_addr_encode(address, unitext=utf8)}"
        except XtextError:
            pass
    return f"rfc822; {_generic(address.encode('utf-8', 'surrogateescape'))}"


def _original_recipient(orcpt: str, utf8: bool) -> str:
    """ORCPT as received (``type;xtext``), in the same ``type;address`` shape with the address decoded (RFC 3461
    §4.2) and written as RFC 3464 §2.3.1 wants it: printable text as it is, anything else xtext; the ``utf-8``
    type in RFC 6533's form."""
    addr_type, semicolon, encoded = orcpt.partition(";")
    addr_type = addr_type.strip()
    if not semicolon or not _ATOM.match(addr_type):
        addr_type, encoded = "unknown", orcpt
    try:
        if addr_type.lower() == "utf-8":
            return f"{addr_type};{utf8_addr_encode(utf8_addr_decode(encoded, unitext=True), unitext=utf8)}"
        return f"{addr_type};{_generic(xtext_decode(encoded))}"
    except XtextError:
        return f"{addr_type};{_generic(encoded.encode('utf-8', 'surrogateescape'))}"


def _status(outcome: Outcome | None, action: str) -> str:
    """The RFC 3463 status: the outcome's enhanced code, or one that fits its basic code or the action."""
    if outcome is None:
        return _DEFAULT_STATUS[action]
    if _STATUS.match(outcome.enhanced):
        return outcome.enhanced
    klass = outcome.code // 100
    return f"{klass}.0.0" if klass in (2, 4, 5) else _DEFAULT_STATUS[action]


def _remote_name(remote: str) -> str:
    """The host name of ``mx.example.net[192.0.2.1]`` (its address when it has no name), for ``dns;``."""
    name, bracket, rest = remote.partition("[")
    name = name.strip()
    if not name and bracket:
        name = rest.partition("]")[0]
    return _host(name)


def _boundary(new_id: str, bodies: list[bytes]) -> str:
    """A boundary made from ``new_id`` that no part contains (a counter is added until none does)."""
    base = (_NOT_ID.sub("", new_id)[:40] or "report") + "/report"
    candidate, n = base, 0
    while any(b"--" + candidate.encode("ascii") in body for body in bodies):
        n += 1
        candidate = f"{base}.{n}"
    return candidate
