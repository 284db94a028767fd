"""Prometheus metrics at ``GET /metrics``: the API's own traffic, and the service's state from the database.

Two sources, so that no new server has to run beside the workers:

- **HTTP**, counted by a middleware in this process: requests by route template, method and status,
  and a latency histogram per route. With several API processes (gunicorn or uvicorn workers), set
  ``PROMETHEUS_MULTIPROC_DIR`` to a shared empty folder and every process's counts are summed.
- **Jobs and workers**, read at scrape time from the database the workers already write and from the
  broker: jobs by status, queue depth per queue, block progress of running jobs, job durations,
  attempts, failures by cause and time per calibrated block. Every worker's figures therefore reach
  Prometheus through the API, whatever machine the worker runs on.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator

from fastapi import APIRouter, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from api.front.admission import ASGIApp, Message, Receive, Scope, Send
from swq_shared.db import session_scope
from swq_shared.models import Job, JobEvent, JobStatus
from swq_shared.settings import Settings

logger = logging.getLogger(__name__)
# Job durations span seconds (a tiny test model) to a day (a 70B model on one GPU).
DURATION_BUCKETS = (10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 24 * 3600)
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
QUEUES = ("gpu", "cpu")


class HttpMetrics:
    """The request counter and latency histogram, in a registry of their own (or multiprocess files).

    A plain ASGI middleware rather than Starlette's ``BaseHTTPMiddleware``, whose extra task and
    streams per request cost more than the counting itself on the polling paths.
    """

    def __init__(self, app: ASGIApp, registry: CollectorRegistry | None) -> None:
        self.app = app
        self.requests = Counter(
            "swquant_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=registry
        )
        self.latency = Histogram(
            "swquant_http_request_seconds",
            "Time from request to response",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            # The route's template, never the raw path: job ids must not become label values.
            template = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(template, scope["method"], str(status)).inc()
            self.latency.labels(template, scope["method"]).observe(time.perf_counter() - started)


class ServiceCollector(Collector):
    """Jobs, queues and worker figures, computed from the database and the broker at every scrape."""

    def __init__(self, settings: Settings, queue_lengths: Callable[[], dict[str, int]]) -> None:
        self.settings, self.queue_lengths = settings, queue_lengths

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._from_database()
        except Exception as exc:  # a scrape reports what it can; the database's absence is itself a signal
            logger.warning("metrics: database unavailable: %s", type(exc).__name__)
            yield GaugeMetricFamily("swquant_database_up", "Whether the database answered the scrape", 0)
        try:
            depth = GaugeMetricFamily("swquant_queue_depth", "Jobs waiting in the broker", labels=["queue"])
            for queue, length in self.queue_lengths().items():
                depth.add_metric([queue], length)
            yield depth
        except Exception as exc:
            logger.warning("metrics: broker unavailable: %s", type(exc).__name__)

    def _from_database(self) -> Iterator[Metric]:
        with session_scope(self.settings.resolved_database_url) as session:
            by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            jobs = GaugeMetricFamily("swquant_jobs", "Jobs by status", labels=["status"])
            for status in JobStatus:
                jobs.add_metric([status.value], by_status.get(status.value, 0))
            attempts = session.scalar(select(func.coalesce(func.sum(Job.attempts), 0)))
            failures = CounterMetricFamily("swquant_job_failures", "Failed jobs by cause", labels=["code"])
            failed = select(Job.error_code, func.count()).where(Job.status == JobStatus.failed.value)
            for code, count in session.execute(failed.group_by(Job.error_code)).all():
                failures.add_metric([code or "unknown"], count)
            finished = session.execute(
                select(Job.started_at, Job.finished_at).where(Job.finished_at.is_not(None), Job.started_at.is_not(None))
            ).all()
            running = session.execute(
                select(Job.id, Job.blocks_done, Job.num_blocks).where(Job.status == JobStatus.running.value)
            ).all()
            seconds = JobEvent.data["seconds"].as_float()
            block_count, block_sum = session.execute(
                select(func.count(), func.coalesce(func.sum(seconds), 0.0)).where(JobEvent.kind == "block")
            ).one()
        yield GaugeMetricFamily("swquant_database_up", "Whether the database answered the scrape", 1)
        yield jobs
        yield CounterMetricFamily("swquant_job_attempts", "Worker attempts over all jobs", attempts)
        yield failures
        yield _histogram(
            "swquant_job_duration_seconds",
            "Running time of finished jobs",
            [(end - start).total_seconds() for start, end in finished],
        )
        done = GaugeMetricFamily("swquant_job_blocks_done", "Blocks calibrated by a running job", labels=["job_id"])
        total = GaugeMetricFamily("swquant_job_blocks", "Blocks of a running job's model", labels=["job_id"])
        for job_id, blocks_done, num_blocks in running:
            done.add_metric([job_id], blocks_done)
            if num_blocks is not None:
                total.add_metric([job_id], num_blocks)
        yield done
        yield total
        yield CounterMetricFamily("swquant_blocks_calibrated", "Blocks calibrated by every worker", block_count)
        yield CounterMetricFamily(
            "swquant_block_seconds", "Seconds spent calibrating blocks, by every worker", float(block_sum)
        )


def _histogram(name: str, documentation: str, values: list[float]) -> HistogramMetricFamily:
    buckets: list[tuple[str, float]] = [(str(edge), sum(v <= edge for v in values)) for edge in DURATION_BUCKETS]
    buckets.append(("+Inf", len(values)))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=sum(values))


def broker_queue_lengths(app: FastAPI) -> Callable[[], dict[str, int]]:
    """Waiting messages per queue on the Redis broker (a queue is a list named after it)."""

    def lengths() -> dict[str, int]:
        with app.state.celery.connection_for_read() as connection:
            client = connection.default_channel.client
            return {queue: int(client.llen(queue)) for queue in QUEUES}

    return lengths


def install_metrics(app: FastAPI) -> None:
    """The middleware and ``GET /metrics``: unauthenticated like ``/healthz``, for a private network."""
    multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    registry = CollectorRegistry()
    # In multiprocess mode the counters write to the shared files and are read back through them.
    app.add_middleware(HttpMetrics, registry=None if multiprocess else registry)
    service = ServiceCollector(app.state.settings, broker_queue_lengths(app))
    registry.register(service)
    router = APIRouter(tags=["health"])

    @router.get("/metrics", include_in_schema=False)
    def metrics_endpoint() -> Response:
        if not multiprocess:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
        scrape = CollectorRegistry()
        MultiProcessCollector(scrape)
        scrape.register(service)
        return Response(generate_latest(scrape), media_type=CONTENT_TYPE_LATEST)

    app.include_router(router)
