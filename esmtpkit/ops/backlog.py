"""The listen backlog of ``twistd esmtpkit``'s listeners: room for a burst of ``--max-connections`` at once.

SMTP clients wait for the server to speak first (RFC 5321 §3.1). While a listening socket's accept queue is full,
Linux may still complete handshakes with SYN cookies and then drop them, leaving each such client connected in its
own eyes and waiting for a greeting that never comes. Twisted's default queue (50) fills within milliseconds of a
burst, so every ``tcp:``, ``tcp6:``, ``ssl:`` and ``unix:`` listener (also under ``haproxy:``) that does not say
``backlog=`` gets one sized for ``--max-connections``. The kernel caps every backlog at ``net.core.somaxconn``
without a word; a listener asking for more is logged once, at start.
"""

from __future__ import annotations

import socket
from typing import Iterable

from twisted.logger import Logger

from esmtpkit.ops.workers import split_description

__all__ = ["SOMAXCONN_PATH", "TWISTED_BACKLOG", "somaxconn", "listen_backlog", "requested_backlog", "with_backlog",
           "sized_listeners"]

#: Where Linux shows its cap on listen backlogs (per network namespace).
SOMAXCONN_PATH = "/proc/sys/net/core/somaxconn"
#: Twisted's own default backlog; esmtpkit never chooses a smaller one.
TWISTED_BACKLOG = 50
#: Endpoint types whose backlog esmtpkit sizes, and where their Twisted parser takes it as a positional argument
#: (``tcp:PORT:INTERFACE:BACKLOG``, ``tcp6:PORT:BACKLOG``, ``unix:PATH:MODE:BACKLOG``, ``ssl:`` sixth).
_POSITION = {"tcp": 3, "tcp6": 2, "unix": 3, "ssl": 6}

log = Logger()


def somaxconn(path: str = SOMAXCONN_PATH) -> int | None:
    """The kernel's cap on any listen backlog (``net.core.somaxconn``); None where it cannot be read."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def listen_backlog(max_connections: int, cap: int | None = None) -> int:
    """The backlog for listeners that give none: room for ``max_connections`` clients connecting at once (at
    least Twisted's 50); with no connection limit (0), the kernel's ``cap`` (`socket.SOMAXCONN` when unknown)."""
    if max_connections <= 0:
        return cap if cap else socket.SOMAXCONN
    return max(max_connections, TWISTED_BACKLOG)


def _parts(description: str) -> tuple[str, list[str], dict[str, str]]:
    """(kind, arguments after it, keyword arguments) of an endpoint string, looking through ``haproxy:``."""
    args, kwargs = split_description(description)
    if args[:1] == ["haproxy"]:
        return _parts(description.partition(":")[2])
    return (args[0] if args else ""), args[1:], kwargs


def requested_backlog(description: str) -> str | None:
    """The backlog an endpoint string gives, as written (``backlog=N`` or positional); None if it gives none."""
    kind, args, kwargs = _parts(description)
    if "backlog" in kwargs:
        return kwargs["backlog"]
    position = _POSITION.get(kind)
    if position is not None and len(args) >= position:
        return args[position - 1]
    return None


def with_backlog(description: str, backlog: int) -> str:
    """``description`` with ``:backlog=N`` added when it is a ``tcp:``, ``tcp6:``, ``ssl:`` or ``unix:`` listener
    (also under ``haproxy:``) that gives no backlog; any other string (``systemd:``, ...) as it is."""
    if _parts(description)[0] not in _POSITION or requested_backlog(description) is not None:
        return description
    return f"{description}:backlog={backlog}"


def sized_listeners(descriptions: Iterable[str], max_connections: int, cap: int | None = None) -> list[str]:
    """The ``--listen`` strings as esmtpkit listens on them: `with_backlog` of `listen_backlog`, and a warning for
    each listener asking for more than the kernel's ``cap`` (read from `SOMAXCONN_PATH` when not given)."""
    cap = somaxconn() if cap is None else cap
    backlog = listen_backlog(max_connections, cap)
    sized = [with_backlog(description, backlog) for description in descriptions]
    for description in sized:
        asked = requested_backlog(description)
        if cap and asked is not None and asked.isdigit() and int(asked) > cap:
            log.warn("--listen {description}: the kernel caps the listen backlog at net.core.somaxconn = {cap}, not "
                     "{asked}; raise net.core.somaxconn for bursts of more connections at once",
                     description=description, asked=int(asked), cap=cap)
    return sized
