"""Postfix as a real relaying MTA in front of ``twistd esmtpkit``: a private instance, nothing system-wide touched.

The instance lives in a temporary directory: its own main.cf and master.cf (every ``inet`` listener off, no
chroot), queue, data directory and log file; ``relayhost = [127.0.0.1]:<our port>``. Mail goes in with
``sendmail -C``, the queue is flushed with ``postqueue -c``, and the message must reach our Maildir with its
envelope and content intact. The system Postfix is never started; the instance's processes must all be gone
when the test ends.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Iterator

import pytest

POSTFIX = shutil.which("postfix", path="/usr/sbin:/usr/bin:/sbin:/bin")
SENDMAIL = shutil.which("sendmail", path="/usr/sbin:/usr/lib:/usr/bin")
POSTQUEUE = shutil.which("postqueue", path="/usr/sbin:/usr/bin")
MASTER_CF = Path("/etc/postfix/master.cf")
TIMEOUT = 60


def _why_not() -> str | None:
    """Why a private Postfix instance cannot run here (None when it can)."""
    if not (POSTFIX and SENDMAIL and POSTQUEUE and MASTER_CF.exists()):
        return "Postfix is not installed (apt-get install postfix: postfix, sendmail, postqueue, master.cf)"
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root (its master runs daemons as user postfix)"
    try:
        pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")
    except KeyError:
        return "the postfix user or the postdrop group does not exist"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")


def private_master_cf(text: str) -> str:
    """master.cf with every ``inet`` service (and its ``-o`` lines) commented out and chroot off everywhere.

    Without a listener the instance takes mail only through sendmail/postdrop; without chroot it needs no
    copies of /etc files under its queue directory. A ``postlog`` service (Postfix >= 3.4) is added if missing.
    """
    out: list[str] = []
    in_inet = False
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            out.append(line)  # comments and blank lines neither start nor end a logical line
            continue
        if line[:1] in (" ", "\t"):
            out.append("#" + line if in_inet else line)  # continues the service above
            continue
        if len(fields) < 8:
            raise ValueError(f"unexpected master.cf line: {line!r}")
        in_inet = fields[1] == "inet"
        if in_inet:
            out.append("#" + line)
        else:
            fields[4] = "n"
            out.append(" ".join(fields))
    if not any(line.split()[:2] == ["postlog", "unix-dgram"] for line in out if line.strip()):
        out.append("postlog unix-dgram n - n - 1 postlogd")
    return "\n".join(out) + "\n"


def _instance_processes(config_dir: Path) -> list[int]:
    """Live (not zombie) processes whose environment says MAIL_CONFIG=<config_dir>: this instance's daemons."""
    marker = b"MAIL_CONFIG=" + os.fsencode(config_dir)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in (b"Z", b"X"):
            found.append(int(entry))
    return found


class PrivatePostfix:
    """A Postfix instance under ``base``: ``etc/`` (config), ``spool/`` (queue), ``data/``, ``maillog``."""

    def __init__(self, base: Path, relay_port: int) -> None:
        self.base = base
        self.etc = base / "etc"
        self.spool = base / "spool"
        self.maillog = base / "maillog"
        self.env = dict(os.environ, MAIL_CONFIG=str(self.etc))
        self.etc.mkdir(mode=0o755)
        self.spool.mkdir(mode=0o755)
        (self.etc / "master.cf").write_text(private_master_cf(MASTER_CF.read_text()))
        (self.etc / "main.cf").write_text("\n".join([
            "compatibility_level = 3.6",
            f"queue_directory = {self.spool}",
            f"data_directory = {base / 'data'}",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            "inet_interfaces = loopback-only",
            "inet_protocols = ipv4",
            "myhostname = test.local",
            "mydomain = test.local",
            "myorigin = $myhostname",
            "mydestination =",
            "local_recipient_maps =",
            "alias_maps =",
            "alias_database =",
            f"relayhost = [127.0.0.1]:{relay_port}",
            "smtp_tls_security_level = none",
            "smtp_dns_support_level = disabled",
            f"maillog_file_prefixes = /var, /dev/stdout, {base}",
            f"maillog_file = {self.maillog}",
            "biff = no",
        ]) + "\n")

    def run(self, *argv: str, input: bytes | None = None) -> str:
        """Run a Postfix command for this instance; fail the test with its output unless it exits 0."""
        out = subprocess.run(list(argv), input=input, capture_output=True, env=self.env, timeout=TIMEOUT)
        text = (out.stdout + out.stderr).decode("utf-8", "replace")
        if out.returncode != 0:
            pytest.fail(f"{' '.join(argv)} exited with {out.returncode}:\n{text}\n{self.log()}", pytrace=False)
        return text

    def log(self) -> str:
        """The instance's mail log so far."""
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def start(self) -> None:
        self.run(POSTFIX or "postfix", "-c", str(self.etc), "check")
        self.run(POSTFIX or "postfix", "-c", str(self.etc), "start")

    def submit(self, sender: str, recipients: list[str], message: bytes) -> None:
        """Queue a message as a local user would (``sendmail -i``: a lone "." line is content, not the end)."""
        self.run(SENDMAIL or "sendmail", "-C", str(self.etc), "-i", "-f", sender, *recipients, input=message)

    def flush(self) -> None:
        """Ask the queue manager to deliver now (``postqueue -f``)."""
        self.run(POSTQUEUE or "postqueue", "-c", str(self.etc), "-f")

    def stop(self) -> list[str]:
        """Stop the instance and wait until its processes are gone; return what went wrong (killed leftovers)."""
        problems = []
        if (self.spool / "pid" / "master.pid").exists():
            out = subprocess.run([POSTFIX or "postfix", "-c", str(self.etc), "stop"], capture_output=True,
                                 env=self.env, timeout=TIMEOUT)
            if out.returncode != 0:
                problems.append(f"postfix stop exited with {out.returncode}: {out.stdout!r} {out.stderr!r}")
        deadline = time.monotonic() + 20
        while _instance_processes(self.etc) and time.monotonic() < deadline:
            time.sleep(0.1)
        leftovers = _instance_processes(self.etc)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if leftovers:
            problems.append(f"Postfix processes still running after stop (killed): {leftovers}")
        return problems


@pytest.fixture
def postfix(esmtpkit_process) -> Iterator[PrivatePostfix]:
    """A private Postfix instance relaying everything to ``esmtpkit_process``; stopped and removed afterwards."""
    # A short path (UNIX socket names are limited to about 100 bytes) that the postfix user may traverse.
    base = Path(tempfile.mkdtemp(prefix="esmtpkit-postfix-"))
    base.chmod(0o755)
    instance = PrivatePostfix(base, esmtpkit_process.port)
    try:
        instance.start()
        yield instance
    finally:
        problems = instance.stop()
        log = instance.log()
        shutil.rmtree(base, ignore_errors=True)
    if problems:
        pytest.fail("\n".join(problems) + "\n" + log, pytrace=False)


PLAIN = (b"From: Sender <sender@example.org>\nTo: rcpt@example.org\nSubject: relayed by Postfix\n"
         b"Date: Mon, 23 Nov 2026 10:00:00 +0000\nMessage-ID: <plain@example.org>\n"
         b"\n.leading dot\n..two\n.\nlast line\n")
EIGHT_BIT = ("From: Jörg <joerg@example.org>\nTo: a@example.net, b@example.net\nSubject: 8bit\n"
             "Date: Mon, 23 Nov 2026 10:00:01 +0000\nMessage-ID: <eightbit@example.org>\nMIME-Version: 1.0\n"
             "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n"
             "\nGrüße aus Köln, ½ € ✓\n" + "Zeile\n" * 2000).encode("utf-8")

#: The trace field Postfix puts in front of a locally submitted message.
POSTFIX_RECEIVED = re.compile(rb"Received: by test\.local \(Postfix, from userid \d+\)\r\n"
                              rb"\tid [0-9A-Za-z]+; [^\r\n]+\r\n")


def test_postfix_relays_to_esmtpkit(esmtpkit_process, postfix: PrivatePostfix) -> None:
    """Two messages through Postfix's smtp client: envelope, headers and body arrive intact, 8-bit included."""
    postfix.submit("sender@example.org", ["rcpt@example.org"], PLAIN)
    postfix.submit("joerg@example.org", ["a@example.net", "b@example.net"], EIGHT_BIT)
    postfix.flush()
    deliveries = esmtpkit_process.deliveries(2, timeout=TIMEOUT)
    by_id = {}
    for delivery in deliveries:
        parsed = BytesParser(policy=policy.default).parsebytes(delivery.content)
        by_id[parsed["Message-ID"]] = delivery
    assert sorted(by_id) == ["<eightbit@example.org>", "<plain@example.org>"]

    # Postfix uses SMTPUTF8 for the message with UTF-8 headers: the trace says UTF8SMTP then (RFC 6531 §3.7.3).
    for message_id, sender, source, for_clause, keyword in [
        ("<plain@example.org>", "sender@example.org", PLAIN, " for <rcpt@example.org>; ", "ESMTP"),
        ("<eightbit@example.org>", "joerg@example.org", EIGHT_BIT, None, "UTF8SMTP"),
    ]:
        delivery = by_id[message_id]
        assert delivery.return_path == sender
        assert re.match(rf"from test\.local \(127\.0\.0\.1 \[127\.0\.0\.1\]\) by mx\.test with {keyword} id \S+",
                        delivery.received), delivery.received
        if for_clause:
            assert for_clause in delivery.received, delivery.received
        else:
            assert " for <" not in delivery.received, delivery.received
        theirs = POSTFIX_RECEIVED.match(delivery.content)
        assert theirs, delivery.content[:300]
        assert delivery.content[theirs.end():] == source.replace(b"\n", b"\r\n")

    # Postfix logged our 250 reply for each recipient, naming the message id that the Maildir file name carries.
    log = postfix.log()
    for delivery in deliveries:
        message_id = delivery.name.split(".")[1].split("I", 1)[1]
        assert f"status=sent (250 2.0.0 Ok: queued as {message_id})" in log, log
    assert log.count("status=sent") == 3, log
    assert not re.search(r"postfix/smtp\[\d+\]: (?:warning|error|fatal|panic):", log), log
