"""``twistd esmtpkit`` options and service, against a MemoryReactor (no sockets)."""

from __future__ import annotations

import os
import tempfile

from twisted.internet.testing import MemoryReactor
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.cli import tap
from esmtpkit.server.factory import ESMTPFactory
from esmtpkit.handlers.base import MessageHandler


class OptionsTests(SynchronousTestCase):
    """Parsing the command line into a policy and a handler factory."""

    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self) -> None:
        """Without options: one loopback listener on 2525 and the Maildir handler."""
        with tempfile.TemporaryDirectory() as tmp:
            options = self.parse("--maildir", os.path.join(tmp, "md"))
            self.assertEqual(options["listen"], ["tcp:2525:interface=127.0.0.1"])
            self.assertEqual(options["handler"], "esmtpkit.handlers.maildir.Maildir")
            handler = options["handler-factory"]()
            self.assertEqual(type(handler).__name__, "Maildir")

    def test_policy_options(self) -> None:
        """Limits and timeouts reach the Policy."""
        options = self.parse("--handler", "esmtpkit.handlers.base.MessageHandler", "--hostname", "mx.example",
                             "--max-message-size", "1000", "--max-recipients", "5", "--timeout", "30",
                             "--data-timeout", "60", "--error-limit", "3", "--bare-newline", "allow",
                             "--max-connections", "7", "--max-connections-per-client", "2", "--max-transactions", "9",
                             "--soft-error-limit", "4", "--error-delay", "1.5", "--pregreet-delay", "2",
                             "--shutdown-timeout", "12")
        policy = options["policy"]
        self.assertEqual((policy.hostname, policy.max_message_size, policy.max_recipients, policy.command_timeout,
                          policy.data_timeout, policy.error_limit, policy.bare_newline),
                         ("mx.example", 1000, 5, 30.0, 60.0, 3, "allow"))
        self.assertEqual((policy.max_connections, policy.max_connections_per_client, policy.max_transactions,
                          policy.soft_error_limit, policy.error_delay, policy.pregreet_delay, policy.shutdown_timeout),
                         (7, 2, 9, 4, 1.5, 2.0, 12.0))

    def test_repeated_listen(self) -> None:
        """--listen may be given several times."""
        options = self.parse("--handler", "esmtpkit.handlers.base.MessageHandler", "--listen", "tcp:2525",
                             "--listen", "unix:/tmp/x.sock")
        self.assertEqual(options["listen"], ["tcp:2525", "unix:/tmp/x.sock"])

    def test_handler_not_importable(self) -> None:
        """An unknown module or class is a usage error naming it."""
        error = self.assertRaises(usage.UsageError, self.parse, "--handler", "no_such_module.Thing")
        self.assertIn("no_such_module.Thing", str(error))

    def test_handler_not_a_handler(self) -> None:
        """A class that does not implement IMessageHandler is a usage error."""
        error = self.assertRaises(usage.UsageError, self.parse, "--handler", "esmtpkit.server.policy.Policy")
        self.assertIn("does not provide IMessageHandler", str(error))

    def test_handler_without_dot(self) -> None:
        """A bare name is a usage error."""
        self.assertRaises(usage.UsageError, self.parse, "--handler", "Maildir")

    def test_bad_numbers(self) -> None:
        """Non-numeric or negative limits are usage errors."""
        for argv in (["--max-message-size", "big"], ["--max-recipients", "-1"], ["--timeout", "0"],
                     ["--bare-newline", "maybe"], ["--error-delay", "-1"], ["--pregreet-delay", "soon"]):
            self.assertRaises(usage.UsageError, self.parse, "--handler", "esmtpkit.handlers.base.MessageHandler",
                              *argv)

    def test_handler_option(self) -> None:
        """--handler-option key=value become keyword arguments; unknown keywords are refused."""
        options = self.parse("--handler", "tests.test_tap.Configurable", "--handler-option", "greeting=Hi there")
        self.assertEqual(options["handler-factory"]().greeting, "Hi there")
        self.assertRaises(usage.UsageError, self.parse, "--handler", "tests.test_tap.Configurable",
                          "--handler-option", "nope=1")
        self.assertRaises(usage.UsageError, self.parse, "--handler", "tests.test_tap.Configurable",
                          "--handler-option", "novalue")

    def test_handler_constructor_raising(self) -> None:
        """Whatever a handler's constructor raises is a usage error naming the handler and the exception."""
        error = self.assertRaises(usage.UsageError, self.parse, "--handler", "tests.test_tap.Raising")
        self.assertEqual(str(error), "--handler tests.test_tap.Raising: cannot make one: RuntimeError: the database "
                         "is down")

    def test_unusable_maildir(self) -> None:
        """A Maildir whose folders cannot be made is refused when the options are read."""
        with tempfile.TemporaryDirectory() as tmp:
            taken = os.path.join(tmp, "file")
            with open(taken, "w") as f:
                f.write("not a folder")
            error = self.assertRaises(usage.UsageError, self.parse, "--maildir", taken)
            self.assertEqual(str(error), f"--maildir {taken}: not a usable Maildir: not a directory ({taken}/tmp)")
            error = self.assertRaises(usage.UsageError, self.parse, "--handler-option", f"path={taken}")
            self.assertTrue(str(error).startswith(f"--handler-option path={taken}: not a usable Maildir"))

    def test_maildir_made_and_probed(self) -> None:
        """A usable Maildir gets its three folders; the probe file in tmp/ is gone again."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "md")
            self.parse("--maildir", path)
            self.assertEqual(sorted(os.listdir(path)), ["cur", "new", "tmp"])
            self.assertEqual(os.listdir(os.path.join(path, "tmp")), [])

    def test_maildir_left_alone_for_other_handlers(self) -> None:
        """--maildir is probed only for the Maildir handler."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "md")
            self.parse("--handler", "esmtpkit.handlers.base.MessageHandler", "--maildir", path)
            self.assertFalse(os.path.exists(path))

    def test_one_line_under_twistd(self) -> None:
        """As twistd's subcommand a usage error is one line and a hint on stderr, and exit status 2."""
        import io
        import sys

        from twisted.scripts.twistd import ServerOptions

        for argv, line in [(["--timeout", "x"], "--timeout takes seconds, not 'x'"),
                           (["--nosuch"], "--nosuch: not recognized"),
                           (["--timeout"], "--timeout: requires argument")]:
            stderr, stdout = io.StringIO(), io.StringIO()
            self.patch(sys, "stderr", stderr)
            self.patch(sys, "stdout", stdout)
            with self.assertRaises(SystemExit) as raised:
                ServerOptions().parseOptions(["-n", "esmtpkit", "--handler", "esmtpkit.handlers.base.MessageHandler",
                                              *argv])
            self.assertEqual(raised.exception.code, tap.USAGE_ERROR)
            self.assertEqual(stderr.getvalue(), f"twistd esmtpkit: {line}\nsee twistd esmtpkit --help\n")
            self.assertEqual(stdout.getvalue(), "")

    def test_bad_option_values_name_the_option(self) -> None:
        """Every value error starts with the option it is about."""
        for argv in (["--timeout", "x"], ["--data-timeout", "0"], ["--proxy-timeout", "nan"], ["--error-delay", "x"],
                     ["--pregreet-delay", "-1"], ["--shutdown-timeout", "inf"], ["--max-recipients", "-1"],
                     ["--bare-newline", "maybe"], ["--log-format", "xml"], ["--listen", "tcp:70000"],
                     ["--auth", "nosuch:x"], ["--auth", "file:/nonexistent/passwd"], ["--workers", "many"]):
            error = self.assertRaises(usage.UsageError, self.parse, "--handler",
                                      "esmtpkit.handlers.base.MessageHandler", *argv)
            self.assertTrue(str(error).startswith(argv[0]), str(error))


class Raising(MessageHandler):
    """A handler whose constructor fails."""

    def __init__(self) -> None:
        raise RuntimeError("the database is down")


class Configurable(MessageHandler):
    """A handler with one setting, for --handler-option."""

    def __init__(self, greeting: str = "Hello") -> None:
        self.greeting = greeting


class ServiceTests(SynchronousTestCase):
    """makeService listens on every endpoint with one factory."""

    def test_listens_on_each_endpoint(self) -> None:
        reactor = MemoryReactor()
        options = tap.Options()
        options.parseOptions(["--handler", "esmtpkit.handlers.base.MessageHandler", "--listen",
                              "tcp:2525:interface=127.0.0.1", "--listen", "tcp:2526", "--hostname", "mx.test"])
        service = tap.makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        ports = [(port, iface) for port, _, _, iface in reactor.tcpServers]
        self.assertEqual(ports, [(2525, "127.0.0.1"), (2526, "")])
        factories = {id(f) for _, f, _, _ in reactor.tcpServers}
        self.assertEqual(len(factories), 1)
        factory = reactor.tcpServers[0][1]
        self.assertIsInstance(factory, ESMTPFactory)
        self.assertEqual(factory.policy.hostname, "mx.test")
        self.assertIs(factory.clock, reactor)
