"""PROXY protocol v1/v2 headers as values: framing and strict parsing, no I/O (pure core, standard library only).

The format is HAProxy's (https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt). `HeaderReader` collects
one header from bytes arriving in any pieces and refuses, as early as it can tell, bytes that cannot start one;
`parse_v1` and `parse_v2` turn a complete header into a `ProxyHeader`. Addresses are checked against the family the
header announces and normalised (IPv6 compressed, IPv4-mapped IPv6 as IPv4), so one client has one spelling.
``esmtpkit.server.proxy`` puts this in front of a Twisted factory.

Only stream connections are accepted: a v2 header announcing UDP or a UNIX datagram socket is malformed, since
SMTP cannot run over a datagram connection. v2 TLVs are skipped unread.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["Endpoint", "ProxyHeader", "HeaderReader", "MalformedHeader", "parse_v1", "parse_v2",
           "MAX_V1_LENGTH", "MAX_V2_LENGTH", "V2_SIGNATURE"]

#: Longest v1 header, CRLF included (spec §2.1: "PROXY UNKNOWN" with two IPv6 addresses and ports).
MAX_V1_LENGTH: Final = 107
#: Largest v2 address block plus TLVs accepted by default (the 16-byte fixed part not counted; the spec allows
#: 65535).
MAX_V2_LENGTH: Final = 4096
#: The 12 bytes every v2 header starts with (spec §2.2).
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"

_V1_PREFIX: Final = b"PROXY "
_V1_PROTOCOLS: Final = (b"TCP4 ", b"TCP6 ", b"UNKNOWN")
_V1_TCP_CHARS: Final = frozenset(b"0123456789abcdefABCDEF:. ")
_PORT: Final = re.compile(rb"[0-9]{1,5}")
_V2_FIXED: Final = 16
_V2_LOCAL: Final = 0x20
_V2_PROXY: Final = 0x21
_UNIX_PATH: Final = 108
#: v2 family/transport bytes (spec §2.2) that carry addresses: (family, size of the address block).
_V2_FAMILIES: Final[dict[int, tuple[Literal["TCP4", "TCP6", "UNIX"], int]]] = {
    0x11: ("TCP4", 12), 0x21: ("TCP6", 36), 0x31: ("UNIX", 2 * _UNIX_PATH)}
#: v2 family/transport bytes that are valid but refused: datagram connections cannot carry SMTP.
_V2_DATAGRAM: Final = {0x12: "UDP4", 0x22: "UDP6", 0x32: "UNIX datagram"}
_V2_UNSPEC: Final = 0x00

Family = Literal["TCP4", "TCP6", "UNIX"]


class MalformedHeader(ValueError):
    """The bytes are not a PROXY header we accept; the message says why (for the log)."""


@dataclass(frozen=True)
class Endpoint:
    """One end of the proxied connection as the header names it.

    ``family`` is ``"TCP4"`` or ``"TCP6"`` with ``host`` a normalised IP address (IPv6 compressed; an IPv4-mapped
    IPv6 address becomes ``"TCP4"`` and dotted IPv4) and ``port`` 0-65535; or ``"UNIX"`` with ``host`` the socket
    path (its bytes decoded as UTF-8 with ``surrogateescape``, so any path survives) and ``port`` 0.
    """

    family: Family
    host: str
    port: int


@dataclass(frozen=True)
class ProxyHeader:
    """One parsed PROXY header.

    ``command`` is ``"PROXY"``, or ``"LOCAL"`` for a v2 connection the proxy made itself (health checks).
    ``family`` is what the header announces: ``"TCP4"``, ``"TCP6"``, ``"UNIX"``, or ``"UNKNOWN"`` for v1 UNKNOWN,
    v2 UNSPEC and v2 LOCAL (whose address block is ignored). ``source``/``destination`` are the client and the
    address it connected to, or None when the header carries none: the socket's own addresses then apply.
    ``raw`` is the header as received (a v1 line without its CRLF).
    """

    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"]
    family: Family | Literal["UNKNOWN"]
    source: Endpoint | None
    destination: Endpoint | None
    raw: bytes


class HeaderReader:
    """Collects one PROXY header from bytes arriving in any pieces (I/O free, so it can be fed byte by byte).

    ``feed`` returns None until the header is complete, then ``(header, bytes_after_it)`` and starts afresh; it
    raises `MalformedHeader` as soon as the bytes cannot start a header, or a header would pass the size limits
    (``max_v2_length`` bounds a v2 header's address block and TLVs).
    """

    def __init__(self, max_v2_length: int = MAX_V2_LENGTH) -> None:
        self.max_v2_length = max_v2_length
        self._buffer = b""

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        """Add ``data``; return the header and the bytes after it once the header is complete."""
        buffer = self._buffer = self._buffer + data
        if not buffer:
            return None
        try:
            found = self._v2(buffer) if buffer[:1] == V2_SIGNATURE[:1] else self._v1(buffer)
        except MalformedHeader:
            self._buffer = b""
            raise
        if found is not None:
            self._buffer = b""
        return found

    def _v1(self, buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
        end = buffer.find(b"\r\n", 0, MAX_V1_LENGTH)
        if end >= 0:
            return parse_v1(buffer[:end]), buffer[end + 2:]
        if len(buffer) >= MAX_V1_LENGTH:
            raise MalformedHeader(f"v1 header longer than {MAX_V1_LENGTH} bytes")
        _check_v1_start(buffer)
        return None

    def _v2(self, buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
        if not V2_SIGNATURE.startswith(buffer[:len(V2_SIGNATURE)]):
            raise MalformedHeader("not a PROXY header")
        if len(buffer) > 12:
            _check_command(buffer[12])
        if len(buffer) > 13 and buffer[12] == _V2_PROXY:
            _check_family(buffer[13])
        if len(buffer) < _V2_FIXED:
            return None
        length = int.from_bytes(buffer[14:16], "big")
        if length > self.max_v2_length:
            raise MalformedHeader(f"v2 header declares {length} bytes, more than {self.max_v2_length}")
        _check_length(buffer[12], buffer[13], length)
        end = _V2_FIXED + length
        if len(buffer) < end:
            return None
        return parse_v2(buffer[:end]), buffer[end:]


def parse_v1(line: bytes) -> ProxyHeader:
    """A v1 header line (CRLF removed) as a `ProxyHeader`; `MalformedHeader` if invalid (spec §2.1).

    Fields are separated by exactly one space; TCP4/TCP6 lines have exactly six fields, addresses of the announced
    family and decimal ports 0-65535. After ``PROXY UNKNOWN`` and a space anything may follow (the spec says to
    ignore it), but no line holds a CR or LF.
    """
    if len(line) > MAX_V1_LENGTH - 2:
        raise MalformedHeader(f"v1 header longer than {MAX_V1_LENGTH} bytes")
    if b"\r" in line or b"\n" in line:
        raise MalformedHeader(f"v1 header with a bare CR or LF: {line!r}")
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None, line)
    fields = line.split(b" ")
    if len(fields) != 6 or fields[0] != b"PROXY" or fields[1] not in (b"TCP4", b"TCP6"):
        raise MalformedHeader(f"invalid v1 header {line!r}")
    family: Family = "TCP4" if fields[1] == b"TCP4" else "TCP6"
    source = _tcp_endpoint(_v1_ip(family, fields[2]), _v1_port(fields[4]))
    destination = _tcp_endpoint(_v1_ip(family, fields[3]), _v1_port(fields[5]))
    return ProxyHeader(1, "PROXY", family, source, destination, line)


def parse_v2(header: bytes) -> ProxyHeader:
    """Exactly one complete v2 header (fixed part, addresses, TLVs) as a `ProxyHeader`; `MalformedHeader` if invalid.

    TLVs are skipped. A LOCAL header's family and addresses are ignored, as the spec asks (§2.2); a PROXY header
    must announce UNSPEC or a stream family, with a length that covers its address block.
    """
    if len(header) < _V2_FIXED or not header.startswith(V2_SIGNATURE):
        raise MalformedHeader("v2 header without its signature and fixed part")
    command, family_byte = header[12], header[13]
    length = int.from_bytes(header[14:16], "big")
    _check_command(command)
    if len(header) != _V2_FIXED + length:
        raise MalformedHeader(f"v2 header of {len(header) - _V2_FIXED} bytes after its fixed part, declares {length}")
    if command == _V2_LOCAL:
        return ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, header)
    _check_family(family_byte)
    _check_length(command, family_byte, length)
    if family_byte == _V2_UNSPEC:
        return ProxyHeader(2, "PROXY", "UNKNOWN", None, None, header)
    family, size = _V2_FAMILIES[family_byte]
    block = header[_V2_FIXED:_V2_FIXED + size]
    if family == "UNIX":
        source = Endpoint("UNIX", _unix_path(block[:_UNIX_PATH]), 0)
        destination = Endpoint("UNIX", _unix_path(block[_UNIX_PATH:]), 0)
    else:
        width = 4 if family == "TCP4" else 16
        source = _tcp_endpoint(ipaddress.ip_address(block[:width]),
                               int.from_bytes(block[2 * width:2 * width + 2], "big"))
        destination = _tcp_endpoint(ipaddress.ip_address(block[width:2 * width]),
                                    int.from_bytes(block[2 * width + 2:2 * width + 4], "big"))
    return ProxyHeader(2, "PROXY", family, source, destination, header)


def _check_v1_start(partial: bytes) -> None:
    """Raise unless ``partial`` (no CRLF in it yet) can still grow into a valid v1 line."""
    if not _V1_PREFIX.startswith(partial[:len(_V1_PREFIX)]):
        raise MalformedHeader("not a PROXY header")
    if b"\n" in partial or b"\r" in partial[:-1]:
        raise MalformedHeader(f"v1 header with a bare CR or LF: {partial!r}")
    if partial.endswith(b"\r"):  # only the CRLF can follow: what came before must be a whole line
        parse_v1(partial[:-1])
        return
    rest = partial[len(_V1_PREFIX):]
    if not rest:
        return
    protocol = next((p for p in _V1_PROTOCOLS if p.startswith(rest[:len(p)])), None)
    if protocol is None or (protocol == b"UNKNOWN" and rest[7:8] not in (b"", b" ")):
        raise MalformedHeader(f"invalid v1 header {partial!r}")
    if protocol == b"UNKNOWN":
        return
    fields = rest[len(protocol):].split(b" ")
    if len(fields) > 4 or b"" in fields[:-1] or not _V1_TCP_CHARS.issuperset(rest[len(protocol):]):
        raise MalformedHeader(f"invalid v1 header {partial!r}")


def _v1_ip(family: Family, text: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address in a v1 field; it must be plain ASCII text of the announced family (no IPv6 zone)."""
    kind = ipaddress.IPv4Address if family == "TCP4" else ipaddress.IPv6Address
    if b"%" in text:
        raise MalformedHeader(f"not a {family} address: {text!r}")
    try:
        return kind(text.decode("ascii"))
    except ValueError as e:  # UnicodeDecodeError is one
        raise MalformedHeader(f"not a {family} address: {text!r}") from e


def _v1_port(text: bytes) -> int:
    """A v1 port field: decimal digits only (no sign), 0-65535."""
    if _PORT.fullmatch(text) is None or int(text) > 65535:
        raise MalformedHeader(f"not a port number: {text!r}")
    return int(text)


def _tcp_endpoint(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> Endpoint:
    """A TCP endpoint with one spelling per client: IPv4-mapped IPv6 as IPv4, IPv6 compressed."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return Endpoint("TCP4", str(ip.ipv4_mapped), port)
        return Endpoint("TCP6", ip.compressed, port)
    return Endpoint("TCP4", str(ip), port)


def _unix_path(field: bytes) -> str:
    """A 108-byte v2 path field: the bytes up to the first NUL."""
    return field.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _check_command(command: int) -> None:
    """The v2 version/command byte must say version 2, LOCAL or PROXY."""
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise MalformedHeader(f"v2 header with version {command >> 4}, command {command & 0x0F}")


def _check_family(family: int) -> None:
    """A PROXY v2 header's family/transport byte must be UNSPEC or a known stream family."""
    if family in _V2_DATAGRAM:
        raise MalformedHeader(f"v2 header for a datagram connection ({_V2_DATAGRAM[family]})")
    if family != _V2_UNSPEC and family not in _V2_FAMILIES:
        raise MalformedHeader(f"v2 header with unknown family/transport 0x{family:02x}")


def _check_length(command: int, family: int, length: int) -> None:
    """A PROXY v2 header's declared length must cover its address block."""
    if command == _V2_PROXY and family in _V2_FAMILIES and length < _V2_FAMILIES[family][1]:
        raise MalformedHeader(f"v2 header declares {length} bytes, too few for its "
                              f"{_V2_FAMILIES[family][0]} addresses")
