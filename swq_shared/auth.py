"""Tenants and API keys. Keys are random tokens shown once; only their SHA-256 digest is stored."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from swq_shared.models import ApiKey, Tenant, utcnow

KEY_PREFIX = "swq_"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(session: Session, tenant_name: str, key_name: str = "") -> str:
    """A new key for the tenant (created if needed); the plain key is returned once and never stored."""
    tenant = get_or_create_tenant(session, tenant_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, digest=digest(key), name=key_name))
    session.flush()
    return key


@dataclass(frozen=True)
class Caller:
    """The tenant a valid key belongs to: all a request needs of it, and safe to share between threads."""

    id: str
    name: str


def tenant_for_key(session: Session, key: str) -> Caller | None:
    """The tenant owning an active key, or None (unknown or revoked)."""
    tenant = session.scalar(
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.digest == digest(key), ApiKey.revoked_at.is_(None))
    )
    return None if tenant is None else Caller(tenant.id, tenant.name)


def revoke_api_key(session: Session, key: str) -> bool:
    """Mark the key revoked; False when no active key matches. API processes honour it within ``KeyCache.ttl_s``."""
    stored = session.scalar(select(ApiKey).where(ApiKey.digest == digest(key), ApiKey.revoked_at.is_(None)))
    if stored is None:
        return False
    stored.revoked_at = utcnow()
    session.flush()
    return True


class KeyCache:
    """Valid keys' tenants, remembered for ``ttl_s`` seconds by each API process.

    A client polling a job sends the same key several times a second; looking it up in the database
    every time was a query and a transaction per request. Remembering it briefly bounds how long a
    revoked key keeps working (``ttl_s`` after the revocation commits, in every process) and costs one
    lookup per key and period. Unknown keys are never remembered, so random keys cannot fill the
    cache and a new key works at once; the cache holds at most ``max_keys`` keys (least recently used
    out first), by digest, never the plain key.
    """

    def __init__(self, ttl_s: float, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_keys, self._clock = ttl_s, max_keys, clock
        self._entries: OrderedDict[str, tuple[Caller, float]] = OrderedDict()
        self._lock = threading.Lock()

    def fresh(self, key: str) -> Caller | None:
        """The key's tenant if the cache holds it and it has not expired; never looks anything up."""
        if self.ttl_s <= 0:
            return None
        hashed = digest(key)
        with self._lock:
            entry = self._entries.get(hashed)
            if entry is None or entry[1] <= self._clock():
                return None
            self._entries.move_to_end(hashed)
            return entry[0]

    def caller(self, key: str, lookup: Callable[[str], Caller | None]) -> Caller | None:
        """The key's tenant from the cache while fresh, else from ``lookup`` (remembered if valid)."""
        if self.ttl_s <= 0:
            return lookup(key)
        cached = self.fresh(key)
        if cached is not None:
            return cached
        hashed, now = digest(key), self._clock()
        found = lookup(key)
        with self._lock:
            if found is None:
                self._entries.pop(hashed, None)
            else:
                self._entries[hashed] = (found, now + self.ttl_s)
                self._entries.move_to_end(hashed)
                while len(self._entries) > self.max_keys:
                    self._entries.popitem(last=False)
        return found
