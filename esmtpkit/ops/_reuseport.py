"""``twistd esmtpkit --reuse-port``: ``tcp:``/``tcp6:`` listeners bound with ``SO_REUSEPORT``.

Several independent processes (containers, replicas) can then each bind the same port; the kernel gives each its own
accept queue and spreads new connections over them. Uses Twisted's ``tcp.makeBinding(..., reusePort=True)``.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IProtocolFactory, IStreamServerEndpoint
from twisted.internet.tcp import makeBinding
from twisted.python import usage

from esmtpkit.ops.listening import Listener
from esmtpkit.ops.workers import split_description

__all__ = ["check_reuse_port", "reuse_port_endpoint", "reuse_port_service"]


def check_reuse_port(options: usage.Options) -> None:
    """``--reuse-port``: every listener must be ``tcp:``/``tcp6:``, and it excludes ``--workers`` above 1."""
    if not options["reuse-port"]:
        return
    if options["workers"] > 1:
        raise usage.UsageError("--reuse-port and --workers are alternatives: --workers shares one socket already")
    for description in options["listen"]:
        _parse(description)


def _parse(description: str) -> tuple[str, int, int, str]:
    """(kind, port, backlog, interface) of a ``tcp:``/``tcp6:`` string; `usage.UsageError` for anything else."""
    args, kwargs = split_description(description)
    kind = args[0] if args else ""
    if kind not in ("tcp", "tcp6"):
        raise usage.UsageError(f"--reuse-port applies to tcp: and tcp6: listeners, not {description!r}")
    try:
        if len(args) != 2 or set(kwargs) - {"interface", "backlog"}:
            raise ValueError(description)
        port, backlog = int(args[1]), int(kwargs.get("backlog", "50"))
    except ValueError:
        raise usage.UsageError(f"--listen {description!r}: with --reuse-port, give "
                               f"{kind}:PORT[:interface=ADDR][:backlog=N]") from None
    return kind, port, backlog, kwargs.get("interface", "::" if kind == "tcp6" else "")


def reuse_port_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """A TCP server endpoint for a ``tcp:PORT[:interface=ADDR][:backlog=N]`` (or ``tcp6:``) string, with SO_REUSEPORT."""
    kind, port, backlog, interface = _parse(description)
    # The interface is given twice: Twisted picks the address family from it, and checks it matches the binding.
    binding: Any = makeBinding(interface, port, reuseAddress=True, reusePort=True)
    endpoint = TCP6ServerEndpoint if kind == "tcp6" else TCP4ServerEndpoint
    return endpoint(reactor, binding, backlog, interface)


def reuse_port_service(description: str, factory: IProtocolFactory, reactor: Any = None) -> IService:
    """A service listening on ``description`` with SO_REUSEPORT; a port it cannot bind stops twistd in one line."""
    if reactor is None:
        from twisted.internet import reactor as default

        reactor = default
    return Listener("--listen", reuse_port_endpoint(reactor, description), factory)
