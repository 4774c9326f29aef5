"""LIMITS (RFC 9422): the EHLO keyword that tells the client the limits this server applies in a session.

Pure core. The limits come from the server's Policy, which the protocol already enforces: ``RCPTMAX`` is
``max_recipients`` (one RCPT beyond gets 452 4.5.3, RFC 9422 §4.2 and RFC 5321 §4.5.3.1.10) and ``MAILMAX`` is
``max_transactions`` (a MAIL beyond gets 421 4.7.0 and the connection closes, RFC 9422 §4.1). Each is shown only
when the policy sets it (0 means no limit), and the keyword only when one is set. LIMITS adds no parameters.
"""

from __future__ import annotations

from typing import Any

from esmtpkit.core.extension import Extension
from esmtpkit.core.session import Session

__all__ = ["Limits"]


def _limits(settings: Any) -> list[str]:
    """The ``NAME=value`` pairs the policy ``settings`` sets (none for a limit of 0, which means no limit)."""
    pairs = []
    for name, attribute in (("RCPTMAX", "max_recipients"), ("MAILMAX", "max_transactions")):
        value = getattr(settings, attribute, 0) or 0
        if value > 0:
            pairs.append(f"{name}={value}")
    return pairs


class Limits(Extension):
    """LIMITS (RFC 9422 §3): ``LIMITS RCPTMAX=<max_recipients> MAILMAX=<max_transactions>``, from the policy."""

    name = keyword = "LIMITS"
    rfc = "RFC 9422"

    def ehlo_params(self, session: Session, settings: Any) -> str:
        return " ".join(_limits(settings))

    def offered(self, session: Session, settings: Any) -> bool:
        """Only with at least one limit to announce (RFC 9422 §3 gives the keyword one or more limits)."""
        return bool(_limits(settings))
