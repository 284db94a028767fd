"""Turning library and infrastructure errors into HTTP answers that name what went wrong.

Validation problems are 422 with the same ``detail`` shape FastAPI uses (``loc`` ends with the
field), whether pydantic or quant_core found them; an unreachable database or storage is a 503 with
a message, never a 500. A key over its rate limit is a 429 with ``Retry-After``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DataError, InterfaceError, OperationalError

from api.rate_limit import RateLimitExceeded
from quant_core.errors import ConfigError
from swq_shared.jobs import InvalidCursorError
from swq_shared.storage import NotFoundError, StorageError

log = logging.getLogger(__name__)


def validation_error(exc: ValidationError) -> HTTPException:
    detail = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors(include_url=False)]
    return HTTPException(422, detail)


def _config_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ConfigError)
    loc = ["body", *(exc.field.split(".") if exc.field else [])]
    return JSONResponse({"detail": [{"loc": loc, "msg": str(exc), "type": "value_error"}]}, 422)


def _cursor_error(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": ["query", "cursor"], "msg": str(exc), "type": "value_error"}]}, 422)


def _database_down(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", type(exc).__name__)
    return JSONResponse({"detail": "database unavailable; retry shortly"}, 503, {"Retry-After": "5"})


def _storage_down(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("storage unavailable: %s", exc)
    return JSONResponse({"detail": f"storage unavailable: {exc}"}, 503, {"Retry-After": "5"})


def _storage_object_missing(_request: Request, exc: Exception) -> JSONResponse:
    log.error("storage object missing: %s", exc)
    return JSONResponse({"detail": f"not found in storage: {exc}"}, 404)


def _rate_limited(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RateLimitExceeded)
    return JSONResponse({"detail": str(exc)}, 429, {"Retry-After": str(exc.retry_after_s)})


def _unstorable_value(_request: Request, exc: Exception) -> JSONResponse:
    """Last line of defence: a value the database cannot hold is the request's fault, not a 500."""
    log.warning("request value refused by the database: %s", type(getattr(exc, "orig", exc)).__name__)
    detail = [{"loc": ["request"], "msg": "a value in the request cannot be stored", "type": "value_error"}]
    return JSONResponse({"detail": detail}, 422)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ConfigError, _config_error)
    app.add_exception_handler(InvalidCursorError, _cursor_error)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(InterfaceError, _database_down)
    app.add_exception_handler(DataError, _unstorable_value)
    app.add_exception_handler(NotFoundError, _storage_object_missing)
    app.add_exception_handler(StorageError, _storage_down)
    app.add_exception_handler(RateLimitExceeded, _rate_limited)
