"""``--log-format json``: every log event as one JSON object per line, where twistd would write its text log.

twistd picks its log observer before the service exists, through its ``--logger`` option (a factory called with
no arguments). `use_json` records where the log goes (twistd's ``--logfile`` and ``-n``) and returns the name
of `json_observer`, which the esmtpkit options hand to twistd as that factory.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.logger import ILogObserver, formatEvent, jsonFileLogObserver
from zope.interface import provider

__all__ = ["use_json", "json_observer", "json_lines_observer"]

_destination: dict[str, Any] = {"logfile": None, "nodaemon": True}


def use_json(logfile: str | None, nodaemon: bool) -> str:
    """Remember twistd's ``--logfile``/``-n``; return the ``--logger`` name that writes JSON lines there."""
    _destination.update(logfile=logfile, nodaemon=nodaemon)
    return f"{__name__}.json_observer"


def json_lines_observer(out: IO[str]) -> ILogObserver:
    """An observer writing each event to ``out`` as JSON (``jsonFileLogObserver``), one per line, with the
    formatted message in ``text`` for log shippers that do not read Twisted's ``log_format``."""
    write = jsonFileLogObserver(out, recordSeparator="")

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        event = dict(event)
        event.setdefault("text", formatEvent(event))
        write(event)

    return observe


def json_observer() -> ILogObserver:
    """twistd's ``--logger`` factory: JSON lines to stdout (``-n`` without ``--logfile``, or ``--logfile -``),
    else to the ``--logfile`` (twistd.log by default), rotated at 1 MB and on SIGUSR1 as twistd's own log is."""
    logfile, nodaemon = _destination["logfile"], _destination["nodaemon"]
    if logfile == "-" or (nodaemon and not logfile):
        return json_lines_observer(sys.stdout)
    from twisted.python.logfile import LogFile

    out = LogFile.fromFullPath(logfile or "twistd.log")
    _rotate_on_usr1(out)
    return json_lines_observer(out)  # type: ignore[arg-type]


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
