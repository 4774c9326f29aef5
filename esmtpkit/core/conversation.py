"""`ServerConversation`: the server's side of one SMTP dialogue, with no I/O, no clock and no Twisted.

It is fed command lines and told the replies; it owns the phase and the mail transaction and decides, through the
rule book (`esmtpkit.core.rules`), what may run and where each reply moves the dialogue. The Twisted protocol is
the edge around it: it reads and writes bytes, runs timers, calls the handler and reports replies back here.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Final, Mapping

from esmtpkit.core import rules
from esmtpkit.core.address import Address
from esmtpkit.core.commands import BASE_LINE_LIMIT, Command, CommandError, Verb, line_limit, parse_command
from esmtpkit.core.reply import Reply
from esmtpkit.core.rules import Phase, Standing
from esmtpkit.core.session import Envelope, Session

__all__ = ["ServerConversation", "Turn", "LINE_TOO_LONG", "JUNK"]

#: A command line longer than its verb allows (RFC 5321 §4.5.3.1.4).
LINE_TOO_LONG: Final = Reply(500, ("Line too long",), "5.5.2")
#: Commands that move no mail (Postfix's smtpd_junk_command_limit counts NOOP, VRFY, ETRN and RSET); past the junk
#: limit in a session without a delivered message, each counts as an error.
JUNK: Final = frozenset((Verb.NOOP, Verb.RSET, Verb.VRFY, Verb.EXPN, Verb.HELP, Verb.HELO, Verb.EHLO, Verb.LHLO))
_NO_KEYWORDS: Final[frozenset[str]] = frozenset()
#: The phases the per-command paths compare against, as globals: Python 3.11 reads enum members (``Phase.CLOSED``)
#: through a slow __getattr__ hook.
_CLOSED: Final = Phase.CLOSED
_GREETED: Final = Phase.GREETED
_UNKNOWN: Final = Verb.UNKNOWN


@lru_cache(maxsize=16)
def _line_limits(base: int, mail_extra: int = 0, rcpt_extra: int = 0) -> Mapping[Verb, int]:
    """The longest command line of each verb for a base limit and the room extensions' parameters add to MAIL and
    RCPT (one table shared by every connection)."""
    limits = {verb: line_limit(verb, base) for verb in Verb}
    limits[Verb.MAIL] += mail_extra
    limits[Verb.RCPT] += rcpt_extra
    return limits


class Turn:
    """One command line as the conversation judged it: ``verb`` (UNKNOWN for a line that did not parse, or an
    extension not enabled), the parsed ``command`` (None if it did not parse), ``refusal``, the reply to send
    instead of running it (None when it may run), and ``extension``, the verb's `VerbSpec` when an extension adds
    it."""

    __slots__ = ("verb", "command", "refusal", "extension")

    def __init__(self, verb: Verb, command: Command | None, refusal: Reply | None, extension: Any = None) -> None:
        self.verb = verb
        self.command = command
        self.refusal = refusal
        self.extension = extension  # the `VerbSpec` of an extension verb (verb is then UNKNOWN)


class ServerConversation:
    """The state of one server-side dialogue: phase, transaction, what EHLO offered, junk and refusal.

    ``receive`` judges a command line; ``answered`` applies the handler's reply to it; the other methods are the
    dialogue's other transitions (end of message, abort, STARTTLS, close). Nothing else changes ``phase``.
    """

    __slots__ = ("phase", "session", "standing", "keywords", "refused", "junk", "penalty", "_junk_limit",
                 "_line_limits", "_extension_verbs")

    def __init__(self, session: Session, standing: Standing = Standing(), max_command_length: int = BASE_LINE_LIMIT,
                 junk_limit: int = 0) -> None:
        self.phase = Phase.CONNECTED
        self.session = session
        self.standing = standing
        self.keywords: frozenset[str] = _NO_KEYWORDS  # offered at the last EHLO/LHLO; none after HELO or STARTTLS
        self.refused = False  # connect() refused service: only QUIT is run
        self.junk = 0  # junk commands since the session began or last delivered a message
        self.penalty = False  # the reply being made counts as an error whatever its code (a junk command too many)
        self._junk_limit = junk_limit
        extensions = standing.extensions
        self._extension_verbs = bool(extensions is not None and extensions.verbs)
        self._line_limits = _line_limits(max_command_length, extensions.mail_allowance if extensions else 0,
                                         extensions.rcpt_allowance if extensions else 0)

    # ---- commands ---------------------------------------------------------------------------------------------

    def receive(self, raw: bytes) -> Turn:
        """Judge one command line (CRLF removed): parse it, find its verb here, and apply the rule book."""
        try:
            command = parse_command(raw)
        except CommandError as e:
            return Turn(Verb.UNKNOWN, None, e.reply)
        verb = command.verb
        if verb in rules.EXTENSION_VERBS:
            verb = rules.effective_verb(verb, self.standing, self.keywords)
        elif verb is _UNKNOWN and self._extension_verbs:
            spec = self.standing.extensions.verb(command.name.upper(), self.keywords, self.session)
            if spec is not None:
                return self._extension_turn(raw, command, spec)
        if len(raw) > self._line_limits[verb]:
            return Turn(verb, command, LINE_TOO_LONG)
        if verb in JUNK and not self.refused:
            self.junk += 1
            self.penalty = bool(self._junk_limit) and self.junk > self._junk_limit
        if (self.phase, verb) in rules.ADVANCE and verb not in rules.ADMISSION and not self.refused:
            return Turn(verb, command, None)  # the usual case, decided by the table alone
        return Turn(verb, command, rules.admit(self.phase, verb, self.standing, self.session, self.refused))

    def _extension_turn(self, raw: bytes, command: Command, spec: Any) -> Turn:
        """Judge an extension verb: its line limit, then the phases its `VerbSpec` admits it in."""
        if len(raw) > self._line_limits[_UNKNOWN] + spec.line_allowance:
            return Turn(_UNKNOWN, command, LINE_TOO_LONG, spec)
        return Turn(_UNKNOWN, command, rules.admit_extension(self.phase, spec.name, spec.phases, self.standing,
                                                            self.session, self.refused), spec)

    def restart(self) -> None:
        """An extension verb (XCLIENT) started the dialogue over: the client must greet again, the transaction and
        what EHLO offered are forgotten (the phase as after STARTTLS, with TLS and AUTH as they are)."""
        self.drop_transaction()
        self.session.helo, self.session.esmtp = None, False
        self.keywords = _NO_KEYWORDS
        if self.phase is not _CLOSED:
            self.phase = Phase.CONNECTED

    def admit_parsed(self, verb: Verb) -> Reply | None:
        """The rule book's refusal for a well-formed ``verb`` (``rules.ONCE_PARSED``), or None if it may run."""
        return rules.admit_parsed(verb, self.standing, self.session)

    def answered(self, verb: Verb, code: int) -> None:
        """The reply ``code`` was given to the admitted ``verb``: move the dialogue as the rule book says."""
        if self.phase is not _CLOSED:
            self.phase = rules.after_reply(self.phase, verb, code)

    def take_penalty(self) -> bool:
        """Whether the reply now sent counts as an error regardless of its code (once per command)."""
        penalty, self.penalty = self.penalty, False
        return penalty

    # ---- greetings and TLS ------------------------------------------------------------------------------------

    def greeted(self, name: str, extended: bool, keywords: frozenset[str] = _NO_KEYWORDS) -> None:
        """HELO (``extended`` False) or EHLO/LHLO was answered 250 with ``keywords`` offered."""
        self.session.helo, self.session.esmtp = name, extended
        self.keywords = keywords if extended else _NO_KEYWORDS

    def tls_started(self) -> None:
        """STARTTLS was answered 220: the client must greet again and authenticate again (RFC 3207 §4.2). The
        edge sets ``session.tls`` once the transport has switched."""
        session = self.session
        session.helo, session.esmtp, session.authenticated, session.auth_mechanism = None, False, None, None
        session.envelope = Envelope()
        self.keywords = _NO_KEYWORDS
        self.answered(Verb.STARTTLS, 220)

    def refuse_service(self) -> None:
        """connect() refused service (554, or an early talker): every command but QUIT now gets 503."""
        self.refused = True

    # ---- the transaction --------------------------------------------------------------------------------------

    @property
    def in_transaction(self) -> bool:
        """True while a mail transaction is open (MAIL accepted, no end of data or RSET yet)."""
        return self.phase in rules.IN_TRANSACTION  # the rule book's set, read without a second call

    def mail_accepted(self, sender: Address | str, params: dict[str, Any], transaction_id: str) -> None:
        """MAIL was answered positively: a new transaction with this sender."""
        self.session.envelope = Envelope(id=transaction_id, sender=sender, mail_params=params)  # type: ignore[arg-type]
        self.session.transactions += 1

    def recipient_accepted(self, recipient: Address, params: dict[str, Any]) -> None:
        """RCPT was answered positively: the recipient joins the envelope."""
        self.session.envelope.recipients.append(recipient)
        self.session.envelope.rcpt_params.append(params)

    def chunk_failed(self) -> None:
        """A BDAT chunk failed: the transaction stays in its chunking phase, refusing chunks, until RSET."""
        if self.phase is not _CLOSED:
            self.phase = Phase.CHUNKING

    def message_ended(self, delivered: bool) -> None:
        """The message's final reply was given: the transaction is over (``delivered``: some reply was positive)."""
        self.session.envelope = Envelope()
        if delivered:
            self.junk = 0  # a session that delivers mail may keep resetting between messages
        if self.phase is not _CLOSED:
            self.phase = _GREETED

    def drop_transaction(self) -> bool:
        """Forget an open transaction (RSET, a new greeting, QUIT, STARTTLS, a lost connection); True if one was."""
        was = self.phase in rules.IN_TRANSACTION
        if was:
            self.phase = _GREETED
        self.session.envelope = Envelope()
        return was

    def close(self) -> None:
        """The dialogue is over (QUIT answered, the server closed, or the connection was lost)."""
        self.phase = _CLOSED

    @property
    def closed(self) -> bool:
        """True once the dialogue is over."""
        return self.phase is _CLOSED
