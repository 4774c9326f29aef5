"""Take the messages the AMQP handler queued and deliver each into a Maildir, acknowledging only after it is on disk.

    python examples/amqp_consumer.py --url amqp://guest:guest@127.0.0.1:5672/%2F --queue mail --maildir ~/Maildir

Run as many consumers as you like, on any host: RabbitMQ hands each message to one of them, and takes it back for
another if a consumer dies before its ack. A message is therefore delivered at least once; ``--count`` stops after
that many messages (handy in tests). The file written is ``Return-Path:`` (from the envelope sender, RFC 5321 §4.4)
followed by the queued bytes, which begin with the ``Received:`` field the SMTP server added.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import pika

from esmtpkit.handlers.amqp import DEFAULT_QUEUE, DEFAULT_URL, QUEUE_ARGUMENTS
from esmtpkit.handlers.maildir import unique_name
from esmtpkit.core.trace import return_path_header


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def deliver(maildir: str, data: bytes) -> str:
    """Write ``data`` as a new Maildir message: tmp/, fsync, rename into new/, fsync new/. Returns the file name."""
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, sub), mode=0o700, exist_ok=True)
    name = unique_name()
    tmp, new = os.path.join(maildir, "tmp", name), os.path.join(maildir, "new", name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, new)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(new))
    return name


def consume(url: str, queue: str, maildir: str, count: int = 0, prefetch: int = 16) -> int:
    """Deliver messages from ``queue`` until ``count`` are done (0: forever). Returns the number delivered."""
    maildir = os.path.abspath(os.path.expanduser(maildir))
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True, arguments=dict(QUEUE_ARGUMENTS))
    channel.basic_qos(prefetch_count=prefetch)
    done = 0

    def on_message(channel: Any, method: Any, properties: Any, body: bytes) -> None:
        nonlocal done
        headers = properties.headers or {}
        name = deliver(maildir, return_path_header(headers.get("sender", "")) + body)
        channel.basic_ack(method.delivery_tag)  # only now: the message is safe on disk
        done += 1
        recipients = ", ".join(headers.get("recipients", []))
        print(f"{properties.message_id} -> {name} (for {recipients})", flush=True)
        if count and done >= count:
            channel.stop_consuming()

    channel.basic_consume(queue, on_message)
    try:
        channel.start_consuming()
    except KeyboardInterrupt:
        channel.stop_consuming()
    finally:
        connection.close()
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="the broker's AMQP URL (default: %(default)s)")
    parser.add_argument("--queue", default=DEFAULT_QUEUE, help="the queue to read (default: %(default)s)")
    parser.add_argument("--maildir", default="Maildir", help="where to deliver (default: %(default)s)")
    parser.add_argument("--count", type=int, default=0, help="stop after this many messages (default: never)")
    args = parser.parse_args(argv)
    consume(args.url, args.queue, args.maildir, args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
