"""Response bodies of the REST API (request bodies live in swq_shared.jobspec)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from swq_shared.models import Artifact, Job, JobEvent, Upload


class ErrorOut(BaseModel):
    """Every error answer: a message, or FastAPI's list of ``{loc, msg, type}`` for invalid input."""

    detail: Any


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI declarations of the error statuses a route can answer, all shaped as :class:`ErrorOut`."""
    return {
        code: {"model": ErrorOut, "description": ERROR_MEANINGS[code]} | ERROR_HEADERS.get(code, {}) for code in codes
    }


ERROR_MEANINGS = {
    400: "the body could not be parsed",
    401: "missing or invalid API key",
    404: "no such job, artifact or upload among yours",
    409: "the job is already finished",
    413: "upload larger than the limit",
    416: "range not satisfiable",
    429: "too many requests with this API key; retry after Retry-After seconds",
    503: "database, storage or queue unavailable; retry",
}

RETRY_AFTER = {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}
ERROR_HEADERS: dict[int, dict[str, Any]] = {429: {"headers": {"Retry-After": RETRY_AFTER}}}


class Progress(BaseModel):
    blocks_done: int
    num_blocks: int | None


class JobError(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    id: str
    status: str
    spec: dict[str, Any]
    metadata: dict[str, Any]
    progress: Progress
    attempts: int
    cancel_requested: bool
    error: JobError | None
    metrics: dict[str, float]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls(
            id=job.id,
            status=job.status,
            spec=job.spec,
            metadata=job.labels,
            progress=Progress(blocks_done=job.blocks_done, num_blocks=job.num_blocks),
            attempts=job.attempts,
            cancel_requested=job.cancel_requested,
            error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None,
            metrics={m.name: m.value for m in job.metrics},
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            updated_at=job.updated_at,
        )


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class EventOut(BaseModel):
    id: int
    kind: str
    created_at: datetime
    data: dict[str, Any]

    @classmethod
    def of(cls, event: JobEvent) -> EventOut:
        return cls(id=event.id, kind=event.kind, created_at=event.created_at, data=event.data)


class EventList(BaseModel):
    items: list[EventOut]
    next_cursor: str
    has_more: bool


class ArtifactOut(BaseModel):
    name: str
    size: int
    content_type: str
    created_at: datetime

    @classmethod
    def of(cls, artifact: Artifact) -> ArtifactOut:
        return cls(
            name=artifact.name, size=artifact.size, content_type=artifact.content_type, created_at=artifact.created_at
        )


class UploadOut(BaseModel):
    id: str
    kind: str
    name: str
    size: int
    files: int
    reference: str
    created_at: datetime

    @classmethod
    def of(cls, upload: Upload) -> UploadOut:
        return cls(
            id=upload.id,
            kind=upload.kind,
            name=upload.name,
            size=upload.size,
            files=upload.files,
            reference=f"upload:{upload.id}",
            created_at=upload.created_at,
        )


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}
