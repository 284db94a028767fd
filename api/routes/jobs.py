"""``/v1/jobs``: submit, list, inspect, cancel, follow events, download artifacts.

The reads pollers hit (a job, a page of its events, a page of jobs) are ``async`` and read the
database on the event loop. A thread-pool hand-off, which a plain ``def`` route costs, took more CPU
than the read itself (about 0.7 ms against 0.3-0.8 ms on a 2-core machine, bench/README.md), and
these reads never wait on a lock: a read session runs each statement on its own (autocommit), and
readers wait for no writer under PostgreSQL's MVCC or SQLite's WAL. Everything that writes, streams
or calls another service stays in the thread pool.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from api.routes.conditional import tagged_json
from api.routes.deps import ReadSessionDep, SessionDep, SettingsDep, StorageDep, TenantDep, get_tenant
from api.routes.errors import validation_error
from api.routes.schemas import ArtifactOut, EventList, EventOut, JobList, JobOut, error_responses
from api.routes.submission import artifact_response, own_job, submit_job_request
from swq_shared import jobs
from swq_shared.jobspec import JobRequest, request_from_lightcompress
from swq_shared.models import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=error_responses(401, 429, 503))
_JOB_MISSING = error_responses(404)
_NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "unchanged since the ETag sent as If-None-Match"}
}
_ARTIFACT_TYPES = {t: {} for t in ("application/x-tar", "application/json", "application/octet-stream")}

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
_BODY_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}},
            "application/yaml": {"schema": {"type": "string", "description": "LightCompress-style YAML config"}},
        },
    }
}


async def _parse_request(request: Request) -> JobRequest:
    """A JSON JobRequest, or a LightCompress YAML document when sent as YAML.

    Only reading the body is asynchronous; the route itself is synchronous so its database work and
    queue publish run in the thread pool instead of stalling every other request on the event loop.
    """
    raw = await request.body()
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    try:
        if content_type in YAML_TYPES:
            return request_from_lightcompress(raw.decode("utf-8", errors="replace"))
        return JobRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc) from exc


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    openapi_extra=_BODY_SCHEMA,
    responses={200: {"model": JobOut, "description": "the job an Idempotency-Key already created"}}
    | error_responses(400),
)
def submit_job(
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,  # before the body, so an unauthenticated request learns nothing from validation
    spec: Annotated[JobRequest, Depends(_parse_request)],
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobOut:
    """Queue a job. Retrying with the same ``Idempotency-Key`` returns the same job (200)."""
    job, created = submit_job_request(request.app.state.celery, session, tenant, spec, idempotency_key)
    if not created:
        response.status_code = 200
    return JobOut.of(job)


@router.post(
    "/validate",
    response_model=JobRequest,
    dependencies=[Depends(get_tenant)],
    openapi_extra=_BODY_SCHEMA,
    responses=error_responses(400),
)
def validate_job(spec: Annotated[JobRequest, Depends(_parse_request)]) -> JobRequest:
    """Check a job spec (JSON or LightCompress YAML, as for submission) without submitting it; returns it
    with every default filled in."""
    return spec


@router.get("", response_model=JobList, responses=_NOT_MODIFIED)
async def list_jobs(
    request: Request,
    session: ReadSessionDep,
    tenant: TenantDep,
    status: Annotated[list[JobStatus] | None, Query()] = None,
    metadata: Annotated[list[str] | None, Query(description="KEY=VALUE; repeat to require several labels")] = None,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> Response:
    labels = jobs.parse_label_filters(metadata or [])  # a bad filter: LabelFilterError, a 422 (api/routes/errors.py)
    page = jobs.list_jobs(
        session, tenant.id, limit=limit, cursor=cursor, statuses=[s.value for s in status or []], labels=labels
    )
    return tagged_json(request, JobList(items=[JobOut.of(j) for j in page.items], next_cursor=page.next_cursor))


@router.get("/{job_id}", response_model=JobOut, responses=_JOB_MISSING | _NOT_MODIFIED)
async def get_job(request: Request, job_id: str, session: ReadSessionDep, tenant: TenantDep) -> Response:
    """The job; send its last ``ETag`` as ``If-None-Match`` to get a bodiless 304 while it is unchanged.

    Runs on the event loop (see the module docstring): one indexed read by primary key.
    """
    return tagged_json(request, JobOut.of(own_job(session, tenant, job_id)))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=error_responses(404, 409))
def cancel_job(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    force: Annotated[bool, Query(description="also stop the job's process at once")] = False,
) -> JobOut:
    """Cancel: a queued job at once; a running one stops after its current block, or with ``force``
    ends cancelled now and its worker stops the job's process within ``job_watch_seconds``."""
    job = jobs.request_cancel(session, own_job(session, tenant, job_id))  # already ended: 409 (api/routes/errors.py)
    if force and job.status == JobStatus.running.value:
        jobs.finish_job(session, job.id, JobStatus.cancelled)
        session.refresh(job)
    return JobOut.of(job)


@router.get("/{job_id}/events", response_model=EventList, responses=_JOB_MISSING | _NOT_MODIFIED)
async def job_events(
    request: Request,
    job_id: str,
    session: ReadSessionDep,
    tenant: TenantDep,
    cursor: Annotated[int, Query(ge=0, le=2**63 - 1, description="last event id seen; 0 for the start")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    own_job(session, tenant, job_id)
    page = jobs.list_events(session, job_id, after=cursor, limit=limit)
    events = EventList(items=[EventOut.of(e) for e in page.items], next_cursor=page.next_cursor, has_more=page.has_more)
    return tagged_json(request, events)


@router.get("/{job_id}/artifacts", response_model=list[ArtifactOut], responses=_JOB_MISSING)
def list_artifacts(job_id: str, session: ReadSessionDep, tenant: TenantDep) -> list[ArtifactOut]:
    job = own_job(session, tenant, job_id)
    return [ArtifactOut.of(a) for a in sorted(job.artifacts, key=lambda a: a.name)]


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=StreamingResponse,
    responses={
        200: {"content": _ARTIFACT_TYPES, "description": "the artifact"},
        206: {"content": _ARTIFACT_TYPES, "description": "the requested byte range"},
        307: {"description": "redirect to a presigned storage URL"},
    }
    | error_responses(404, 416),
)
def download_artifact(
    job_id: str,
    name: str,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    storage: StorageDep,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
) -> Any:
    """Stream an artifact; honours a single HTTP byte range so large downloads can resume."""
    return artifact_response(session, tenant, settings, storage, job_id, name, range_header)
