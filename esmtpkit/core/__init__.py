"""Ring 0, the pure core: addresses, replies, commands, the rule book, the content reader and the conversation.

Nothing here imports Twisted or does I/O: it is fed bytes and returns decisions, so it can be read, tested byte by
byte and shared by the server and the client roles.
"""
