"""The pure PROXY header parser (esmtpkit.core.proxy_header): byte-exact v1 and v2 headers, every refusal, early
refusal while framing, and any split of a valid header giving the same header and the same bytes after it.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core.proxy_header import (
    MAX_V1_LENGTH,
    MAX_V2_LENGTH,
    V2_SIGNATURE,
    Endpoint,
    HeaderReader,
    MalformedHeader,
    ProxyHeader,
    parse_v1,
    parse_v2,
)

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(command: int = 0x21, family: int = 0x11, block: bytes | None = None, tlvs: bytes = b"",
       length: int | None = None) -> bytes:
    """A v2 header built by hand from the spec (§2.2); ``block`` defaults to 192.0.2.10:51000 -> 198.51.100.1:25."""
    if block is None:
        block = ipv4_block("192.0.2.10", "198.51.100.1", 51000, 25)
    body = block + tlvs
    size = len(body) if length is None else length
    return SIGNATURE + bytes([command, family]) + struct.pack("!H", size) + body


def ipv4_block(source: str, destination: str, sport: int, dport: int) -> bytes:
    return socket.inet_pton(socket.AF_INET, source) + socket.inet_pton(socket.AF_INET, destination) + \
        struct.pack("!HH", sport, dport)


def ipv6_block(source: str, destination: str, sport: int, dport: int) -> bytes:
    return socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(socket.AF_INET6, destination) + \
        struct.pack("!HH", sport, dport)


def unix_block(source: bytes, destination: bytes) -> bytes:
    return source.ljust(108, b"\0") + destination.ljust(108, b"\0")


def tcp4(host: str, port: int) -> Endpoint:
    return Endpoint("TCP4", host, port)


def tcp6(host: str, port: int) -> Endpoint:
    return Endpoint("TCP6", host, port)


class ConstantsTests(SynchronousTestCase):
    def test_limits_and_signature(self) -> None:
        self.assertEqual((MAX_V1_LENGTH, MAX_V2_LENGTH), (107, 4096))
        self.assertEqual(V2_SIGNATURE, SIGNATURE)


class V1Tests(SynchronousTestCase):
    """Version 1: one text line (spec §2.1), given to parse_v1 without its CRLF."""

    def test_tcp4(self) -> None:
        line = b"PROXY TCP4 192.0.2.10 198.51.100.1 51000 25"
        self.assertEqual(parse_v1(line), ProxyHeader(1, "PROXY", "TCP4", tcp4("192.0.2.10", 51000),
                                                     tcp4("198.51.100.1", 25), line))

    def test_tcp6(self) -> None:
        line = b"PROXY TCP6 2001:db8::10 2001:db8::1 51000 25"
        self.assertEqual(parse_v1(line), ProxyHeader(1, "PROXY", "TCP6", tcp6("2001:db8::10", 51000),
                                                     tcp6("2001:db8::1", 25), line))

    def test_tcp6_is_normalised(self) -> None:
        """Upper-case or uncompressed IPv6 becomes the compressed spelling; IPv4-mapped IPv6 becomes IPv4."""
        header = parse_v1(b"PROXY TCP6 2001:DB8:0:0:0:0:0:10 ::ffff:198.51.100.1 51000 25")
        self.assertEqual(header.family, "TCP6")
        self.assertEqual((header.source, header.destination),
                         (tcp6("2001:db8::10", 51000), tcp4("198.51.100.1", 25)))
        self.assertEqual(parse_v1(b"PROXY TCP6 ::FFFF:C000:20A ::1 1 2").source, tcp4("192.0.2.10", 1))

    def test_port_range(self) -> None:
        header = parse_v1(b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535")
        self.assertEqual((header.source, header.destination), (tcp4("0.0.0.0", 0), tcp4("255.255.255.255", 65535)))
        self.assertEqual(parse_v1(b"PROXY TCP4 192.0.2.10 198.51.100.1 00025 025").source, tcp4("192.0.2.10", 25))

    def test_unknown(self) -> None:
        """Bare, or followed by anything the receiver must ignore (spec §2.1): no addresses either way."""
        for line in (b"PROXY UNKNOWN", b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2", b"PROXY UNKNOWN ",
                     b"PROXY UNKNOWN \xff\x00 anything  at all", b"PROXY UNKNOWN " + b"f" * 91):
            self.assertEqual(parse_v1(line), ProxyHeader(1, "PROXY", "UNKNOWN", None, None, line), line)

    MALFORMED = {
        "empty": b"",
        "only PROXY": b"PROXY",
        "PROXY and a space": b"PROXY ",
        "lower-case": b"proxy TCP4 192.0.2.10 198.51.100.1 51000 25",
        "lower-case protocol": b"PROXY tcp4 192.0.2.10 198.51.100.1 51000 25",
        "unknown protocol": b"PROXY TCP5 192.0.2.10 198.51.100.1 51000 25",
        "UDP": b"PROXY UDP4 192.0.2.10 198.51.100.1 51000 25",
        "UNKNOWN glued to more": b"PROXY UNKNOWNX",
        "TCP4 alone": b"PROXY TCP4",
        "missing port": b"PROXY TCP4 192.0.2.10 198.51.100.1 51000",
        "extra field": b"PROXY TCP4 192.0.2.10 198.51.100.1 51000 25 x",
        "trailing space": b"PROXY TCP4 192.0.2.10 198.51.100.1 51000 25 ",
        "two spaces": b"PROXY TCP4  192.0.2.10 198.51.100.1 51000 25",
        "two spaces before a port": b"PROXY TCP4 192.0.2.10 198.51.100.1  51000 25",
        "tab": b"PROXY TCP4 192.0.2.10\t198.51.100.1 51000 25",
        "leading space": b" PROXY TCP4 192.0.2.10 198.51.100.1 51000 25",
        "port not a number": b"PROXY TCP4 192.0.2.10 198.51.100.1 x 25",
        "empty port": b"PROXY TCP4 192.0.2.10 198.51.100.1 51000 ",
        "port out of range": b"PROXY TCP4 192.0.2.10 198.51.100.1 65536 25",
        "port of six digits": b"PROXY TCP4 192.0.2.10 198.51.100.1 000025 25",
        "negative port": b"PROXY TCP4 192.0.2.10 198.51.100.1 -1 25",
        "plus sign": b"PROXY TCP4 192.0.2.10 198.51.100.1 +51000 25",
        "underscore in port": b"PROXY TCP4 192.0.2.10 198.51.100.1 51_000 25",
        "non-ASCII digits": "PROXY TCP4 192.0.2.10 198.51.100.1 ١٢ 25".encode(),
        "hex port": b"PROXY TCP4 192.0.2.10 198.51.100.1 0x19 25",
        "not an address": b"PROXY TCP4 mail.example 198.51.100.1 51000 25",
        "octet out of range": b"PROXY TCP4 192.0.2.256 198.51.100.1 51000 25",
        "leading zero octet": b"PROXY TCP4 192.0.2.010 198.51.100.1 51000 25",
        "short IPv4": b"PROXY TCP4 192.0.2 198.51.100.1 51000 25",
        "IPv6 in TCP4": b"PROXY TCP4 2001:db8::10 2001:db8::1 51000 25",
        "IPv4 in TCP6": b"PROXY TCP6 192.0.2.10 198.51.100.1 51000 25",
        "IPv6 zone": b"PROXY TCP6 fe80::1%eth0 2001:db8::1 51000 25",
        "bad IPv6": b"PROXY TCP6 2001:db8:::1 2001:db8::1 51000 25",
        "unchecked by lenient parsers": b"PROXY TCP4 ::1 nonsense 99999 25",
        "not UTF-8": b"PROXY TCP4 192.0.2.\xff 198.51.100.1 51000 25",
        "bare LF inside": b"PROXY TCP4 192.0.2.10 198.51.100.1 51000 25\nx",
        "bare CR at the end": b"PROXY TCP4 192.0.2.10 198.51.100.1 51000 25\r",
        "LF in an UNKNOWN tail": b"PROXY UNKNOWN a\nb",
        "CR after UNKNOWN": b"PROXY UNKNOWN\r",
        "longer than the limit": b"PROXY UNKNOWN " + b"f" * 92,
    }

    def test_malformed(self) -> None:
        for name, line in self.MALFORMED.items():
            with self.assertRaises(MalformedHeader, msg=name):
                parse_v1(line)

    def test_malformed_through_the_reader(self) -> None:
        """The same lines with their CRLF, whole and byte by byte: refused at the latest at the CRLF."""
        for name, line in self.MALFORMED.items():
            if not line:  # CRLF alone is how a v2 signature starts
                continue
            self.assertRaises(MalformedHeader, HeaderReader().feed, line + b"\r\n")
            reader = HeaderReader()
            with self.assertRaises(MalformedHeader, msg=name):
                for byte in line + b"\r\n":
                    reader.feed(bytes([byte]))


class V2Tests(SynchronousTestCase):
    """Version 2: a binary header (spec §2.2), given to parse_v2 whole, TLVs included."""

    def test_tcp4(self) -> None:
        header = v2()
        self.assertEqual(parse_v2(header), ProxyHeader(2, "PROXY", "TCP4", tcp4("192.0.2.10", 51000),
                                                       tcp4("198.51.100.1", 25), header))

    def test_tcp6(self) -> None:
        header = v2(family=0x21, block=ipv6_block("2001:db8:0:0::10", "2001:db8::1", 51000, 25))
        self.assertEqual(parse_v2(header), ProxyHeader(2, "PROXY", "TCP6", tcp6("2001:db8::10", 51000),
                                                       tcp6("2001:db8::1", 25), header))

    def test_ipv4_mapped(self) -> None:
        """::ffff:a.b.c.d is the IPv4 client a.b.c.d; each endpoint is judged on its own."""
        header = parse_v2(v2(family=0x21, block=ipv6_block("::ffff:192.0.2.10", "2001:db8::1", 0, 65535)))
        self.assertEqual((header.family, header.source, header.destination),
                         ("TCP6", tcp4("192.0.2.10", 0), tcp6("2001:db8::1", 65535)))

    def test_unix(self) -> None:
        """Paths end at the first NUL; bytes that are not UTF-8 survive as surrogate escapes."""
        header = v2(family=0x31, block=unix_block(b"/run/client", b"/run/haproxy\0junk"))
        self.assertEqual(parse_v2(header), ProxyHeader(2, "PROXY", "UNIX", Endpoint("UNIX", "/run/client", 0),
                                                       Endpoint("UNIX", "/run/haproxy", 0), header))
        parsed = parse_v2(v2(family=0x31, block=unix_block(b"/run/\xff", b"")))
        self.assertEqual((parsed.source, parsed.destination),
                         (Endpoint("UNIX", "/run/\udcff", 0), Endpoint("UNIX", "", 0)))
        self.assertEqual(parsed.source.host.encode("utf-8", "surrogateescape"), b"/run/\xff")
        full = parse_v2(v2(family=0x31, block=unix_block(b"a" * 108, b"b" * 108)))
        self.assertEqual(full.source, Endpoint("UNIX", "a" * 108, 0))

    def test_local(self) -> None:
        """LOCAL (health checks): family and address block are ignored, whatever they say (spec §2.2)."""
        for family, block in ((0x00, b""), (0x11, None), (0x12, None), (0x21, b""), (0x41, b"\0" * 5),
                              (0xFF, b"")):
            header = v2(command=0x20, family=family, block=block)
            self.assertEqual(parse_v2(header), ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, header), family)

    def test_unspec(self) -> None:
        for body in (b"", b"\0" * 12, b"\x04\x00\x01x"):
            header = v2(family=0x00, block=body)
            self.assertEqual(parse_v2(header), ProxyHeader(2, "PROXY", "UNKNOWN", None, None, header))

    def test_tlvs_are_skipped(self) -> None:
        """TLVs (even ones that do not parse as TLVs) are not read; the raw header keeps them."""
        for tlvs in (b"\x04\x00\x03abc\x05\x00\x02id", b"\x01", b"\xff" * 300):
            header = v2(tlvs=tlvs)
            parsed = parse_v2(header)
            self.assertEqual((parsed.source, parsed.raw), (tcp4("192.0.2.10", 51000), header))
        header = v2(family=0x21, block=ipv6_block("::1", "::2", 1, 2), tlvs=b"\x20\x00\x01\x05")
        self.assertEqual(parse_v2(header).destination, tcp6("::2", 2))

    MALFORMED = {
        "version 1": v2(command=0x11),
        "version 3": v2(command=0x31),
        "version 0": v2(command=0x01),
        "command 2": v2(command=0x22),
        "command 15": v2(command=0x2F),
        "UDP4": v2(family=0x12),
        "UDP6": v2(family=0x22, block=ipv6_block("::1", "::2", 1, 2)),
        "UNIX datagram": v2(family=0x32, block=unix_block(b"/a", b"/b")),
        "unknown family": v2(family=0x41),
        "unknown transport": v2(family=0x13),
        "INET without transport": v2(family=0x10),
        "INET6 without transport": v2(family=0x20, block=ipv6_block("::1", "::2", 1, 2)),
        "UNIX without transport": v2(family=0x30, block=unix_block(b"/a", b"/b")),
        "UNSPEC family with stream": v2(family=0x01, block=b""),
        "TCP4 block short": v2(block=b"\0" * 11),
        "TCP6 block short": v2(family=0x21, block=b"\0" * 35),
        "UNIX block short": v2(family=0x31, block=b"\0" * 215),
        "TCP6 block given a TCP4 length": v2(family=0x21),
        "body shorter than declared": v2(length=13),
        "body longer than declared": v2(length=11),
        "signature wrong": b"\r\n\r\n\x00\r\nQUIX\n" + v2()[12:],
        "signature only": SIGNATURE,
        "no fixed part": SIGNATURE + b"\x21\x11\x00",
        "empty": b"",
    }

    def test_malformed(self) -> None:
        for name, header in self.MALFORMED.items():
            with self.assertRaises(MalformedHeader, msg=name):
                parse_v2(header)

    def test_malformed_through_the_reader(self) -> None:
        """Every malformed header that is a whole header by its declared length is refused by the reader too."""
        for name, header in self.MALFORMED.items():
            if len(header) < 16 or len(header) != 16 + struct.unpack("!H", header[14:16])[0]:
                continue
            self.assertRaises(MalformedHeader, HeaderReader().feed, header)


class ReaderTests(SynchronousTestCase):
    """HeaderReader: framing, limits, and refusal as soon as the bytes cannot start a header."""

    def test_whole_and_rest(self) -> None:
        reader = HeaderReader()
        line = b"PROXY TCP4 192.0.2.10 198.51.100.1 51000 25"
        self.assertEqual(reader.feed(line + b"\r\nEHLO x\r\n"), (parse_v1(line), b"EHLO x\r\n"))
        self.assertEqual(reader.feed(v2() + v2()), (parse_v2(v2()), v2()))
        self.assertIsNone(reader.feed(b""))

    def test_one_byte_at_a_time(self) -> None:
        for header in (b"PROXY TCP6 2001:db8::10 2001:db8::1 51000 25\r\n", b"PROXY UNKNOWN \xff\r\n",
                       v2(tlvs=b"\x04\x00\x01x"), v2(command=0x20, family=0x12), v2(family=0x00)):
            reader = HeaderReader()
            for i in range(len(header) - 1):
                self.assertIsNone(reader.feed(header[i:i + 1]), (header, i))
            found = reader.feed(header[-1:] + b"rest")
            assert found is not None
            self.assertEqual(found[1], b"rest")

    def test_longest_v1(self) -> None:
        line = b"PROXY UNKNOWN " + b"f" * 91
        self.assertEqual(HeaderReader().feed(line + b"\r\n"), (parse_v1(line), b""))
        reader = HeaderReader()
        self.assertIsNone(reader.feed(line + b"\r"))
        self.assertRaises(MalformedHeader, HeaderReader().feed, line + b"ff")
        self.assertRaises(MalformedHeader, HeaderReader().feed, b"PROXY UNKNOWN " + b"f" * 93)

    def test_v2_size_limit(self) -> None:
        """The declared length is checked on the 16th byte, against the reader's limit."""
        self.assertRaises(MalformedHeader, HeaderReader().feed, v2(length=MAX_V2_LENGTH + 1)[:16])
        self.assertIsNone(HeaderReader().feed(v2(length=MAX_V2_LENGTH)[:16]))
        tlvs = b"\x04" + struct.pack("!H", MAX_V2_LENGTH - 15) + b"\0" * (MAX_V2_LENGTH - 15)
        self.assertIsNotNone(HeaderReader().feed(v2(tlvs=tlvs)))
        self.assertRaises(MalformedHeader, HeaderReader(max_v2_length=12).feed, v2(tlvs=b"\x04\x00\x00"))
        self.assertIsNotNone(HeaderReader(max_v2_length=12).feed(v2()))
        self.assertRaises(MalformedHeader, HeaderReader(max_v2_length=0).feed, v2()[:16])
        self.assertIsNotNone(HeaderReader(max_v2_length=0).feed(v2(command=0x20, family=0x00, block=b"")))

    EARLY = {
        "SMTP": b"E",
        "SMTP with a P": b"PROXX",
        "v2 signature": b"\r\n\r\n\x01",
        "v1 after a v2 start": b"\r\nP",
        "v2 version": SIGNATURE + b"\x11",
        "v2 command": SIGNATURE + b"\x23",
        "v2 datagram": SIGNATURE + b"\x21\x12",
        "v2 unknown family": SIGNATURE + b"\x21\x41",
        "v2 length short of the addresses": SIGNATURE + b"\x21\x21\x00\x0c",
        "v1 protocol": b"PROXY TCP5",
        "v1 UNKNOWN glued": b"PROXY UNKNOWNS",
        "v1 two spaces": b"PROXY TCP4  ",
        "v1 space before protocol": b"PROXY  ",
        "v1 hostname": b"PROXY TCP4 m",
        "v1 sign": b"PROXY TCP4 192.0.2.10 198.51.100.1 -",
        "v1 too many fields": b"PROXY TCP4 192.0.2.10 198.51.100.1 1 2 ",
        "v1 bare LF": b"PROXY TCP4 192.0.2.10\n",
        "v1 bare CR": b"PROXY UNKNOWN\rx",
        "v1 complete but bad before its CR": b"PROXY TCP4 192.0.2.10 198.51.100.1 1\r",
    }

    def test_refused_as_soon_as_possible(self) -> None:
        """Each of these is refused on its last byte, and not before (fed one byte at a time)."""
        for name, data in self.EARLY.items():
            reader = HeaderReader()
            for i in range(len(data) - 1):
                self.assertIsNone(reader.feed(data[i:i + 1]), (name, i))
            with self.assertRaises(MalformedHeader, msg=name):
                reader.feed(data[-1:])

    def test_local_waits_whatever_its_family(self) -> None:
        """A LOCAL header's family byte is ignored, so no family makes the reader give up early."""
        for family in (0x00, 0x12, 0x41, 0xFF):
            self.assertIsNone(HeaderReader().feed(SIGNATURE + bytes([0x20, family]) + b"\x00\x01"))

    def test_messages_say_why(self) -> None:
        cases = {SIGNATURE + b"\x11": "version 1", v2(family=0x12): "datagram",
                 v2(length=0xFFFF)[:16]: "declares 65535 bytes", b"PROXY TCP4 a b 1 2\r\n": "TCP4 address",
                 b"EHLO": "not a PROXY header"}
        for data, text in cases.items():
            with self.assertRaises(MalformedHeader) as caught:
                HeaderReader().feed(data)
            self.assertIn(text, str(caught.exception))


def _spelled_ipv6(draw: Any, ip: ipaddress.IPv6Address) -> str:
    """Any of the valid text forms of ``ip``: compressed, exploded, upper case."""
    text = draw(st.sampled_from([ip.compressed, ip.exploded]))
    return text.upper() if draw(st.booleans()) else text


def _expected_tcp(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> Endpoint:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return Endpoint("TCP4", str(ip.ipv4_mapped), port)
        return Endpoint("TCP6", ip.compressed, port)
    return Endpoint("TCP4", str(ip), port)


@st.composite
def valid_headers(draw: Any) -> tuple[bytes, ProxyHeader]:
    """A valid header of any kind, built from the spec, with the ProxyHeader it must give."""
    kind = draw(st.sampled_from(["v1-tcp4", "v1-tcp6", "v1-unknown", "v2-tcp4", "v2-tcp6", "v2-unix", "v2-unspec",
                                 "v2-local"]))
    ports = draw(st.tuples(st.integers(0, 65535), st.integers(0, 65535)))
    tlvs = draw(st.binary(max_size=40))
    if kind == "v1-unknown":
        tail = draw(st.none() | st.binary(max_size=MAX_V1_LENGTH - 16).map(
            lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
        line = b"PROXY UNKNOWN" + (b"" if tail is None else b" " + tail)
        return line + b"\r\n", ProxyHeader(1, "PROXY", "UNKNOWN", None, None, line)
    if kind in ("v1-tcp4", "v1-tcp6"):
        version = 4 if kind == "v1-tcp4" else 6
        ips = draw(st.tuples(st.ip_addresses(v=version), st.ip_addresses(v=version)))
        texts = [str(ip) if version == 4 else _spelled_ipv6(draw, ip) for ip in ips]
        line = f"PROXY TCP{version} {texts[0]} {texts[1]} {ports[0]} {ports[1]}".encode()
        return line + b"\r\n", ProxyHeader(1, "PROXY", f"TCP{version}", _expected_tcp(ips[0], ports[0]),
                                           _expected_tcp(ips[1], ports[1]), line)
    if kind in ("v2-tcp4", "v2-tcp6"):
        version = 4 if kind == "v2-tcp4" else 6
        ips = draw(st.tuples(st.ip_addresses(v=version), st.ip_addresses(v=version)))
        header = v2(family=0x11 if version == 4 else 0x21,
                    block=ips[0].packed + ips[1].packed + struct.pack("!HH", *ports), tlvs=tlvs)
        return header, ProxyHeader(2, "PROXY", f"TCP{version}", _expected_tcp(ips[0], ports[0]),
                                   _expected_tcp(ips[1], ports[1]), header)
    if kind == "v2-unix":
        paths = draw(st.tuples(*[st.binary(max_size=108).map(lambda b: b.replace(b"\0", b""))] * 2))
        header = v2(family=0x31, block=unix_block(*paths), tlvs=tlvs)
        source, destination = (Endpoint("UNIX", p.decode("utf-8", "surrogateescape"), 0) for p in paths)
        return header, ProxyHeader(2, "PROXY", "UNIX", source, destination, header)
    if kind == "v2-unspec":
        header = v2(family=0x00, block=b"", tlvs=tlvs)
        return header, ProxyHeader(2, "PROXY", "UNKNOWN", None, None, header)
    header = v2(command=0x20, family=draw(st.integers(0, 255)), block=b"", tlvs=tlvs)
    return header, ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, header)


class AnySplitTests(SynchronousTestCase):
    @settings(max_examples=500, deadline=None)
    @given(valid_headers(), st.binary(max_size=30), st.lists(st.integers(0, 400), max_size=10))
    def test_any_split_gives_the_header_and_the_rest(self, case: tuple[bytes, ProxyHeader], rest: bytes,
                                                      cuts: list[int]) -> None:
        """Fed in pieces cut anywhere, the reader gives the expected header and exactly the bytes after it."""
        data, expected = case
        stream = data + rest
        reader = HeaderReader()
        points = sorted({min(c, len(stream)) for c in cuts} | {len(stream)})
        start, found = 0, None
        for point in points:
            found = reader.feed(stream[start:point])
            if found is not None:
                found = (found[0], found[1] + stream[point:])
                break
            self.assertLess(point, len(data))
            start = point
        self.assertEqual(found, (expected, rest))
        if expected.version == 1:
            self.assertEqual(parse_v1(data[:-2]), expected)
        else:
            self.assertEqual(parse_v2(data), expected)
