"""ESMTP extensions as values: the EHLO keyword a server offers, the MAIL/RCPT parameters it then accepts and the
verbs it adds (RFC 5321 §2.2).

Pure core. An `Extension` says what it offers and when (`Offer`), parses its parameters (each a `ParamParser`,
which returns the value handlers see in ``envelope.mail_params`` / ``rcpt_params`` or raises `CommandError`) and
declares its verbs (`VerbSpec`: the phases the rule book admits it in, the room its command line needs, and the
code that answers it). `Extensions` is the set one server offers, in EHLO order, built once per policy;
`esmtpkit.server.extensions` makes the built-in ones and gives the zope interface, `IExtension`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Final, Mapping, NamedTuple, Protocol

from esmtpkit.core.commands import CommandError, Verb
from esmtpkit.core.reply import Reply
from esmtpkit.core.rules import Phase
from esmtpkit.core.session import Session

__all__ = ["Offer", "ParamContext", "ParamParser", "VerbCall", "VerbSpec", "Extension", "Extensions",
           "param_error", "OPEN_PHASES", "OUTSIDE_TRANSACTION"]

_VERB_NAME: Final = re.compile(r"[A-Z0-9][A-Z0-9-]*\Z")
_CORE_VERBS: Final = frozenset(verb.value for verb in Verb)

#: Every phase in which commands are read.
OPEN_PHASES: Final = frozenset((Phase.CONNECTED, Phase.GREETED, Phase.SENDER, Phase.RECIPIENTS, Phase.CHUNKING))
#: The phases outside a mail transaction (where XCLIENT, XFORWARD and the like belong).
OUTSIDE_TRANSACTION: Final = frozenset((Phase.CONNECTED, Phase.GREETED))


class Offer(enum.Enum):
    """When an extension's keyword is in the EHLO reply (and so when its parameters and verbs are accepted)."""

    ALWAYS = "always"
    TLS = "tls"  # only inside TLS (REQUIRETLS, RFC 8689 §4)
    BEFORE_TLS = "before-tls"  # only before TLS (STARTTLS, RFC 3207 §4.2)
    AUTHENTICATED = "authenticated"  # only after a successful AUTH
    TRUSTED = "trusted"  # only to clients on the policy's trusted networks (XCLIENT, XFORWARD)


def param_error(text: str, code: int = 501, enhanced: str = "5.5.4") -> CommandError:
    """The error a `ParamParser` raises for a bad value: 501 5.5.4 unless told otherwise (RFC 5321 §4.1.1.11)."""
    return CommandError(Reply(code, (text,), enhanced))


class ParamContext(NamedTuple):
    """What a parameter parser may look at: the session, the keywords this connection was offered, the
    parameters of the same command parsed before this one, the transaction's MAIL parameters (for RCPT) and
    whether the transaction uses SMTPUTF8. (A named tuple: one is made for every command with parameters.)"""

    session: Session
    offered: frozenset[str]
    params: Mapping[str, Any]
    mail_params: Mapping[str, Any]
    utf8: bool
    settings: Any = None  # the server's Policy


#: Parses one ESMTP parameter's value (None when given without ``=``): returns what handlers see, or raises
#: `CommandError` (see `param_error`).
ParamParser = Callable[[str | None, ParamContext], Any]


class VerbCall(Protocol):
    """What the code answering an extension verb is given (the protocol provides it)."""

    verb: str  # upper-case
    argument: str  # the text after the verb, spaces stripped
    session: Session
    handler: Any  # the connection's IMessageHandler
    settings: Any  # the server's Policy
    trusted: bool  # the client is on the policy's trusted networks

    def restart(self) -> None:
        """Start the dialogue over once the reply is sent: the client must greet again (as after STARTTLS)."""


#: Answers one extension command: a `Reply` (or ``(code, text)``), a Deferred or coroutine of one, or raises
#: `CommandError` for bad syntax.
VerbRunner = Callable[[VerbCall], Any]


@dataclass(frozen=True)
class VerbSpec:
    """An extension verb: the phases in which the rule book admits it (503 5.5.1 elsewhere), the octets its
    command line may have beyond RFC 5321's 512, and ``run``, which answers it. The phase stays as it was, unless
    ``run`` calls ``restart``."""

    name: str
    run: VerbRunner
    phases: frozenset[Phase] = OUTSIDE_TRANSACTION
    line_allowance: int = 0
    #: Known only once the extension's keyword was offered at the last EHLO (else an unknown command, answered by
    #: the handler's ``unknown``). False for a verb that must be known to be refused (XCLIENT's 550 5.7.0 to an
    #: untrusted client): such a verb runs whatever ``offer`` says, so its ``run`` must check what it needs.
    gated: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.name.upper())
        if not _VERB_NAME.match(self.name):
            raise ValueError(f"bad verb name {self.name!r}")
        if self.name in _CORE_VERBS:
            raise ValueError(f"{self.name} is a verb esmtpkit runs itself")


_ALWAYS: Final = Offer.ALWAYS
#: How Extension.offered decides each Offer but ALWAYS, as a test of the session.
_OFFERED: Final[dict[Offer, Callable[[Session], bool]]] = {
    Offer.TLS: lambda session: session.tls,
    Offer.BEFORE_TLS: lambda session: not session.tls,
    Offer.AUTHENTICATED: lambda session: session.authenticated is not None,
    Offer.TRUSTED: lambda session: session.trusted,
}


class Extension:
    """One ESMTP extension (subclass it; see docs/extensions.md). Class attributes describe it:

    ``name`` (how ``--extension`` and `Extensions.get` name it), ``keyword`` (the EHLO keyword, or None for an
    extension that offers none), ``rfc`` (its specification), ``offer`` (when the keyword is offered), ``mail_params`` and ``rcpt_params``
    (parameter name -> `ParamParser`, accepted only when the keyword was offered), ``verbs`` (`VerbSpec` s),
    ``mail_line_allowance`` / ``rcpt_line_allowance`` (octets the parameters may add to a MAIL or RCPT line).
    ``ehlo_params`` gives the text after the keyword; ``offered`` decides, per connection, beyond ``offer``.
    """

    name: str = ""
    keyword: str | None = None
    rfc: str = ""  # the specification, for the docs' generated tables ("RFC 1870", "Postfix XCLIENT_README")
    offer: Offer = Offer.ALWAYS
    mail_params: Mapping[str, ParamParser] = {}
    rcpt_params: Mapping[str, ParamParser] = {}
    verbs: tuple[VerbSpec, ...] = ()
    protocol_verbs: tuple[str, ...] = ()  # verbs the protocol runs itself for it (BDAT, STARTTLS, AUTH): docs only
    mail_line_allowance: int = 0
    rcpt_line_allowance: int = 0

    def ehlo_params(self, session: Session, settings: Any) -> str:
        """The EHLO keyword's parameters (the text after it), as offered now; ``""`` for none."""
        return ""

    def offered(self, session: Session, settings: Any) -> bool:
        """Whether the keyword is offered on this connection now (``offer`` says when; override for more)."""
        return self.offer is _ALWAYS or bool(_OFFERED[self.offer](session))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name or self.keyword}>"


@dataclass(eq=False)
class Extensions:
    """The extensions one server offers, in EHLO order, with lookup tables made once: the parameter parsers by
    name, the verbs by name and the line allowances. Names and keywords are unique; a parameter or verb belongs
    to one extension (BODY excepted: 8BITMIME and BINARYMIME share it, as RFC 3030 §3 says)."""

    items: tuple[Extension, ...]
    settings: Any = field(default=None, compare=False, repr=False)  # the server's Policy, handed to extensions
    mail_params: dict[str, list[tuple[Extension, ParamParser]]] = field(init=False, default_factory=dict)
    rcpt_params: dict[str, list[tuple[Extension, ParamParser]]] = field(init=False, default_factory=dict)
    verbs: dict[str, tuple[Extension, VerbSpec]] = field(init=False, default_factory=dict)
    mail_allowance: int = field(init=False, default=0)
    rcpt_allowance: int = field(init=False, default=0)
    _plan: Any = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        names: set[str] = set()
        keywords: set[str] = set()
        for ext in self.items:
            label = ext.name or ext.keyword or type(ext).__name__
            if label.upper() in names:
                raise ValueError(f"extension {label} is listed twice")
            names.add(label.upper())
            if ext.keyword is not None:
                if ext.keyword.upper() in keywords:
                    raise ValueError(f"EHLO keyword {ext.keyword} is offered by two extensions")
                keywords.add(ext.keyword.upper())
            for table, params in ((self.mail_params, ext.mail_params), (self.rcpt_params, ext.rcpt_params)):
                for param, parser in params.items():
                    owners = table.setdefault(param.upper(), [])
                    if any(known is not parser for _, known in owners):  # one parser may serve two (BODY)
                        raise ValueError(f"parameter {param.upper()} is parsed by two extensions")
                    owners.append((ext, parser))
            for spec in ext.verbs:
                if spec.name in self.verbs:
                    raise ValueError(f"verb {spec.name} is added by two extensions")
                self.verbs[spec.name] = (ext, spec)
            self.mail_allowance += ext.mail_line_allowance
            self.rcpt_allowance += ext.rcpt_line_allowance

    def __iter__(self) -> Any:
        return iter(self.items)

    def get(self, name: str) -> Extension | None:
        """The extension called ``name`` (or offering the keyword ``name``), if this server has it."""
        wanted = name.upper()
        for ext in self.items:
            if (ext.name or "").upper() == wanted or (ext.keyword or "").upper() == wanted:
                return ext
        return None

    def ehlo_keywords(self, session: Session) -> list[str]:
        """The EHLO reply's keyword lines for this connection now, in order."""
        settings = self.settings
        lines = []
        # Made once: extensions that keep Extension's own offered() and ehlo_params() are decided here, inline.
        plan = self._plan if self._plan is not None else self._make_plan()
        for keyword, ext, offer, fixed in plan:
            if offer is None:
                if not ext.offered(session, settings):
                    continue
            elif offer is not _ALWAYS and not _OFFERED[offer](session):
                continue
            if fixed:
                lines.append(keyword)
            else:
                params = ext.ehlo_params(session, settings)
                lines.append(f"{keyword} {params}" if params else keyword)
        return lines

    def _make_plan(self) -> list[tuple[str, Extension, "Offer | None", bool]]:
        plan = []
        for ext in self.items:
            if ext.keyword is None:
                continue
            own_offer = type(ext).offered is Extension.offered
            fixed = type(ext).ehlo_params is Extension.ehlo_params
            plan.append((ext.keyword, ext, ext.offer if own_offer else None, fixed))
        self._plan = plan
        return plan

    def parse(self, kind: str, raw: Mapping[str, str | None], context: ParamContext) -> dict[str, Any]:
        """Parse a MAIL (``kind`` "MAIL") or RCPT command's parameters: each by the extension that declares it,
        if that extension's keyword was offered on this connection; anything else is 555 5.5.4."""
        if not raw:
            return {}
        table = self.mail_params if kind == "MAIL" else self.rcpt_params
        parsed: dict[str, Any] = {}
        # One context for the command, whose ``params`` is the dict being filled.
        context = ParamContext(context.session, context.offered, parsed, context.mail_params, context.utf8,
                               context.settings)
        for key, value in raw.items():
            for ext, parser in table.get(key, ()):
                if ext.keyword.upper() in context.offered if ext.keyword is not None \
                        else ext.offered(context.session, self.settings):
                    try:
                        parsed[key] = parser(value, context)
                    except (ValueError, ArithmeticError):  # a value the parser could not take, e.g. a date's year
                        raise param_error(f"Bad value for {kind} parameter {key}") from None
                    break
            else:
                raise param_error(f"Unsupported {kind} parameter {key}", 555)
        return parsed

    def verb(self, name: str, offered: frozenset[str], session: Session) -> VerbSpec | None:
        """The extension verb ``name`` (upper-case) if this connection knows it: an ungated verb always; a gated
        one once its extension's keyword was offered at the last EHLO (or, for an extension without a keyword,
        while its ``offered`` says yes)."""
        found = self.verbs.get(name)
        if found is None:
            return None
        ext, spec = found
        if not spec.gated:
            return spec
        if ext.keyword is None:
            return spec if ext.offered(session, self.settings) else None
        return spec if ext.keyword.upper() in offered else None


