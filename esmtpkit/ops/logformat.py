"""twistd's log lines, text or JSON (``--log-format json``: one JSON object per line), written cheaply.

twistd picks its log observer before the service exists, through its ``--logger`` option (a factory called with
no arguments). `use_json` records where the log goes (twistd's ``--logfile`` and ``-n``) and returns the name
of `json_observer`, which the esmtpkit options hand to twistd as that factory (`use_text` does the same for
`text_observer`, twistd's own text lines). The observers here write what Twisted's would (the text lines byte for
byte, the JSON lines as the same objects), but an event that carries its ``log_flattened`` values (every
`esmtpkit.server.monitor.EventLog` event does) is formatted without parsing its format string, the text line's
time prefix is computed once a second, and the JSON line is filled into a template made once for each kind of
event (`_json_writer`); anything else is Twisted's to write: see docs/performance.md.
"""

from __future__ import annotations

import json
import sys
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from math import floor, isfinite
from operator import itemgetter
from string import Formatter
from typing import IO, Any, Callable

from twisted.logger import (FileLogObserver, ILogObserver, Logger, LogLevel, eventAsJSON, formatEvent,
                            formatEventAsClassicLogText, formatTime)

__all__ = ["use_json", "json_observer", "json_lines_observer", "use_text", "text_observer", "text_lines_observer",
           "event_text", "event_json", "json_line", "classic_line"]

_destination: dict[str, Any] = {"logfile": None, "nodaemon": True}

#: How many distinct format strings (and JSON event shapes) the fast paths remember; beyond that, Twisted works.
_MEMORY = 512

#: log_format -> (its text as a ``%`` template, a getter of its ``name!s:`` values), or None for Twisted to format.
_compiled: dict[str, tuple[str, Callable[[Any], tuple[Any, ...]]] | None] = {}


def _getter(keys: list[str]) -> Callable[[Any], tuple[Any, ...]]:
    """`operator.itemgetter` of ``keys`` that always gives a tuple (one key included)."""
    if len(keys) == 1:
        key = keys[0]
        return lambda mapping: (mapping[key],)
    return itemgetter(*keys) if keys else lambda mapping: ()


def _compile(format: str) -> tuple[str, Callable[[Any], tuple[Any, ...]]] | None:
    """``format`` as a ``%`` template over its ``log_flattened`` keys (``name!s:``), if every field is a plain
    name used once (else None: Twisted's flattened keys would differ)."""
    pieces: list[str] = []
    keys: list[str] = []
    for literal, name, spec, conversion in Formatter().parse(format):
        pieces.append(literal.replace("%", "%%"))
        if name is None:
            continue
        if spec or conversion or not name.isidentifier() or f"{name}!s:" in keys:
            return None
        keys.append(f"{name}!s:")
        pieces.append("%s")
    return "".join(pieces), _getter(keys)


def _template(format: str) -> tuple[str, Callable[[Any], tuple[Any, ...]]] | None:
    compiled = _compiled.get(format, False)
    if compiled is False:
        compiled = _compile(format)
        if len(_compiled) < _MEMORY:
            _compiled[format] = compiled
    return compiled  # type: ignore[return-value]


def event_text(event: dict[str, Any]) -> str:
    """What `twisted.logger.formatEvent` returns for ``event``, without parsing the format of an event that
    carries its ``log_flattened`` values (as `esmtpkit.server.monitor.EventLog` events do)."""
    flat, format = event.get("log_flattened"), event.get("log_format")
    if flat is not None and type(format) is str:
        compiled = _template(format)
        if compiled is not None:
            # One C-level ``%`` over the flattened strings instead of Twisted's per-field flatKey/str/join.
            try:
                return compiled[0] % compiled[1](flat)
            except Exception:  # a missing key or a failing __str__: Twisted says so its own way
                pass
    return formatEvent(event)


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


#: Each LogLevel as `twisted.logger.eventAsJSON` writes it: ``{"name": "info", "__class_uuid__": "..."}``.
_LEVELS = {level: json.dumps(json.loads(eventAsJSON({"log_level": level}))["log_level"])
           for level in LogLevel.iterconstants()}
_LEVEL = type(LogLevel.info)
_UNPERSISTABLE = '{"unpersistable": true}'


#: The JSON text of a value of each type, as ``json.dumps`` writes it (for a float, if finite): a Python
#: expression over the value's variable, calling a C function from `_NAMESPACE`.
_ENCODERS: dict[type, str] = {str: "esc({})", int: "int_repr({})", float: "float_repr({})", bool: "BOOLS[{}]",
                              _LEVEL: "LEVELS[{}]"}
_NAMESPACE = {"esc": encode_basestring_ascii, "int_repr": int.__repr__, "float_repr": float.__repr__,
              "BOOLS": {True: "true", False: "false"}, "LEVELS": _LEVELS, "isfinite": isfinite, "str": str}


def _json_writer(event: dict[str, Any], with_text: bool) -> Callable[[dict[str, Any], dict[str, Any]], str]:
    """A function writing the JSON line of every event with the format, keys (in order) and value types of
    ``event``, ``with_text``: with its ``text`` (unless it has one) and a newline. Raises ValueError when some
    value of ``event`` is not one it knows how to write.

    ``json.dumps`` of a big event dict spends most of its time on the dict machinery and on encoding each value
    two or three times (the field, its ``log_flattened`` entries, the text). The function made here (Python source,
    compiled once for each kind of event) has the keys, the punctuation, the logger and the format as constant
    text; it encodes each value once, by the C function for its type, and reuses that text for the value's
    ``name!:`` and ``name!s:`` entries and for ``text``, once it has checked that they are the field itself and its
    ``str()``. When they are not, or a float is NaN or infinite, it raises ValueError.
    """
    format = event["log_format"]
    compiled = _template(format)
    names = [name for _, name, _, _ in Formatter().parse(format) if name is not None]
    if compiled is None or not set(names) <= set(event) or not all(type(key) is str for key in event):
        raise ValueError(format)
    body = [f"if len(flat) != {2 * len(names)}: raise ValueError"]
    checks: dict[str, None] = {}  # conditions under which the line cannot be written so (in order, once each)
    parts: list[tuple[bool, str]] = []  # (is constant text, the text or the variable holding encoded text)
    variables: dict[str, str] = {}  # Python expression -> the variable it is computed into, once

    def variable(expression: str) -> str:
        if expression not in variables:
            variables[expression] = f"v{len(variables)}"
            body.append(f"{variables[expression]} = {expression}")
        return variables[expression]

    def value(key: str, kind: type) -> str | None:
        """The variable with the JSON of ``event[key]``; None after adding constant text to ``parts``."""
        if kind is type(None):
            parts.append((True, "null"))
        elif issubclass(kind, Logger):
            parts.append((True, _UNPERSISTABLE))
        elif kind in _ENCODERS:
            field = variable(f"e[{key!r}]")
            if kind is float:
                checks[f"not isfinite({field})"] = None  # json writes NaN and Infinity, not as float_repr does
            encoded = variable(_ENCODERS[kind].format(field))
            parts.append((False, encoded))
            return encoded
        else:
            raise ValueError(kind)
        return None

    strings: list[str] = []  # the variable with each field's str(), in the order of the format
    for key, field in event.items():
        parts.append((True, ("{" if not parts else ", ") + f"{encode_basestring_ascii(key)}: "))
        if key == "log_format":
            parts.append((True, encode_basestring_ascii(format)))
        elif key != "log_flattened":
            value(key, type(field))
        elif type(field) is not dict:
            raise ValueError(key)
        else:
            parts.append((True, "{"))
            for n, name in enumerate(names):
                kind, fetched = type(event[name]), variable(f"e[{name!r}]")
                parts.append((True, (", " if n else "") + f"{encode_basestring_ascii(name + '!s:')}: "))
                if kind is str:  # str() is the field itself, its JSON the field's
                    string = fetched
                    parts.append((False, variable(_ENCODERS[str].format(fetched))))
                    checks[f"flat[{name + '!s:'!r}] is not {fetched}"] = None
                elif kind in (int, float, bool, type(None)):  # str() is the JSON number (or True, None), quoted
                    string = variable(_ENCODERS[kind].format(fetched) if kind in (int, float) else f"str({fetched})")
                    parts.extend([(True, '"'), (False, string), (True, '"')])
                    checks[f"flat[{name + '!s:'!r}] != {string}"] = None
                else:
                    raise ValueError(kind)
                strings.append(string)
                parts.append((True, f", {encode_basestring_ascii(name + '!:')}: "))
                value(name, kind)
                checks[f"flat[{name + '!:'!r}] is not {fetched}"] = None
            parts.append((True, "}"))
    if with_text and "text" not in event:
        text = variable(f"esc({compiled[0]!r} % ({''.join(f'{string}, ' for string in strings)}))")
        parts.extend([(True, ', "text": '), (False, text)])
    parts.append((True, "}\n" if with_text else "}"))
    if checks:
        body.append(f"if {' or '.join(checks)}: raise ValueError")
    joined: list[tuple[bool, str]] = []  # adjacent constant text as one
    for constant, text in parts:
        if constant and joined and joined[-1][0]:
            joined[-1] = (True, joined[-1][1] + text)
        else:
            joined.append((constant, text))
    body.append(f"return ''.join(({''.join(f'{text!r}, ' if constant else f'{text}, ' for constant, text in joined)}))")
    source = "def line(e, flat):\n" + "".join(f"    {line}\n" for line in body)
    namespace = dict(_NAMESPACE)
    exec(compile(source, "<esmtpkit.ops.logformat JSON line>", "exec"), namespace)
    return namespace["line"]  # type: ignore[no-any-return]


#: (log_format, keys, value types, with text) -> its writer, or None when Twisted must write such events.
_writers: dict[tuple[Any, ...], Callable[[dict[str, Any], dict[str, Any]], str] | None] = {}


def _fast_json(event: dict[str, Any], with_text: bool) -> str | None:
    """The JSON line of a flattened event through its `_json_writer`; None when it has none."""
    format, flat = event.get("log_format"), event.get("log_flattened")
    if type(format) is not str or type(flat) is not dict:
        return None
    shape = (format, tuple(event), tuple(map(type, event.values())), with_text)
    writer = _writers.get(shape, False)
    if writer is False:
        if len(_writers) >= _MEMORY:  # no compiling for every line of a process logging ever new formats
            return None
        try:
            writer = _json_writer(event, with_text)
        except (ValueError, KeyError):
            writer = None
        _writers[shape] = writer
    if writer is None:
        return None
    try:
        return writer(event, flat)  # type: ignore[operator]
    except Exception:  # a value that did not fit after all (a NaN, an unknown level): Twisted writes it
        return None


def event_json(event: dict[str, Any]) -> str:
    """What `twisted.logger.eventAsJSON` returns for ``event`` (the same JSON object; for a flattened event,
    written through its template and without adding to ``event``)."""
    line = _fast_json(event, with_text=False)
    return eventAsJSON(event) if line is None else line


def use_json(logfile: str | None, nodaemon: bool) -> str:
    """Remember twistd's ``--logfile``/``-n``; return the ``--logger`` name that writes JSON lines there."""
    _destination.update(logfile=logfile, nodaemon=nodaemon)
    return f"{__name__}.json_observer"


def use_text(logfile: str | None, nodaemon: bool) -> str:
    """Remember twistd's ``--logfile``/``-n``; return the ``--logger`` name that writes twistd's text lines there."""
    _destination.update(logfile=logfile, nodaemon=nodaemon)
    return f"{__name__}.text_observer"


def json_line(event: dict[str, Any]) -> str:
    """``event`` as one JSON line (with its newline): what `twisted.logger.eventAsJSON` writes for it, plus
    ``text`` (the formatted message, for log shippers that do not read Twisted's ``log_format``) unless it has one."""
    line = _fast_json(event, with_text=True)
    if line is None:
        event = dict(event)
        if "text" not in event:
            event["text"] = event_text(event)
        line = f"{eventAsJSON(event)}\n"
    return line


def json_lines_observer(out: IO[str]) -> ILogObserver:
    """An observer writing each event to ``out`` as JSON (``jsonFileLogObserver``), one per line, with the
    formatted message in ``text`` (`json_line`)."""
    return FileLogObserver(out, json_line)


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
