"""A handler that delivers into a Maildir, but only for the recipients this server knows (docs/tutorial.md)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from esmtpkit import Address, SMTPReply
from esmtpkit.handlers import Maildir


class Handler(Maildir):
    """Deliver to the Maildir at ``path``; refuse recipients not in ``recipients`` and not at ``domain``.

    Addresses are compared without regard to case. ``<postmaster>`` is always accepted (RFC 5321 §4.5.1).
    """

    def __init__(self, path: str = "Maildir", recipients: str | Iterable[str] = "postmaster@example.com",
                 domain: str = "") -> None:
        super().__init__(path)
        if isinstance(recipients, str):  # from --handler-option: "a@example.com b@example.com"
            recipients = recipients.replace(",", " ").split()
        self.recipients = {address.lower() for address in recipients}
        self.domain = domain.lower()

    def known(self, recipient: Address) -> bool:
        """Whether mail for ``recipient`` is delivered here."""
        if recipient.lower() in self.recipients:
            return True
        if self.domain and recipient.domain.lower() == self.domain:
            return True
        return not recipient.domain and recipient.local_part.lower() == "postmaster"

    def rcpt(self, recipient: Address, params: Mapping[str, Any]) -> Any:
        """Refuse an unknown recipient with 550 5.1.1 (RFC 3463: bad destination mailbox address)."""
        if not self.known(recipient):
            raise SMTPReply(550, f"<{recipient}>: no such user here", enhanced="5.1.1")
        return super().rcpt(recipient, params)
