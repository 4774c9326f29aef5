"""The milter protocol (libmilter's version 6), the MTA's side, as pure values: packet framing, the commands an
MTA sends, the replies a milter answers, and the header section of a held message read a field at a time.

No Twisted and no I/O beyond reading a file object handed in: `esmtpkit.filters.milter` drives it over a
connection. Every packet is ``uint32 length`` (network order, counting the command octet) ``+ command + data``;
strings are NUL-terminated.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import IO, Iterable, Iterator, Mapping

from esmtpkit.core.reply import Reply
from esmtpkit.filters.verdict import HeaderEdit

__all__ = ["MilterProtocolError", "Decoder", "Negotiated", "packet", "optneg", "macros", "connect", "helo",
           "envelope", "header", "parse_optneg", "parse_edit", "parse_replycode", "safe_text", "macro_name",
           "HeaderReader", "VERSION", "OFFERED_ACTIONS", "OFFERED_PROTOCOL", "MAX_PACKET", "MAX_CHUNK"]

#: The protocol version esmtpkit speaks.
VERSION = 6
#: The largest packet accepted from a milter (its length field included); a bigger one is a protocol error.
MAX_PACKET = 1 << 20
#: The largest data of a packet sent to a milter (libmilter's default limit): body chunks, header fields.
MAX_CHUNK = 65535

# Commands, MTA to milter.
SMFIC_ABORT, SMFIC_BODY, SMFIC_CONNECT, SMFIC_MACRO, SMFIC_BODYEOB = b"A", b"B", b"C", b"D", b"E"
SMFIC_HELO, SMFIC_HEADER, SMFIC_MAIL, SMFIC_EOH, SMFIC_OPTNEG = b"H", b"L", b"M", b"N", b"O"
SMFIC_QUIT, SMFIC_RCPT, SMFIC_DATA = b"Q", b"R", b"T"

# Replies, milter to MTA.
SMFIR_ACCEPT, SMFIR_CONTINUE, SMFIR_DISCARD, SMFIR_REJECT, SMFIR_TEMPFAIL = b"a", b"c", b"d", b"r", b"t"
SMFIR_SKIP, SMFIR_REPLYCODE, SMFIR_PROGRESS, SMFIR_QUARANTINE = b"s", b"y", b"p", b"q"
SMFIR_ADDHEADER, SMFIR_INSHEADER, SMFIR_CHGHEADER = b"h", b"i", b"m"

# Actions a milter may take (the MTA offers, the milter asks for a subset).
SMFIF_ADDHDRS, SMFIF_CHGBODY, SMFIF_ADDRCPT, SMFIF_DELRCPT = 0x01, 0x02, 0x04, 0x08
SMFIF_CHGHDRS, SMFIF_QUARANTINE, SMFIF_CHGFROM, SMFIF_ADDRCPT_PAR = 0x10, 0x20, 0x40, 0x80
SMFIF_SETSYMLIST = 0x100

# Protocol flags: steps the milter does not want, steps it does not answer, and how headers are sent.
SMFIP_NOCONNECT, SMFIP_NOHELO, SMFIP_NOMAIL, SMFIP_NORCPT = 0x01, 0x02, 0x04, 0x08
SMFIP_NOBODY, SMFIP_NOHDRS, SMFIP_NOEOH, SMFIP_NR_HDR = 0x10, 0x20, 0x40, 0x80
SMFIP_NOUNKNOWN, SMFIP_NODATA, SMFIP_SKIP, SMFIP_RCPT_REJ = 0x100, 0x200, 0x400, 0x800
SMFIP_NR_CONN, SMFIP_NR_HELO, SMFIP_NR_MAIL, SMFIP_NR_RCPT = 0x1000, 0x2000, 0x4000, 0x8000
SMFIP_NR_DATA, SMFIP_NR_UNKN, SMFIP_NR_EOH, SMFIP_NR_BODY = 0x10000, 0x20000, 0x40000, 0x80000
SMFIP_HDR_LEADSPC = 0x100000

#: What esmtpkit applies: add and insert, change and delete header fields, quarantine, and a milter's own macro
#: lists. Not body replacement, nor recipient or sender changes: a milter that asks for them anyway is held to
#: what was offered (`parse_optneg`), and fails the message when it sends one.
OFFERED_ACTIONS = SMFIF_ADDHDRS | SMFIF_CHGHDRS | SMFIF_QUARANTINE | SMFIF_SETSYMLIST
#: Every step may be left out or left unanswered; SMFIS_SKIP and leading spaces understood. Not RCPT_REJ
#: (refused recipients are not sent) and no larger packets than libmilter's default.
OFFERED_PROTOCOL = (SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NORCPT | SMFIP_NOBODY | SMFIP_NOHDRS
                    | SMFIP_NOEOH | SMFIP_NR_HDR | SMFIP_NOUNKNOWN | SMFIP_NODATA | SMFIP_SKIP | SMFIP_NR_CONN
                    | SMFIP_NR_HELO | SMFIP_NR_MAIL | SMFIP_NR_RCPT | SMFIP_NR_DATA | SMFIP_NR_UNKN
                    | SMFIP_NR_EOH | SMFIP_NR_BODY | SMFIP_HDR_LEADSPC)

#: The macro stages of a milter's symbol lists (SMFIM_*), by the command whose macros they are.
MACRO_STAGES = {0: SMFIC_CONNECT, 1: SMFIC_HELO, 2: SMFIC_MAIL, 3: SMFIC_RCPT, 4: SMFIC_DATA, 5: SMFIC_BODYEOB,
                6: SMFIC_EOH}


class MilterProtocolError(Exception):
    """The milter broke the protocol: a malformed or oversized packet, or a reply it may not give here."""


def packet(command: bytes, data: bytes = b"") -> bytes:
    """One packet: length, command octet, data."""
    return struct.pack(">I", len(data) + 1) + command + data


def _cstr(value: str | bytes) -> bytes:
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    return raw.replace(b"\0", b" ") + b"\0"


def optneg(version: int = VERSION, actions: int = OFFERED_ACTIONS, protocol: int = OFFERED_PROTOCOL) -> bytes:
    """SMFIC_OPTNEG: the version, the actions and the protocol flags the MTA offers."""
    return packet(SMFIC_OPTNEG, struct.pack(">III", version, actions, protocol))


def macros(command: bytes, values: Iterable[tuple[str, str]]) -> bytes:
    """SMFIC_MACRO: the macros (``name``, ``value``) for ``command``; names as ``j`` or ``{daemon_name}``."""
    return packet(SMFIC_MACRO, command + b"".join(_cstr(name) + _cstr(value) for name, value in values))


def connect(hostname: str, family: bytes, port: int, address: str) -> bytes:
    """SMFIC_CONNECT: the client's name, its address family (``4``, ``6``, ``L``, or ``U``: unknown, no address
    follows), port and address."""
    if family == b"U":
        return packet(SMFIC_CONNECT, _cstr(hostname) + b"U")
    return packet(SMFIC_CONNECT, _cstr(hostname) + family + struct.pack(">H", port) + _cstr(address))


def helo(name: str) -> bytes:
    """SMFIC_HELO: the name the client gave."""
    return packet(SMFIC_HELO, _cstr(name))


def envelope(command: bytes, address: str, params: Mapping[str, object]) -> bytes:
    """SMFIC_MAIL or SMFIC_RCPT: ``<address>`` then each ESMTP parameter as ``KEY=VALUE`` (or ``KEY``)."""
    args = [f"<{address}>"]
    for key, value in params.items():
        args.append(key if value is True or value is None or value == "" else f"{key}={value}")
    return packet(command, b"".join(_cstr(arg) for arg in args))


def header(name: bytes, value: bytes) -> bytes:
    """SMFIC_HEADER: a field's name and value, cut so the packet's data fits `MAX_CHUNK`."""
    room = MAX_CHUNK - len(name) - 2
    return packet(SMFIC_HEADER, name.replace(b"\0", b" ") + b"\0" + value[:max(room, 0)].replace(b"\0", b" ") + b"\0")


class Decoder:
    """Splits what a milter sends into ``(command, data)`` packets; a packet above `MAX_PACKET` octets, or of
    length 0, raises `MilterProtocolError` (so at most one packet is ever buffered)."""

    def __init__(self, limit: int = MAX_PACKET) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buffer += data
        out = []
        while len(self._buffer) >= 4:
            (size,) = struct.unpack_from(">I", self._buffer)
            if size == 0 or size + 4 > self.limit:
                raise MilterProtocolError(f"a milter packet of {size} octets (at most {self.limit - 4})")
            if len(self._buffer) < size + 4:
                break
            out.append((bytes(self._buffer[4:5]), bytes(self._buffer[5:size + 4])))
            del self._buffer[:size + 4]
        return out


@dataclass(frozen=True)
class Negotiated:
    """What the milter answered to SMFIC_OPTNEG: its version, the actions it takes, its protocol flags, and the
    macros it asks for at each command (`MACRO_STAGES`), when it gave a list."""

    version: int
    actions: int
    protocol: int
    macros: Mapping[bytes, tuple[str, ...]] = field(default_factory=dict)

    def has(self, flag: int) -> bool:
        """Whether the milter set protocol flag ``flag``."""
        return bool(self.protocol & flag)


def _strings(data: bytes, what: str) -> list[bytes]:
    if not data.endswith(b"\0"):
        raise MilterProtocolError(f"{what}: a string without its NUL")
    return data[:-1].split(b"\0")


def parse_optneg(data: bytes, actions: int = OFFERED_ACTIONS, protocol: int = OFFERED_PROTOCOL) -> Negotiated:
    """The milter's SMFIC_OPTNEG answer, checked against what was offered.

    The version must be 6: versions 2 to 5 know fewer commands (no SMFIC_DATA before 4, no SMFIC_UNKNOWN before 3)
    and other protocol flags, so rather than a second, rarely exercised conversation for them, an older milter
    fails here, clearly (libmilter has spoken 6 since Sendmail 8.14, 2007; OpenDKIM, OpenDMARC, clamav-milter and
    rspamd all do). The milter's action bits are masked to what was offered: a milter may answer with more than it
    was offered (rspamd's proxy adds recipient and body changes to whatever it is offered), and what matters is
    what it then sends, a reply for an action it does not hold failing the step. Protocol flags that were not
    offered fail negotiation: each changes what the milter expects to be sent."""
    if len(data) < 12:
        raise MilterProtocolError("option negotiation: fewer than 12 octets")
    version, wanted, flags = struct.unpack_from(">III", data)
    if version != VERSION:
        raise MilterProtocolError(f"option negotiation: the milter speaks milter protocol version {version}; "
                                  f"esmtpkit speaks version {VERSION} only")
    wanted &= actions
    if flags & ~protocol:
        raise MilterProtocolError(f"option negotiation: the milter needs protocol flags {flags & ~protocol:#x}")
    lists: dict[bytes, tuple[str, ...]] = {}
    rest = data[12:]
    while rest:
        end = rest.find(b"\0", 4)
        if len(rest) < 5 or end < 0:
            raise MilterProtocolError("option negotiation: a malformed macro list")
        (where,) = struct.unpack_from(">I", rest)
        if where not in MACRO_STAGES:
            raise MilterProtocolError(f"option negotiation: a macro list for unknown stage {where}")
        names = rest[4:end].decode("ascii", "replace").split()
        lists[MACRO_STAGES[where]] = tuple(macro_name(name) for name in names)
        rest = rest[end + 1:]
    return Negotiated(version, wanted, flags, lists)


def macro_name(name: str) -> str:
    """A macro's name as sent: one character bare (``j``), longer ones in braces (``{daemon_name}``)."""
    bare = name.strip("{}")
    return bare if len(bare) == 1 else "{" + bare + "}"


def safe_text(raw: bytes) -> str:
    """Milter text made safe for a header value or a reply: unfolded, printable."""
    text = re.sub(r"\r?\n", "", raw.decode("utf-8", "replace"))
    return "".join(c if c.isprintable() or c == "\t" else " " for c in text)


def header_value(raw: bytes) -> str:
    """A header value a milter sent, as `HeaderEdit` takes it: its folds kept (a line end before a space or a tab,
    written back as CRLF), any other line end dropped, other control characters made spaces, and octets that are
    not UTF-8 kept as surrogate escapes (so they go back into the message as they came)."""
    text = raw.decode("utf-8", "surrogateescape")
    text = re.sub(r"[\r\n]+(?![ \t])", "", re.sub(r"\r?\n(?=[ \t])", "\n", text))
    return "".join(c if c in "\t\n" or " " <= c <= "~" or ord(c) >= 0xA0 or 0xDC80 <= ord(c) <= 0xDCFF else " "
                   for c in text)


def parse_edit(command: bytes, data: bytes, leading_space: bool = False) -> HeaderEdit:
    """SMFIR_ADDHEADER, SMFIR_INSHEADER or SMFIR_CHGHEADER as a `HeaderEdit` (a change to an empty value is a
    delete; an index 0 to change or delete means the first field). Folds are kept (`header_value`); with
    SMFIP_HDR_LEADSPC the one space after the colon is the milter's and is taken off."""
    index = 0
    if command in (SMFIR_INSHEADER, SMFIR_CHGHEADER):
        if len(data) < 4:
            raise MilterProtocolError("a header change without its index")
        (index,) = struct.unpack_from(">I", data)
        data = data[4:]
    parts = _strings(data, "a header change")
    if len(parts) != 2:
        raise MilterProtocolError("a header change is a name and a value")
    name = parts[0].decode("ascii", "replace")
    value = header_value(parts[1])
    if leading_space and value.startswith(" "):
        value = value[1:]
    try:
        if command == SMFIR_ADDHEADER:
            return HeaderEdit("add", name, value)
        if command == SMFIR_INSHEADER:
            return HeaderEdit("insert", name, value, index)
        if not value:
            return HeaderEdit("delete", name, index=max(index, 1))
        return HeaderEdit("change", name, value, max(index, 1))
    except ValueError as e:
        raise MilterProtocolError(f"a header change: {e}") from None


_REPLY_LINE = re.compile(r"([45]\d\d)([ -]|$)(.*)", re.DOTALL)
_ENHANCED = re.compile(r"([45])\.(\d{1,3})\.(\d{1,3})(?: |$)")
#: Bounds on a milter's reply: its lines, and each line's text.
MAX_REPLY_LINES, MAX_REPLY_TEXT = 10, 400


def parse_replycode(data: bytes) -> Reply:
    """SMFIR_REPLYCODE (``"550 5.7.1 text"``, lines joined by CRLF as smfi_setmlreply sends them) as a 4xx or
    5xx `Reply`: every line with the same code, at most `MAX_REPLY_LINES` of `MAX_REPLY_TEXT` printable
    characters."""
    if data.count(b"\0") != 1 or not data.endswith(b"\0"):
        raise MilterProtocolError("a reply code is one NUL-terminated string")
    lines = data[:-1].decode("utf-8", "replace").split("\r\n")
    if len(lines) > MAX_REPLY_LINES:
        raise MilterProtocolError(f"a reply of more than {MAX_REPLY_LINES} lines")
    code = None
    enhanced = None
    texts = []
    for number, line in enumerate(lines):
        match = _REPLY_LINE.fullmatch(line)
        if match is None or (code is not None and match.group(1) != code):
            raise MilterProtocolError(f"not an SMTP reply line: {line[:80]!r}")
        last = number == len(lines) - 1
        if (match.group(2) == "-") == last:
            raise MilterProtocolError(f"a reply line continued wrongly: {line[:80]!r}")
        code = match.group(1)
        text = match.group(3)
        found = _ENHANCED.match(text)
        if found and found.group(1) == code[0]:
            enhanced = enhanced or f"{found.group(1)}.{found.group(2)}.{found.group(3)}"
            text = text[found.end():]
        texts.append("".join(c if c.isprintable() else " " for c in text)[:MAX_REPLY_TEXT])
    assert code is not None
    return Reply(int(code), tuple(texts), enhanced or f"{code[0]}.7.1")


#: A header field's first line: a name, maybe spaces, a colon.
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")


class HeaderReader:
    """Reads a message's header section from ``stream`` a field at a time (`fields`), then its body (`chunks`).

    The section ends at an empty line, or at a line that is not a field (which is then the body's first line).
    A field is cut at ``limit`` octets (the rest of it is read and dropped), so memory stays bounded."""

    def __init__(self, stream: IO[bytes], limit: int = MAX_CHUNK) -> None:
        self.stream = stream
        self.limit = limit
        self._leftover = b""

    def _line(self) -> tuple[bytes, bool]:
        """The next piece of a line, and whether it is the line's end (or the content's). Lines end at CRLF only,
        as the server's parser and the front that applies the milter's changes read them: a bare LF (let in with
        ``bare_newline="allow"``) is part of its line, so the fields the milter counts are the front's."""
        piece = b""
        while True:
            more = self.stream.readline(self.limit + 2 - len(piece))
            piece += more
            if not more or piece.endswith(b"\r\n") or len(piece) >= self.limit + 2:
                break
        return piece, piece.endswith(b"\r\n") or len(piece) < self.limit + 2

    def fields(self) -> Iterator[tuple[bytes, bytes]]:
        """Each field as (name, value): the value as after the colon, folds as LF, its line end taken off."""
        current: bytearray | None = None
        while True:
            piece, whole = self._line()
            if not piece or piece == b"\r\n":
                break
            if piece[:1] in (b" ", b"\t") and current is not None:
                pass
            elif _FIELD.match(piece):
                if current is not None:
                    yield _split(current)
                current = bytearray()
            else:
                self._leftover = piece
                break
            current += piece[:max(self.limit - len(current), 0)]
            while not whole:
                piece, whole = self._line()
                current += piece[:max(self.limit - len(current), 0)]
        if current is not None:
            yield _split(current)

    def chunks(self, size: int = MAX_CHUNK) -> Iterator[bytes]:
        """The body after `fields`: ``size`` octets at a time (call `fields` to its end first)."""
        first, self._leftover = self._leftover, b""
        while True:
            chunk = first + self.stream.read(size - len(first))
            first = b""
            if not chunk:
                return
            yield chunk


def _split(field: bytearray) -> tuple[bytes, bytes]:
    raw = bytes(field)
    if raw.endswith(b"\n"):
        raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    name, _, value = raw.partition(b":")
    return name.rstrip(b" \t"), value.replace(b"\r\n", b"\n")
