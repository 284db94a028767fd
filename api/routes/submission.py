"""What the REST API and the dashboard both do for a tenant: submit a job, find its own jobs, stream artifacts.

Route handlers (JSON or HTML) stay thin and call these, so both front ends follow the same rules.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from celery import Celery
from fastapi.responses import RedirectResponse, StreamingResponse
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from api.routes.ranges import parse_range
from swq_shared import jobs
from swq_shared.auth import Caller
from swq_shared.errors import InvalidFieldError, NotFoundInTenantError, QueueUnavailableError
from swq_shared.jobspec import JobRequest
from swq_shared.models import Artifact, Job, JobStatus, Upload, is_id
from swq_shared.queue import enqueue_job
from swq_shared.settings import Settings
from swq_shared.storage import Storage

log = logging.getLogger(__name__)
ARTIFACT_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")


def own_job(session: Session, tenant: Caller, job_id: str) -> Job:
    """The caller's job; another tenant's job is reported missing, not forbidden (no existence leak)."""
    # The metrics every answer about a job carries come in the same query, not in a second one.
    job = session.get(Job, job_id, options=[joinedload(Job.metrics)]) if is_id(job_id) else None
    if job is None or job.tenant_id != tenant.id:
        raise NotFoundInTenantError(f"job {job_id} not found")
    return job


def check_uploads(session: Session, tenant: Caller, spec: JobRequest) -> None:
    for field, upload_id in spec.upload_ids().items():
        upload = session.get(Upload, upload_id) if is_id(upload_id) else None
        if upload is None or upload.tenant_id != tenant.id:
            raise InvalidFieldError(("body", *field.split(".")), f"upload:{upload_id} not found among your uploads")


def submit_job_request(
    celery: Celery, session: Session, tenant: Caller, spec: JobRequest, idempotency_key: str | None = None
) -> tuple[Job, bool]:
    """Check, store and queue a job; ``created`` is False when the idempotency key names an existing job.

    Raises ConfigError (semantic checks), InvalidFieldError (someone else's upload) or
    QueueUnavailableError (the job is stored but the queue is unreachable; retrying with the same
    idempotency key is safe, since re-sending a still-queued job is harmless: only one worker can
    claim it).
    """
    check_uploads(session, tenant, spec)
    job, created = jobs.create_job(session, tenant.id, spec.model_dump(mode="json"), spec.metadata, idempotency_key)
    session.commit()
    if created or job.status == JobStatus.queued.value:
        try:
            enqueue_job(celery, job.id, job.spec)
        except KombuOperationalError as exc:
            log.warning("queue unavailable for job %s: %s", job.id, exc)
            raise QueueUnavailableError(
                f"job {job.id} is stored but the queue is unavailable; retry with the same Idempotency-Key"
            ) from exc
    session.refresh(job)
    return job, created


def artifact_response(
    session: Session,
    tenant: Caller,
    settings: Settings,
    storage: Storage,
    job_id: str,
    name: str,
    range_header: str | None,
) -> Any:
    """Stream an artifact (or redirect to a presigned URL), honouring one HTTP byte range."""
    own_job(session, tenant, job_id)
    artifact = None
    if ARTIFACT_NAME.fullmatch(name):
        artifact = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if artifact is None:
        raise NotFoundInTenantError(f"artifact {name} not found")
    if settings.presigned_downloads and (url := storage.presigned_url(artifact.storage_key)):
        return RedirectResponse(url, status_code=307)
    headers = {"Accept-Ranges": "bytes", "Content-Disposition": f'attachment; filename="{artifact.name}"'}
    span = parse_range(range_header, artifact.size)
    if span is None:
        headers["Content-Length"] = str(artifact.size)
        return StreamingResponse(storage.iter_range(artifact.storage_key), 200, headers, artifact.content_type)
    start, end = span
    headers["Content-Range"] = f"bytes {start}-{end}/{artifact.size}"
    headers["Content-Length"] = str(end - start + 1)
    return StreamingResponse(storage.iter_range(artifact.storage_key, start, end), 206, headers, artifact.content_type)
