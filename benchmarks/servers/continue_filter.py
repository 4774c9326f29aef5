"""``twistd esmtpkit`` with one more ``--filter`` kind, ``continue``: an in-process `MessageFilter` that answers
CONTINUE to every message, so a benchmark sees what the filter front costs on its own (holding the message at the
end of data, asking the chain, replaying the message to the handler) under exactly the options twistd is given.

    python continue_filter.py -n --pidfile= esmtpkit --handler esmtpkit.handlers.null.Null \\
        --filter continue:in-process[,read=yes] ...

``read=yes`` makes the filter read the whole held message (64 KiB chunks) before answering, as a scanner would.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

from esmtpkit.filters import registry
from esmtpkit.filters.base import MessageFilter
from esmtpkit.filters.interfaces import HeldMessage
from esmtpkit.filters.verdict import CONTINUE, Verdict


class Continue(MessageFilter):
    """CONTINUE for every message; with ``read``, after reading it all."""

    name = "continue"

    def __init__(self, read: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.read = read

    def check(self, message: HeldMessage) -> Verdict:
        if self.read:
            for _ in message.chunks():
                pass
        return CONTINUE


def from_spec(target: str, options: Mapping[str, str], *, reactor: Any = None) -> Continue:
    """``continue:ANYTHING[,read=yes|no]``, plus the ``name``, ``timeout`` and ``on-failure`` every filter takes."""
    unknown = set(options) - {"read", "name", "timeout", "on-failure"}
    if unknown:
        raise ValueError(f"unknown option {sorted(unknown)[0]!r}")
    if options.get("read", "no") not in ("yes", "no"):
        raise ValueError("read is yes or no")
    timeout = float(options["timeout"]) if "timeout" in options else None
    return Continue(options.get("read") == "yes", name=options.get("name"), timeout=timeout,
                    on_failure=options.get("on-failure"))


if __name__ == "__main__":
    # The registry imports a kind's module by name: this script is __main__, already imported.
    registry.KINDS = {**registry.KINDS, "continue": "__main__"}
    from twisted.scripts.twistd import run

    sys.argv[0] = "twistd"
    run()
