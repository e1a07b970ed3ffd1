"""Which source addresses may send requests (``dmq.allowed_sources``).

One class for the main process and the UDP receiver processes, so both refuse exactly the same
sources with 403.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

__all__ = ["SourceFilter"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class SourceFilter:
    """CIDR networks allowed to send; both ``0.0.0.0/0`` and ``::/0`` mean everyone (no check).

    A dual-stack socket reports IPv4 peers as ``::ffff:a.b.c.d``: those are compared as IPv4.
    """

    def __init__(self, networks: Iterable[Network | str]) -> None:
        self.networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in networks
        )
        self.everyone = {"0.0.0.0/0", "::/0"} <= {str(n) for n in self.networks}
        self._check = lru_cache(maxsize=4096)(self._inside)

    def allows(self, host: str) -> bool:
        """Whether ``host`` (an IP literal, brackets allowed) may send requests."""
        return self.everyone or self._check(host)

    def _inside(self, host: str) -> bool:
        text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)
