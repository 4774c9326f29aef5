"""twistd options that compose features built elsewhere: PROXY protocol, AMQP handler settings, workers' listeners."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactor
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.cli import tap
from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.handlers.base import MessageHandler
from esmtpkit.server.proxy import ProxyProtocolFactory

BASE = ["--handler", "esmtpkit.handlers.base.MessageHandler"]


def parse(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


class ProxyOptionTests(SynchronousTestCase):
    def test_listeners_wrapped(self) -> None:
        """--proxy-protocol wraps every listener; the service still drains the ESMTPFactory itself."""
        reactor = MemoryReactor()
        options = parse(*BASE, "--proxy-protocol", "--proxy-trusted", "10.0.0.0/8", "--proxy-timeout", "3",
                        "--listen", "tcp:2525:interface=127.0.0.1")
        service = tap.makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        listening = reactor.tcpServers[0][1]
        self.assertIsInstance(listening, ProxyProtocolFactory)
        self.assertIsInstance(listening.wrappedFactory, ESMTPFactory)
        self.assertIs(service.factory, listening.wrappedFactory)
        self.assertTrue(listening.is_trusted(type("A", (), {"host": "10.1.2.3"})()))
        self.assertFalse(listening.is_trusted(type("A", (), {"host": "192.0.2.1"})()))

    def test_without_flag_not_wrapped(self) -> None:
        reactor = MemoryReactor()
        service = tap.makeService(parse(*BASE, "--listen", "tcp:2525"), reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertIsInstance(reactor.tcpServers[0][1], ESMTPFactory)

    def test_bad_combinations(self) -> None:
        for argv in (["--proxy-trusted", "10.0.0.0/8"], ["--proxy-protocol", "--proxy-trusted", "10.0.0.5/8"],
                     ["--proxy-protocol", "--listen", "haproxy:tcp:2525"],
                     ["--proxy-protocol", "--listen", "ssl:465:privateKey=k.pem"]):
            self.assertRaises(usage.UsageError, parse, *BASE, *argv)


class Settable(MessageHandler):
    """Takes the AMQP handler's keyword names, to see what the options pass."""

    def __init__(self, url: str = "u", queue: str = "q", confirm_timeout: float = 1.0,
                 refuse_when_down: bool = False) -> None:
        self.settings = (url, queue, confirm_timeout, refuse_when_down)


class HandlerSettingTests(SynchronousTestCase):
    def test_amqp_options_reach_handlers_that_take_them(self) -> None:
        options = parse("--handler", "tests.test_tap_integration.Settable", "--amqp-url", "amqp://h/%2F",
                        "--amqp-queue", "inbound", "--amqp-confirm-timeout", "7", "--amqp-refuse-when-down")
        self.assertEqual(options["handler-factory"]().settings, ("amqp://h/%2F", "inbound", 7.0, True))

    def test_defaults_left_to_the_handler(self) -> None:
        options = parse("--handler", "tests.test_tap_integration.Settable")
        self.assertEqual(options["handler-factory"]().settings, ("u", "q", 1.0, False))

    def test_handler_option_wins(self) -> None:
        options = parse("--handler", "tests.test_tap_integration.Settable", "--amqp-queue", "a",
                        "--handler-option", "queue=b")
        self.assertEqual(options["handler-factory"]().settings[1], "b")

    def test_bad_handler_value_is_a_usage_error(self) -> None:
        """A constructor's ValueError (a bad setting) is a usage error, not a traceback."""
        self.assertRaises(usage.UsageError, parse, "--handler", "esmtpkit.handlers.relay.Relay",
                          "--handler-option", "tls=sometimes")


class WorkerListenerTests(SynchronousTestCase):
    def test_unshareable_listener_refused_at_parse_time(self) -> None:
        self.assertRaises(usage.UsageError, parse, *BASE, "--workers", "2", "--listen", "unix:/tmp/x.sock")
