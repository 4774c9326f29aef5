"""The Maildir handler: byte-exact delivery, 250 only after fsync + rename, nothing left behind on any failure."""

from __future__ import annotations

import errno
import mailbox
import os
import re
import shutil
import stat
import tempfile
from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from esmtpkit.handlers import maildir as maildir_module
from esmtpkit.handlers.maildir import Maildir, unique_name
from esmtpkit.server.interfaces import IMessageHandler
from esmtpkit.server.policy import Policy

from .support import HandlerTestCase

CONTENT = (b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: caf\xc3\xa9\r\n\r\n"
           b".leading dot\r\n..two dots\r\n.\r\n"  # a line that is only a dot, stuffed on the wire
           b"8-bit: \xe9\xff\x80 and a NUL-free tail\r\n")
TRACE = re.compile(
    rb"Return-Path: <alice@example\.com>\r\n"
    rb"Received: from client\.test \(127\.0\.0\.1 \[127\.0\.0\.1\]\) by mx\.test with ESMTP\r\n"
    rb"\tid ([0-9A-HJKMNP-TV-Z]{20})(?: for <bob@example\.net>;|;)"
    rb"(?: |\r\n\t)[A-Z][a-z]{2}, \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\n")


class Base(HandlerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.root = os.path.join(self.scratch(), "Maildir")
        self.handler = Maildir(path=self.root)
        self.talk = self.conversation(self.handler)

    def scratch(self) -> str:
        """A fresh directory outside the working tree, removed after the test."""
        path = tempfile.mkdtemp(prefix="esmtpkit-maildir-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def listing(self, sub: str) -> list[str]:
        return sorted(os.listdir(os.path.join(self.root, sub)))

    def read_new(self) -> list[bytes]:
        out = []
        for name in self.listing("new"):
            with open(os.path.join(self.root, "new", name), "rb") as f:
                out.append(f.read())
        return out

    def cut(self) -> None:
        self.talk.protocol.connectionLost(Failure(ConnectionLost("cut")))


class DeliveryTests(Base):
    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IMessageHandler, self.handler))

    def test_default_path(self) -> None:
        """With no arguments (``--handler esmtpkit.handlers.Maildir``) the Maildir is ./Maildir."""
        here = os.getcwd()
        os.chdir(os.path.dirname(os.path.abspath(self.root)))
        try:
            handler = Maildir()
        finally:
            os.chdir(here)
        self.assertEqual(handler.path, os.path.join(os.path.dirname(os.path.abspath(self.root)), "Maildir"))
        self.assertTrue(os.path.isdir(os.path.join(handler.path, "new")))

    def test_creates_folders_private(self) -> None:
        """cur/, new/ and tmp/ are made if missing, mode 0700."""
        for sub in ("cur", "new", "tmp"):
            mode = stat.S_IMODE(os.stat(os.path.join(self.root, sub)).st_mode)
            self.assertEqual(mode & 0o077, 0, sub)

    def test_byte_exact(self) -> None:
        """The file in new/ is the trace fields followed by exactly the unstuffed bytes (8-bit, leading dots)."""
        reply = self.talk.message("alice@example.com", ["bob@example.net"], CONTENT)
        [stored] = self.read_new()
        match = TRACE.match(stored)
        assert match is not None, stored[:300]
        self.assertEqual(stored[match.end():], CONTENT)
        [name] = self.listing("new")
        self.assertEqual(self.listing("tmp"), [])
        message_id = match.group(1).decode()
        self.assertEqual((reply.code, reply.enhanced, reply.text), (250, "2.0.0", f"Ok: queued as {message_id}"))
        self.assertTrue(name.split(".")[1].endswith("I" + message_id), name)

    def test_wire_reply(self) -> None:
        """The final reply on the wire."""
        self.talk.message("alice@example.com", ["bob@example.net"], b"Subject: x\r\n\r\nhi\r\n")
        [name] = self.listing("new")
        message_id = name.split(".")[1].split("I")[1]
        self.assertTrue(self.talk.transport.value().endswith(f"250 2.0.0 Ok: queued as {message_id}\r\n".encode()))

    def test_readable_by_mailbox(self) -> None:
        """Python's mailbox.Maildir reads what was delivered."""
        self.talk.message("alice@example.com", ["bob@example.net"], CONTENT)
        box = mailbox.Maildir(self.root, factory=None, create=False)
        [message] = list(box)
        self.assertEqual(message["Return-Path"], "<alice@example.com>")
        self.assertEqual(message["To"], "bob@example.net")
        self.assertTrue(message["Received"].startswith("from client.test"))
        # mailbox gives lines with the platform's line ends; the bytes on disk are checked in test_byte_exact.
        self.assertEqual(message.get_payload(decode=True),
                         b".leading dot\n..two dots\n.\n8-bit: \xe9\xff\x80 and a NUL-free tail\n")
        self.assertEqual(message.get_subdir(), "new")

    def test_several_messages_and_null_sender(self) -> None:
        """Each message gets its own unique file; a bounce gets ``Return-Path: <>``."""
        self.talk.message("alice@example.com", ["bob@example.net"], b"one\r\n")
        self.talk.message("", ["bob@example.net"], b"two\r\n")
        first, second = sorted(self.read_new(), key=lambda data: data.endswith(b"two\r\n"))
        self.assertTrue(first.endswith(b"\r\none\r\n"))
        self.assertTrue(second.startswith(b"Return-Path: <>\r\nReceived: "))
        self.assertEqual(len(self.listing("new")), 2)

    def test_empty_message(self) -> None:
        """DATA followed at once by the dot stores just the trace fields."""
        reply = self.talk.message("alice@example.com", ["bob@example.net"], b"")
        self.assertEqual(reply.code, 250)
        [stored] = self.read_new()
        self.assertIsNotNone(TRACE.fullmatch(stored))

    def test_several_recipients(self) -> None:
        """One file for all recipients, and the Received field names none of them."""
        self.talk.message("alice@example.com", ["bob@example.net", "carol@example.net"], b"x\r\n")
        [stored] = self.read_new()
        self.assertNotIn(b"carol", stored)
        self.assertNotIn(b"for <", stored)

    def test_unique_names(self) -> None:
        """Names follow time.MusecPpidQnRrand.host, with / and : escaped in the host part."""
        self.patch(maildir_module.socket, "gethostname", lambda: "odd/host:name")
        names = {unique_name(1700000000.25) for _ in range(100)}
        self.assertEqual(len(names), 100)
        for name in names:
            self.assertRegex(name, r"^1700000000\.M250000P\d+Q\d+R[0-9a-f]{8}\.odd\\057host\\072name$")


class CrashSafetyTests(Base):
    def test_cut_mid_data(self) -> None:
        """The connection drops mid-DATA: tmp/ and new/ are empty afterwards."""
        self.talk.write(b"EHLO client.test\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
        self.talk.write(b"Subject: half\r\n\r\nsome of the body")
        self.assertEqual(len(self.listing("tmp")), 1)
        self.cut()
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.listing("new"), [])

    def test_cut_right_after_data(self) -> None:
        """Even before any content arrived."""
        self.talk.write(b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        self.talk.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((self.listing("tmp"), self.listing("new")), ([], []))

    def test_timeout_mid_data(self) -> None:
        """The data timeout closes with 421 and removes the partial file."""
        self.talk.write(b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\npart")
        self.talk.clock.advance(Policy().data_timeout + 1)
        self.assertTrue(self.talk.transport.value().endswith(b"421 4.4.2 Timeout exceeded, closing connection\r\n"))
        self.assertEqual((self.listing("tmp"), self.listing("new")), ([], []))

    def test_too_big(self) -> None:
        """Over the size limit: 552, and nothing kept."""
        talk = self.conversation(Maildir(path=self.root), Policy(hostname="mx.test", max_message_size=100))
        reply = talk.message("a@x.test", ["b@y.test"], b"x" * 98 + b"\r\n" + b"y" * 200 + b"\r\n")
        self.assertEqual(reply.code, 552)
        self.assertEqual((self.listing("tmp"), self.listing("new")), ([], []))

    def test_bare_newline_rejected(self) -> None:
        """Content refused by policy (bare LF): 550, and nothing kept."""
        reply = self.talk.message("a@x.test", ["b@y.test"], b"one\ntwo\r\n")
        self.assertEqual(reply.code, 550)
        self.assertEqual((self.listing("tmp"), self.listing("new")), ([], []))

    def test_next_transaction_after_cut_content(self) -> None:
        """After a refused message the same connection delivers the next one whole."""
        self.talk.message("a@x.test", ["b@y.test"], b"bad\n\r\n")
        self.talk.message("a@x.test", ["b@y.test"], b"good\r\n")
        [stored] = self.read_new()
        self.assertTrue(stored.endswith(b"\r\ngood\r\n"))
        self.assertEqual(self.listing("tmp"), [])


class StorageErrorTests(Base):
    def assertNothingKept(self, reply: Any) -> None:
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))
        self.assertEqual((self.listing("tmp"), self.listing("new")), ([], []))

    def test_fsync_fails(self) -> None:
        """fsync of the file fails (disk full): 451 4.3.0, nothing in new/ or tmp/."""
        def fail(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "fsync", fail)
        self.assertNothingKept(self.talk.message("a@x.test", ["b@y.test"], CONTENT))

    def test_directory_fsync_fails(self) -> None:
        """Syncing new/ fails after the rename: the file is taken back out of new/ and the client gets 451."""
        def fail(path: str) -> None:
            raise OSError(errno.EIO, "I/O error")

        self.patch(maildir_module, "_fsync_dir", fail)
        self.assertNothingKept(self.talk.message("a@x.test", ["b@y.test"], CONTENT))

    def test_write_fails(self) -> None:
        """A write fails mid-message: the rest is drained, the client gets 451, the tmp file is gone."""
        real = os.fdopen

        class Full:
            def __init__(self, fd: int, mode: str) -> None:
                self.file = real(fd, mode)
                self.written = 0

            def write(self, data: bytes) -> int:
                self.written += len(data)
                if self.written > 400:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return self.file.write(data)

            def __getattr__(self, name: str) -> Any:
                return getattr(self.file, name)

        self.patch(os, "fdopen", Full)
        talk = self.conversation(Maildir(path=self.root))
        reply = talk.message("a@x.test", ["b@y.test"], b"Subject: big\r\n\r\n" + b"line of text\r\n" * 500)
        self.assertNothingKept(reply)
        self.assertEqual(talk.send("NOOP").code, 250)

    def test_tmp_not_writable(self) -> None:
        """tmp/ cannot take a file: DATA itself answers 451 4.3.0."""
        def refuse(*args: Any, **kwargs: Any) -> int:
            raise PermissionError(errno.EACCES, "Permission denied")

        patched = self.patch(os, "open", refuse)
        self.talk.write(b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
        self.talk.replies()
        reply = self.talk.send("DATA")
        assert reply is not None
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))
        patched.restore()
        self.assertEqual((self.listing("tmp"), self.listing("new")), ([], []))
        self.assertEqual(self.talk.send("RSET").code, 250)

    def test_maildir_cannot_be_created(self) -> None:
        """A path that cannot become a Maildir does not stop the server: messages get 451 until it is fixed."""
        blocker = os.path.join(self.scratch(), "not-a-folder")
        with open(blocker, "w") as f:
            f.write("a file, not a folder")
        talk = self.conversation(Maildir(path=blocker))
        talk.write(b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
        talk.replies()
        reply = talk.send("DATA")
        assert reply is not None
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))
