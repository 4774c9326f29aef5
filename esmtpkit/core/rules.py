"""The rule book: which verb is legal in which phase, and where a positive reply moves the dialogue.

Pure core. RFC 5321 §3.3 and §4.1.4 (command order), RFC 3207 §4.2 (STARTTLS forgets HELO/EHLO), RFC 4954 §4
(AUTH outside transactions), RFC 3030 §2 (BDAT). One table, read top to bottom; pairs not listed get 503 5.5.1.
"""

from __future__ import annotations

import enum
from typing import Final, Mapping

from esmtpkit.core.commands import Verb

__all__ = ["Phase", "ADVANCE", "allowed", "advance", "refusal", "ALWAYS"]


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


def rulebook_markdown() -> str:
    """The rule book as a Markdown table (rows: verbs, columns: phases), generated so the docs cannot drift."""
    phases = [p for p in Phase if p not in (Phase.DATA, Phase.CLOSED)]
    verbs = [v for v in Verb if any((p, v) in ADVANCE for p in phases)]
    lines = ["| verb | " + " | ".join(p.value for p in phases) + " |",
             "|---|" + "---|" * len(phases)]
    for verb in verbs:
        cells = [ADVANCE[p, verb].value if (p, verb) in ADVANCE else "503" for p in phases]
        lines.append(f"| {verb.value} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def in_transaction(phase: Phase) -> bool:
    """True while a mail transaction is open (MAIL accepted, no end of data or RSET yet)."""
    return phase in _TRANSACTION or phase is Phase.DATA
