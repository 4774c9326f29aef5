"""esmtpkit.ops.logformat: the text and JSON lines written the fast way are the ones Twisted would write."""

from __future__ import annotations

import enum
import io
import json
from typing import Any

from twisted.logger import (Logger, LogLevel, eventAsJSON, eventsFromJSONLogFile, formatEvent,
                            formatEventAsClassicLogText, formatTime)
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.ops import logformat
from esmtpkit.ops.logformat import classic_line, event_json, event_text, json_line, json_lines_observer

from .support import every_event

#: Text a client may choose, with what JSON must escape: non-ASCII, quotes, backslashes, controls, separators.
AWKWARD = ['', 'é ü 日本 \U0001f600', 'say "hi" \\ back', '\x1b[31m\x00\t\r\n', '\u2028\u2029 \ud800']


class Code(enum.IntEnum):
    OK = 250


def twisted_json(event: dict[str, Any], text: bool = True) -> Any:
    """The JSON object `twisted.logger.eventAsJSON` writes for ``event`` (on a copy: it flattens in place), with
    ``text`` as `json_line` adds it."""
    copy = dict(event)
    if text and "text" not in copy:
        copy["text"] = formatEvent(copy)
    return json.loads(eventAsJSON(copy))


def emitted(format: str, **fields: Any) -> dict[str, Any]:
    """The event `Logger.emit` makes of ``format`` and ``fields``, flattened as Twisted flattens it."""
    from twisted.logger._flatten import flattenEvent

    events: list[dict[str, Any]] = []
    Logger(namespace="elsewhere", observer=events.append).info(format, **fields)
    flattenEvent(events[0])
    return events[0]


class JSONLineTests(SynchronousTestCase):
    def assertTwistedWrites(self, event: dict[str, Any]) -> None:
        """``event`` does not fit a template; its line is Twisted's."""
        self.assertIsNone(logformat._fast_json(event, True))
        self.assertSameJSON(event)

    def assertSameJSON(self, event: dict[str, Any]) -> None:
        """`json_line` and `event_json` write the JSON object Twisted writes, as one line, without touching
        ``event``; the line reads back as an event that formats to the same text."""
        before = dict(event)
        line = json_line(event)
        self.assertEqual(event, before)
        self.assertTrue(line.endswith("\n"))
        self.assertNotIn("\n", line[:-1])
        self.assertEqual(json.loads(line), twisted_json(event))
        self.assertEqual(json.loads(event_json(event)), twisted_json(event, text=False))
        [read] = eventsFromJSONLogFile(io.StringIO(line))
        self.assertEqual(formatEvent(read), formatEvent(event))
        if "text" not in event:
            self.assertEqual(read["text"], formatEvent(event))

    def test_every_event_kind_fast(self) -> None:
        """Every EventLog event, with awkward client text, takes the template path and writes Twisted's object."""
        for text in AWKWARD:
            events = every_event(text)
            self.assertEqual({e["event"] for e in events}, set(logformat_events()))
            for event in events:
                self.assertIsNotNone(logformat._fast_json(event, True), event["event"])
                self.assertSameJSON(event)

    def test_documented_fields(self) -> None:
        """The keys and values docs/operating.md lists: the event's fields, Twisted's, ``text``."""
        event = every_event()[10]
        line = json.loads(json_line(event))
        self.assertEqual(line["event"], "message.accepted")
        self.assertEqual(line["log_level"], {"name": "info", "__class_uuid__": "02e59486-f24d-46ad-8224-3acdf2a5732a"})
        self.assertEqual(line["log_logger"], {"unpersistable": True})
        self.assertEqual((line["log_namespace"], line["log_source"]), ("esmtpkit.events", None))
        self.assertEqual(line["log_format"], event["log_format"])
        self.assertEqual(line["log_time"], event["log_time"])
        self.assertEqual(line["log_flattened"]["recipients!s:"], "1")
        self.assertEqual(line["log_flattened"]["recipients!:"], 1)
        self.assertEqual(line["text"], formatEvent(event))

    def test_value_types(self) -> None:
        """Floats, None, booleans and ints, in the format and outside it, each as json writes them."""
        for value in (0.5, 1e-7, 1795434347.9279222, -0.0, None, True, False, 0, -12, 2 ** 70, "x"):
            event = emitted("value {v} and {w}", v=value, w="w", other=value)
            self.assertIsNotNone(logformat._fast_json(event, True), value)
            self.assertSameJSON(event)
            self.assertSameJSON(emitted("value {v}", v=value, more=[1, value]))

    def test_other_values_go_to_twisted(self) -> None:
        """What the templates do not write (NaN, infinities, enums, str subclasses, bytes, objects, lists, a
        failure, a level that is no LogLevel) is written by Twisted, the same object either way."""

        class Text(str):
            pass

        for value in (float("nan"), float("inf"), -float("inf"), Code.OK, Text("sub"), b"\xff", object(), [1, "a"],
                      {"k": 1}, LogLevel):
            for event in (emitted("value {v}", v=value), emitted("no field", v=value)):
                self.assertIsNone(logformat._fast_json(event, True))
                self.assertSameJSON(event)
        try:
            1 / 0
        except ZeroDivisionError:
            events: list[dict[str, Any]] = []
            Logger(observer=events.append).failure("it failed {n}", n=1)
        self.assertSameJSON(events[0])

    def test_events_others_changed(self) -> None:
        """Events whose flattened values are not their fields' (or that an observer changed or extended) are
        written as they are, by Twisted."""
        event = every_event()[10]
        event["log_flattened"]["id!s:"] = "other"
        self.assertTwistedWrites(event)
        self.assertIn("message other accepted", json_line(event))
        event = every_event()[10]
        event["size"] = 7
        self.assertTwistedWrites(event)
        event = every_event()[10]
        event["log_flattened"]["size!:"] = 1.0 * event["size"]
        self.assertTwistedWrites(event)
        event = every_event()[10]
        event["log_flattened"]["size!s:"] = "1.0"
        self.assertTwistedWrites(event)
        event = every_event()[10]
        event.update(message=(), time=event["log_time"], system="-", isError=0)
        self.assertTwistedWrites(event)
        event = every_event()[10]
        event["log_flattened"]["extra!s:"] = "x"
        self.assertTwistedWrites(event)
        event = every_event()[10]
        del event["log_flattened"]["size!:"]
        self.assertTwistedWrites(event)

    def test_formats(self) -> None:
        """Formats with literal percent signs and braces, no field, or fields Twisted flattens otherwise."""
        for format in ("100% {x} %s %(x)s", "{{braces}} {x}", 'say "{x}" é\\ \u2028', "nothing", "",
                       "{x!r} {x:>4} {x}", "{x} {x}", "{a.b}", "{x()}"):
            fields: dict[str, Any] = {"x": "v", "a": type("A", (), {"b": 2})(), "z": 1}
            if "{x()}" in format:
                fields["x"] = lambda: "called"
            self.assertSameJSON(emitted(format, **fields))

    def test_peer_without_port(self) -> None:
        """A connection from a UNIX socket (no peer address, port None) is written the fast way too."""
        from esmtpkit.core.session import Session
        from esmtpkit.server.monitor import EventLog

        events: list[dict[str, Any]] = []
        EventLog(Logger(namespace="esmtpkit.events", observer=events.append)).connection_opened(Session("mx"))
        [event] = events
        self.assertIsNone(event["port"])
        self.assertIsNotNone(logformat._fast_json(event, True))
        self.assertSameJSON(event)

    def test_memory_bounded(self) -> None:
        """Once it knows ``_MEMORY`` kinds of events, another kind is written by Twisted (nothing is compiled)."""
        self.patch(logformat, "_writers", {})
        self.patch(logformat, "_MEMORY", 1)
        first, second = every_event()[:2]
        self.assertIsNotNone(logformat._fast_json(first, True))
        self.assertIsNone(logformat._fast_json(second, True))
        self.assertSameJSON(second)
        self.assertEqual(len(logformat._writers), 1)

    def test_text_field_kept(self) -> None:
        """An event that has a ``text`` keeps it."""
        event = emitted("message {x}", x="y", text="their own")
        self.assertEqual(json.loads(json_line(event))["text"], "their own")
        self.assertSameJSON(event)

    def test_unflattened_events(self) -> None:
        """Events no EventLog made (not flattened, no format) are Twisted's."""
        events: list[dict[str, Any]] = []
        Logger(observer=events.append).info("plain {x}", x="y")
        for event in events + [{"log_time": 1.0}, {"log_format": None}, {"log_format": "{a}", "a": 1}]:
            self.assertSameJSON(event)

    def test_observer(self) -> None:
        """`json_lines_observer` writes `json_line` for each event."""
        out = io.StringIO()
        observe = json_lines_observer(out)
        events = every_event(AWKWARD[1])
        for event in events:
            observe(event)
        self.assertEqual(out.getvalue(), "".join(json_line(event) for event in events))


class TextTests(SynchronousTestCase):
    def test_event_text(self) -> None:
        """`event_text` is `formatEvent`, for our events, awkward text, and formats Twisted handles otherwise."""
        events = [event for text in AWKWARD for event in every_event(text)]
        events += [emitted(format, x="v", y=2) for format in ("100% {x}", "{{b}} {x} {y}", "", "{x!r}", "{x} {x}")]
        broken = every_event()[0]
        del broken["log_flattened"]["peer!s:"]
        events.append(broken)
        for event in events:
            self.assertEqual(event_text(event), formatEvent(event))
            clock = logformat._Clock()
            self.assertEqual(classic_line(event, clock), formatEventAsClassicLogText(event, formatTime=formatTime))


def logformat_events() -> list[str]:
    from esmtpkit.server.monitor import EVENTS

    return list(EVENTS)
