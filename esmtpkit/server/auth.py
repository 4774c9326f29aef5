"""AUTH (RFC 4954): the SASL exchange, the identity it yields, and the password-guessing throttle.

The rule book has already checked that AUTH may run (after EHLO, outside a transaction, not twice, TLS first if
the policy says so); what is left is the mechanism's challenges, the portal's verdict and the cross-connection
throttle (`esmtpkit.server.authlimit`). `esmtpkit.server.protocol` mixes this in.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from esmtpkit.core.commands import Command, Verb
from esmtpkit.core.escape import escape
from esmtpkit.core.reply import Reply
from esmtpkit.server import sasl
from esmtpkit.server.authlimit import AUTH_THROTTLED, AuthThrottle

__all__ = ["Auth"]


def _username(step: sasl.Step) -> str | None:
    """The user name a finished AUTH exchange named (for the log), if its credentials carry one."""
    name = getattr(getattr(step, "credentials", None), "username", None)
    if isinstance(name, bytes):
        return name.decode("utf-8", "replace")
    return name if isinstance(name, str) else None


class Auth:
    """Mixin: the AUTH verb and the SASL exchange that follows it."""

    __slots__ = ()


    def _do_AUTH(self, command: Command) -> "Deferred[Any] | None":
        name, initial = sasl.parse_auth(command.argument)
        if self._refused_once_parsed(Verb.AUTH):
            return None
        mechanism = sasl.new_mechanism(name, hostname=self.policy.hostname, authorize=self.policy.auth_authorize,
                                       offered=self._mechanisms)
        if mechanism is None:
            self.send(sasl.AUTH_MECHANISM_UNKNOWN)
            return None
        throttle: AuthThrottle | None = getattr(self.factory, "auth_throttle", None)
        if throttle is not None and throttle.refuses(self.session.peer_ip, None, self._now()):
            return self._auth_held(AUTH_THROTTLED, throttle.delay)  # the address is in its cool-off
        return self._auth_step(mechanism, mechanism.start(initial))

    def _auth_response(self, line: bytes) -> "Deferred[Any] | None":
        """The client's answer to a 334 challenge (RFC 4954 §4); ``*`` cancels."""
        mechanism = self._sasl
        assert mechanism is not None
        return self._auth_step(mechanism, mechanism.respond(line))

    def _auth_step(self, mechanism: sasl.Mechanism, step: sasl.Step) -> "Deferred[Any] | None":
        if isinstance(step, sasl.Challenge):
            self._sasl = mechanism
            self.transport.write(step.wire)  # "334 " even with an empty challenge; never an enhanced code
            return None
        self._sasl = None
        if isinstance(step, sasl.Failed):
            self.monitor.auth_failed(self.session, mechanism.name, None, step.reply)
            self.send(step.reply)  # counts toward the error limit, as every failure does
            return None
        user = _username(step)
        # Password guessing is counted across connections (esmtpkit.server.authlimit): a check in progress counts toward
        # the limits until its result, so parallel connections cannot run more guesses than the limit allows.
        throttle: AuthThrottle | None = getattr(self.factory, "auth_throttle", None)
        attempt = throttle.begin(self.session.peer_ip, user, self._now()) if throttle is not None else None
        if throttle is not None and attempt is None:
            return self._auth_held(AUTH_THROTTLED, throttle.delay)
        self._auth_attempt = attempt

        def then(value: Any) -> None:
            # A check whose connection was lost first was ended then: its client learns nothing, so it is no guess.
            counted = throttle is not None and attempt is not None and self._auth_attempt is attempt
            self._auth_attempt = None
            if isinstance(value, Failure):
                reply = self._reply_from(value, "auth")
                self.monitor.auth_failed(self.session, mechanism.name, user, reply)
                if counted:
                    if reply.code < 500:  # the checker failed (454), not the client: no guess was judged
                        throttle.ended(attempt, self._now())
                    else:
                        verdict = throttle.failed(attempt, self._now())
                        for scope in verdict.scopes:
                            self.monitor.auth_throttled(self.session, scope, user, throttle.cool_off)
                        if verdict.delay and not self._gone:
                            self._todo.append(lambda: self._auth_held(reply, verdict.delay))  # next, before the rest
                            return
                self.send(reply)
                return
            if counted:
                throttle.ended(attempt, self._now())
            if self._gone:
                value.logout()
                return
            self._identity = value
            self.session.authenticated = value.name
            self.session.auth_mechanism = value.mechanism
            # Extensions offered only after AUTH are usable now; RFC 4954 clients do not send EHLO again.
            self.conversation.keywords |= {k.split(" ", 1)[0] for k in self.extensions()}
            self.monitor.auth_succeeded(self.session, value.mechanism, value.name)
            self.send(sasl.AUTH_SUCCEEDED)

        return self._call(sasl.authenticate, (self.policy.portal, step), then)

    def _end_auth_attempt(self) -> None:
        """The connection is gone with a check in progress: that check no longer counts against its client."""
        attempt, self._auth_attempt = self._auth_attempt, None
        throttle = getattr(self.factory, "auth_throttle", None)
        if attempt is not None and throttle is not None:
            throttle.ended(attempt, self._now())

    def _auth_held(self, reply: Reply, delay: float) -> "Deferred[Any] | None":
        """Send an AUTH refusal after ``delay`` seconds in which nothing is read from this connection."""
        if not delay or self.clock is None:
            self.send(reply)
            return None
        return self._pause(delay, lambda: self.send(reply))

    def _logout(self) -> None:
        """Release the authenticated identity (its realm's logout), if any."""
        identity, self._identity = self._identity, None
        if identity is not None:
            try:
                identity.logout()
            except Exception:
                self.log.failure("logout of {name} failed", name=escape(identity.name))
