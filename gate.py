"""The request gate: who a request is (API key identity, client-IP subject) and the limiter
subjects the decision counts against.

``KeyDirectory`` maps a presented key to its immutable identity with a per-process cache; tier
and blocked state stay in the limiter store, so every worker sees a change on the next request.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hmac
import ipaddress
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

import auth
import database as db

KEY_TAG_CHARS = 16  # hex digits of the key's hash in its limiter subject


def key_subject(key_id: int, key_hash: str) -> str:
    """Limiter subject of an API key: id and the start of the key's hash, so that a cached record
    or store entry of a deleted key can never match a later key that got the same id."""
    return f"k:{key_id}.{key_hash[:KEY_TAG_CHARS]}"


def user_subject(user_id: int, stamp: str) -> str:
    """Limiter subject of a user's tokens: id and account stamp (``auth.account_stamp``), so that a
    deleted account's tokens never reach the meta or counters of an account that got the same id."""
    return f"u:{user_id}.{stamp}"


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    """Identity of an API key (immutable); tier and blocked state live in the limiter store."""

    id: int
    user_id: int
    prefix: str
    name: str
    tag: str  # the start of the key's hash: binds the record to this very key
    expires_at: float | None = None  # epoch seconds; immutable, so the per-process cache may hold it

    @property
    def subject(self) -> str:
        return key_subject(self.id, self.tag)


class KeyDirectory:
    """Per-process cache from key hash to identity, with a negative cache for unknown keys.

    Keys are random, so an unknown hash stays unknown: caching misses briefly is safe and
    keeps key enumeration from reaching the database on every guess.
    """

    def __init__(self, engine: sa.engine.Engine, *, size: int = 50_000, miss_ttl: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._size = size
        self._miss_ttl = miss_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._hits: collections.OrderedDict[str, KeyRecord] = collections.OrderedDict()
        self._misses: collections.OrderedDict[str, float] = collections.OrderedDict()

    def cached(self, raw_key: str) -> tuple[str, KeyRecord | None, bool]:
        """(hash, record, known) from the cache only; ``known`` False means ask the database."""
        key_hash = auth.hash_api_key(raw_key)
        with self._lock:
            record = self._hits.get(key_hash)
            if record is not None:
                self._hits.move_to_end(key_hash)
                return key_hash, record, True
            expires = self._misses.get(key_hash)
            if expires is not None and expires > self._clock():
                return key_hash, None, True
        return key_hash, None, False

    def load(self, key_hash: str) -> KeyRecord | None:
        """Look the hash up in the database (active keys only) and cache the answer."""
        c = db.api_keys.c
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(c.id, c.user_id, c.prefix, c.name, c.key_hash, c.expires_at)
                .where(c.key_hash == key_hash, c.revoked_at.is_(None))
            ).first()
        record = None
        if row is not None and hmac.compare_digest(row.key_hash, key_hash):
            record = KeyRecord(row.id, row.user_id, row.prefix, row.name, row.key_hash[:KEY_TAG_CHARS],
                               db.epoch(row.expires_at))
        with self._lock:
            if record is None:
                self._misses[key_hash] = self._clock() + self._miss_ttl
                self._trim(self._misses)
            else:
                self._hits[key_hash] = record
                self._trim(self._hits)
        return record

    def _trim(self, cache: collections.OrderedDict[str, Any]) -> None:
        while len(cache) > self._size:
            cache.popitem(last=False)

    def forget(self, key_id: int) -> None:
        with self._lock:
            for key_hash, record in list(self._hits.items()):
                if record.id == key_id:
                    del self._hits[key_hash]


def ip_subject(address: str, ipv6_prefix: int) -> str:
    """What the per-IP limit, bans and throttles count: an IPv4 address as it is, an IPv6 address
    as its /``ipv6_prefix`` network (one client holds a whole /64, so per-address limits on IPv6
    would be no limits), an IPv4-mapped IPv6 address as its IPv4 address. Anything else (a
    malformed forwarded header) stays as it came, so it is still counted."""
    if len(address) > MAX_ADDRESS_CHARS:  # no address is this long; not worth a cache slot either
        return address
    return _ip_subject(address, ipv6_prefix)


MAX_ADDRESS_CHARS = 64


@functools.lru_cache(maxsize=16384)
def _ip_subject(address: str, ipv6_prefix: int) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ipv6_prefix >= 128:
        return str(ipaddress.IPv6Address(int(ip)))  # int(): without a zone id ("%eth0")
    return str(ipaddress.IPv6Network((int(ip), ipv6_prefix), strict=False))
