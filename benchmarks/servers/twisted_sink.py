"""twisted.mail.smtp with an IMessageDelivery whose messages are thrown away: ``twisted_sink.py PORT``.

Run by benchmarks/run.py with the peers' virtualenv. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import sys

from twisted.internet import defer, reactor
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDelivery
from zope.interface import implementer


@implementer(smtp.IMessage)
class DiscardedMessage:
    """Ignore every line; succeed at the end of the message."""

    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> defer.Deferred:
        return defer.succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(IMessageDelivery)
class Discard:
    """Accept every sender and recipient; no Received header."""

    def receivedHeader(self, helo, origin, recipients):
        return None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        return DiscardedMessage


class Factory(smtp.SMTPFactory):
    protocol = smtp.ESMTP
    domain = "localhost"

    def buildProtocol(self, addr):
        proto = super().buildProtocol(addr)
        proto.delivery = Discard()
        return proto


def main() -> None:
    port = int(sys.argv[1])
    reactor.listenTCP(port, Factory(), backlog=1024, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
