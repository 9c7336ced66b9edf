"""Which address is the client: the TCP peer, or what trusted proxies say.

Only a peer inside ``trusted_proxies`` is believed. Its ``Forwarded`` (RFC 7239) or,
failing that, ``X-Forwarded-For`` chain is walked from the right (nearest hop first),
skipping trusted addresses; the first untrusted address is the client. Hops further
left were written by the client itself and prove nothing.

* A hop that is not an IP (``unknown``, an obfuscated ``_token``, garbage) stops the
  walk: the client is then the last address we could verify (a trusted proxy).
* If every hop is trusted, the leftmost one is the client (traffic from inside).
* IPv4-mapped IPv6 addresses (``::ffff:192.0.2.1``) are reported as plain IPv4.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Bounds the work one request can cause; real proxy chains are a few hops long.
MAX_HOPS = 32


def parse_hop(raw: str) -> IPAddress | None:
    """An address from one Forwarded ``for=`` / X-Forwarded-For entry, or None."""
    s = raw.strip().strip('"')
    if not s:
        return None
    if s[0] == "[":  # "[2001:db8::1]" or "[2001:db8::1]:4711"
        end = s.find("]")
        if end < 0:
            return None
        s = s[1:end]
    elif s.count(":") == 1:  # "192.0.2.1:4711"
        s = s.partition(":")[0]
    try:
        ip = ipaddress.ip_address(s)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ClientIPResolver:
    def __init__(self, trusted: Iterable[IPNetwork]) -> None:
        self.trusted: tuple[IPNetwork, ...] = tuple(trusted)
        # Per-instance bounded cache: the same few proxy / client strings repeat a lot.
        self._classify = lru_cache(maxsize=4096)(self._classify_uncached)

    def _classify_uncached(self, raw: str) -> tuple[str | None, bool]:
        ip = parse_hop(raw)
        if ip is None:
            return None, False
        return str(ip), any(ip in net for net in self.trusted)

    def resolve(
        self,
        peer: str | None,
        forwarded: Sequence[Mapping[str, str]] | None = None,
        x_forwarded_for: Iterable[str] = (),
    ) -> str | None:
        """The client address. ``forwarded``: parsed Forwarded elements (aiohttp's
        ``request.forwarded``); ``x_forwarded_for``: every X-Forwarded-For header value."""
        if peer is None:
            return None
        peer_ip, trusted = self._classify(peer)
        if peer_ip is None:
            return peer  # not an IP (e.g. a unix socket path): report as is
        if not trusted:
            return peer_ip
        hops: list[str] = []
        if forwarded and any("for" in element for element in forwarded):
            # An element without "for" is a proxy that did not disclose: an unknown hop.
            hops = [element.get("for", "unknown") for element in forwarded]
        else:
            for value in x_forwarded_for:
                hops.extend(value.split(","))
        return self._walk(peer_ip, hops)

    def resolve_request(self, request) -> str | None:
        """``resolve`` for an aiohttp request; headers are parsed only for a trusted peer."""
        peer = request.remote
        if peer is None:
            return None
        peer_ip, trusted = self._classify(peer)
        if peer_ip is None:
            return peer
        if not trusted:
            return peer_ip
        return self.resolve(peer, request.forwarded, request.headers.getall("X-Forwarded-For", ()))

    def _walk(self, peer_ip: str, hops: list[str]) -> str:
        last = peer_ip
        for raw in reversed(hops[-MAX_HOPS:]):
            ip, trusted = self._classify(raw)
            if ip is None:
                return last
            if not trusted:
                return ip
            last = ip
        return last

    def cache_info(self):  # for tests / debugging
        return self._classify.cache_info()
