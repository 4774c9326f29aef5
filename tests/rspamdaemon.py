"""A private rspamd for tests: the Debian package's own configuration (``/etc/rspamd``, read, never changed) with
every path moved into a temporary directory and overrides there, one normal worker on a loopback port.

Nothing leaves the machine: the modules that ask the internet (RBLs, URL and e-mail lists, fuzzy hashes, DKIM,
SPF, DMARC and ARC lookups, ASN, phishing feeds, remote maps, updates, HELO checks) are turned off, the ones that
need Redis turn themselves off (no Redis is configured), and rspamd's only name server is a UDP socket of the
test's on 127.0.0.1 that never answers: what is left (the reverse lookup of a client without a host name, the
updates of the maps the package ships a copy of) times out there. No controller or proxy worker runs, so nothing
asks for a password, and GTUBE still works: rspamd checks for it in its core, before any module. A rule of the
test's (``ESMTPKIT_ENVELOPE``, score 0) echoes in its options what the request headers told rspamd.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import urllib.request
from pathlib import Path

from twisted.names import dns

from tests.daemons import Daemon, free_port

__all__ = ["RSPAMD", "PrivateRspamd", "rspamd_missing", "GTUBE"]

RSPAMD = shutil.which("rspamd", path="/usr/bin:/usr/sbin:/bin:/sbin")
CONFIG = Path("/etc/rspamd/rspamd.conf")

#: How long rspamd may take to start or stop (a bound, not an expectation).
TIMEOUT = 60.0

#: The test pattern rspamd rejects (its own copy of SpamAssassin's GTUBE).
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

#: Modules that would ask the internet (DNS or HTTP), or keep state we do not want here.
NETWORKED = ("rbl", "surbl", "emails", "fuzzy_check", "dkim", "dkim_signing", "arc", "spf", "dmarc", "asn",
             "phishing", "neural", "url_redirector", "multimap", "whitelist", "rspamd_update", "hfilter", "bimi",
             "mx_check", "greylist", "ratelimit", "replies", "reputation", "history_redis", "dcc", "p0f",
             "spamtrap", "clickhouse", "elastic", "metadata_exporter", "external_services", "antivirus",
             "maillist", "trie")


#: A rule (score 0) whose options echo what the request headers told rspamd, so a test can see them arrive.
ECHO_RULE = """
rspamd_config.ESMTPKIT_ENVELOPE = {
  score = 0.0,
  description = "What the MTA said about the message",
  callback = function(task)
    local said = {}
    local ip = task:get_from_ip()
    if ip and ip:is_valid() then table.insert(said, "ip=" .. ip:to_string()) end
    if task:get_helo() then table.insert(said, "helo=" .. task:get_helo()) end
    if task:get_hostname() then table.insert(said, "hostname=" .. task:get_hostname()) end
    if task:get_user() then table.insert(said, "user=" .. task:get_user()) end
    if task:get_queue_id() then table.insert(said, "qid=" .. task:get_queue_id()) end
    local from = task:get_from("smtp")
    if from and from[1] then table.insert(said, "from=" .. (from[1].addr or "")) end
    for _, rcpt in ipairs(task:get_recipients("smtp") or {}) do table.insert(said, "rcpt=" .. rcpt.addr) end
    task:insert_result("ESMTPKIT_ENVELOPE", 1.0, said)
  end
}
"""


def rspamd_missing() -> str | None:
    """Why a private rspamd cannot run here (None when it can)."""
    if RSPAMD is None or not CONFIG.exists():
        return "rspamd is not installed (apt-get install rspamd: /usr/bin/rspamd, /etc/rspamd/rspamd.conf)"
    return None


class PrivateRspamd(Daemon):
    """rspamd under a new temporary directory (short: rspamd makes a control socket there): ``local.d``,
    ``override.d``, ``db``, ``run``, ``log``. `start` runs it in the foreground and waits for ``/ping``; `stop`
    ends it and removes the directory. ``url`` is its normal worker, ``http://127.0.0.1:PORT``."""

    name = "rspamd"
    ready = "answer /ping"
    timeout = TIMEOUT

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="esmtpkit-rspamd-"))
        self.port = free_port()
        #: rspamd's only name server: a UDP socket on 127.0.0.1 that keeps what it gets and never answers, so
        #: every query rspamd makes times out on this machine (`dns_queries` says which names it asked).
        self.dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.dns.bind(("127.0.0.1", 0))
        self.dns.setblocking(False)
        self.dns_port = int(self.dns.getsockname()[1])
        self.log = self.base / "log" / "rspamd.log"
        for name in ("local.d", "override.d", "db", "run", "log"):
            (self.base / name).mkdir()
        self._configure()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write(self, folder: str, name: str, text: str) -> None:
        (self.base / folder / name).write_text(text)

    def _configure(self) -> None:
        self._write("override.d", "worker-normal.inc", f'bind_socket = "127.0.0.1:{self.port}";\ncount = 1;\n')
        for worker in ("controller", "proxy", "fuzzy"):
            self._write("override.d", f"worker-{worker}.inc", "enabled = false;\ncount = 0;\n")
        self._write("override.d", "logging.inc",
                    f'type = "file";\nfilename = "{self.log}";\nlevel = "info";\n')
        self._write("local.d", "options.inc",
                    f'dns {{\n  nameserver = ["127.0.0.1:{self.dns_port}"];\n  timeout = 0.2s;\n'
                    f'  retransmits = 1;\n}}\ntempdir = "{self.base / "run"}";\n'
                    "local_addrs = [];\nmap_watch_interval = 1h;\n")
        self._write("local.d", "redis.conf", "enabled = false;\n")
        for module in NETWORKED:
            self._write("local.d", f"{module}.conf", "enabled = false;\n")
        # The summary header rspamd's own milter headers module can add, so a test sees the milter block.
        (self.base / "rspamd.local.lua").write_text(ECHO_RULE)
        self._write("local.d", "milter_headers.conf",
                    'use = ["x-spamd-result"];\nskip_local = false;\nskip_authenticated = false;\n')

    def argv(self) -> list[str]:
        variables = {"LOCAL_CONFDIR": self.base, "DBDIR": self.base / "db", "RUNDIR": self.base / "run",
                     "LOGDIR": self.base / "log"}
        argv = [str(RSPAMD), "-f", "-c", str(CONFIG), "-p", str(self.base / "run" / "rspamd.pid")]
        for name, value in variables.items():
            argv += ["--var", f"{name}={value}"]
        if os.geteuid() == 0:
            argv.append("-i")  # root: run the workers as root too (no user to switch to in a temporary dir)
        return argv

    def start(self) -> "PrivateRspamd":
        """Start rspamd and wait until its normal worker answers ``/ping``; fails showing its log otherwise."""
        self.launch(self.argv(), self.base, self.base / "log" / "stdout")
        return self

    def ping(self) -> bool:
        """Whether its normal worker answers ``/ping``."""
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=5) as answer:
                return answer.read().strip() == b"pong"
        except OSError:
            return False

    def dns_queries(self) -> list[str]:
        """The names rspamd asked its name server about since the last call (what would have left the machine)."""
        names = []
        while True:
            try:
                packet = self.dns.recv(65535)
            except BlockingIOError:
                return names
            query = dns.Message()
            query.fromStr(packet)
            names += [str(q.name) for q in query.queries]

    def log_text(self) -> str:
        """What rspamd logged and printed so far."""
        parts = [path.read_text(errors="replace") for path in (self.log, self.base / "log" / "stdout")
                 if path.exists()]
        return "\n".join(parts)

    def remove(self) -> None:
        """Close the name server's socket and remove the temporary directory (after `stop`)."""
        self.dns.close()
        shutil.rmtree(self.base, ignore_errors=True)
