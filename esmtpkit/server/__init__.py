"""Ring 1, the Twisted edge of the server role: the protocol, its factory and service, TLS, PROXY, SASL, monitors,
and the handler contract it calls."""
