"""REQUIRETLS (RFC 8689): the sender asks that the message travel over TLS only, on every hop.

Pure core. The keyword is offered only inside TLS (RFC 8689 §2: never on a cleartext session), so the MAIL
parameter ``REQUIRETLS`` (no value) is accepted only there; elsewhere it is an unknown parameter (555 5.5.4).
Handlers find ``mail_params["REQUIRETLS"] is True``: the message is tagged as RFC 8689 §4.1 asks.

What the rest of the path owes such a message (RFC 8689 §4.2, §5): relay it only to next hops that offer
REQUIRETLS, over TLS with a verified certificate, else return it with 5.7.30 ("REQUIRETLS support required"). The
queue and the Relay do: the client sends such a message only over TLS whose certificate verifies
(`esmtpkit.client.options.ClientOptions.for_requiretls`) to a hop offering REQUIRETLS, tries the next MX when a
hop cannot take it, and fails it 550 5.7.30 when none is left; the queue's notices about it are REQUIRETLS too.
They have no MTA-STS or DANE: the certificate is checked by its chain and the host's name. The ``TLS-Required: No``
header field (RFC 8689 §3) asks the opposite, relaxing the relay's own TLS policy; RFC 8689 §4.1 has it ignored
when the transaction has REQUIRETLS. Neither the queue nor the Relay acts on it; it is left to a handler.
"""

from __future__ import annotations

from esmtpkit.core.extension import Extension, Offer, ParamContext, param_error

__all__ = ["RequireTLS", "REQUIRETLS_ALLOWANCE"]

#: The octets the parameter adds to a MAIL line: " REQUIRETLS".
REQUIRETLS_ALLOWANCE = len(" REQUIRETLS")


def parse_requiretls(value: str | None, context: ParamContext) -> bool:
    """``REQUIRETLS`` takes no value (RFC 8689 §2); it stands only on a TLS session."""
    if value is not None:
        raise param_error("REQUIRETLS takes no value")
    if not context.session.tls:  # not offered outside TLS, so not reached: kept as a guard
        raise param_error("Unsupported MAIL parameter REQUIRETLS", 555)
    return True


class RequireTLS(Extension):
    """REQUIRETLS (RFC 8689 §2, §4.1): offered only inside TLS; ``MAIL ... REQUIRETLS`` sets
    ``mail_params["REQUIRETLS"] = True``."""

    name = keyword = "REQUIRETLS"
    rfc = "RFC 8689"
    offer = Offer.TLS
    mail_params = {"REQUIRETLS": parse_requiretls}
    mail_line_allowance = REQUIRETLS_ALLOWANCE
