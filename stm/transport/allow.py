"""Source-address allowlists (the planned ``--allow CIDR`` of stm-recv).

A collector must refuse reports from anyone it does not know. The receivers check the
source address of every datagram and connection against an :class:`AddressFilter` first,
before a byte of it is parsed or a TLS handshake starts; what is refused is counted.
Without a filter every address is allowed (the default).

An allowlist is no authentication on its own: UDP source addresses are easily forged.
It narrows who can reach the parsers at all; TLS/DTLS with client certificates says who
the peer is.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from stm.errors import UsageError

__all__ = ["AddressFilter"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_CACHE_LIMIT = 4096


def _address(addr: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address of a socket address (tuple or string); IPv4-mapped IPv6 addresses
    (``::ffff:192.0.2.1``, from a dual-stack socket) as IPv4; None if not an IP address."""
    host = addr[0] if isinstance(addr, tuple) else addr
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return None
    host = host.split("%", 1)[0]  # IPv6 scope (fe80::1%eth0)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class AddressFilter:
    """Allows the addresses in any of ``cidrs`` (``"10.0.0.0/8"``, ``"2001:db8::/32"``,
    or a single address); :meth:`allows` counts every refusal in ``denied``.

    Results are cached per address (a bounded cache), so the per-datagram cost is one
    dict lookup for the few producers a collector knows.
    """

    def __init__(self, cidrs: Iterable[str]) -> None:
        networks: list[_Network] = []
        for cidr in cidrs:
            try:
                networks.append(ipaddress.ip_network(str(cidr).strip(), strict=False))
            except ValueError:
                raise UsageError(f"bad --allow {cidr!r}: not an address or a CIDR prefix") from None
        if not networks:
            raise UsageError("an allowlist needs at least one CIDR prefix")
        self.networks: tuple[_Network, ...] = tuple(networks)
        self.denied = 0
        self._cache: dict[Any, bool] = {}

    @classmethod
    def from_options(cls, cidrs: Iterable[str] | None) -> AddressFilter | None:
        """The filter for repeatable ``--allow`` values; None (allow all) when none given."""
        cidrs = list(cidrs or ())
        return cls(cidrs) if cidrs else None

    def _lookup(self, host: Any) -> bool:
        ip = _address(host)
        if ip is None:
            return False  # not an IP socket address: nothing to match, so not allowed
        return any(ip.version == net.version and ip in net for net in self.networks)

    def allows(self, addr: Any) -> bool:
        """True if ``addr`` (a socket address tuple, or a host string) is allowed; a refusal
        is counted."""
        host = addr[0] if isinstance(addr, tuple) else addr
        ok = self._cache.get(host)
        if ok is None:
            ok = self._lookup(host)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[host] = ok
        if not ok:
            self.denied += 1
        return ok

    def __repr__(self) -> str:
        return f"AddressFilter({[str(n) for n in self.networks]!r}, denied={self.denied})"
