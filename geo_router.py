"""Geographic routing: client IP -> location -> nearest healthy datacenter.

A MaxMind-format City database (the ``db_path`` argument, which the balancer fills from its
config's ``GEOIP_DB_PATH``; this module never reads the environment) is opened once.
Anything that can go wrong with it (missing, corrupt, wrong type, a bad record) is logged
once and routing falls back to the configured default datacenter: geo routing is an
optimisation, never a reason to fail a request.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

EARTH_RADIUS_KM = 6371.0088


@dataclass(frozen=True)
class Location:
    """Where an IP address is, as far as the database knows."""

    latitude: float
    longitude: float
    country: str | None = None
    city: str | None = None


@dataclass(frozen=True)
class Datacenter:
    """A named site with coordinates and the backend URLs that live there."""

    name: str
    latitude: float
    longitude: float
    backends: tuple[str, ...] = field(default_factory=tuple)


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in kilometres between two points given in degrees."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi = phi2 - phi1
    dlambda = math.radians(lon2 - lon1)
    a = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlambda / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def distance_km(location: Location, dc: Datacenter) -> float:
    return haversine_km(location.latitude, location.longitude, dc.latitude, dc.longitude)


def is_routable(ip: str) -> bool:
    """True for a syntactically valid public address worth looking up."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_global


def open_reader(path: str | None) -> Any | None:
    """Open a City database, or log one clear line and return None."""
    if not path:
        log.info("geo routing: no GeoIP database configured; using the default datacenter")
        return None
    import geoip2.database

    try:
        reader = geoip2.database.Reader(path)
    except Exception as exc:  # missing file, corrupt metadata, bad search tree: all mean "no database"
        log.error("geo routing: cannot open GeoIP database %s (%s); using the default datacenter", path, exc)
        return None
    database_type = reader.metadata().database_type
    if "City" not in database_type:
        log.error("geo routing: %s is a %r database, not a City one; using the default datacenter", path, database_type)
        reader.close()
        return None
    return reader


class GeoRouter:
    """Pick the nearest healthy datacenter for a client address."""

    def __init__(
        self,
        datacenters: Sequence[Datacenter],
        default: str | None = None,
        db_path: str | None = None,
        cache_size: int = 4096,
        reader: Any | None = None,
    ) -> None:
        self.datacenters = list(datacenters)
        names = [dc.name for dc in self.datacenters]
        if default is not None and default not in names:
            raise ValueError(f"default datacenter {default!r} is not one of {names}")
        self.default = default or (names[0] if names else None)
        self._reader = reader if reader is not None else open_reader(db_path)
        self._lookup_failed_logged = False
        self.locate = functools.lru_cache(maxsize=cache_size)(self._locate_uncached)

    @property
    def has_database(self) -> bool:
        return self._reader is not None

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self.locate.cache_clear()

    def _locate_uncached(self, ip: str) -> Location | None:
        if self._reader is None or not is_routable(ip):
            return None
        import geoip2.errors

        try:
            record = self._reader.city(ip)
        except geoip2.errors.AddressNotFoundError:
            return None
        except Exception as exc:  # a corrupt record must not fail the request that asked
            if not self._lookup_failed_logged:
                log.error("geo routing: lookup of %s failed (%s); using the default datacenter", ip, exc)
                self._lookup_failed_logged = True
            return None
        lat, lon = record.location.latitude, record.location.longitude
        if lat is None or lon is None:
            return None
        return Location(lat, lon, record.country.iso_code, record.city.name)

    def nearest(self, ip: str, healthy: Collection[str] | None = None) -> Datacenter | None:
        """The nearest datacenter among ``healthy`` names (all when None); default when unknown."""
        candidates = [dc for dc in self.datacenters if healthy is None or dc.name in healthy]
        if not candidates:
            return None
        location = self.locate(ip)
        if location is not None:
            return min(candidates, key=lambda dc: distance_km(location, dc))
        for dc in candidates:
            if dc.name == self.default:
                return dc
        return candidates[0]

    def stats(self) -> dict[str, Any]:
        info = self.locate.cache_info()
        return {
            "database": self.has_database,
            "default_datacenter": self.default,
            "datacenters": [dc.name for dc in self.datacenters],
            "lookup_cache": {"hits": info.hits, "misses": info.misses, "entries": info.currsize},
        }
