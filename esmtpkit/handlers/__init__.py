"""Handlers to use or subclass: `MessageHandler` gives every verb its default reply."""

from esmtpkit.handlers.amqp import AMQP
from esmtpkit.handlers.base import MessageHandler
from esmtpkit.handlers.collecting import Collecting, Message, MessageStore
from esmtpkit.handlers.debug import Debug
from esmtpkit.handlers.maildir import Maildir
from esmtpkit.handlers.null import Null
from esmtpkit.handlers.queue import Queue
from esmtpkit.handlers.relay import Relay

__all__ = ["MessageHandler"]
__all__ += ["Collecting", "Debug", "Maildir", "Message", "MessageStore", "Null", "Relay"]
__all__ += ["AMQP"]
__all__ += ["Queue"]
