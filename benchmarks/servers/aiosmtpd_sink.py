"""aiosmtpd with a handler that accepts every message and keeps nothing: ``aiosmtpd_sink.py PORT``.

Run by benchmarks/run.py with the peers' virtualenv. Listens on 127.0.0.1 only, with no size limit so the
100 MiB scenario is accepted.
"""

from __future__ import annotations

import asyncio
import sys

from aiosmtpd.smtp import SMTP


class Discard:
    """Answer 250 at the end of every message and drop its content."""

    async def handle_DATA(self, server: SMTP, session: object, envelope: object) -> str:
        return "250 OK discarded"


def main() -> None:
    port = int(sys.argv[1])
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    handler = Discard()
    server = loop.run_until_complete(loop.create_server(
        lambda: SMTP(handler, data_size_limit=None, hostname="localhost", loop=loop),
        host="127.0.0.1", port=port, backlog=1024))
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    main()
