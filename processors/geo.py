"""Geo enrichment: country, region, city and a location record from the visitor's IP.

``GeoLookup(path)`` opens a MaxMind-format City database (GeoIP2/GeoLite2 City or
Enterprise, DB-IP City; a Country database works too and gives country only).
``lookup(ip)`` returns a :class:`Geo`:

* ``country``: ISO 3166-1 alpha-2 code of the country the address is in (``"GB"``);
  the *registered* country (the ISP's) is not used, it says nothing of the visitor;
* ``region``: name of the *first*, i.e. largest, subdivision (``"England"`` for
  Boxford, not ``"West Berkshire"``). Databases list subdivisions largest first and
  the depth varies by country and by address; the first level (US state, German
  Land, UK country, ...) is the one that is comparable across rows;
* ``city``: city name;
* ``location``: a dict for the ``location`` jsonb column with whichever of
  ``latitude``, ``longitude``, ``accuracy_radius`` (km), ``time_zone``,
  ``postal_code`` are known; ``None`` when none is.

Names are in the first of ``locales`` the database has (default English).

Bad input never raises: ``None``, non-strings, malformed addresses, and addresses no
database can place (private, loopback, link-local, CGNAT, multicast, reserved,
documentation ranges) give ``NO_GEO`` (all ``None``), as do addresses the database
does not list. Results are cached (LRU) per IP string; cached ``Geo`` objects are
shared, so treat ``location`` as read-only.
"""

from __future__ import annotations

import functools
import ipaddress
import os
from dataclasses import dataclass
from typing import Any, Sequence

import geoip2.database
import geoip2.errors
import maxminddb

__all__ = ["Geo", "GeoLookup", "NO_GEO"]

# No textual address is longer (45 characters plus a zone id); longer input is
# garbage and must not fill the cache.
_MAX_IP_LENGTH = 100


@dataclass(frozen=True, slots=True)
class Geo:
    country: str | None = None
    region: str | None = None
    city: str | None = None
    location: dict[str, Any] | None = None


NO_GEO = Geo()


class GeoLookup:
    """IP -> :class:`Geo` from a MaxMind-format database, with an LRU cache."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        cache_size: int = 50_000,
        locales: Sequence[str] = ("en",),
    ) -> None:
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, not {cache_size!r}")
        # Opening is the only I/O: the file is memory-mapped, lookups read the map.
        self._reader = geoip2.database.Reader(os.fspath(path), locales=list(locales))
        self.database_type = self._reader.metadata().database_type
        if "City" in self.database_type or "Enterprise" in self.database_type:
            self._query = self._reader.city
        elif "Country" in self.database_type:
            self._query = self._reader.country
        else:
            self._reader.close()
            raise ValueError(f"{os.fspath(path)}: a City or Country database is needed, not {self.database_type}")
        self._cached = functools.lru_cache(maxsize=cache_size)(self._lookup_uncached)

    def lookup(self, ip: str | None) -> Geo:
        if not isinstance(ip, str) or len(ip) > _MAX_IP_LENGTH:
            return NO_GEO
        return self._cached(ip)

    __call__ = lookup

    def _lookup_uncached(self, ip: str) -> Geo:
        try:
            addr = ipaddress.ip_address(ip.strip())
        except ValueError:
            return NO_GEO
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # ::ffff:a.b.c.d from dual-stack sockets
        if not addr.is_global:
            # Private, loopback, link-local, CGNAT, reserved, documentation, ...:
            # no database can place these, and a lookup could only mislead.
            return NO_GEO
        try:
            record = self._query(str(addr))
        except geoip2.errors.AddressNotFoundError:
            return NO_GEO
        except maxminddb.InvalidDatabaseError:
            # A damaged record: this address gets no geo, the worker goes on.
            return NO_GEO
        return _to_geo(record)

    def cache_info(self):
        """``functools`` statistics of the lookup cache."""
        return self._cached.cache_info()

    def close(self) -> None:
        """Close the database. Later lookups of uncached addresses raise ValueError."""
        self._cached.cache_clear()
        self._reader.close()

    def __enter__(self) -> GeoLookup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _to_geo(record: Any) -> Geo:
    country = record.country.iso_code
    region = city = None
    location: dict[str, Any] = {}
    subdivisions = getattr(record, "subdivisions", None)  # absent from Country records
    if subdivisions:
        region = subdivisions[0].name
    if hasattr(record, "city"):
        city = record.city.name
        loc = record.location
        for key, value in (
            ("latitude", loc.latitude),
            ("longitude", loc.longitude),
            ("accuracy_radius", loc.accuracy_radius),
            ("time_zone", loc.time_zone),
            ("postal_code", record.postal.code),
        ):
            if value is not None:
                location[key] = value
    if country is None and region is None and city is None and not location:
        return NO_GEO
    return Geo(country, region, city, location or None)
