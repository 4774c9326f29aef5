"""twistd's log lines, text or JSON (``--log-format json``: one JSON object per line), written cheaply.

twistd picks its log observer before the service exists, through its ``--logger`` option (a factory called with
no arguments). `use_json` records where the log goes (twistd's ``--logfile`` and ``-n``) and returns the name
of `json_observer`, which the esmtpkit options hand to twistd as that factory (`use_text` does the same for
`text_observer`, twistd's own text lines). The observers here write what Twisted's would, byte for byte, but an
event that carries its ``log_flattened`` values (every `esmtpkit.server.monitor.EventLog` event does) is
formatted without parsing its format string, and the text line's time prefix is computed once a second: see
docs/performance.md.
"""

from __future__ import annotations

import json
import sys
from math import floor
from string import Formatter
from typing import IO, Any, Callable

from twisted.logger import (FileLogObserver, ILogObserver, Logger, LogLevel, eventAsJSON, formatEvent,
                            formatEventAsClassicLogText, formatTime)

__all__ = ["use_json", "json_observer", "json_lines_observer", "use_text", "text_observer", "text_lines_observer",
           "event_text", "event_json", "classic_line"]

_destination: dict[str, Any] = {"logfile": None, "nodaemon": True}

#: How many distinct format strings the fast paths remember; beyond that, events are formatted by Twisted.
_MEMORY = 512

#: log_format -> ((literal text, flattened key or None), ...), or None when Twisted must format it.
_compiled: dict[str, tuple[tuple[str, str | None], ...] | None] = {}


def _compile(format: str) -> tuple[tuple[str, str | None], ...] | None:
    """``format`` as literal text and ``log_flattened`` keys (``name!s:``), if every field is a plain name used once."""
    parts: list[tuple[str, str | None]] = []
    names: set[str] = set()
    for literal, name, spec, conversion in Formatter().parse(format):
        if name is None:
            parts.append((literal, None))
            continue
        if spec or conversion or not name.isidentifier() or name in names:
            return None
        names.add(name)
        parts.append((literal, f"{name}!s:"))
    return tuple(parts)


def _parts(event: dict[str, Any]) -> tuple[tuple[str, str | None], ...] | None:
    """The compiled ``log_format`` of a flattened event whose flattening covers every field, else None."""
    flat, format = event.get("log_flattened"), event.get("log_format")
    if flat is None or type(format) is not str:
        return None
    parts = _compiled.get(format, False)
    if parts is False:
        parts = _compile(format)
        if len(_compiled) < _MEMORY:
            _compiled[format] = parts
    if parts is None:
        return None
    for _, key in parts:
        if key is not None and (key not in flat or key[:-2] + ":" not in flat):
            return None
    return parts


def _text(event: dict[str, Any], parts: tuple[tuple[str, str | None], ...]) -> str:
    flat = event["log_flattened"]
    return "".join([literal if key is None else literal + str(flat[key]) for literal, key in parts])


def event_text(event: dict[str, Any]) -> str:
    """What `twisted.logger.formatEvent` returns for ``event``, without parsing the format of an event that
    carries its ``log_flattened`` values (as `esmtpkit.server.monitor.EventLog` events do)."""
    parts = _parts(event)
    return formatEvent(event) if parts is None else _text(event, parts)


class _Clock:
    """`twisted.logger.formatTime` (RFC 3339, to the second), computed once per second of ``log_time``."""

    def __init__(self) -> None:
        self.second: int | None = None
        self.text = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = floor(when)
        if second != self.second:
            self.text, self.second = formatTime(second), second
        return self.text


_systems: dict[tuple[Any, Any], str] = {}


def classic_line(event: dict[str, Any], clock: Callable[[float | None], str] = formatTime) -> str | None:
    """What `twisted.logger.formatEventAsClassicLogText` returns for ``event`` (twistd's text log line, with its
    newline), the fast way for a flattened event without ``log_system`` or ``log_failure``."""
    namespace, level = event.get("log_namespace", "-"), event.get("log_level")
    if "log_system" in event or "log_failure" in event or type(namespace) is not str:
        return formatEventAsClassicLogText(event, formatTime=clock)
    text = event_text(event)
    if not text:
        return None
    try:
        system = _systems.get((namespace, level))
    except TypeError:  # a level that is no LogLevel
        return formatEventAsClassicLogText(event, formatTime=clock)
    if system is None:
        system = f"{namespace}#{'-' if level is None else level.name}"
        if len(_systems) < _MEMORY:
            _systems[namespace, level] = system
    line = f"{clock(event.get('log_time'))} [{system}] {text}"
    return (line.replace("\n", "\n\t") if "\n" in line else line) + "\n"


def text_lines_observer(out: IO[Any]) -> ILogObserver:
    """An observer writing each event to ``out`` as `twisted.logger.textFileLogObserver` does (the same lines),
    with the time prefix computed once a second and flattened events formatted without parsing."""
    clock = _Clock()
    return FileLogObserver(out, lambda event: classic_line(event, clock))


_levels = {level: json.loads(eventAsJSON({"log_level": level}))["log_level"] for level in LogLevel.iterconstants()}
_UNPERSISTABLE = {"unpersistable": True}
_LEVEL = type(LogLevel.info)


def _encodable(value: object) -> Any:
    """A value ``json`` cannot encode, as `twisted.logger.eventAsJSON` would write it."""
    if isinstance(value, bytes):
        return value.decode("charmap")
    return json.loads(eventAsJSON({"value": value}))["value"]


#: What `twisted.logger.eventAsJSON` calls ``json.dumps`` with, made once.
_encoder = json.JSONEncoder(skipkeys=True, default=_encodable)


def _json(event: dict[str, Any]) -> str:
    fields = dict(event)
    if isinstance(fields.get("log_logger"), Logger):
        fields["log_logger"] = _UNPERSISTABLE
    level = fields.get("log_level")
    if type(level) is _LEVEL and level in _levels:
        fields["log_level"] = _levels[level]
    return _encoder.encode(fields)


def event_json(event: dict[str, Any]) -> str:
    """What `twisted.logger.eventAsJSON` returns for ``event``: the flattening is skipped when the event carries
    it already, and the logger and level are encoded without Twisted's hooks."""
    return eventAsJSON(event) if _parts(event) is None else _json(event)


def use_json(logfile: str | None, nodaemon: bool) -> str:
    """Remember twistd's ``--logfile``/``-n``; return the ``--logger`` name that writes JSON lines there."""
    _destination.update(logfile=logfile, nodaemon=nodaemon)
    return f"{__name__}.json_observer"


def use_text(logfile: str | None, nodaemon: bool) -> str:
    """Remember twistd's ``--logfile``/``-n``; return the ``--logger`` name that writes twistd's text lines there."""
    _destination.update(logfile=logfile, nodaemon=nodaemon)
    return f"{__name__}.text_observer"


def json_lines_observer(out: IO[str]) -> ILogObserver:
    """An observer writing each event to ``out`` as JSON (``jsonFileLogObserver``), one per line, with the
    formatted message in ``text`` for log shippers that do not read Twisted's ``log_format``."""

    def line(event: dict[str, Any]) -> str:
        parts = _parts(event)
        event = dict(event)
        if "text" not in event:
            event["text"] = formatEvent(event) if parts is None else _text(event, parts)
        return f"{eventAsJSON(event) if parts is None else _json(event)}\n"

    return FileLogObserver(out, line)


def _log_file() -> IO[Any]:
    """Where twistd would write its log: stdout (``-n`` without ``--logfile``, or ``--logfile -``), else the
    ``--logfile`` (twistd.log by default), rotated at 1 MB and on SIGUSR1 as twistd's own log is."""
    logfile, nodaemon = _destination["logfile"], _destination["nodaemon"]
    if logfile == "-" or (nodaemon and not logfile):
        return sys.stdout
    from twisted.python.logfile import LogFile

    out = LogFile.fromFullPath(logfile or "twistd.log")
    _rotate_on_usr1(out)
    return out  # type: ignore[return-value]


def json_observer() -> ILogObserver:
    """twistd's ``--logger`` factory for ``--log-format json``: JSON lines where twistd would write its log."""
    return json_lines_observer(_log_file())


def text_observer() -> ILogObserver:
    """A twistd ``--logger`` factory writing twistd's own text lines where twistd would, the cheaper way
    (`text_lines_observer`)."""
    return text_lines_observer(_log_file())


def _rotate_on_usr1(out: Any) -> None:
    """``kill -USR1`` rotates the file, as it does twistd's own text log (whose handler twistd installs itself)."""
    import signal

    if not hasattr(signal, "SIGUSR1"):
        return
    from twisted.internet import reactor

    try:
        signal.signal(signal.SIGUSR1, lambda signum, frame: reactor.callFromThread(out.rotate))  # type: ignore
    except ValueError:  # not the main thread
        pass
