"""Registers ``twistd esmtpkit``; the options and the service live in esmtpkit.cli.tap (imported lazily)."""

from twisted.application.service import ServiceMaker

esmtpkit = ServiceMaker(
    "esmtpkit",
    "esmtpkit.cli.tap",
    "An ESMTP server whose every verb is decided by a handler (default: Maildir delivery).",
    "esmtpkit",
)
