"""``--log-format`` and ``--metrics``: how the options reach twistd, the factory's monitor and the workers."""

from __future__ import annotations

import io
import json
import sys
from typing import Any

from twisted.logger import Logger
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.ops import logformat
from esmtpkit.ops.metrics import Metrics
from esmtpkit.server.monitor import EventLog, Monitors
from esmtpkit.cli.tap import Options, build_monitor, makeService
from esmtpkit.ops.workers import worker_arguments

from .support import ScratchWorkingDirectory


def twistd(*argv: str) -> ServerOptions:
    config = ServerOptions()
    config.parseOptions(list(argv))
    return config


class LogFormatTests(ScratchWorkingDirectory, SynchronousTestCase):
    def test_json_becomes_twistds_logger(self) -> None:
        self.addCleanup(logformat._destination.update, dict(logformat._destination))
        config = twistd("-n", "--logfile", "x.json", "esmtpkit", "--log-format", "json")
        self.assertIs(config["logger"], logformat.json_observer)
        self.assertEqual(logformat._destination, {"logfile": "x.json", "nodaemon": True})

    def test_text_becomes_twistds_logger_unless_twistd_was_told_otherwise(self) -> None:
        self.addCleanup(logformat._destination.update, dict(logformat._destination))
        config = twistd("-n", "--logfile", "x.log", "esmtpkit")
        self.assertIs(config["logger"], logformat.text_observer)
        self.assertEqual(logformat._destination, {"logfile": "x.log", "nodaemon": True})
        self.assertIsNone(twistd("-n", "--syslog", "esmtpkit")["logger"])
        from esmtpkit.ops import _worker

        chosen = twistd("-n", "--logger", "esmtpkit.ops._worker.log_observer", "esmtpkit")["logger"]
        self.assertIs(chosen, _worker.log_observer)

    def test_refusals(self) -> None:
        for argv, message in [
            (("-n", "esmtpkit", "--log-format", "xml"), "--log-format takes text or json"),
            (("-n", "--syslog", "esmtpkit", "--log-format", "json"), "cannot go with --syslog"),
            (("-n", "--logger", "esmtpkit.ops._worker.log_observer", "esmtpkit", "--log-format", "json"),
             "leave out --logger"),
            (("--logfile", "-", "esmtpkit", "--log-format", "json"), "a daemon cannot log to stdout"),
        ]:
            stderr = io.StringIO()
            self.patch(sys, "stderr", stderr)
            with self.assertRaises(SystemExit) as raised:
                twistd(*argv)
            self.assertEqual(raised.exception.code, 2)
            error, hint = stderr.getvalue().splitlines()
            self.assertIn(message, error)
            self.assertEqual(hint, "see twistd esmtpkit --help")

    def test_json_lines(self) -> None:
        """One JSON object per line, with the formatted message in ``text`` and the event's own fields."""
        out = io.StringIO()
        log = Logger(namespace="esmtpkit.events", observer=logformat.json_lines_observer(out))
        log.info("message {id} accepted", event="message.accepted", id="X1", size=3)
        log.info("second", event="connection.closed")
        first, second = (json.loads(line) for line in out.getvalue().splitlines())
        self.assertEqual((first["text"], first["id"], first["size"], first["event"]),
                         ("message X1 accepted", "X1", 3, "message.accepted"))
        self.assertEqual(first["log_namespace"], "esmtpkit.events")
        self.assertEqual(second["text"], "second")


class MetricsOptionTests(ScratchWorkingDirectory, SynchronousTestCase):
    def options(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_monitor(self) -> None:
        plain = build_monitor(self.options())
        self.assertIsInstance(plain, EventLog)
        options = self.options("--metrics", "tcp:0:interface=127.0.0.1")
        both: Any = build_monitor(options)
        self.assertIsInstance(both, Monitors)
        self.assertEqual([type(m) for m in both.monitors], [EventLog, Metrics])
        self.assertIs(both.monitors[1], options["metrics-recorder"])

    def test_log_events(self) -> None:
        from twisted.logger import LogLevel

        from esmtpkit.server.monitor import Monitor, _nothing

        quiet: Any = build_monitor(self.options("--log-events", "warn"))
        self.assertEqual((type(quiet), quiet.minimum), (EventLog, LogLevel.warn))
        self.assertIs(quiet.message_accepted, _nothing)
        self.assertIsNot(quiet.auth_failed, _nothing)
        self.assertIs(type(build_monitor(self.options("--log-events", "none"))), Monitor)
        metrics_only = build_monitor(self.options("--log-events", "none", "--metrics", "tcp:0"))
        self.assertIsInstance(metrics_only, Metrics)
        with self.assertRaises(usage.UsageError):
            self.options("--log-events", "some")

    def test_service_listens_for_metrics(self) -> None:
        from twisted.internet.testing import MemoryReactor

        reactor = MemoryReactor()
        service: Any = makeService(self.options("--metrics", "tcp:9101:interface=127.0.0.1"), reactor=reactor)
        service.startService()
        try:
            ports = sorted(port for port, *_ in reactor.tcpServers)
            self.assertEqual(ports, [2525, 9101])
        finally:
            service.stopService()

    def test_workers_leave_metrics_and_log_format_to_the_supervisor(self) -> None:
        options = self.options("--workers", "2", "--metrics", "tcp:9101", "--log-format=json", "--max-recipients",
                               "7", "--listen", "tcp:2525")
        self.assertEqual(worker_arguments(options), ["--max-recipients", "7"])
