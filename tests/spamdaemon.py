"""A private SpamAssassin ``spamd`` for tests: in the foreground on a free 127.0.0.1 port, from a temporary folder
holding its site configuration (the plugins that need no network, Bayes off), pid file and log, with the rules
the Debian package ships (no sa-update), local tests only (``-L``) and no user configuration. Run as ``nobody``
when the tests run as root. Never the system's spamd or its configuration."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Iterator

from .daemons import Daemon, free_port, private

SPAMD = shutil.which("spamd", path="/usr/sbin:/usr/bin:/sbin:/bin")
#: The rules as the package ships them (sa-update would put newer ones under /var/lib/spamassassin).
RULES = Path("/usr/share/spamassassin")
#: SpamAssassin's test pattern (GTUBE): any message holding it scores 1000.
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
#: A bound on spamd's start and stop, not an expectation.
TIMEOUT = 120.0
#: The plugins loaded: those whose rules look at the message alone (no DNS, no network service).
PLUGINS = ("Check", "HeaderEval", "BodyEval", "MIMEEval", "MIMEHeader", "HTMLEval", "RelayEval", "URIEval",
           "WLBLEval", "ReplaceTags", "ImageInfo", "FreeMail", "HTTPSMismatch", "URIDetail")
SETTINGS = ("use_bayes 0", "bayes_auto_learn 0", "dns_available no", "skip_rbl_checks 1")


def spamd_missing() -> str | None:
    """Why a private spamd cannot run here (None when it can)."""
    if SPAMD is None:
        return "SpamAssassin's spamd is not installed (apt-get install spamd spamassassin)"
    if not (RULES / "20_body_tests.cf").exists():
        return f"SpamAssassin's rules are not in {RULES} (apt-get install spamassassin)"
    return None


class PrivateSpamd(Daemon):
    """spamd running from ``base``, listening on 127.0.0.1 at ``port``."""

    name = "spamd"
    timeout = TIMEOUT

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.log = base / "spamd.log"
        site = base / "site"
        site.mkdir()
        (site / "init.pre").write_text("".join(f"loadplugin Mail::SpamAssassin::Plugin::{name}\n"
                                               for name in PLUGINS))
        (site / "local.cf").write_text("".join(f"{line}\n" for line in SETTINGS))
        argv = [str(SPAMD), "--local", "--nouser-config", "--allowed-ips", "127.0.0.1",
                "--listen", f"127.0.0.1:{self.port}", "--configpath", str(RULES), "--siteconfigpath", str(site),
                "--pidfile", str(base / "spamd.pid"), "--syslog", str(self.log), "--max-children", "2",
                "--min-children", "1"]
        if os.geteuid() == 0:
            # spamd would switch to nobody by itself, with a warning: say it. nobody reads the site folder.
            pwd.getpwnam("nobody")
            for folder in (base, site):
                folder.chmod(0o755)
            argv += ["--username", "nobody"]
        self.launch(argv, base, base / "spamd.out")

    @property
    def target(self) -> str:
        """Its port as a client endpoint string."""
        return f"tcp:127.0.0.1:{self.port}"

    def log_text(self) -> str:
        """Its log and anything it printed, so far."""
        return "\n".join(p.read_text(errors="replace") for p in (self.log, self.base / "spamd.out") if p.exists())

    def ping(self) -> bool:
        """Whether spamd answers PING."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as probe:
                probe.sendall(b"PING SPAMC/1.5\r\n\r\n")
                return probe.recv(64).startswith(b"SPAMD/1.5 0 PONG")
        except OSError:
            return False

    def children(self) -> list[int]:
        """The child processes it said it started."""
        return [int(pid) for pid in re.findall(r"spawned child process, pid (\d+)", self.log_text())]

    def stop(self) -> int | None:
        """Stop spamd (SIGTERM: it stops its children; SIGKILL after a bound); its exit status."""
        status = super().stop()
        deadline = time.monotonic() + TIMEOUT
        for pid in self.children():
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        return status


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live spamd child (not a zombie, not a new process under a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return b"(spamd child)" in stat and stat.rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")


def start_spamd() -> Iterator[PrivateSpamd]:
    """A private spamd for a fixture: skipped without spamd; stopped and its folder removed afterwards."""
    yield from private("esmtpkit-spamd-", spamd_missing(), PrivateSpamd)
