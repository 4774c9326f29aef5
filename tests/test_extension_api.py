"""The extension interface: a user's extension adds an EHLO keyword, a MAIL parameter and a verb without touching
esmtpkit; the rule book admits its verb in its phases; the standard extensions are written on the same interface."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import succeed
from zope.interface.verify import verifyObject

from esmtpkit.core.commands import CommandError
from esmtpkit.core.extension import Extension, Offer, ParamContext, VerbSpec, param_error
from esmtpkit.core.reply import Reply
from esmtpkit.core.rules import Phase
from esmtpkit.core.session import Session
from esmtpkit.core.standard import Pipelining, standard
from esmtpkit.server.extensions import (BUILT_IN, ExtensionError, IExtension, extensions_for, resolve,
                                        trusted)
from esmtpkit.server.policy import Policy
from esmtpkit.testing import Conversation, RecordingHandler


def _tag(value: str | None, context: ParamContext) -> str:
    if value is None or not value.isalnum() or len(value) > 16:
        raise param_error("TAG takes up to 16 letters or digits")
    return value.lower()


def _ping(call: Any) -> Reply:
    if not call.argument:
        raise CommandError(Reply(501, ("Syntax: XPING text",), "5.5.4"))
    return Reply(250, (f"pong {call.argument} from {call.session.peer_ip}",), "2.0.0")


class Tagging(Extension):
    """A user's extension: EHLO XTAG, MAIL parameter TAG=, verb XPING in every open phase."""

    name = keyword = "XTAG"
    mail_params = {"TAG": _tag, "NOTE": lambda value, context: value}
    mail_line_allowance = 2000  # NOTE= may carry up to about 2000 octets
    verbs = (VerbSpec("XPING", _ping, phases=frozenset(Phase) - {Phase.DATA, Phase.CLOSED}),)

    def ehlo_params(self, session: Session, settings: Any) -> str:
        return "v1"


class Restarting(Extension):
    """A keyword-less extension whose verb, outside a transaction, starts the dialogue over (as XCLIENT does)."""

    name = "XAGAIN"
    verbs = (VerbSpec("XAGAIN", lambda call: (call.restart(), succeed(Reply(220, ("again",))))[1]),)


def talk(*extensions: Any, **policy: Any) -> Conversation:
    return Conversation(RecordingHandler(), Policy(hostname="mx.test", extensions=extensions, **policy))


def test_keyword_parameter_and_verb_of_a_users_extension() -> None:
    conversation = talk(Tagging())
    ehlo = conversation.send("EHLO client.test")
    assert ehlo.lines[-1] == "XTAG v1"
    assert conversation.send("MAIL FROM:<a@example.org> TAG=Blue").code == 250
    assert conversation.protocol.session.envelope.mail_params == {"TAG": "blue"}
    assert conversation.handler.calls[-1].args[1] == {"TAG": "blue"}
    reply = conversation.send("XPING hello")
    assert (reply.code, reply.enhanced, reply.text) == (250, "2.0.0", "pong hello from 127.0.0.1")
    assert conversation.protocol.phase is Phase.SENDER  # the verb left the transaction as it was


def test_bad_value_unoffered_parameter_and_syntax() -> None:
    conversation = talk(Tagging())
    conversation.send("EHLO client.test")
    reply = conversation.send("MAIL FROM:<a@example.org> TAG=no_way")
    assert (reply.code, reply.enhanced) == (501, "5.5.4")
    reply = conversation.send("XPING")
    assert (reply.code, reply.text) == (501, "Syntax: XPING text")
    after_helo = talk(Tagging())
    after_helo.send("HELO client.test")  # nothing offered after HELO: the parameter and the verb are unknown
    assert after_helo.send("MAIL FROM:<a@example.org> TAG=x").code == 555
    assert after_helo.send("XPING hello").code == 500
    assert after_helo.handler.calls[-1].verb == "unknown"


def test_line_allowance() -> None:
    """A MAIL line longer than the standard extensions allow fits in the room the extension adds."""
    line = f"MAIL FROM:<a@example.org> NOTE={'n' * 1500}"
    conversation = talk(Tagging())
    conversation.send("EHLO client.test")
    assert conversation.send(line).code == 250
    assert conversation.send("RSET").code == 250
    assert conversation.send(line + "n" * 2200).text == "Line too long"
    plain = talk()
    plain.send("EHLO client.test")
    assert plain.send(line).text == "Line too long"


def test_rule_book_admits_the_verb_only_in_its_phases() -> None:
    again = talk(Restarting())
    again.send("EHLO client.test")
    again.send("MAIL FROM:<a@example.org>")
    reply = again.send("XAGAIN")
    assert (reply.code, reply.enhanced) == (503, "5.5.1")
    assert again.send("RSET").code == 250
    reply = again.send("XAGAIN")
    assert (reply.code, reply.enhanced, reply.text) == (220, None, "again")
    assert again.protocol.phase is Phase.CONNECTED
    assert again.send("MAIL FROM:<a@example.org>").code == 503  # greet again first
    assert again.send("EHLO client.test").code == 250


def test_standard_extensions_are_written_on_the_interface() -> None:
    policy = Policy(hostname="mx.test", dsn=True)
    offered = extensions_for(policy)
    assert [ext.keyword for ext in offered] == ["PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
                                                "CHUNKING", "BINARYMIME", "DSN"]
    for ext in offered:
        assert verifyObject(IExtension, ext)
    assert extensions_for(policy) is offered  # one set per policy, shared by its connections
    assert offered.get("dsn").keyword == "DSN"


def test_offer_rules() -> None:
    session = Session(hostname="mx.test")
    for offer, needs in ((Offer.TLS, "tls"), (Offer.AUTHENTICATED, "authenticated"), (Offer.TRUSTED, "trusted")):
        ext = type("E", (Extension,), {"offer": offer, "keyword": "X"})()
        assert not ext.offered(session, None)
        setattr(session, needs, "user" if needs == "authenticated" else True)
        assert ext.offered(session, None)
    assert not type("E", (Extension,), {"offer": Offer.BEFORE_TLS})().offered(session, None)


def test_conflicts_are_refused_when_the_policy_is_made() -> None:
    with pytest.raises(ValueError, match="PIPELINING is listed twice"):
        Policy(extensions=(Pipelining(),))
    with pytest.raises(ValueError, match="verb XPING is added by two extensions"):
        Policy(extensions=(Tagging(), type("Other", (Tagging,), {"name": "O", "keyword": "O"})()))
    with pytest.raises(ValueError, match="does not provide IExtension"):
        Policy(extensions=(object(),))


def test_resolve_names_and_classes() -> None:
    assert isinstance(resolve(f"{__name__}.Tagging"), Tagging)
    with pytest.raises(ExtensionError, match="unknown extension 'NOPE'"):
        resolve("NOPE")
    with pytest.raises(ExtensionError, match="does not provide IExtension"):
        resolve("os.path")
    with pytest.raises(ExtensionError, match="cannot import"):
        resolve("no.such.Module")
    assert "XCLIENT" in BUILT_IN


def test_trusted_networks() -> None:
    policy = Policy(trusted_networks=("127.0.0.0/8", "2001:db8::/32"))
    assert trusted(policy, "127.0.0.2") and trusted(policy, "::ffff:127.0.0.1") and trusted(policy, "2001:db8::1")
    assert not trusted(policy, "192.0.2.1") and not trusted(policy, "") and not trusted(Policy(), "127.0.0.1")
    with pytest.raises(ValueError, match="trusted_networks"):
        Policy(trusted_networks=("10.0.0.0/33",))
    assert Conversation(RecordingHandler(), policy, peer=("127.0.0.9", 1)).protocol.session.trusted
    assert not Conversation(RecordingHandler(), policy, peer=("192.0.2.9", 1)).protocol.session.trusted


def test_standard_list_follows_the_switches() -> None:
    names = [ext.keyword for ext in standard(Policy(pipelining=False, chunking=False, smtputf8=False))]
    assert names == ["SIZE", "8BITMIME", "ENHANCEDSTATUSCODES"]


def test_a_parser_that_fails() -> None:
    """A value a parser cannot take is the client's 501; a parser's own bug is logged and answered 451 4.3.0."""
    def broken(value: str | None, context: ParamContext) -> Any:
        return {}[value]

    class Numbers(Extension):
        name = keyword = "XNUM"
        mail_params = {"N": lambda value, context: int(value or ""), "BROKEN": broken}

    conversation = talk(Numbers())
    conversation.send("EHLO client.test")
    reply = conversation.send("MAIL FROM:<a@example.org> N=many")
    assert (reply.code, reply.enhanced, reply.text) == (501, "5.5.4", "Bad value for MAIL parameter N")
    reply = conversation.send("MAIL FROM:<a@example.org> BROKEN=x")
    assert (reply.code, reply.enhanced) == (451, "4.3.0")
    assert conversation.send("MAIL FROM:<a@example.org> N=7").code == 250  # the session goes on
    assert conversation.protocol.session.envelope.mail_params == {"N": 7}


def test_offered_after_auth_without_a_new_ehlo() -> None:
    """RFC 4954 clients do not greet again after AUTH: what AUTH makes available is usable at once."""
    from esmtpkit.server.sasl import portal_from_strings

    class Priority(Extension):
        name = keyword = "XAFTERAUTH"
        offer = Offer.AUTHENTICATED
        mail_params = {"XP": lambda value, context: value}

    conversation = talk(Priority(), portal=portal_from_strings(["memory:alice:secret"]), auth_require_tls=False)
    assert "XAFTERAUTH" not in conversation.send("EHLO client.test").lines
    assert conversation.send("MAIL FROM:<a@example.org> XP=1").code == 555
    assert conversation.send("AUTH PLAIN AGFsaWNlAHNlY3JldA==").code == 235
    assert conversation.send("MAIL FROM:<a@example.org> XP=1").code == 250


def test_keyword_less_parameters_follow_offered() -> None:
    class OnlyInTLS(Extension):
        name = "XNOKEYWORD"
        offer = Offer.TLS
        mail_params = {"NK": lambda value, context: value}

    conversation = talk(OnlyInTLS())
    conversation.send("EHLO client.test")
    assert conversation.send("MAIL FROM:<a@example.org> NK=1").code == 555


def test_verbs_and_parameters_cannot_be_taken_twice() -> None:
    with pytest.raises(ValueError, match="VRFY is a verb esmtpkit runs itself"):
        VerbSpec("vrfy", _ping)
    with pytest.raises(ValueError, match="bad verb name"):
        VerbSpec("X\u00e9", _ping)
    other = type("Other", (Extension,), {"name": "XO", "keyword": "XO", "mail_params": {"TAG": _tag.__call__}})()
    with pytest.raises(ValueError, match="parameter TAG is parsed by two extensions"):
        Policy(extensions=(Tagging(), other))
