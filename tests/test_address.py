"""Tests for `esmtpkit.core.address`: RFC 5321 §4.1.2 paths into `Address` values."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core.address import Address, AddressError, parse_path, quote_local_part
from esmtpkit.core.escape import UNSAFE

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None)

_ATOM = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~",
                min_size=1, max_size=10)
_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
#: Characters no path may hold, quoted or not: C0, DEL, C1, U+2028/U+2029, bidirectional formatting characters.
_UNSAFE = ("\x00\x01\t\x0b\x0c\x1b\x1c\x1d\x1e\x7f\x80\x85\x9b\x9f"
           "\u061c\u200e\u200f\u2028\u2029\u202a\u202e\u2066\u2069")


class ParsePathTests(SynchronousTestCase):
    """Valid paths and their parts."""

    def test_plain(self) -> None:
        address = parse_path("<user@example.org>")
        self.assertEqual(address, "user@example.org")
        self.assertIsInstance(address, str)
        self.assertEqual((address.local_part, address.domain, address.source_route), ("user", "example.org", ()))
        self.assertFalse(address.is_null)
        self.assertFalse(address.utf8)

    def test_bracketed_and_repr(self) -> None:
        address = parse_path("<user@example.org>")
        self.assertEqual(address.bracketed(), "<user@example.org>")
        self.assertEqual(repr(address), "Address('user@example.org')")

    def test_null_path(self) -> None:
        """``<>`` is the null reverse-path (RFC 5321 §4.5.5), legal only where allowed."""
        address = parse_path("<>", allow_null=True)
        self.assertEqual(address, "")
        self.assertTrue(address.is_null)
        self.assertEqual(address.bracketed(), "<>")
        self.assertRaises(AddressError, parse_path, "<>")

    def test_source_route_tolerated(self) -> None:
        """RFC 5321 §4.1.2 / Appendix C: the route is accepted and kept, and the mailbox is what counts."""
        address = parse_path("<@a.example,@b.example:user@d.example>")
        self.assertEqual(address, "user@d.example")
        self.assertEqual(address.source_route, ("a.example", "b.example"))
        self.assertEqual(parse_path("<@a.example:u@d>").source_route, ("a.example",))

    def test_bad_source_route(self) -> None:
        for path in ("<@a.example>", "<@a.example,b.example:u@d>", "<@-a:u@d>", "<@:u@d>"):
            self.assertRaises(AddressError, parse_path, path)

    def test_quoted_local_part(self) -> None:
        address = parse_path('<"john smith"@example.org>')
        self.assertEqual(address, '"john smith"@example.org')
        self.assertEqual(address.local_part, '"john smith"')
        self.assertEqual(parse_path('<"a@b"@c.example>').domain, "c.example")
        self.assertEqual(parse_path(r'<"a\"b"@c.example>').local_part, r'"a\"b"')

    def test_bad_quoted_local_part(self) -> None:
        for path in ('<"abc@d>', '<"a"b@d>', '<"a\x01"@d>'):
            self.assertRaises(AddressError, parse_path, path)

    def test_address_literals(self) -> None:
        """RFC 5321 §4.1.3: IPv4, IPv6 and general address literals."""
        self.assertEqual(parse_path("<u@[192.0.2.1]>").domain, "[192.0.2.1]")
        self.assertEqual(parse_path("<u@[IPv6:2001:db8::1]>").domain, "[IPv6:2001:db8::1]")
        self.assertEqual(parse_path("<u@[x-tag:anything]>").domain, "[x-tag:anything]")
        for path in ("<u@[300.1.1.1]>", "<u@[IPv6:zz::1]>", "<u@[192.0.2.1>", "<u@[]>"):
            self.assertRaises(AddressError, parse_path, path)

    def test_postmaster_without_domain(self) -> None:
        """RFC 5321 §4.1.1.3: ``RCPT TO:<Postmaster>`` must be accepted, in any case."""
        for path in ("<Postmaster>", "<postmaster>", "<POSTMASTER>"):
            address = parse_path(path, allow_postmaster=True)
            self.assertEqual(address, path[1:-1])
            self.assertEqual((address.local_part, address.domain), (path[1:-1], ""))
        self.assertRaises(AddressError, parse_path, "<Postmaster>")

    def test_without_brackets(self) -> None:
        self.assertEqual(parse_path("user@example.org"), "user@example.org")

    def test_syntax_errors(self) -> None:
        for path in ("<user@example.org", "<user>", "<@>", "<user@>", "<@example.org>", "<a..b@c>", "<.a@c>",
                     "<a.@c>", "<a b@c>", "<a@-c>", "<a@c->", "<a@c..d>", "<a@c_d>", "<a@b@c>", "<a@ c>"):
            self.assertRaises(AddressError, parse_path, path)

    def test_lengths(self) -> None:
        """RFC 5321 §4.5.3.1: 64 octets of local part, 255 of domain, 256 of path."""
        self.assertEqual(parse_path(f"<{'a' * 64}@b>").local_part, "a" * 64)
        self.assertRaises(AddressError, parse_path, f"<{'a' * 65}@b>")
        self.assertRaises(AddressError, parse_path, f"<a@{'b' * 64}.c>")
        domain = ".".join(["b" * 63] * 3 + ["b" * 62])
        self.assertEqual(parse_path(f"<a@{domain}>").domain, domain)  # 256 octets of path
        self.assertRaises(AddressError, parse_path, f"<aa@{domain}>")

    def test_utf8(self) -> None:
        """RFC 6531 mailboxes only when SMTPUTF8 was asked for."""
        self.assertRaisesRegex(AddressError, "SMTPUTF8", parse_path, "<j\u00f6rg@example.org>")
        address = parse_path("<j\u00f6rg@b\u00fccher.example>", utf8=True)
        self.assertEqual(address, "j\u00f6rg@b\u00fccher.example")
        self.assertTrue(address.utf8)
        self.assertFalse(parse_path("<a@b>", utf8=True).utf8)

    def test_address_from_text(self) -> None:
        address = Address("a@b.c")
        self.assertEqual((address.local_part, address.domain), ("a", "b.c"))

    @SETTINGS
    @given(local=st.lists(_ATOM, min_size=1, max_size=3), labels=st.lists(_LABEL, min_size=1, max_size=4))
    def test_dot_atoms_round_trip(self, local: list[str], labels: list[str]) -> None:
        """Any dot-atom local part at any domain parses back to itself."""
        mailbox = ".".join(local) + "@" + ".".join(labels)
        if len(".".join(local)) > 64:
            return
        address = parse_path(f"<{mailbox}>")
        self.assertEqual(address, mailbox)
        self.assertEqual(address.bracketed(), f"<{mailbox}>")

    @SETTINGS
    @given(st.text(max_size=40))
    def test_never_crashes(self, path: str) -> None:
        """Any text either parses or raises AddressError (never another exception)."""
        for options in ({}, {"allow_null": True, "allow_postmaster": True, "utf8": True}):
            try:
                parse_path(path, **options)  # type: ignore[arg-type]
            except AddressError:
                pass


class ControlCharacterTests(SynchronousTestCase):
    """No address holds a character that could act on a log reader or a header field (RFC 5321 §4.1.2)."""

    def test_refused_everywhere_in_the_path(self) -> None:
        """In a dot-string, a quoted string, the domain or a source route, with or without SMTPUTF8."""
        for char in _UNSAFE:
            for path in (f"<x{char}y@example.com>", f'<"x{char}y"@example.com>', f"<xy@exa{char}mple.com>",
                         f"<@relay{char}.example:xy@example.com>", f"<x@[IPv6:{char}::1]>"):
                for utf8 in (False, True):
                    with self.assertRaises(AddressError, msg=repr(path)) as caught:
                        parse_path(path, utf8=utf8)
                    self.assertEqual(str(caught.exception), f"character U+{ord(char):04X} not allowed in an address")

    def test_the_message_never_echoes_the_character(self) -> None:
        """The refusal names the code point, so the 501 reply and its log line stay clean."""
        with self.assertRaises(AddressError) as caught:
            parse_path("<x\x1b[2J@example.com>")
        self.assertIsNone(UNSAFE.search(str(caught.exception)))

    def test_other_unicode_is_still_accepted(self) -> None:
        """Letters, marks and the zero-width joiners some scripts need stay legal in RFC 6531 mailboxes."""
        for mailbox in ("j\u00f6rg@b\u00fccher.example", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645@example.ir",
                        "\u0939\u093f\u0902\u0926\u0940@example.in", '"j\u00f6 rg"@example.org',
                        "emoji\U0001f469\u200d\U0001f4bb@example.org"):
            self.assertEqual(parse_path(f"<{mailbox}>", utf8=True), mailbox)

    @SETTINGS
    @given(st.text(max_size=20), st.sampled_from(_UNSAFE), st.text(max_size=20))
    def test_never_parses(self, before: str, char: str, after: str) -> None:
        """Whatever surrounds one such character, the path is refused."""
        for options in ({}, {"allow_null": True, "allow_postmaster": True, "utf8": True}):
            self.assertRaises(AddressError, parse_path, f"<{before}{char}{after}>", **options)  # type: ignore[arg-type]


class CanonicalTests(SynchronousTestCase):
    """The least-quoted form of a mailbox (RFC 5321 §4.1.2: all quoted forms are equivalent)."""

    def test_quote_local_part(self) -> None:
        self.assertEqual(quote_local_part("alice.b"), "alice.b")
        self.assertEqual(quote_local_part("j\u00f6rg"), "j\u00f6rg")
        self.assertEqual(quote_local_part("john smith"), '"john smith"')
        self.assertEqual(quote_local_part('a"b\\c'), '"a\\"b\\\\c"')
        self.assertEqual(quote_local_part("a..b"), '"a..b"')
        self.assertEqual(quote_local_part(""), '""')

    def test_canonical(self) -> None:
        cases = {
            "<alice@example.org>": "alice@example.org",
            '<"alice"@example.org>': "alice@example.org",
            '<"a\\ b"@example.org>': '"a b"@example.org',
            '<"a\\"b"@example.org>': '"a\\"b"@example.org',
            '<"a\\\\b"@example.org>': '"a\\\\b"@example.org',
            '<"x; Tue, 1 Jan 2030 00:00:00 +0000 (authenticated as root)"@evil.test>':
                '"x; Tue, 1 Jan 2030 00:00:00 +0000 (authenticated as root)"@evil.test',
            '<"a@b"@example.org>': '"a@b"@example.org',
            "<>": "",
            "<Postmaster>": "Postmaster",
        }
        for path, canonical in cases.items():
            address = parse_path(path, allow_null=True, allow_postmaster=True)
            self.assertEqual(address.canonical(), canonical, path)
            if address:
                self.assertEqual(parse_path(f"<{canonical}>", allow_postmaster=True).canonical(), canonical)

    def test_address_from_text(self) -> None:
        """An Address made from text by a handler gets quoted where its local part needs it."""
        self.assertEqual(Address("john smith@example.org").canonical(), '"john smith"@example.org')
