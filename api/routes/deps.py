"""Request-scoped dependencies: settings, a database session, the caller's tenant (rate limited).

What does no I/O is ``async``: FastAPI runs a plain ``def`` dependency in its thread pool, and each
such hop (a hand-off to a worker thread and back through the event loop) cost more CPU than the
whole database read of a status poll; with every dependency synchronous a poll made five of them.
Now a poll makes one, for the route itself, unless its key must be looked up or rate limited.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.front.rate_limit import RateLimiter
from swq_shared.auth import Caller, KeyCache, tenant_for_key
from swq_shared.db import read_scope, session_scope
from swq_shared.settings import Settings
from swq_shared.storage import Storage


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_session(settings: Annotated[Settings, Depends(get_app_settings)]) -> Iterator[Session]:
    with session_scope(settings.resolved_database_url) as session:
        yield session


async def get_read_session(settings: Annotated[Settings, Depends(get_app_settings)]) -> AsyncIterator[Session]:
    """Opening it connects to nothing, and closing it sends nothing (autocommit), so neither needs a thread."""
    with read_scope(settings.resolved_database_url) as session:
        yield session


# For routes that only read (status polls, listings, event pages): no BEGIN/COMMIT round trips.
ReadSessionDep = Annotated[Session, Depends(get_read_session)]

# "function" scope: the transaction commits before the response is sent, so a client that acts on
# the response (submits a job naming a fresh upload, reads a cancelled job) sees what it was told.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def caller_for_key(request: Request, session: Session, key: str) -> Caller | None:
    """The key's tenant, through the app's key cache (a revoked key works at most its TTL longer)."""
    cache: KeyCache = request.app.state.key_cache
    return cache.caller(key, lambda k: tenant_for_key(session, k))


async def get_tenant(
    request: Request,
    session: ReadSessionDep,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Caller:
    """The tenant of the API key in ``Authorization: Bearer <key>`` or ``X-API-Key``, within its rate limit.

    The key is checked first, so that a request without a valid key is a 401 that touches no bucket
    (and random keys cannot fill Redis with buckets); a valid key over its limit is a 429. A key the
    cache holds costs no I/O; the lookup and the Redis round trip run in the thread pool.
    """
    key = x_api_key
    if authorization and authorization.lower().startswith("bearer "):
        key = authorization[7:].strip()
    if not key:
        raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})
    cache: KeyCache = request.app.state.key_cache
    tenant = cache.fresh(key) or await run_in_threadpool(caller_for_key, request, session, key)
    if tenant is None:
        raise HTTPException(401, "invalid or revoked API key", {"WWW-Authenticate": "Bearer"})
    limiter: RateLimiter | None = request.app.state.rate_limiter
    if limiter is not None:
        await run_in_threadpool(limiter.check, key)
    return tenant


TenantDep = Annotated[Caller, Depends(get_tenant)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]
