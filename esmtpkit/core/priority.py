"""MT-PRIORITY (RFC 6710): the priority of a message in transfer, -9 (lowest) to 9 (highest), 0 by default.

Pure core. EHLO offers ``MT-PRIORITY`` with the server's priority assignment policy when it has one (RFC 6710
§3: "MIXER", "STANAG4406", "NSEP"...); MAIL takes ``MT-PRIORITY=<-9..9>`` and handlers find the priority this
server grants, an int, in ``mail_params["MT-PRIORITY"]``.

Who may raise a priority (RFC 6710 §5: a server need not honour a priority from a client it does not trust, and
may lower it): here a client keeps a priority above 0 only when it authenticated (AUTH) or is on the policy's
trusted networks; anyone else gets 0 in its place. Lowering is never refused, so priorities of 0 and below are
kept from every client. ``trust_all=True`` keeps every client's priority (a server behind a submission server that
already checked). The queue and the Relay pass the granted priority on to a next hop that offers MT-PRIORITY; the
queue's spool and in-memory stores also hand out due messages higher priority first (the spool among the
``active_limit`` earliest due that a scan holds; the RabbitMQ store ignores it).
"""

from __future__ import annotations

import re
from typing import Any, Final

from esmtpkit.core.extension import Extension, ParamContext, param_error
from esmtpkit.core.session import Session

__all__ = ["MtPriority", "parse_priority", "PRIORITY_ALLOWANCE", "PROFILES"]

#: The priority assignment policies RFC 6710 registers (others may be named too).
PROFILES: Final = ("MIXER", "STANAG4406", "NSEP")
#: The octets the parameter adds to a MAIL line: " MT-PRIORITY=-9".
PRIORITY_ALLOWANCE: Final = len(" MT-PRIORITY=-9")

_VALUE: Final = re.compile(r"[+-]?[0-9]\Z")
_PROFILE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")


def parse_priority(value: str | None) -> int:
    """``MT-PRIORITY=<priority-value>`` (RFC 6710 §3): one digit with an optional sign, -9 to 9; else 501 5.5.4."""
    if value is None or _VALUE.match(value) is None:
        raise param_error("MT-PRIORITY takes a priority from -9 to 9")
    return int(value)


class MtPriority(Extension):
    """MT-PRIORITY (RFC 6710 §3): EHLO ``MT-PRIORITY [policy]``; MAIL ``MT-PRIORITY=`` as an int, priorities
    above 0 kept only from authenticated or trusted clients unless ``trust_all`` (RFC 6710 §5)."""

    name = keyword = "MT-PRIORITY"
    rfc = "RFC 6710"
    mail_line_allowance = PRIORITY_ALLOWANCE

    def __init__(self, profile: str | None = None, trust_all: bool = False) -> None:
        if profile is not None and _PROFILE.match(profile) is None:
            raise ValueError(f"bad MT-PRIORITY policy name {profile!r}")
        self.profile = profile.upper() if profile is not None else None
        self.trust_all = trust_all
        self.mail_params = {"MT-PRIORITY": self._parse}

    def _parse(self, value: str | None, context: ParamContext) -> int:
        priority = parse_priority(value)
        if priority > 0 and not self.may_raise(context.session):
            return 0
        return priority

    def may_raise(self, session: Session) -> bool:
        """Whether this client's priorities above 0 are kept: authenticated, trusted, or ``trust_all``."""
        return self.trust_all or session.authenticated is not None or session.trusted

    def ehlo_params(self, session: Session, settings: Any) -> str:
        return self.profile or ""
