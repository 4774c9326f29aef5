"""Who really sent a message: SPF, DKIM, DMARC and ARC verdicts, the ``Authentication-Results:`` field, and DKIM
signing and ARC sealing on the way out.

The checks are the well-kept libraries' (pyspf, dkimpy, dmarc with publicsuffix2's list, authres); every DNS
query goes through twisted.names (`esmtpkit.mailauth.lookups`), so the reactor never waits on DNS. The checks
sit in front of any handler through `esmtpkit.handlers.mailauth`; the Queue and the Relay sign with
`esmtpkit.mailauth.signing`. docs/mail-authentication.md tells the whole story.
"""

from esmtpkit.mailauth.checks import MailAuth
from esmtpkit.mailauth.verdicts import ArcVerdict, AuthVerdicts, DkimVerdict, DmarcVerdict, SpfVerdict

__all__ = ["MailAuth", "AuthVerdicts", "SpfVerdict", "DkimVerdict", "DmarcVerdict", "ArcVerdict"]
