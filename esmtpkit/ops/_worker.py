"""One worker of ``twistd esmtpkit --workers N``: ``python -m esmtpkit.ops._worker <twistd arguments>``.

The supervisor (`esmtpkit.ops.workers`) starts this with its listening sockets on fds 3, 4, … and ``LISTEN_FDS`` /
``LISTEN_FDNAMES`` set, and with a pipe on stdin that it never writes to. Before twistd starts, this module claims
the sockets the way systemd hands them over (``LISTEN_PID`` = this process, sd_listen_fds(3)), so the worker serves
them through Twisted's own ``systemd:`` endpoint, and it watches stdin so that a supervisor that dies without
stopping its workers (SIGKILL, OOM) still gets them to stop gracefully instead of holding the port forever.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

__all__ = ["main", "log_observer"]


def main(argv: list[str]) -> None:
    """Claim the inherited sockets, leave the supervisor's process group, watch stdin, then run twistd."""
    if "twisted.internet.endpoints" in sys.modules:
        raise SystemExit("esmtpkit worker: twisted.internet.endpoints was imported before LISTEN_PID could be set")
    os.environ["LISTEN_PID"] = str(os.getpid())
    # A Ctrl-C on a terminal reaches the supervisor only; it stops the workers itself, each exactly once.
    os.setpgid(0, 0)
    threading.Thread(target=_stop_when_orphaned, name="esmtpkit-supervisor-watch", daemon=True).start()
    sys.argv = ["twistd", *argv]
    from twisted.scripts.twistd import run

    run()


def _stop_when_orphaned() -> None:
    """Block on stdin until the supervisor's end of the pipe closes, then stop gracefully (as on SIGTERM)."""
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def log_observer() -> Any:
    """twistd ``--logger`` factory: every log event as one JSON record on stdout, for the supervisor to re-emit."""
    from twisted.logger import jsonFileLogObserver

    return jsonFileLogObserver(sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
