"""Turning library and infrastructure errors into HTTP answers that name what went wrong.

Validation problems are 422 with the same ``detail`` shape FastAPI uses (``loc`` ends with the
field), whether pydantic, quant_core or the request layer found them; a job or artifact outside the
caller's tenant is a 404; an unreachable database, storage or queue is a 503 with a message and
``Retry-After``, never a 500. A key over its rate limit is a 429 with ``Retry-After``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DataError, InterfaceError, OperationalError

from api.front.rate_limit import RateLimitExceeded
from quant_core.errors import ConfigError, placed
from swq_shared.errors import InvalidFieldError, NotFoundInTenantError, QueueUnavailableError
from swq_shared.jobs import InvalidCursorError, JobStateError, LabelFilterError
from swq_shared.storage import NotFoundError, StorageError

log = logging.getLogger(__name__)


def field_problem(loc: Sequence[str], message: str) -> list[dict[str, Any]]:
    """A 422's ``detail`` naming one field, shaped like FastAPI's own validation errors."""
    return [{"loc": list(loc), "msg": message, "type": "value_error"}]


def invalid_field(loc: Sequence[str], message: str) -> HTTPException:
    return HTTPException(422, field_problem(loc, message))


def validation_error(exc: ValidationError) -> HTTPException:
    """A request's validation errors as a 422; a check across settings (a ConfigError inside pydantic's
    error) is placed at the field it names, not at the model that ran it."""
    detail = []
    for error in exc.errors(include_url=False):
        loc, message = placed(error)
        detail.append({"loc": ["body", *loc], "msg": message, "type": error["type"]})
    return HTTPException(422, detail)


def _config_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ConfigError)
    return JSONResponse(
        {"detail": field_problem(("body", *(exc.field.split(".") if exc.field else [])), str(exc))}, 422
    )


def _invalid_field(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidFieldError)
    return JSONResponse({"detail": field_problem(exc.loc, str(exc))}, 422)


def _cursor_error(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": field_problem(("query", "cursor"), str(exc))}, 422)


def _label_filter_error(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": field_problem(("query", "metadata"), str(exc))}, 422)


def _not_found(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, 404)


def _conflict(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, 409)


def _queue_down(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("queue unavailable: %s", exc.__cause__ or exc)
    return JSONResponse({"detail": str(exc)}, 503, {"Retry-After": "5"})


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
    return JSONResponse({"detail": field_problem(("request",), "a value in the request cannot be stored")}, 422)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ConfigError, _config_error)
    app.add_exception_handler(InvalidFieldError, _invalid_field)
    app.add_exception_handler(InvalidCursorError, _cursor_error)
    app.add_exception_handler(LabelFilterError, _label_filter_error)
    app.add_exception_handler(NotFoundInTenantError, _not_found)
    app.add_exception_handler(JobStateError, _conflict)
    app.add_exception_handler(QueueUnavailableError, _queue_down)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(InterfaceError, _database_down)
    app.add_exception_handler(DataError, _unstorable_value)
    app.add_exception_handler(NotFoundError, _storage_object_missing)
    app.add_exception_handler(StorageError, _storage_down)
    app.add_exception_handler(RateLimitExceeded, _rate_limited)
