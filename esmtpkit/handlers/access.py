"""Who may relay: the rule the Relay and Queue handlers share, so that both open exactly the same door.

A client may have mail passed on to other domains when its session is authenticated, or when its IP address is
inside one of the configured networks (by default this host only). Everyone else is refused at RCPT.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Iterable

from esmtpkit.core.session import Session

__all__ = ["DEFAULT_NETWORKS", "Network", "parse_networks", "may_relay"]

#: Clients that may relay without authenticating: this host only.
DEFAULT_NETWORKS = ("127.0.0.0/8", "::1/128")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(networks: str | Iterable[str]) -> tuple[Network, ...]:
    """Networks from CIDR texts (a comma/space separated string or an iterable); ValueError on a bad one."""
    items = re.split(r"[,\s]+", networks) if isinstance(networks, str) else list(networks)
    return tuple(ipaddress.ip_network(str(item).strip(), strict=False) for item in items if str(item).strip())


def may_relay(session: Session | None, networks: Iterable[Network]) -> bool:
    """True when ``session`` is authenticated or its client's IP is inside one of ``networks``.

    An IPv4 client seen through an IPv6 socket (``::ffff:192.0.2.7``) matches the IPv4 networks too.
    """
    if session is None:
        return False
    if session.authenticated:
        return True
    try:
        ip = ipaddress.ip_address(session.peer_ip)
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    return any(candidate in network for candidate in candidates for network in networks
               if candidate.version == network.version)
