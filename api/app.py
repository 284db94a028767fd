"""The FastAPI application: ``uvicorn api.app:create_app --factory``. OpenAPI at /docs."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from api.dashboard import pages
from api.front.admission import AdmissionControl
from api.front.rate_limit import RateLimiter
from api.routes import health, jobs, uploads
from api.routes.errors import install_error_handlers
from api.routes.metrics import install_metrics
from swq_shared.artifacts import open_settings_storage
from swq_shared.auth import KeyCache
from swq_shared.log_redaction import install_log_redaction
from swq_shared.queue import make_celery
from swq_shared.settings import Settings, get_settings

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(
        title="SWQuant",
        version="1",
        description="Quantize LLMs with blockwise calibration and the Sliced-Wasserstein alignment loss.",
    )
    app.state.settings = settings or get_settings()
    install_log_redaction(app.state.settings)  # before anything can log a URL, a key or a secret
    app.state.celery = make_celery(app.state.settings)
    # One storage client per app: building an S3 client costs tenths of a second.
    app.state.storage = open_settings_storage(app.state.settings)
    app.state.rate_limiter = RateLimiter.from_settings(app.state.settings)
    app.state.key_cache = KeyCache(app.state.settings.api_key_cache_seconds)
    install_error_handlers(app)
    settings = app.state.settings
    app.add_middleware(
        AdmissionControl, limit=settings.max_concurrent_requests, max_lag_s=settings.max_loop_lag_ms / 1000
    )
    install_metrics(app)  # added last, so outermost: it also counts the requests refused with a 503
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(uploads.router)
    pages.install_dashboard(app)
    return app
