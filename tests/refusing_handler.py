"""A Maildir handler that refuses, at the end of data, any message whose content mentions SPAM (for the tests)."""

from __future__ import annotations

from typing import Any

from esmtpkit.handlers.maildir import Maildir
from esmtpkit.core.reply import Reply


class RefusingMaildir(Maildir):
    """Delivers like Maildir, except that content containing ``SPAM`` gets ``554 5.7.1`` and is not kept."""

    def data(self) -> Any:
        self._spam = False
        self._tail = b""
        return super().data()

    def body(self, chunk: bytes) -> None:
        probe = self._tail + chunk
        self._spam = self._spam or b"SPAM" in probe
        self._tail = probe[-3:]
        super().body(chunk)

    def eom(self) -> Any:
        if self._spam:
            self.abort("refused")
            return Reply.of(554, "Message refused as spam", enhanced="5.7.1")
        return super().eom()
