"""`Front`: a handler in front of another, which holds each message until it has looked at the whole of it.

Every verb goes to the handler behind unchanged, except that the message content is held (in memory up to
``hold_in_memory`` octets, then in a temporary file, so memory stays bounded however large the message) and,
at the end of data, the front decides (`decide`): refuse the message (the handler behind is told ``abort``),
or pass it on with header fields added at the top and some removed. Passing on replays the content to the
handler behind in the content mode it asked for (PARSED, LINES or RAW) and in its chunk size, waiting on each
Deferred it returns and giving the reactor a turn after every `REPLAY_SLICE` octets it took at once (so one large
message does not hold up every other connection), then asks for its end-of-data reply, which is what the client
gets. Mail-authentication checks are a front (`esmtpkit.handlers.mailauth`); so can a filter be.

Removal streams: the whole header section, however long, is read one field at a time as it is replayed, so no
field past the part kept for `decide` (`MAX_HEAD`) escapes it. A field is held whole to be judged, so one longer
than `MAX_FIELD` (which the server's default header limit never lets through) gets the message refused
(`FIELD_TOO_LONG`) rather than passed on unjudged or judged on part of its value.
"""

from __future__ import annotations

import io
import re
import tempfile
from types import CoroutineType
from typing import IO, Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from zope.interface import alsoProvides, implementer

from esmtpkit.core.address import Address
from esmtpkit.core.content import EOH, ContentMode, ContentReader, HeaderEvent, HeaderSplitter
from esmtpkit.core.reply import Reply
from esmtpkit.core.session import Session
from esmtpkit.server.interfaces import IMessageHandler, ILMTPHandler, content_mode_of

__all__ = ["Front", "Decision", "HOLD_IN_MEMORY", "MAX_HEAD", "MAX_FIELD", "REPLAY_SLICE", "FIELD_TOO_LONG"]

#: Message octets held in memory before the rest goes to a temporary file.
HOLD_IN_MEMORY = 256 * 1024
#: The most octets of the header section kept aside for `decide` (the server's header limit is usually lower).
MAX_HEAD = 256 * 1024
#: The longest header field (all its lines) judged for removal; a longer one gets the message `FIELD_TOO_LONG`.
MAX_FIELD = 256 * 1024
#: Octets replayed to a handler that takes them at once before the reactor gets a turn.
REPLAY_SLICE = 256 * 1024
#: The reply to a message with a header field longer than `MAX_FIELD` when the front removes fields.
FIELD_TOO_LONG = Reply.of(552, f"Message header field too long to check (over {MAX_FIELD} octets)",
                          enhanced="5.3.4")
#: Replay reads the held message this many octets at a time.
_READ = 64 * 1024
#: The first line of a header field, as the server's parser reads it (`HeaderSplitter`).
_FIELD_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
#: The start of a line that may yet turn out to be a field's first line.
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*")
#: Any line end: a bare CR or LF (let through with ``bare_newline="allow"``) ends a line for some readers.
_ANY_LINE_END = re.compile(rb"\r\n|\r|\n")


class Decision:
    """What a front decided at the end of data: ``reply`` refuses the message (the handler behind never sees
    its end), else ``add`` (complete header fields, each ending in CRLF) go on top of it, the header fields
    for which ``remove(name, value)`` is true (raw octets, value unfolded) are left out, and ``edits``
    (`esmtpkit.filters.HeaderEdit` values: add at the end of the header section, insert, change, delete, with the
    milter protocol's positions, counted in the header section as received) are made."""

    __slots__ = ("reply", "add", "remove", "edits")

    def __init__(self, reply: Reply | None = None, add: Sequence[bytes] = (),
                 remove: Callable[[bytes, bytes], bool] | None = None, edits: Sequence[Any] = ()) -> None:
        self.reply = reply
        self.add = tuple(add)
        self.remove = remove
        self.edits = tuple(edits)


class _TooLong(Exception):
    """A header field longer than `MAX_FIELD`."""


class _EditPlan:
    """Header edits (`esmtpkit.filters.HeaderEdit`) made ready to apply in one pass over the header section as
    received. Positions and field counts are those of the section as received; of several edits to the same field
    (a ``change`` or ``delete`` of the same name and index, or a ``delete`` of every field of that name) the last
    one wins; a ``change`` or ``delete`` with index 0 means the first field of that name, but ``delete`` with index
    0 every one; a ``change`` of a field the section does not have adds it at the end; what goes at the end (adds,
    such changes, inserts past the last field) goes in the order of the edits."""

    def __init__(self, edits: Sequence[Any]) -> None:
        self._inserts: dict[int, list[tuple[int, bytes]]] = {}
        self._adds: list[tuple[int, bytes]] = []
        self._targets: dict[tuple[bytes, int], tuple[int, Any]] = {}
        self._every: dict[bytes, int] = {}
        for order, edit in enumerate(edits):
            name = edit.name.lower().encode("ascii")
            if edit.kind == "add":
                self._adds.append((order, edit.line))
            elif edit.kind == "insert":
                self._inserts.setdefault(edit.index, []).append((order, edit.line))
            elif edit.kind == "delete" and edit.index == 0:
                self._every[name] = order
                self._targets = {k: v for k, v in self._targets.items() if k[0] != name}
            else:
                self._targets[(name, max(edit.index, 1))] = (order, edit)

    def before(self, position: int) -> bytes:
        """The fields to insert before the field at ``position``."""
        return b"".join(line for _, line in self._inserts.pop(position, ()))

    def field(self, name: bytes, count: int) -> tuple[bool, bytes]:
        """For the ``count``-th field named ``name`` (lower case): whether an edit decides it, and what replaces it
        (nothing, to remove it)."""
        target = self._targets.pop((name, count), None)
        every = self._every.get(name)
        if target is None:
            return (True, b"") if every is not None else (False, b"")
        edit = target[1]
        if edit.kind == "delete" or not edit.value:
            return True, b""
        return True, edit.line

    def tail(self) -> bytes:
        """What goes after the last field, in the order of the edits: the inserts past it, the changes of fields
        it did not have, the added fields."""
        late = [item for items in self._inserts.values() for item in items] + self._adds
        late += [(order, edit.line) for order, edit in self._targets.values() if edit.kind == "change" and edit.value]
        return b"".join(line for _, line in sorted(late))


class _Remover:
    """The header section, fed in pieces, without the fields ``remove`` picks (raw name, value unfolded).

    One field is held at a time (at most ``limit`` octets, else `_TooLong`); the section ends where the server's
    parser ends it (an empty line, or a line that is neither a field nor a continuation) and what follows passes
    as it is. A field holding a bare CR or LF is also judged on each line those split it into, since a reader
    that ends lines there sees more fields than the server did."""

    def __init__(self, remove: Callable[[bytes, bytes], bool] | None, limit: int = MAX_FIELD,
                 edits: Sequence[Any] = ()) -> None:
        self.remove = remove if remove is not None else (lambda name, value: False)
        self.limit = limit
        self.done = False
        self._field = bytearray()
        self._line = b""
        self._plan = _EditPlan(edits) if edits else None
        self._position = 0  # the fields of the section as received, so far
        self._seen: dict[bytes, int] = {}  # of each field name (lower case)

    def feed(self, data: bytes) -> bytes:
        """What of ``data`` (and what was held back) can go on now."""
        if self.done:
            return data
        buf = self._line + data if self._line else data
        out = bytearray()
        at = 0
        while True:
            end = buf.find(b"\r\n", at)
            if end < 0:
                break
            if not self._take(buf[at:end + 2], out):
                out += buf[end + 2:]
                self._line = b""
                return bytes(out)
            at = end + 2
        self._line = buf[at:]
        if len(self._field) + len(self._line) > self.limit:
            line = self._line
            if (line[0] in (32, 9) and self._field) or _FIELD_START.match(line) or _FIELD_NAME.fullmatch(line):
                raise _TooLong()
            self._flush(out)  # a long line that cannot be a field: the section ended before it
            self._tail(out, line)
            out += line
            self._line = b""
            self.done = True
        return bytes(out)

    def end(self) -> bytes:
        """The content ended (BDAT content may end without CRLF): what was held back."""
        out = bytearray()
        if not self.done:
            line, self._line = self._line, b""
            if not line or self._take(line, out):
                self._flush(out)
                self._tail(out, b"")
            self.done = True
        return bytes(out)

    def _take(self, line: bytes, out: bytearray) -> bool:
        """One line (with its CRLF, unless it is the content's last): False when it ended the section."""
        if line[0] in (32, 9) and self._field:
            if len(self._field) + len(line) > self.limit:
                raise _TooLong()
            self._field += line
            return True
        self._flush(out)
        if line != b"\r\n" and _FIELD_START.match(line):
            if len(line) > self.limit:
                raise _TooLong()
            self._field = bytearray(line)
            return True
        self._tail(out, line)
        out += line
        self.done = True
        return False

    def _flush(self, out: bytearray) -> None:
        field = bytes(self._field)
        self._field = bytearray()
        if not field:
            return
        plan = self._plan
        if plan is None:
            if not self._picked(field):
                out += field
            return
        out += plan.before(self._position)
        self._position += 1
        name = field.partition(b":")[0].strip().lower()
        count = self._seen[name] = self._seen.get(name, 0) + 1
        found, replacement = plan.field(name, count)
        if found:
            out += replacement
        elif not self._picked(field):
            out += field

    def _tail(self, out: bytearray, ending: bytes) -> None:
        """The section ends before ``ending``: what the edits put after its last field goes there (with an empty
        line, if ``ending`` was not one)."""
        plan, self._plan = self._plan, None
        if plan is None:
            return
        tail = plan.tail()
        if tail and out and not out.endswith(b"\r\n"):
            out += b"\r\n"  # the content ended inside its last field (BDAT need not end in CRLF)
        out += tail
        if tail and ending != b"\r\n":
            out += b"\r\n"

    def _picked(self, field: bytes) -> bool:
        name, _, value = field.partition(b":")
        if self.remove(name.strip(), b" ".join(value.split())):
            return True
        if field.count(b"\r") == field.count(b"\n") == field.count(b"\r\n"):
            return False
        for line in _ANY_LINE_END.split(field)[1:]:
            if _FIELD_START.match(line):
                name, _, value = line.partition(b":")
                if self.remove(name.strip(), b" ".join(value.split())):
                    return True
        return False


class _Turns:
    """Gives the reactor a turn once ``size`` octets went to the handler behind without it making the replay
    wait (a Deferred not yet fired is a wait, and a turn)."""

    def __init__(self, clock: IReactorTime, size: int) -> None:
        self.clock = clock
        self.size = max(1, size)
        self.since = 0
        self._waited = False

    def waited(self) -> None:
        self._waited = True

    async def passed(self, octets: int) -> None:
        """``octets`` more went on: wait for a turn if a slice of them did without one."""
        if self._waited:
            self._waited, self.since = False, 0
            return
        self.since += octets
        if self.since >= self.size:
            self.since = 0
            await deferLater(self.clock, 0, lambda: None)


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
    #: Octets replayed to a handler that takes them at once before the reactor gets a turn.
    replay_slice: int = REPLAY_SLICE

    def __init__(self, behind: Any, clock: IReactorTime | None = None) -> None:
        if not IMessageHandler.providedBy(behind):
            raise TypeError(f"{behind!r} does not provide IMessageHandler")
        self.behind = behind
        #: Where the replay waits for its turns (the global reactor when None).
        self.clock = clock
        self.session: Session | None = None
        self._memory = bytearray()
        self._file: Any = None
        self._head = bytearray()
        self._head_done = False
        #: The connection has ended (`connection_lost`).
        self.lost = False
        self._ending = False
        self._told_lost = False
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

    def connection_lost(self) -> None:
        """The connection ended: the handler behind is told too, if it listens; while the end of a message is
        being decided or passed on, only once that has stopped (the message then goes no further: the client
        never heard it was taken, so it will send it again)."""
        self.lost = True
        if not self._ending or isinstance(self.behind, Front):
            self._tell_lost()  # a front behind holds its own handler back the same way, and calls off its work now

    def _tell_lost(self) -> None:
        if self._told_lost:
            return
        self._told_lost = True
        lost = getattr(self.behind, "connection_lost", None)
        if lost is not None:
            lost()

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
                self._head_done = True
            elif len(self._head) >= MAX_HEAD:
                head = _fields_only(bytes(self._head))
                self._head = bytearray(head[:head.rfind(b"\r\n") + 2] if b"\r\n" in head else b"")
                self._head_done = True
        return None

    def _whole_head(self) -> None:
        self._head = bytearray(_fields_only(bytes(self._head)))
        self._head_done = True

    @property
    def head(self) -> bytes:
        """The held message's header section (its first `MAX_HEAD` octets, in whole lines, when it is longer), each
        field with its CRLF."""
        return bytes(self._head)

    @property
    def held_size(self) -> int:
        """The octets of the held message so far."""
        if self._file is None:
            return len(self._memory)
        self._file.flush()
        return self._file.tell()

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
        self._head_done = False
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
        self._ending = True
        try:
            return await self._ended(per_recipient)
        finally:
            self._ending = False
            if self.lost:
                self._tell_lost()

    async def _ended(self, per_recipient: bool) -> Any:
        if not self._head_done:
            self._whole_head()  # no empty line: the whole message is its header section
        try:
            decision = await _settled(self.decide())
        except BaseException:
            self._drop()
            self.behind.abort("the front in front of the handler failed")
            raise
        if self.lost:
            return self._gone()
        if decision.reply is not None:
            return self._refuse(decision.reply, per_recipient)
        try:
            await self._replay(decision.add, decision.remove, decision.edits)
        except _TooLong:
            return self._refuse(FIELD_TOO_LONG, per_recipient)
        except BaseException:
            self._drop()
            self.behind.abort("passing the message on failed")
            raise
        if self.lost:
            return self._gone()
        self._drop()
        if per_recipient:
            return await _settled(self.behind.eom_per_recipient())
        return await _settled(self.behind.eom())

    def _gone(self) -> None:
        """The connection ended before the message was passed on: the handler behind drops it."""
        self._drop()
        self.behind.abort("connection lost")

    def _refuse(self, reply: Reply, per_recipient: bool) -> Any:
        self._drop()
        self.behind.abort(f"refused: {reply.code} {reply.enhanced or ''}".strip())
        if per_recipient and self.session is not None:
            return [reply] * len(self.session.envelope.recipients)
        return reply

    async def _replay(self, add: Sequence[bytes], remove: Callable[[bytes, bytes], bool] | None,
                      edits: Sequence[Any] = ()) -> None:
        behind = self.behind
        mode = content_mode_of(behind)
        size = getattr(behind, "chunk_size", None) or 65536
        reader = ContentReader(mode, size, dotted=False, check_bare=False)
        if self.clock is None:
            from twisted.internet import reactor as clock
        else:
            clock = self.clock
        turns = _Turns(clock, self.replay_slice)

        async def give(events: list[Any]) -> None:
            for event in events:
                if type(event) is bytes:
                    result = behind.body(event)
                elif isinstance(event, HeaderEvent):
                    result = behind.header(event.name, event.value)
                elif event is EOH:
                    result = behind.eoh()
                else:
                    continue
                if isinstance(result, Deferred) and not result.called:
                    turns.waited()
                await _settled(result)

        for field in add:
            await give(reader.feed(field))
        remover = _Remover(remove, edits=edits) if remove is not None or edits else None
        with self.open_held() as stream:
            while True:
                piece = stream.read(min(_READ, turns.size))
                if not piece:
                    break
                await give(reader.feed(remover.feed(piece) if remover is not None else piece))
                await turns.passed(len(piece))
            if remover is not None:
                await give(reader.feed(remover.end()))
        await give(reader.end())
