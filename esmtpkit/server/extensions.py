"""`IExtension`, the contract of an ESMTP extension, and the extensions one server offers (`extensions_for`).

An extension (usually an `esmtpkit.core.extension.Extension` subclass) declares its EHLO keyword and when it is
offered, the MAIL/RCPT parameters it accepts and the verbs it adds; the protocol asks the server's `Extensions`
for each. The standard ones come from the policy's switches (`esmtpkit.core.standard`), then ``Policy.extensions``
in order. ``twistd esmtpkit --extension NAME`` takes one of `BUILT_IN` by name, or ``module.Class``.
"""

from __future__ import annotations

import weakref
from typing import Any, Final, Sequence

from twisted.python.reflect import namedAny
from zope.interface import Attribute, Interface, classImplements

from esmtpkit.core.extension import Extension, Extensions
from esmtpkit.core.standard import standard
from esmtpkit.core.xclient import on_networks

__all__ = ["IExtension", "extensions_for", "check_extensions", "trusted", "reference_markdown", "resolve", "BUILT_IN", "ExtensionError"]


class IExtension(Interface):
    """An ESMTP extension a server offers (see docs/extensions.md)."""

    name = Attribute("How `twistd esmtpkit --extension` and `Extensions.get` name it (unique on a server).")
    keyword = Attribute("The EHLO keyword (unique on a server), or None for an extension that offers none.")
    offer = Attribute("An `esmtpkit.core.extension.Offer`: always, only inside TLS, only before TLS, only after "
                      "AUTH, only to trusted clients.")
    mail_params = Attribute("MAIL parameter name -> `ParamParser`, accepted once the keyword was offered; the value "
                            "it returns is what handlers find in ``envelope.mail_params``.")
    rcpt_params = Attribute("RCPT parameter name -> `ParamParser` (handlers find the values in ``rcpt_params``).")
    verbs = Attribute("The `VerbSpec` s of the verbs it adds.")
    mail_line_allowance = Attribute("Octets its parameters may add to a MAIL command line.")
    rcpt_line_allowance = Attribute("Octets its parameters may add to a RCPT command line.")

    def ehlo_params(session: Any, settings: Any) -> str:
        """The text after the keyword in the EHLO reply ("" for none); ``settings`` is the server's Policy."""

    def offered(session: Any, settings: Any) -> bool:
        """Whether the keyword is offered on this connection now."""


classImplements(Extension, IExtension)


class ExtensionError(ValueError):
    """An ``--extension`` that names nothing usable."""


#: The built-in extensions ``--extension`` takes by name, and where each lives.
_BUILT_IN: Final = {"LIMITS": "esmtpkit.core.limits.Limits", "RRVS": "esmtpkit.core.rrvs.Rrvs",
                    "DELIVERBY": "esmtpkit.core.deliverby.DeliverBy",
                    "MT-PRIORITY": "esmtpkit.core.priority.MtPriority",
                    "REQUIRETLS": "esmtpkit.core.requiretls.RequireTLS",
                    "XCLIENT": "esmtpkit.core.xclient.XClient", "XFORWARD": "esmtpkit.core.xclient.XForward"}


#: The extensions ``--extension`` takes by name (case-insensitive), beyond those the policy's switches turn on.
BUILT_IN: Final = tuple(_BUILT_IN)


def resolve(name: str) -> Any:
    """An extension object for ``name``: one of `BUILT_IN`, or ``module.Class`` (a class, called with no
    arguments, or an object) providing `IExtension`."""
    where = _BUILT_IN.get(name.upper(), name)
    if "." not in where:
        raise ExtensionError(f"unknown extension {name!r}: give one of {', '.join(BUILT_IN)} or module.Class")
    try:
        made = namedAny(where)
    except Exception as e:
        raise ExtensionError(f"cannot import extension {name!r}: {e}") from None
    try:
        ext = made() if isinstance(made, type) else made
    except Exception as e:
        raise ExtensionError(f"cannot make extension {name!r}: {e}") from None
    if not IExtension.providedBy(ext):
        raise ExtensionError(f"{name!r} does not provide IExtension")
    return ext


#: The Extensions of each policy (and mechanism list), made once: keyed by id, dropped with the policy.
_MADE: dict[int, dict[tuple[str, ...], Extensions]] = {}


def check_extensions(policy: Any) -> None:
    """Raise ValueError unless ``policy.extensions`` provide IExtension and fit with the standard ones (unique
    names, keywords and verbs)."""
    for ext in policy.extensions:
        if not IExtension.providedBy(ext):
            raise ValueError(f"extensions: {ext!r} does not provide IExtension")
    try:
        Extensions((*standard(policy, ("PLAIN",) if policy.portal is not None else ()), *policy.extensions))
    except ValueError as e:
        raise ValueError(f"extensions: {e}") from None


def extensions_for(policy: Any, mechanisms: Sequence[str] = ()) -> Extensions:
    """The extensions ``policy`` offers, in EHLO order: the standard ones its switches turn on (AUTH when
    ``mechanisms`` are offered), then ``policy.extensions``. One object per policy, shared by its connections."""
    known = _MADE.get(id(policy))
    if known is None:
        known = _MADE[id(policy)] = {}
        weakref.finalize(policy, _MADE.pop, id(policy), None)
    key = tuple(mechanisms)
    made = known.get(key)
    if made is None:
        made = known[key] = Extensions((*standard(policy, mechanisms), *policy.extensions), settings=policy)
    return made


def trusted(policy: Any, ip: str) -> bool:
    """Whether the client address ``ip`` is on ``policy.trusted_networks`` (an IPv4-mapped IPv6 address counts
    as its IPv4 address)."""
    return on_networks(ip, policy.trusted_networks)


_OFFERS: Final = {"always": "always", "tls": "inside TLS", "before-tls": "before TLS",
                  "authenticated": "after AUTH", "trusted": "to trusted clients"}


def reference_markdown(extensions: Sequence[Any]) -> str:
    """A Markdown table of ``extensions``: keyword, specification, when offered, MAIL and RCPT parameters, verbs
    (docs/extensions.md shows the one for every extension esmtpkit ships, generated so it cannot drift)."""
    def names(items: Any) -> str:
        return ", ".join(f"`{item}`" for item in items) or "—"

    lines = ["| keyword | specification | offered | MAIL parameters | RCPT parameters | verbs |",
             "|---|---|---|---|---|---|"]
    for ext in extensions:
        verbs = (*getattr(ext, "protocol_verbs", ()), *(spec.name for spec in ext.verbs))
        lines.append(f"| `{ext.keyword or ext.name}` | {getattr(ext, 'rfc', '') or '—'} | "
                     f"{_OFFERS[ext.offer.value]} | {names(ext.mail_params)} | {names(ext.rcpt_params)} | "
                     f"{names(verbs)} |")
    return "\n".join(lines) + "\n"
