"""Liveness (``/healthz``), readiness (``/readyz``: database, broker and storage all answer) and the
catalog of methods and losses (``/v1/methods``): what a client may ask before it has a job."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from kombu import Connection
from sqlalchemy import text

from api.routes.deps import SettingsDep, StorageDep
from api.routes.schemas import Health
from quant_core.catalog import catalog
from swq_shared.db import get_engine

router = APIRouter(tags=["health"])
CHECK_TIMEOUT_S = 3


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """On the event loop, not in the thread pool: liveness must answer even when the pool is saturated."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(settings: SettingsDep, storage: StorageDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        with get_engine(settings.resolved_database_url).connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any failure means not ready; the reason is reported, not raised
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        with Connection(settings.broker_url, connect_timeout=CHECK_TIMEOUT_S) as connection:
            connection.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT_S)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    try:
        storage.check()
        checks["storage"] = "ok"
    except Exception as exc:
        checks["storage"] = f"unavailable: {exc}"
    ready = all(v == "ok" for v in checks.values())
    body = Health(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/v1/methods", tags=["jobs"])
def methods() -> dict[str, Any]:
    """Every quantization method (summary, default loss, options and defaults) and every loss with its options."""
    return catalog()
