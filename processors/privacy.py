"""How the visitor's IP address is stored (``EnrichSettings.ip_storage``).

* ``anonymized`` (default): IPv4 keeps its /24 (last octet zeroed, ``81.2.69.0``),
  IPv6 its /48 (``2001:db8:1234::``) -- enough for network-level analysis, too little
  to single out a household;
* ``full``: the address as given, normalised (``2001:DB8::0001`` -> ``2001:db8::1``);
* ``none``: nothing is stored.

An IPv4-mapped IPv6 address (``::ffff:81.2.69.142``, what dual-stack sockets report
for IPv4 clients) is treated as the IPv4 address it carries. IPv6 zone ids
(``fe80::1%eth0``) name a local interface, not part of the address, and are dropped.
Anything that is not an IP address gives ``None``; so do ``None`` and non-strings.

The mode is checked once: ``ip_storer(mode)`` returns the function for that mode,
which the hot path calls. ``store_ip(ip, mode)`` is the one-off convenience.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Callable

__all__ = ["IP_STORAGE_MODES", "ip_storer", "store_ip"]

IP_STORAGE_MODES = ("anonymized", "full", "none")

_V4_KEEP = 0xFFFF_FF00  # /24
_V6_KEEP = ((1 << 48) - 1) << 80  # /48

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse(ip: str) -> _Address | None:
    try:
        addr = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    if addr.version == 6:
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr.scope_id is not None:
            return ipaddress.IPv6Address(int(addr))
    return addr


# Events of one visit share an address, so a small cache saves most of the parsing
# (ipaddress costs ~5 us per IPv4 and ~15 us per IPv6 address).
@functools.lru_cache(maxsize=65_536)
def _anonymize(ip: str) -> str | None:
    addr = _parse(ip)
    if addr is None:
        return None
    if addr.version == 4:
        return str(ipaddress.IPv4Address(int(addr) & _V4_KEEP))
    return str(ipaddress.IPv6Address(int(addr) & _V6_KEEP))


@functools.lru_cache(maxsize=65_536)
def _normalise(ip: str) -> str | None:
    addr = _parse(ip)
    return None if addr is None else str(addr)


# No address is longer (45 characters plus a zone id); longer strings are garbage and
# must not fill the caches.
_MAX_LENGTH = 100


def _anonymized(ip: str | None) -> str | None:
    return _anonymize(ip) if isinstance(ip, str) and len(ip) <= _MAX_LENGTH else None


def _full(ip: str | None) -> str | None:
    return _normalise(ip) if isinstance(ip, str) and len(ip) <= _MAX_LENGTH else None


def _none(ip: str | None) -> None:
    return None


_STORERS: dict[str, Callable[[str | None], str | None]] = {
    "anonymized": _anonymized,
    "full": _full,
    "none": _none,
}


def ip_storer(mode: str = "anonymized") -> Callable[[str | None], str | None]:
    """The storage function for ``mode``; raises ValueError for an unknown mode."""
    try:
        return _STORERS[mode]
    except (KeyError, TypeError):
        raise ValueError(f"ip_storage must be one of {', '.join(IP_STORAGE_MODES)}, not {mode!r}") from None


def store_ip(ip: str | None, mode: str = "anonymized") -> str | None:
    """What to store for ``ip`` under ``mode`` (see the module docstring)."""
    return ip_storer(mode)(ip)
