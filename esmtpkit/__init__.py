"""esmtpkit: a Twisted toolkit for writing ESMTP servers: one protocol, one handler per connection.

The names below are imported on first use, so ``import esmtpkit.core`` never loads Twisted.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from esmtpkit import _moved

__all__ = ["Address", "ContentMode", "ESMTPFactory", "ESMTPProtocol", "Envelope", "IMessageHandler", "MessageHandler", "Policy",
           "Reply", "SMTPReply", "Session"]
__version__ = "0.1.0"

_HOMES = {
    "Address": "esmtpkit.core.address",
    "ContentMode": "esmtpkit.core.content",
    "Reply": "esmtpkit.core.reply",
    "SMTPReply": "esmtpkit.core.reply",
    "Envelope": "esmtpkit.core.session",
    "Session": "esmtpkit.core.session",
    "ESMTPFactory": "esmtpkit.server.factory",
    "ESMTPProtocol": "esmtpkit.server.protocol",
    "IMessageHandler": "esmtpkit.server.interfaces",
    "Policy": "esmtpkit.server.policy",
    "MessageHandler": "esmtpkit.handlers.base",
}

_moved.install()

if TYPE_CHECKING:
    from esmtpkit.core.address import Address
    from esmtpkit.core.content import ContentMode
    from esmtpkit.core.reply import Reply, SMTPReply
    from esmtpkit.core.session import Envelope, Session
    from esmtpkit.handlers.base import MessageHandler
    from esmtpkit.server.factory import ESMTPFactory
    from esmtpkit.server.interfaces import IMessageHandler
    from esmtpkit.server.policy import Policy
    from esmtpkit.server.protocol import ESMTPProtocol


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        if name in _moved.MOVED:  # esmtpkit.protocol and the like, as attributes: the old names, deprecated
            return importlib.import_module(f"esmtpkit.{name}")
        raise AttributeError(f"module 'esmtpkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
