"""Handlers to use or subclass: `MessageHandler` gives every verb its default reply."""

from .amqp import AMQP
from .base import MessageHandler
from .collecting import Collecting, Message, MessageStore
from .debug import Debug
from .maildir import Maildir
from .null import Null
from .relay import Relay

__all__ = ["MessageHandler"]
__all__ += ["Collecting", "Debug", "Maildir", "Message", "MessageStore", "Null", "Relay"]
__all__ += ["AMQP"]
