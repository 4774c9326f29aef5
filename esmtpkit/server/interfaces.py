"""The handler contract: `IMessageHandler` decides the reply to every SMTP verb on one connection.

Verbs are the Pythonic names of Apache2::Protocol::ESMTP's methods (CONNECT, HELO, ... QUIT, UNKNOWN). A verb that
answers the client may return a `Reply`, a ``(code, *lines)`` tuple, a Deferred or a coroutine of either, or raise
`SMTPReply`; any other exception becomes ``451 4.3.0`` and is logged, and the session goes on. ``header``, ``eoh``
and ``body`` answer nothing; they may return a Deferred, during which the connection is paused (backpressure).
STARTTLS and AUTH are the protocol's own; the handler reads their outcome on the `esmtpkit.core.session.Session`.

Every verb has a default in `esmtpkit.handlers.base.MessageHandler`, so a subclass implements only the verbs it
cares about. A provider written from scratch must have them all, and the attributes ``content_mode`` (or the
seed's ``chunk_mode``), ``chunk_size`` and ``disconnect``; LMTP servers may add `ILMTPHandler`.
"""

from __future__ import annotations

import weakref
from typing import Any

from zope.interface import Attribute, Interface

from esmtpkit.core.content import ContentMode

__all__ = ["IMessageHandler", "ILMTPHandler", "ContentMode", "content_mode_of"]

#: The seed's ``chunk_mode`` values and the content modes they stand for.
_CHUNK_MODES = {None: ContentMode.PARSED, False: ContentMode.LINES, True: ContentMode.RAW}


def content_mode_of(handler: Any) -> ContentMode:
    """How ``handler`` wants message content: ``content_mode``, or what the seed's ``chunk_mode`` means.

    Whichever of the two the most specific place sets wins (the instance, then its class, then each base class in
    turn), so a subclass that sets ``chunk_mode`` keeps it even where a base class set ``content_mode``.
    """
    own = getattr(handler, "__dict__", None)
    if own and ("content_mode" in own or "chunk_mode" in own):
        return _mode_in((own, *(vars(cls) for cls in type(handler).__mro__)))
    kind = type(handler)
    mode = _BY_CLASS.get(id(kind))
    if mode is None:
        mode = _BY_CLASS[id(kind)] = _mode_in([vars(cls) for cls in kind.__mro__])
        weakref.finalize(kind, _BY_CLASS.pop, id(kind), None)
    return mode


#: Each handler class's content mode, worked out once (it is asked for every message; class attributes are read
#: the first time, an instance's own are read every time). Keyed by id, the entry dropped with its class: a plain
#: dict lookup costs a fraction of a WeakKeyDictionary's.
_BY_CLASS: dict[int, ContentMode] = {}


def _mode_in(places: Any) -> ContentMode:
    for place in places:
        mode = place.get("content_mode")
        if mode is not None:
            return ContentMode(mode)
        if "chunk_mode" in place:
            return _CHUNK_MODES.get(place["chunk_mode"], ContentMode.PARSED)
    return ContentMode.PARSED


class IMessageHandler(Interface):
    """Decides the reply to every SMTP verb on one connection. One provider is made per connection.

    A provider may also have a ``connection_lost()`` method (not required, so not declared here): it is called
    once the connection has ended, however it ended (after ``abort`` for an open transaction), to release what
    the handler holds for the connection, such as its own connections to other servers.
    """

    session = Attribute(
        "The `esmtpkit.core.session.Session` given to connect(), kept for the connection's life (MessageHandler"
        " keeps it). It is the same object throughout: the envelope, TLS and AUTH state on it change as the"
        " dialogue goes on."
    )
    content_mode = Attribute(
        "How message content reaches the handler, a `ContentMode`, read when DATA or the first BDAT is accepted."
        " PARSED: header lines are unfolded and given to header() one by one, then eoh(), then the rest arrives"
        " through body() in raw chunks of at most chunk_size bytes. LINES: as PARSED, but one body() call per line,"
        " CRLF included (a line longer than chunk_size arrives in chunk_size pieces). RAW: the whole message,"
        " headers included, arrives through body() in raw chunks (header() and eoh() are not called). None (the"
        " default): decided by chunk_mode."
    )
    chunk_mode = Attribute(
        "The seed's chunkmode, still honoured where content_mode is None: None (the default) means PARSED, True"
        " RAW and False LINES."
    )
    chunk_size = Attribute(
        "The largest chunk passed to body(), in bytes; None (the default) means the policy's chunk_size (64 KiB"
        " unless configured). Read at DATA/BDAT time."
    )
    disconnect = Attribute(
        "When set true, the connection is closed once the reply being written is sent (after the current operation)."
        " By default the connection closes only after QUIT."
    )

    def connect(session):  # type: ignore[no-untyped-def]
        """A client connected; ``session`` (an `esmtpkit.core.session.Session`) describes it for the connection's life.

        Default: ``220 ESMTP Mail Server``. The protocol puts the server's hostname before the text, as RFC 5321
        §4.3.1 requires. A 421 reply closes the connection; a 554 reply refuses service: every later command but
        QUIT gets 503.
        """

    def helo(domain):  # type: ignore[no-untyped-def]
        """HELO ``domain`` (RFC 5321 §4.1.1.1): the name the client claims. Default: ``250 OK``.

        The protocol puts the server's hostname before the first text line. A positive reply resets any transaction.
        """

    def ehlo(domain):  # type: ignore[no-untyped-def]
        """EHLO ``domain`` (and LHLO in LMTP mode, RFC 2033 §4.1). Default: ``250 <domain>, pleased to meet you``
        and ``HELP``.

        The protocol puts the server's hostname before the first line and appends the ESMTP keywords it offers
        (PIPELINING, SIZE, ...) after the handler's lines; extra lines a handler returns are extra keywords.
        """

    def mail(sender, params):  # type: ignore[no-untyped-def]
        """MAIL FROM (RFC 5321 §4.1.1.2). ``sender`` is an `Address` (``""`` for ``<>``), ``params`` a dict of ESMTP
        parameters with parsed values: ``SIZE`` an int, ``BODY`` a str (7BIT, 8BITMIME, BINARYMIME), ``SMTPUTF8``
        True, ``AUTH`` the submitter's mailbox or ``"<>"`` (always ``"<>"`` unless the client authenticated,
        RFC 4954 §5); with DSN offered, ``RET`` (`esmtpkit.core.dsn.Ret`) and ``ENVID`` (str, decoded). Default:
        ``250 <sender>, sender ok``. A positive reply opens the transaction.
        """

    def rcpt(recipient, params):  # type: ignore[no-untyped-def]
        """RCPT TO (RFC 5321 §4.1.1.3). ``recipient`` is an `Address`; ``params`` parsed as for mail(): with DSN
        offered, ``NOTIFY`` (`esmtpkit.core.dsn.Notify`) and ``ORCPT`` (`esmtpkit.core.dsn.OriginalRecipient`). Default:
        ``250 <recipient>, recipient ok``. Only recipients answered positively are added to the envelope.
        """

    def data():  # type: ignore[no-untyped-def]
        """DATA, after at least one recipient, or the first BDAT chunk (RFC 3030). Default:
        ``354 Enter mail, end with "." on a line by itself``.

        After DATA a 354 reply starts the message; any other reply leaves the transaction open. For BDAT any
        positive reply lets the content start and is not sent (the chunk is answered 250); any other reply
        answers that chunk, after its octets were read, and ends the transaction (abort() follows).
        """

    def header(name, value):  # type: ignore[no-untyped-def]
        """One message header, unfolded; ``value`` has surrounding whitespace stripped. No reply is sent.

        Called in order, before eoh(), unless chunk_mode is True. May return a Deferred (the client is paused).
        """

    def eoh():  # type: ignore[no-untyped-def]
        """The end of the headers: the empty line, or the first line that is not a header. No reply is sent."""

    def body(chunk):  # type: ignore[no-untyped-def]
        """A chunk of message content (``bytes``, dot-unstuffed, CRLF line ends kept). No reply is sent.

        After DATA the content ends with the CRLF that precedes the final dot; after BDAT it is the chunks' octets
        as sent (never unstuffed) and ends where the last chunk ends, with or without CRLF. May return a Deferred:
        the connection is paused until it fires, so a slow store never makes the server buffer the message.
        """

    def eom():  # type: ignore[no-untyped-def]
        """The end of the message (``.`` alone on a line, or BDAT LAST). Default: ``250 Message accepted for delivery``.

        A 2xx reply here promises the client the message is safe with the handler: only give it once it is.
        In LMTP mode (RFC 2033 §4.2) the client gets one reply per recipient; this reply answers for all of them,
        unless the handler provides `ILMTPHandler`.
        """

    def abort(reason):  # type: ignore[no-untyped-def]
        """The transaction was dropped before eom() was asked (RSET, HELO/EHLO, QUIT, connection lost, timeout,
        size limit, bad content, a failure in header()/body(), a refused or failed BDAT chunk). Discard
        anything kept for it. ``reason`` is a short text for logs. No reply is sent; the return value is ignored.
        Called at most once per transaction, and never after eom().
        """

    def expn(argument):  # type: ignore[no-untyped-def]
        """EXPN ``argument`` (RFC 5321 §4.1.1.7). Default: ``502 Sorry we don't allow this operation``."""

    def vrfy(argument):  # type: ignore[no-untyped-def]
        """VRFY ``argument`` (RFC 5321 §4.1.1.6). Default: ``252 Cannot VRFY user; try RCPT to attempt delivery``."""

    def noop():  # type: ignore[no-untyped-def]
        """NOOP. Default: ``250 OK``."""

    def rset():  # type: ignore[no-untyped-def]
        """RSET: the transaction (if any) was already aborted. Default: ``250 OK``. The protocol resets the envelope
        whatever the reply is (RFC 5321 §4.1.1.5).
        """

    def help(topic):  # type: ignore[no-untyped-def]
        """HELP [topic]; ``topic`` is None without an argument. Default: ``214 This is SMTP::Proxy 1.0`` (the
        seed's reply, word for word)."""

    def quit():  # type: ignore[no-untyped-def]
        """QUIT. Default: ``221 Closing connection``. The connection is closed after this reply, whatever it is."""

    def unknown(command):  # type: ignore[no-untyped-def]
        """A command line esmtpkit does not implement (or an extension verb that is not enabled: STARTTLS without
        a TLS context, AUTH without a portal, BDAT where CHUNKING was not offered, LHLO outside LMTP), as received.

        Default: ``500 Command unrecognized: <line>``. A handler may implement its own verbs here.
        """


class ILMTPHandler(IMessageHandler):
    """An LMTP handler that answers each recipient on its own (RFC 2033 §4.2), as a delivery agent must when one
    mailbox is full and the others are not. Optional: without it, eom()'s one reply answers for every recipient."""

    def eom_per_recipient():  # type: ignore[no-untyped-def]
        """The end of the message, on an LMTP server: return a sequence with one reply per recipient of
        ``session.envelope.recipients``, in that order (or a Deferred or coroutine of one). Called instead of eom().
        A 2xx for a recipient promises that recipient's copy is safe.
        """
