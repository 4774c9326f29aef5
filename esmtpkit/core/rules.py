"""The rule book: which verb is legal in which phase under which policy, and where a reply moves the dialogue.

Pure core, and the only place these rules live. RFC 5321 §3.3 and §4.1.4 (command order), RFC 3207 §4.2 (STARTTLS
forgets HELO/EHLO), RFC 4954 §4 (AUTH after EHLO, outside transactions), RFC 3030 §2 (BDAT), RFC 2033 §4.1 (LMTP).
Three parts: `ADVANCE`, one table read top to bottom (pairs not listed get 503 5.5.1); `ADMISSION`, the rules
that also look at the connection (TLS, authentication, LMTP), which `admit` applies with the table before a
command runs; and `ONCE_PARSED`, the rules `admit_parsed` applies once the command's syntax was found good.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Final, Mapping

from esmtpkit.core.commands import Verb
from esmtpkit.core.reply import Reply
from esmtpkit.core.session import Session

__all__ = ["Phase", "ADVANCE", "ADMISSION", "ONCE_PARSED", "Standing", "allowed", "advance", "after_reply", "admit",
           "admit_parsed", "admit_extension",
           "effective_verb", "refusal", "ALWAYS", "EXTENSION_VERBS", "IN_TRANSACTION"]


class Phase(enum.Enum):
    """Where one SMTP dialogue stands."""

    __hash__ = object.__hash__  # members are singletons: identity hashing is exact and cheaper in table lookups

    CONNECTED = "connected"  # greeting sent, no HELO/EHLO yet
    GREETED = "greeted"  # HELO/EHLO done, no transaction open
    SENDER = "sender"  # MAIL accepted
    RECIPIENTS = "recipients"  # at least one RCPT accepted
    CHUNKING = "chunking"  # inside a BDAT sequence, before BDAT LAST
    DATA = "data"  # message content is being received (no commands read)
    CLOSED = "closed"  # QUIT answered or connection lost


_OPEN: Final = (Phase.CONNECTED, Phase.GREETED, Phase.SENDER, Phase.RECIPIENTS, Phase.CHUNKING)
_TRANSACTION: Final = (Phase.SENDER, Phase.RECIPIENTS, Phase.CHUNKING)

#: Verbs that are legal whenever commands are read and leave the phase as it is.
ALWAYS: Final = (Verb.NOOP, Verb.VRFY, Verb.EXPN, Verb.HELP, Verb.UNKNOWN)


def _build() -> dict[tuple[Phase, Verb], Phase]:
    table: dict[tuple[Phase, Verb], Phase] = {}
    for phase in _OPEN:
        for verb in ALWAYS:
            table[phase, verb] = phase
        # HELO/EHLO/LHLO at any time start over (RFC 5321 §4.1.4: acts like RSET).
        for verb in (Verb.HELO, Verb.EHLO, Verb.LHLO):
            table[phase, verb] = Phase.GREETED
        table[phase, Verb.RSET] = Phase.CONNECTED if phase is Phase.CONNECTED else Phase.GREETED
        table[phase, Verb.QUIT] = Phase.CLOSED
    table.update({
        (Phase.GREETED, Verb.MAIL): Phase.SENDER,
        (Phase.SENDER, Verb.RCPT): Phase.RECIPIENTS,
        (Phase.RECIPIENTS, Verb.RCPT): Phase.RECIPIENTS,
        (Phase.RECIPIENTS, Verb.DATA): Phase.DATA,
        (Phase.RECIPIENTS, Verb.BDAT): Phase.CHUNKING,
        (Phase.CHUNKING, Verb.BDAT): Phase.CHUNKING,
        # RFC 3207 §4.2: after TLS the client must greet again.
        (Phase.CONNECTED, Verb.STARTTLS): Phase.CONNECTED,
        (Phase.GREETED, Verb.STARTTLS): Phase.CONNECTED,
        # RFC 4954 §4: AUTH only after EHLO and outside a transaction.
        (Phase.GREETED, Verb.AUTH): Phase.GREETED,
    })
    return table


#: (phase, verb) -> phase after a positive (2xx/3xx) reply. Pairs not listed get 503 5.5.1.
ADVANCE: Final[Mapping[tuple[Phase, Verb], Phase]] = _build()

#: The 503 text for a verb used out of order, by verb and phase (RFC 5321 §4.1.4 wording as Postfix uses it).
_REFUSALS: Final[Mapping[tuple[Verb, Phase], str]] = {
    (Verb.MAIL, Phase.CONNECTED): "Send HELO/EHLO first",
    (Verb.MAIL, Phase.SENDER): "Nested MAIL command",
    (Verb.MAIL, Phase.RECIPIENTS): "Nested MAIL command",
    (Verb.MAIL, Phase.CHUNKING): "Nested MAIL command",
    (Verb.RCPT, Phase.CONNECTED): "Need MAIL command",
    (Verb.RCPT, Phase.GREETED): "Need MAIL command",
    (Verb.RCPT, Phase.CHUNKING): "RCPT not allowed during BDAT",
    (Verb.DATA, Phase.CONNECTED): "Need MAIL command",
    (Verb.DATA, Phase.GREETED): "Need MAIL command",
    (Verb.DATA, Phase.SENDER): "Need RCPT command",
    (Verb.DATA, Phase.CHUNKING): "DATA not allowed after BDAT",
    (Verb.BDAT, Phase.CONNECTED): "Need MAIL command",
    (Verb.BDAT, Phase.GREETED): "Need MAIL command",
    (Verb.BDAT, Phase.SENDER): "Need RCPT command",
    (Verb.AUTH, Phase.CONNECTED): "Send EHLO first",
    (Verb.AUTH, Phase.SENDER): "AUTH not allowed during a mail transaction",
    (Verb.AUTH, Phase.RECIPIENTS): "AUTH not allowed during a mail transaction",
    (Verb.AUTH, Phase.CHUNKING): "AUTH not allowed during a mail transaction",
    (Verb.STARTTLS, Phase.SENDER): "STARTTLS not allowed during a mail transaction",
    (Verb.STARTTLS, Phase.RECIPIENTS): "STARTTLS not allowed during a mail transaction",
    (Verb.STARTTLS, Phase.CHUNKING): "STARTTLS not allowed during a mail transaction",
}


def allowed(phase: Phase, verb: Verb) -> bool:
    """Whether ``verb`` may be issued in ``phase``."""
    return (phase, verb) in ADVANCE


def advance(phase: Phase, verb: Verb) -> Phase:
    """The phase after a positive reply to ``verb`` in ``phase`` (KeyError if not allowed)."""
    return ADVANCE[phase, verb]


def refusal(phase: Phase, verb: Verb) -> str:
    """The 503 text for ``verb`` out of order in ``phase``."""
    return _REFUSALS.get((verb, phase), "Bad sequence of commands")


def rulebook_markdown(extension_verbs: Mapping[str, frozenset[Phase]] | None = None) -> str:
    """The rule book as a Markdown table (rows: verbs, columns: phases), generated so the docs cannot drift; with
    ``extension_verbs`` (name -> the phases it is admitted in, where it leaves the phase as it was), their rows
    too."""
    phases = [p for p in Phase if p not in (Phase.DATA, Phase.CLOSED)]
    verbs = [v for v in Verb if any((p, v) in ADVANCE for p in phases)]
    lines = ["| verb | " + " | ".join(p.value for p in phases) + " |",
             "|---|" + "---|" * len(phases)]
    for verb in verbs:
        cells = [ADVANCE[p, verb].value if (p, verb) in ADVANCE else "503" for p in phases]
        lines.append(f"| {verb.value} | " + " | ".join(cells) + " |")
    for name, admitted in (extension_verbs or {}).items():
        lines.append(f"| {name} | " + " | ".join(p.value if p in admitted else "503" for p in phases) + " |")
    return "\n".join(lines) + "\n"


def admit_extension(phase: Phase, name: str, admitted: frozenset[Phase], standing: Standing, session: Session,
                    refused: bool = False) -> Reply | None:
    """Why the extension verb ``name``, admitted in the phases ``admitted``, may not be run now, or None."""
    if refused:
        return NO_SERVICE
    if phase not in admitted:
        return Reply(503, (f"{name} not allowed now" if phase in _OPEN else "Bad sequence of commands",), "5.5.1")
    return None


#: The phases in which a mail transaction is open (MAIL accepted, no end of data or RSET yet).
IN_TRANSACTION: Final = frozenset((*_TRANSACTION, Phase.DATA))


def in_transaction(phase: Phase) -> bool:
    """True while a mail transaction is open (MAIL accepted, no end of data or RSET yet)."""
    return phase in IN_TRANSACTION


#: Extension verbs: each is an unknown command (the handler's ``unknown``) unless its extension is enabled.
EXTENSION_VERBS: Final = frozenset((Verb.STARTTLS, Verb.AUTH, Verb.BDAT, Verb.LHLO))


#: Verb.DATA as a global, read for every reply: Python 3.11 reads enum members through a slow __getattr__ hook.
_DATA: Final = Verb.DATA


def after_reply(phase: Phase, verb: Verb, code: int) -> Phase:
    """The phase after the reply ``code`` to an admitted ``verb``: `ADVANCE` on 2xx/3xx, else unchanged.

    DATA moves on only with 354 (any other reply leaves the transaction open, RFC 5321 §4.1.1.4).
    """
    if code >= 400 or (verb is _DATA and code != 354):
        return phase
    return ADVANCE[phase, verb]


@dataclass(frozen=True, slots=True)
class Standing:
    """The server's settings that admission depends on (from the policy, fixed for a connection)."""

    lmtp: bool = False
    starttls: bool = False  # STARTTLS is configured
    auth: bool = False  # AUTH has mechanisms to offer
    require_tls: bool = False  # MAIL needs TLS first (RFC 3207 §4)
    require_auth: bool = False  # MAIL needs AUTH first (RFC 4954 §6)
    auth_require_tls: bool = False  # AUTH needs TLS first (RFC 4954 §4, 538)
    max_transactions: int = 0  # MAIL commands accepted per session; 0 = no limit
    extensions: Any = None  # the server's `esmtpkit.core.extension.Extensions` (None: the standard ones only)


def effective_verb(verb: Verb, standing: Standing, keywords: frozenset[str]) -> Verb:
    """The verb as this connection knows it: an extension verb not enabled here is UNKNOWN.

    STARTTLS and AUTH are known whenever configured (a second STARTTLS gets 503, AUTH before TLS 538); BDAT only
    where the last EHLO offered CHUNKING; LHLO only on an LMTP server.
    """
    if verb not in EXTENSION_VERBS:
        return verb
    if verb is Verb.BDAT:
        enabled = "CHUNKING" in keywords
    elif verb is Verb.STARTTLS:
        enabled = standing.starttls
    elif verb is Verb.AUTH:
        enabled = standing.auth
    else:
        enabled = standing.lmtp
    return verb if enabled else Verb.UNKNOWN


# The replies admission gives (RFC 3463 codes).
NO_SERVICE: Final = Reply(503, ("No service: send QUIT",), "5.5.1")
LMTP_GREETING: Final = Reply(500, ("This is an LMTP server: use LHLO",), "5.5.1")
TLS_REQUIRED: Final = Reply(530, ("Must issue a STARTTLS command first",), "5.7.0")
AUTH_REQUIRED: Final = Reply(530, ("Authentication required",), "5.7.0")
TOO_MANY_TRANSACTIONS: Final = Reply(421, ("Too many transactions in one session, closing connection",), "4.7.0")
BINARY_NEEDS_BDAT: Final = Reply(503, ("BODY=BINARYMIME needs BDAT, not DATA",), "5.5.1")
EHLO_FIRST: Final = Reply(503, ("Send EHLO first",), "5.5.1")
AUTH_ALREADY_DONE: Final = Reply(503, ("Already authenticated",), "5.5.1")
AUTH_ENCRYPTION_REQUIRED: Final = Reply(538, ("Encryption required for requested authentication mechanism",),
                                        "5.7.11")
TLS_ACTIVE: Final = Reply(503, ("TLS already active",), "5.5.1")

Rule = Callable[[Standing, Session], "Reply | None"]

#: The rules beyond the table, by verb, tried in order once the table allows the verb in its phase. Each looks at
#: the standing and the session and returns the refusal, or None. (A refused session, where connect() answered
#: 554, is checked before the table: every verb but QUIT gets `NO_SERVICE`.)
ADMISSION: Final[Mapping[Verb, tuple[Rule, ...]]] = {
    # RFC 2033 §4.1: LMTP has LHLO only.
    Verb.HELO: (lambda st, s: LMTP_GREETING if st.lmtp else None,),
    Verb.EHLO: (lambda st, s: LMTP_GREETING if st.lmtp else None,),
    Verb.MAIL: (
        lambda st, s: TLS_REQUIRED if st.require_tls and not s.tls else None,
        lambda st, s: AUTH_REQUIRED if st.require_auth and s.authenticated is None else None,
    ),
    Verb.AUTH: (
        lambda st, s: EHLO_FIRST if not s.esmtp else None,  # the table allows GREETED, which HELO reaches too
        lambda st, s: AUTH_ALREADY_DONE if s.authenticated is not None else None,
    ),
}

#: The rules applied once the command's own syntax was found good (a malformed command gets its 501 first, as
#: Postfix answers): `admit_parsed` tries them, in order, for the verb being run.
ONCE_PARSED: Final[Mapping[Verb, tuple[Rule, ...]]] = {
    Verb.MAIL: (
        lambda st, s: TOO_MANY_TRANSACTIONS if st.max_transactions and s.transactions >= st.max_transactions
        else None,
    ),
    # RFC 3030 §3: binary content cannot be dot-stuffed.
    Verb.DATA: (lambda st, s: BINARY_NEEDS_BDAT if s.envelope.mail_params.get("BODY") == "BINARYMIME" else None,),
    Verb.AUTH: (lambda st, s: AUTH_ENCRYPTION_REQUIRED if st.auth_require_tls and not s.tls else None,),
    Verb.STARTTLS: (lambda st, s: TLS_ACTIVE if s.tls else None,),
}


def admit_parsed(verb: Verb, standing: Standing, session: Session) -> Reply | None:
    """Why ``verb``, well formed, may still not be run now (see `ONCE_PARSED`), or None."""
    for rule in ONCE_PARSED.get(verb, ()):
        reply = rule(standing, session)
        if reply is not None:
            return reply
    return None


def admit(phase: Phase, verb: Verb, standing: Standing, session: Session, refused: bool = False) -> Reply | None:
    """Why ``verb`` may not be run now (the refusal to send), or None if it may."""
    if refused and verb is not Verb.QUIT:
        return NO_SERVICE
    if (phase, verb) not in ADVANCE:
        return Reply(503, (refusal(phase, verb),), "5.5.1")
    for rule in ADMISSION.get(verb, ()):
        reply = rule(standing, session)
        if reply is not None:
            return reply
    return None
