"""Request-scoped dependencies: settings, a database session, the caller's tenant (rate limited)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request
from sqlalchemy.orm import Session

from api.rate_limit import RateLimiter
from swq_shared.auth import Caller, KeyCache, tenant_for_key
from swq_shared.db import session_scope
from swq_shared.settings import Settings
from swq_shared.storage import Storage


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_session(settings: Annotated[Settings, Depends(get_app_settings)]) -> Iterator[Session]:
    with session_scope(settings.resolved_database_url) as session:
        yield session


# "function" scope: the transaction commits before the response is sent, so a client that acts on
# the response (submits a job naming a fresh upload, reads a cancelled job) sees what it was told.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def caller_for_key(request: Request, session: Session, key: str) -> Caller | None:
    """The key's tenant, through the app's key cache (a revoked key works at most its TTL longer)."""
    cache: KeyCache = request.app.state.key_cache
    return cache.caller(key, lambda k: tenant_for_key(session, k))


def get_tenant(
    request: Request,
    session: SessionDep,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Caller:
    """The tenant of the API key in ``Authorization: Bearer <key>`` or ``X-API-Key``, within its rate limit.

    The key is checked first, so that a request without a valid key is a 401 that touches no bucket
    (and random keys cannot fill Redis with buckets); a valid key over its limit is a 429.
    """
    key = x_api_key
    if authorization and authorization.lower().startswith("bearer "):
        key = authorization[7:].strip()
    if not key:
        raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})
    tenant = caller_for_key(request, session, key)
    if tenant is None:
        raise HTTPException(401, "invalid or revoked API key", {"WWW-Authenticate": "Bearer"})
    limiter: RateLimiter | None = request.app.state.rate_limiter
    if limiter is not None:
        limiter.check(key)
    return tenant


TenantDep = Annotated[Caller, Depends(get_tenant)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]
