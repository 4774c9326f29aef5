"""`Front`: a handler in front of another, which holds each message until it has looked at the whole of it.

Every verb goes to the handler behind unchanged, except that the message content is held (in memory up to
``hold_in_memory`` octets, then in a temporary file, so memory stays bounded however large the message) and,
at the end of data, the front decides (`decide`): refuse the message (the handler behind is told ``abort``),
or pass it on with header fields added at the top. Passing on replays the content to the handler behind in the
content mode it asked for (PARSED, LINES or RAW) and in its chunk size, waiting on each Deferred it returns,
then asks for its end-of-data reply, which is what the client gets. Mail-authentication checks are a front
(`esmtpkit.handlers.mailauth`); so can a filter be.
"""

from __future__ import annotations

import io
import tempfile
from types import CoroutineType
from typing import IO, Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred
from zope.interface import alsoProvides, implementer

from esmtpkit.core.address import Address
from esmtpkit.core.content import EOH, ContentMode, ContentReader, HeaderEvent, HeaderSplitter
from esmtpkit.core.reply import Reply
from esmtpkit.core.session import Session
from esmtpkit.server.interfaces import IMessageHandler, ILMTPHandler, content_mode_of

__all__ = ["Front", "Decision", "HOLD_IN_MEMORY", "MAX_HEAD"]

#: Message octets held in memory before the rest goes to a temporary file.
HOLD_IN_MEMORY = 256 * 1024
#: The most octets of the header section kept aside for `decide` (the server's header limit is usually lower).
MAX_HEAD = 256 * 1024
#: Replay reads the held message this many octets at a time.
_READ = 64 * 1024


class Decision:
    """What a front decided at the end of data: ``reply`` refuses the message (the handler behind never sees
    its end), else ``add`` (complete header fields, each ending in CRLF) go on top of it, and the header fields
    for which ``remove(name, value)`` is true (raw octets, value unfolded) are left out."""

    __slots__ = ("reply", "add", "remove")

    def __init__(self, reply: Reply | None = None, add: Sequence[bytes] = (),
                 remove: Callable[[bytes, bytes], bool] | None = None) -> None:
        self.reply = reply
        self.add = tuple(add)
        self.remove = remove


def _without(head: bytes, remove: Callable[[bytes, bytes], bool]) -> bytes:
    """The header section ``head`` without the fields ``remove`` picks (each field with its continuation lines).
    Its last line may lack its CRLF (BDAT content that ends in its header section)."""
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    kept = []
    for number, field in enumerate(fields, 1):
        name, colon, value = field.partition(b":")
        if colon and remove(name.strip(), b" ".join(value.split())):
            continue
        kept.append(field if number == len(fields) else field + b"\r\n")  # the last: b"" after a CRLF
    return b"".join(kept)


def _fields_only(head: bytes) -> bytes:
    """``head`` up to its first line that is neither a header field nor a continuation: where the server's own
    parser (and so the handler behind) takes the body to start."""
    splitter = HeaderSplitter()
    at = 0
    while at < len(head):
        end = head.find(b"\r\n", at)
        end = len(head) if end < 0 else end
        if splitter.line(head[at:end])[1]:
            return head[:at]
        at = end + 2
    return head


async def _settled(result: Any) -> Any:
    if isinstance(result, CoroutineType):
        return await result
    if isinstance(result, Deferred):
        return await result
    return result


@implementer(IMessageHandler)
class Front:
    """Passes every verb to ``behind`` and holds the message for `decide`; subclass it and override `decide`
    (and any verb, calling the handler behind yourself)."""

    content_mode = ContentMode.RAW
    chunk_mode = None
    chunk_size: int | None = None
    #: Octets kept in memory before the held message goes to a temporary file.
    hold_in_memory: int = HOLD_IN_MEMORY

    def __init__(self, behind: Any) -> None:
        if not IMessageHandler.providedBy(behind):
            raise TypeError(f"{behind!r} does not provide IMessageHandler")
        self.behind = behind
        self.session: Session | None = None
        self._memory = bytearray()
        self._file: Any = None
        self._head = bytearray()
        self._head_done = self._head_whole = False
        if ILMTPHandler.providedBy(behind):
            alsoProvides(self, ILMTPHandler)

    @property
    def disconnect(self) -> bool:  # type: ignore[override]
        """The handler behind's: set either to close the connection after the current reply."""
        return bool(getattr(self.behind, "disconnect", False))

    @disconnect.setter
    def disconnect(self, value: bool) -> None:
        self.behind.disconnect = value

    # ---- verbs passed on ---------------------------------------------------------------------------------------

    def connect(self, session: Session) -> Any:
        self.session = session
        return self.behind.connect(session)

    def helo(self, domain: str) -> Any:
        return self.behind.helo(domain)

    def ehlo(self, domain: str) -> Any:
        return self.behind.ehlo(domain)

    def mail(self, sender: Address, params: Mapping[str, Any]) -> Any:
        return self.behind.mail(sender, params)

    def rcpt(self, recipient: Address, params: Mapping[str, Any]) -> Any:
        return self.behind.rcpt(recipient, params)

    def data(self) -> Any:
        self._drop()
        return self.behind.data()

    def expn(self, argument: str) -> Any:
        return self.behind.expn(argument)

    def vrfy(self, argument: str) -> Any:
        return self.behind.vrfy(argument)

    def noop(self) -> Any:
        return self.behind.noop()

    def rset(self) -> Any:
        return self.behind.rset()

    def help(self, topic: str | None) -> Any:
        return self.behind.help(topic)

    def quit(self) -> Any:
        return self.behind.quit()

    def unknown(self, command: str) -> Any:
        return self.behind.unknown(command)

    def abort(self, reason: str) -> Any:
        self._drop()
        self.aborted(reason)
        return self.behind.abort(reason)

    def aborted(self, reason: str) -> None:
        """The transaction was dropped: forget anything kept for it (the handler behind is told next)."""

    # ---- the content, held ------------------------------------------------------------------------------------

    def header(self, name: str, value: str) -> Any:
        return None  # RAW: never called

    def eoh(self) -> Any:
        return None

    def body(self, chunk: bytes) -> Any:
        if self._file is not None:
            self._file.write(chunk)
        else:
            self._memory += chunk
            if len(self._memory) > self.hold_in_memory:
                self._file = tempfile.NamedTemporaryFile(prefix="esmtpkit-held-")
                self._file.write(self._memory)
                self._memory = bytearray()
        if not self._head_done:
            start = max(0, len(self._head) - 3)
            self._head += chunk[:MAX_HEAD - len(self._head)]
            end = self._head.find(b"\r\n\r\n", start)
            if end >= 0:
                del self._head[end + 2:]
                self._whole_head()
            elif self._head.startswith(b"\r\n"):
                self._head.clear()
                self._head_done = self._head_whole = True
            elif len(self._head) >= MAX_HEAD:
                self._head_done = True
        return None

    def _whole_head(self) -> None:
        self._head = bytearray(_fields_only(bytes(self._head)))
        self._head_done = self._head_whole = True

    @property
    def head(self) -> bytes:
        """The held message's header section (up to `MAX_HEAD` octets), each field with its CRLF."""
        return bytes(self._head)

    def open_held(self) -> IO[bytes]:
        """A new reader of the whole held message, with its own position (another thread may use it)."""
        if self._file is None:
            return io.BytesIO(bytes(self._memory))
        self._file.flush()
        return open(self._file.name, "rb")

    def _drop(self) -> None:
        held, self._file = self._file, None
        self._memory = bytearray()
        self._head = bytearray()
        self._head_done = self._head_whole = False
        if held is not None:
            held.close()

    # ---- the end of data -------------------------------------------------------------------------------------

    def decide(self) -> "Decision | Deferred[Decision]":
        """What to do with the held message (`head`, `open_held`): pass it on unchanged by default."""
        return Decision()

    def eom(self) -> Any:
        return Deferred.fromCoroutine(self._end(per_recipient=False))

    def eom_per_recipient(self) -> Any:
        return Deferred.fromCoroutine(self._end(per_recipient=True))

    async def _end(self, per_recipient: bool) -> Any:
        if not self._head_done:
            self._whole_head()  # no empty line: the whole message is its header section
        try:
            decision = await _settled(self.decide())
        except BaseException:
            self._drop()
            self.behind.abort("the front in front of the handler failed")
            raise
        if decision.reply is not None:
            self._drop()
            self.behind.abort(f"refused: {decision.reply.code} {decision.reply.enhanced or ''}".strip())
            if per_recipient and self.session is not None:
                return [decision.reply] * len(self.session.envelope.recipients)
            return decision.reply
        try:
            await self._replay(decision.add, decision.remove)
        except BaseException:
            self._drop()
            self.behind.abort("passing the message on failed")
            raise
        self._drop()
        if per_recipient:
            return await _settled(self.behind.eom_per_recipient())
        return await _settled(self.behind.eom())

    async def _replay(self, add: Sequence[bytes], remove: Callable[[bytes, bytes], bool] | None) -> None:
        behind = self.behind
        mode = content_mode_of(behind)
        size = getattr(behind, "chunk_size", None) or 65536
        reader = ContentReader(mode, size, dotted=False, check_bare=False)

        async def give(events: list[Any]) -> None:
            for event in events:
                if type(event) is bytes:
                    await _settled(behind.body(event))
                elif isinstance(event, HeaderEvent):
                    await _settled(behind.header(event.name, event.value))
                elif event is EOH:
                    await _settled(behind.eoh())

        for field in add:
            await give(reader.feed(field))
        with self.open_held() as stream:
            if remove is not None and self._head_whole and self._head:
                head = stream.read(len(self._head))
                await give(reader.feed(_without(head, remove)))
            while True:
                piece = stream.read(_READ)
                if not piece:
                    break
                await give(reader.feed(piece))
        await give(reader.end())
