"""A Maildir handler whose greeting names the process serving the connection, for the multi-process tests."""

from __future__ import annotations

import os
from typing import Any

from esmtpkit.handlers.maildir import Maildir
from esmtpkit.core.reply import Reply
from esmtpkit.core.session import Session


class PidMaildir(Maildir):
    """Delivers to a Maildir like its parent class; greets with ``220 pid=<this process's id>``."""

    def connect(self, session: Session) -> Any:
        self.session = session
        return Reply.of(220, f"pid={os.getpid()}")
