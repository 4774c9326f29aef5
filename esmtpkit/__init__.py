"""esmtpkit: a Twisted toolkit for writing ESMTP servers: one protocol, one handler per connection."""

from .address import Address
from .factory import ESMTPFactory
from .handlers.base import MessageHandler
from .interfaces import IMessageHandler
from .policy import Policy
from .protocol import ESMTPProtocol
from .reply import Reply, SMTPReply
from .session import Envelope, Session

__all__ = ["Address", "ESMTPFactory", "ESMTPProtocol", "Envelope", "IMessageHandler", "MessageHandler", "Policy",
           "Reply", "SMTPReply", "Session"]
__version__ = "0.1.0"
