"""The floor for any Twisted SMTP server: canned replies, no parsing, content discarded: ``twisted_floor.py PORT``.

Not an SMTP server worth the name: it answers every command line by its first four bytes and looks for the end
of DATA with one ``find`` per read. It measures what the reactor, the sockets and LineReceiver cost on their own,
so the gap between it and a real server is that server's own work. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import sys

from twisted.internet import protocol, reactor
from twisted.protocols.basic import LineReceiver

_REPLIES = {
    b"HELO": b"250 localhost\r\n",
    b"EHLO": b"250-localhost\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
    b"MAIL": b"250 2.1.0 Ok\r\n",
    b"RCPT": b"250 2.1.5 Ok\r\n",
    b"RSET": b"250 2.0.0 Ok\r\n",
    b"NOOP": b"250 2.0.0 Ok\r\n",
}


class Floor(LineReceiver):
    """Canned replies in line mode; DATA content in raw mode, dropped up to CRLF.CRLF."""

    MAX_LENGTH = 65536

    def connectionMade(self) -> None:
        self._tail = b""
        self.transport.write(b"220 localhost ESMTP\r\n")

    def lineReceived(self, line: bytes) -> None:
        verb = line[:4].upper()
        if verb == b"DATA":
            self.transport.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            self._tail = b"\r\n"
            self.setRawMode()
        elif verb == b"QUIT":
            self.transport.write(b"221 2.0.0 Bye\r\n")
            self.transport.loseConnection()
        else:
            self.transport.write(_REPLIES.get(verb, b"502 5.5.2 Error\r\n"))

    def rawDataReceived(self, data: bytes) -> None:
        buf = self._tail + data
        end = buf.find(b"\r\n.\r\n")
        if end < 0:
            self._tail = buf[-4:]
            return
        self.transport.write(b"250 2.0.0 Ok: discarded\r\n")
        self.setLineMode(buf[end + 5:])


def main() -> None:
    factory = protocol.Factory.forProtocol(Floor)
    factory.noisy = False
    reactor.listenTCP(int(sys.argv[1]), factory, backlog=1024, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
