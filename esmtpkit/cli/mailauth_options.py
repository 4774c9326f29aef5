"""The mail-authentication options of ``twistd esmtpkit``: which checks run in front of the handler (``--verify``),
what they may refuse, which DNS servers they ask, and the keys the Queue and Relay handlers sign with.

`MailAuthOptions` is mixed into `esmtpkit.cli.tap.Options` (usage.Options gathers options from every base class);
`build_mail_auth` turns the options into a `MailAuth` for `Policy.fronts`.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable

from twisted.python import usage

from esmtpkit.mailauth.checks import CHECKS
from esmtpkit.mailauth.lookups import parse_servers
from esmtpkit.mailauth.signing import parse_headers, parse_keys, parse_sign_from

__all__ = ["MailAuthOptions", "build_mail_auth", "check_mail_auth", "SIGNING_KWARGS"]

#: The handler keywords the signing options fill in, for handlers that send mail on (Queue, Relay).
SIGNING_KWARGS = ("dkim_sign", "dkim_headers", "dkim_sign_from", "arc_seal", "authserv_id")


def finite_seconds(option: str) -> Callable[[str], float]:
    """The parser of ``--OPTION SECONDS``, a finite number above 0, with a usage error of its own (not twistd's
    "Parameter type enforcement failed" prefix)."""
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise usage.UsageError(f"--{option} takes seconds, not {value!r}") from None
        if not 0 < number < float("inf"):
            raise usage.UsageError(f"--{option} takes a finite number of seconds above 0, not {value!r}")
        return number

    return parse


class MailAuthOptions(usage.Options):
    """Options for the SPF, DKIM, DMARC and ARC checks and for DKIM signing."""

    optFlags = [
        ["spf-reject", None, "With --verify spf: refuse MAIL FROM when SPF says fail (550 5.7.23), and defer it "
         "when SPF could not be checked (451 4.7.24)."],
        ["dmarc-reject", None, "With --verify dmarc: refuse a message that fails DMARC when its author domain "
         "publishes p=reject (550 5.7.26; 451 4.7.26 when a temporary DNS error may explain the failure)."],
    ]
    optParameters = [
        ["authserv-id", None, None, "The name this server gives in Authentication-Results fields (default: "
         "--hostname, or this host's FQDN)."],
        ["dns-timeout", None, 4.0, "Seconds a DNS query of the checks may take before it is a temperror.",
         finite_seconds("dns-timeout")],
        ["dkim-headers", None, None, "With --dkim-sign: the header fields to sign, as NAME:NAME:... (From always; "
         "default: From, Reply-To, Subject, Date, To, Cc, Message-ID and the other fields RFC 6376 recommends)."],
        ["dkim-sign-from", None, None, "With --dkim-sign: NETWORKS, comma-separated IPs and CIDRs of the clients "
         "whose mail is signed without authenticating (authenticated sessions always are); none: authenticated "
         "sessions only (default: 127.0.0.0/8,::1)."],
        ["arc-seal", None, None, "DOMAIN:SELECTOR:KEYFILE: Queue and Relay handlers seal the messages they "
         "forward (those checked here) with an ARC set (RFC 8617). Needs --verify arc."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["verify"] = []
        self["dns-servers"] = []
        self["dkim-sign"] = []

    def opt_verify(self, checks: str) -> None:
        """Mail-authentication checks to run in front of the handler, comma-separated: spf, dkim, dmarc, arc, or
        all (repeatable). Each message gets an Authentication-Results field."""
        names = [n.strip().lower() for n in checks.split(",") if n.strip()]
        if not names:
            raise usage.UsageError("--verify takes spf, dkim, dmarc, arc or all")
        for name in names:
            if name == "all":
                self["verify"].extend(CHECKS)
            elif name in CHECKS:
                self["verify"].append(name)
            else:
                raise usage.UsageError(f"--verify: unknown check {name!r} (known: {', '.join(CHECKS)}, all)")

    def opt_dns_server(self, server: str) -> None:
        """A name server for the checks, by its IP address: IP, IP:PORT or [IPv6]:PORT (repeatable; default:
        /etc/resolv.conf's)."""
        try:
            host, port = parse_servers(server)
            ipaddress.ip_address(host)  # twisted.names sends to addresses only: a name would fail every query
        except ValueError as e:
            raise usage.UsageError(f"--dns-server: {e}") from None
        self["dns-servers"].append((host, port))

    def opt_dkim_sign(self, entry: str) -> None:
        """DOMAIN:SELECTOR:KEYFILE: Queue and Relay handlers DKIM-sign mail from DOMAIN (and its subdomains) with
        this PEM private key (repeatable, one per domain)."""
        try:
            parse_keys(entry)
        except ValueError as e:
            raise usage.UsageError(f"--dkim-sign: {e}") from None
        self["dkim-sign"].append(entry)


def check_mail_auth(options: usage.Options) -> None:
    """The combinations that cannot work, as one line each; and the keys checked once more as a whole."""
    checks = set(options["verify"])
    if options["spf-reject"] and not ({"spf", "dmarc"} & checks):
        raise usage.UsageError("--spf-reject needs --verify spf")
    if options["dmarc-reject"] and "dmarc" not in checks:
        raise usage.UsageError("--dmarc-reject needs --verify dmarc")
    if options["arc-seal"]:
        if "arc" not in checks:
            raise usage.UsageError("--arc-seal needs --verify arc (a seal carries this server's ARC verdict)")
        try:
            parse_keys(options["arc-seal"])
        except ValueError as e:
            raise usage.UsageError(f"--arc-seal: {e}") from None
    if options["dkim-headers"] is not None:
        if not options["dkim-sign"]:
            raise usage.UsageError("--dkim-headers needs --dkim-sign")
        try:
            parse_headers(options["dkim-headers"])
        except ValueError as e:
            raise usage.UsageError(f"--dkim-headers: {e}") from None
    if options["dkim-sign-from"] is not None:
        if not options["dkim-sign"]:
            raise usage.UsageError("--dkim-sign-from needs --dkim-sign")
        try:
            parse_sign_from(options["dkim-sign-from"])
        except ValueError as e:
            raise usage.UsageError(f"--dkim-sign-from: {e}") from None
    if options["dkim-sign"]:
        try:
            parse_keys(options["dkim-sign"])
        except ValueError as e:
            raise usage.UsageError(f"--dkim-sign: {e}") from None
    given = options["authserv-id"]
    if given and (not given.isprintable() or any(c in given for c in ' \t;()"\\')):
        raise usage.UsageError(f"--authserv-id takes one name, without spaces or ;()\"\\, not {given!r}")
    if (options["dns-servers"] or options["authserv-id"]) and not checks and not options["arc-seal"]:
        raise usage.UsageError("--dns-server and --authserv-id are for --verify")


def authserv_id(options: usage.Options) -> str | None:
    """The authserv-id: --authserv-id, else --hostname (None: MailAuth's own default, the FQDN)."""
    return options["authserv-id"] or options["hostname"] or None


def signing_kwargs(options: usage.Options) -> dict[str, Any]:
    """The handler keywords for the signing options that were given."""
    kwargs: dict[str, Any] = {}
    if options["dkim-sign"]:
        kwargs["dkim_sign"] = ",".join(options["dkim-sign"])
        if options["dkim-headers"]:
            kwargs["dkim_headers"] = options["dkim-headers"]
        if options["dkim-sign-from"] is not None:
            kwargs["dkim_sign_from"] = options["dkim-sign-from"]
    if options["arc-seal"]:
        kwargs["arc_seal"] = options["arc-seal"]
        kwargs["authserv_id"] = authserv_id(options) or _fqdn()
    return kwargs


def _fqdn() -> str:
    import socket

    return socket.getfqdn()


def build_mail_auth(options: usage.Options, monitor: Any = None, reactor: Any = None) -> Any:
    """The `MailAuth` the options ask for, or None without ``--verify``."""
    checks = set(options["verify"])
    if not checks:
        return None
    from esmtpkit.mailauth.checks import MailAuth

    total = options["dns-timeout"]
    return MailAuth(reactor, spf="spf" in checks, dkim="dkim" in checks, dmarc="dmarc" in checks,
                    arc="arc" in checks, authserv_id=authserv_id(options),
                    dns_servers=options["dns-servers"] or None, timeout=(total / 4, total * 3 / 4),
                    spf_reject=bool(options["spf-reject"]), dmarc_reject=bool(options["dmarc-reject"]),
                    monitor=monitor)
