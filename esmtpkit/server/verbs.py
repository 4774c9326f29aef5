"""The verbs: each admitted command asks the handler and reports its reply to the conversation.

By the time a ``_do_<VERB>`` method runs, the rule book has admitted the verb (`esmtpkit.core.rules`); what is left
here is the verb's own syntax, the handler call, and what a positive reply means for the session
(`esmtpkit.server.protocol` mixes this in).
"""

from __future__ import annotations

from types import CoroutineType
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITLSTransport
from twisted.python.failure import Failure

from esmtpkit.core.commands import Command, CommandError, Verb, parse_mail_rcpt
from esmtpkit.core.escape import escape
from esmtpkit.core.ids import new_id
from esmtpkit.core.extension import ParamContext, VerbSpec
from esmtpkit.core.reply import Reply
from esmtpkit.server.replies import HANDLER_ERROR, TLS_READY, TLS_UNAVAILABLE, TOO_BIG, TOO_MANY_RECIPIENTS
from esmtpkit.server.tls import tls_info

__all__ = ["Verbs"]


class Verbs:
    """Mixin: HELO/EHLO/LHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT, VRFY, EXPN, HELP, STARTTLS and unknown commands."""

    __slots__ = ()

    # ---- what EHLO offers --------------------------------------------------------------------------------------

    def extensions(self) -> list[str]:
        """The ESMTP keywords offered in the EHLO (or LHLO) reply, in order, as this connection stands now: those of
        the server's extensions (`esmtpkit.server.extensions.extensions_for`) whose ``offered`` says yes."""
        return self.conversation.standing.extensions.ehlo_keywords(self.session)  # type: ignore[no-any-return]

    # ---- helpers -----------------------------------------------------------------------------------------------

    def _simple(self, method: str, args: tuple[Any, ...], verb: Verb,
                after: Callable[[Reply], None] | None = None) -> "Deferred[Any] | None":
        """Ask the handler's ``method``; the reply moves the conversation, then ``after`` (or `send`) has it."""
        def then(value: Any) -> None:
            reply = self._reply_from(value, method)
            if self._gone:
                # The client left while the handler worked: nobody to answer; a sender it accepted is dropped.
                if reply.is_positive and verb is Verb.MAIL:
                    self._abort_now("connection lost")
                return
            self.conversation.answered(verb, reply.code)
            if after is not None:
                after(reply)
            else:
                self.send(reply)

        return self._call(getattr(self.handler, method), args, then)

    def _parameters(self, kind: str, raw: dict[str, str | None], context: ParamContext) -> dict[str, Any]:
        """MAIL or RCPT parameters parsed by the server's extensions; a parser's own failure is logged and
        answered 451 4.3.0, as a handler's is (its CommandError is the client's fault, and its reply)."""
        try:
            return self.conversation.standing.extensions.parse(kind, raw, context)  # type: ignore[no-any-return]
        except CommandError:
            raise
        except Exception:
            self.log.failure("parameter parser failed on {kind} {params!r}", kind=kind, params=list(raw))
            raise CommandError(HANDLER_ERROR) from None

    def _refused_once_parsed(self, verb: Verb) -> bool:
        """Send the rule book's refusal of the well-formed ``verb``, if it has one (``rules.ONCE_PARSED``)."""
        refusal = self.conversation.admit_parsed(verb)
        if refusal is not None:
            self.send(refusal)
        return refusal is not None

    def _no_argument(self, command: Command) -> None:
        if command.argument:
            raise CommandError(Reply(501, (f"Syntax: {command.verb.value}",), "5.5.4"))

    def _greeting_name(self, command: Command) -> str:
        name = command.argument.split(" ", 1)[0]
        if not name:
            raise CommandError(Reply(501, (f"Syntax: {command.verb.value} hostname",), "5.5.4"))
        return name

    def _with_hostname(self, reply: Reply) -> Reply:
        first = f"{self.policy.hostname} {reply.lines[0]}".rstrip(" ")
        return Reply(reply.code, (first,) + reply.lines[1:], reply.enhanced)

    def _note_tls(self) -> None:
        """Fill ``session.tls_info`` if the handshake was not reported (a wrapper in between may swallow it)."""
        if self.session.tls and not self.session.tls_info:
            self.session.tls_info = tls_info(self.transport)
            if self.session.tls_info:
                self.monitor.tls_established(self.session)

    # ---- the transaction ---------------------------------------------------------------------------------------

    def _abort(self, reason: str) -> None:
        """Tell the handler a transaction in progress was dropped (no-op outside a transaction)."""
        if not self.conversation.in_transaction:
            return
        message = self._message
        ended = message is not None and message.ended
        self._message = None
        if not ended:
            self.monitor.message_aborted(self.session, self.session.envelope, message.size if message else 0, reason)
        self.conversation.drop_transaction()
        if not ended:
            self._abort_now(reason)

    def _abort_now(self, reason: str) -> None:
        try:
            result = self.handler.abort(reason)
            if isinstance(result, CoroutineType):
                result = Deferred.fromCoroutine(result)
            if isinstance(result, Deferred):
                result.addErrback(lambda f: self.log.failure("handler abort failed", f))
        except Exception:
            self.log.failure("handler abort failed")

    def _reset_transaction(self, reason: str) -> None:
        self._abort(reason)
        self.conversation.drop_transaction()

    # ---- greeting ----------------------------------------------------------------------------------------------

    def _greet(self) -> "Deferred[Any] | None":
        def then(value: Any) -> None:
            reply = self._reply_from(value, "connect")
            if reply.code == 220:
                reply = self._with_hostname(reply)
            elif reply.code != 421:
                self.conversation.refuse_service()
            self.send(reply, count_error=False, plain=True)
            self._reset_timer()

        return self._call(self.handler.connect, (self.session,), then)

    def _do_HELO(self, command: Command) -> "Deferred[Any] | None":
        name = self._greeting_name(command)
        self._reset_transaction("reset by HELO")

        def after(reply: Reply) -> None:
            if reply.code == 250:
                self.conversation.greeted(name, extended=False)
                self._note_tls()
                reply = self._with_hostname(reply)
            self.send(reply, plain=True)

        return self._simple("helo", (name,), Verb.HELO, after)

    def _do_EHLO(self, command: Command) -> "Deferred[Any] | None":
        return self._extended_hello(command, Verb.EHLO)

    def _do_LHLO(self, command: Command) -> "Deferred[Any] | None":
        """LHLO (RFC 2033 §4.1): EHLO's twin in LMTP mode; the handler's ``ehlo`` answers it."""
        return self._extended_hello(command, Verb.LHLO)

    def _extended_hello(self, command: Command, verb: Verb) -> "Deferred[Any] | None":
        name = self._greeting_name(command)
        self._reset_transaction(f"reset by {verb.value}")

        def after(reply: Reply) -> None:
            if reply.code == 250:
                self.session.esmtp = True  # before the keywords: what is offered depends on it
                self._note_tls()
                keywords = self.extensions()
                self.conversation.greeted(name, True, frozenset(k.split(" ", 1)[0] for k in keywords))
                reply = self._with_hostname(reply)
                reply = Reply(250, reply.lines + tuple(k for k in keywords if k not in reply.lines), reply.enhanced)
            self.send(reply, plain=True)

        return self._simple("ehlo", (name,), verb, after)

    # ---- the mail transaction ----------------------------------------------------------------------------------
    # These verbs are named by ``command.verb`` (MAIL, RCPT, DATA are no extension verbs, so it is the verb run):
    # cheaper than Verb.MAIL, which Python 3.11 reads through a slow __getattr__ hook, on every message.

    def _do_MAIL(self, command: Command) -> "Deferred[Any] | None":
        offered = self.conversation.keywords
        sender, raw = parse_mail_rcpt(command.argument, "FROM:", allow_null=True, allow_postmaster=False,
                                      utf8_allowed="SMTPUTF8" in offered)
        params = self._parameters("MAIL", raw, ParamContext(
            self.session, offered, {}, {}, "SMTPUTF8" in raw and "SMTPUTF8" in offered, self.policy)) if raw else {}
        limit = self.policy.max_message_size
        if limit and params.get("SIZE", 0) > limit:
            self.send(TOO_BIG)
            return None
        if self._refused_once_parsed(command.verb):
            return None

        def after(reply: Reply) -> None:
            if reply.is_positive:
                self._mail_at = now = self._now()
                self.conversation.mail_accepted(sender, params, new_id(now))
            self.send(reply)

        return self._simple("mail", (sender, params), command.verb, after)

    def _do_RCPT(self, command: Command) -> "Deferred[Any] | None":
        envelope = self.session.envelope
        utf8 = "SMTPUTF8" in envelope.mail_params
        recipient, raw = parse_mail_rcpt(command.argument, "TO:", allow_null=False, allow_postmaster=True,
                                         utf8_allowed=utf8)
        params = self._parameters("RCPT", raw, ParamContext(
            self.session, self.conversation.keywords, {}, envelope.mail_params, utf8, self.policy)) if raw else {}
        limit = self.policy.max_recipients
        if limit and len(envelope.recipients) >= limit:
            self.send(TOO_MANY_RECIPIENTS)
            return None

        def after(reply: Reply) -> None:
            if reply.is_positive:
                self.conversation.recipient_accepted(recipient, params)
            self.send(reply)

        return self._simple("rcpt", (recipient, params), command.verb, after)

    def _do_DATA(self, command: Command) -> "Deferred[Any] | None":
        self._no_argument(command)
        if self._refused_once_parsed(command.verb):
            return None

        def after(reply: Reply) -> None:
            self.send(reply)
            if reply.code == 354 and not self._gone:
                self._start_message()

        return self._simple("data", (), command.verb, after)

    def _do_RSET(self, command: Command) -> "Deferred[Any] | None":
        self._no_argument(command)
        self._reset_transaction("reset by RSET")
        return self._simple("rset", (), Verb.RSET)

    def _do_QUIT(self, command: Command) -> "Deferred[Any] | None":
        self._no_argument(command)
        self._reset_transaction("QUIT")

        def then(value: Any) -> None:
            self.send(self._reply_from(value, "quit"), count_error=False)
            self._close("QUIT")

        return self._call(self.handler.quit, (), then)

    # ---- the rest ----------------------------------------------------------------------------------------------

    def _do_NOOP(self, command: Command) -> "Deferred[Any] | None":
        return self._simple("noop", (), Verb.NOOP)

    def _do_VRFY(self, command: Command) -> "Deferred[Any] | None":
        if not command.argument:
            raise CommandError(Reply(501, ("Syntax: VRFY address",), "5.5.4"))
        return self._simple("vrfy", (command.argument,), Verb.VRFY)

    def _do_EXPN(self, command: Command) -> "Deferred[Any] | None":
        if not command.argument:
            raise CommandError(Reply(501, ("Syntax: EXPN list",), "5.5.4"))
        return self._simple("expn", (command.argument,), Verb.EXPN)

    def _do_HELP(self, command: Command) -> "Deferred[Any] | None":
        return self._simple("help", (command.argument or None,), Verb.HELP)

    def _do_UNKNOWN(self, command: Command) -> "Deferred[Any] | None":
        return self._simple("unknown", (command.line,), Verb.UNKNOWN)

    # ---- extension verbs (esmtpkit.core.extension) -------------------------------------------------------------

    def _run_extension(self, spec: VerbSpec, command: Command) -> "Deferred[Any] | None":
        """Run an extension's verb, admitted by the rule book: its reply is sent; ``restart`` starts over."""
        call = _ExtensionCall(spec.name, command.argument, self.session, self.handler, self.policy)
        previous = self.session.peer_ip

        def then(value: Any) -> None:
            if isinstance(value, Failure) and value.check(CommandError):
                reply = value.value.reply  # bad syntax, as the verb's own code judged it
            else:
                reply = self._reply_from(value, spec.name.lower())
            if self._gone:
                return
            if call.restarting and reply.is_positive:
                self._reset_transaction(f"reset by {spec.name}")
                self.conversation.restart()
            if self.session.peer_ip != previous:
                self.monitor.client_replaced(self.session, spec.name, previous)
            self.send(reply, plain=reply.is_positive and call.restarting)

        return self._call(spec.run, (call,), then)

    # ---- STARTTLS (RFC 3207) -----------------------------------------------------------------------------------

    def _do_STARTTLS(self, command: Command) -> None:
        self._no_argument(command)
        if self._refused_once_parsed(Verb.STARTTLS):
            return None
        if not ITLSTransport.providedBy(self.transport):
            self.send(TLS_UNAVAILABLE)
            return None
        self.send(TLS_READY, count_error=False)
        if self._gone:
            return None
        # RFC 3207 §4.2 (and CVE-2011-0411): whatever the client sent after STARTTLS in plaintext is never run.
        dropped = self._discard_unparsed()
        self._todo.clear()
        self._reprocess = self._skipping_line = self._skip_cr = False
        if dropped:
            self.log.info("discarded {count} plaintext bytes sent after STARTTLS by {peer}", count=dropped,
                          peer=escape(self.session.peer_ip))
        self._reset_transaction("STARTTLS")
        self._logout()
        self.conversation.tls_started()
        self._stop_producing()  # again once the handshake is done (see _start_producing)
        if self._write_blocked or self.paused:
            self._update_reading()
        self.transport.startTLS(self.policy.tls_context)
        self.session.tls = True
        return None


class _ExtensionCall:
    """What an extension verb's ``run`` is given (`esmtpkit.core.extension.VerbCall`)."""

    __slots__ = ("verb", "argument", "session", "handler", "settings", "restarting")

    def __init__(self, verb: str, argument: str, session: Any, handler: Any, settings: Any) -> None:
        self.verb = verb
        self.argument = argument
        self.session = session
        self.handler = handler
        self.settings = settings
        self.restarting = False

    @property
    def trusted(self) -> bool:
        return bool(self.session.trusted)

    def restart(self) -> None:
        self.restarting = True
