"""Job state rules, in one place for the API and the workers.

A job moves queued -> running -> succeeded | failed | cancelled, and back from running to queued
when its worker dies (``requeue_lapsed``, run by worker/reaper.py). Every change is a conditional
UPDATE (``WHERE status = ...``), so two processes racing on one job cannot both win, and every
change appends an event to the job's log. A claim hands the worker a lease token; the worker's
writes (progress, outcome) name it and are refused once the lease has passed to another attempt,
so a worker presumed dead can never overwrite the work of the one that replaced it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import CursorResult, Update, and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from swq_shared.events import BlockEvent, EventData, MessageEvent, StatusEvent
from swq_shared.models import Artifact, ErrorCode, Job, JobEvent, JobStatus, Metric, is_id, new_id, utcnow


def _rows_changed(session: Session, statement: Update) -> int:
    """How many rows an UPDATE changed: the guard of every compare-and-set transition below."""
    result: CursorResult[Any] = session.execute(statement)  # type: ignore[assignment]
    return result.rowcount


class LeaseLostError(RuntimeError):
    """The worker's lease on a job has lapsed or passed to another attempt: it must stop writing."""


class JobStateError(RuntimeError):
    """The requested change does not apply to the job's current status (e.g. cancelling a finished job)."""


class InvalidCursorError(ValueError):
    """A pagination cursor that this service did not issue."""


def add_event(session: Session, job_id: str, event: EventData) -> None:
    session.add(JobEvent(job_id=job_id, kind=event.kind.value, data=event.stored()))


def create_job(
    session: Session, tenant_id: str, spec: dict[str, Any], labels: dict[str, str], idempotency_key: str | None
) -> tuple[Job, bool]:
    """A new queued job, or the tenant's existing job for the same idempotency key (``created`` False)."""
    if idempotency_key is not None:
        existing = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key))
        if existing is not None:
            return existing, False
    job = Job(tenant_id=tenant_id, spec=spec, labels=labels, idempotency_key=idempotency_key)
    session.add(job)
    try:
        session.flush()
    except IntegrityError:
        # A concurrent request with the same key won the insert: answer with its job.
        session.rollback()
        return session.scalars(
            select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key)
        ).one(), False
    add_event(session, job.id, StatusEvent(status=JobStatus.queued))
    return job, True


def claim_job(
    session: Session, job_id: str, worker: str, lease_seconds: float = 60.0, max_attempts: int | None = None
) -> Job | None:
    """Move a queued job to running for ``worker`` with a fresh lease; None if it is not queued.

    The returned job's ``lease_token`` fences every later write of this attempt. ``attempts``
    counts claims; a job that has used ``max_attempts`` is not claimed again.
    """
    now = utcnow()
    condition = [Job.id == job_id, Job.status == JobStatus.queued.value]
    if max_attempts is not None:
        condition.append(Job.attempts < max_attempts)
    token = new_id()
    claimed = _rows_changed(
        session,
        update(Job)
        .where(*condition)
        .values(
            status=JobStatus.running.value,
            worker=worker,
            started_at=func.coalesce(Job.started_at, now),
            updated_at=now,
            attempts=Job.attempts + 1,
            lease_token=token,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
        ),
    )
    if not claimed:
        return None
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    add_event(session, job_id, StatusEvent(status=JobStatus.running, worker=worker, attempt=job.attempts))
    return job


def _leased(job_id: str, lease_token: str | None) -> list[Any]:
    """The condition a write by the holder of ``lease_token`` needs (no token: any running attempt)."""
    condition = [Job.id == job_id, Job.status == JobStatus.running.value]
    return condition if lease_token is None else [*condition, Job.lease_token == lease_token]


def renew_lease(session: Session, job_id: str, lease_token: str, lease_seconds: float) -> None:
    """Push the lease's expiry ``lease_seconds`` ahead; LeaseLostError if it is no longer held."""
    now = utcnow()
    renewed = _rows_changed(
        session,
        update(Job)
        .where(*_leased(job_id, lease_token))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now),
    )
    if not renewed:
        raise LeaseLostError(f"job {job_id}: lease lost")


def add_leased_event(session: Session, job_id: str, lease_token: str, event: EventData) -> None:
    """Append an event for a running attempt, refused (LeaseLostError) once its lease is gone."""
    if not _rows_changed(session, update(Job).where(*_leased(job_id, lease_token)).values(updated_at=utcnow())):
        raise LeaseLostError(f"job {job_id}: lease lost")
    add_event(session, job_id, event)


def record_block(session: Session, job_id: str, block: BlockEvent, lease_token: str | None = None) -> None:
    """Store a finished block's record as an event and advance the job's progress.

    With ``lease_token``, only while that lease is held (LeaseLostError otherwise).
    """
    done = _rows_changed(
        session,
        update(Job)
        .where(*_leased(job_id, lease_token))
        .values(blocks_done=block.index + 1, num_blocks=block.num_blocks, updated_at=utcnow()),
    )
    if not done:
        raise LeaseLostError(f"job {job_id} is not running under this lease")
    add_event(session, job_id, block)


def is_cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def request_cancel(session: Session, job: Job) -> Job:
    """Cancel a queued job at once; flag a running one so its worker stops between blocks."""
    if JobStatus(job.status).terminal:
        raise JobStateError(f"job {job.id} is already {job.status}")
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.queued.value)
        .values(status=JobStatus.cancelled.value, cancel_requested=True, finished_at=now, updated_at=now)
    )
    session.execute(
        update(Job).where(Job.id == job.id, Job.status == JobStatus.running.value).values(cancel_requested=True)
    )
    session.refresh(job)
    if job.status == JobStatus.cancelled.value:
        add_event(session, job.id, StatusEvent(status=JobStatus.cancelled))
    else:
        add_event(session, job.id, MessageEvent(message="cancellation requested"))
    return job


def finish_job(
    session: Session,
    job_id: str,
    status: JobStatus,
    *,
    metrics: dict[str, float] | None = None,
    artifacts: list[dict[str, Any]] | None = None,
    error_code: ErrorCode | None = None,
    error_message: str | None = None,
    lease_token: str | None = None,
) -> bool:
    """Record the outcome of a running job with its metrics and artifacts, all in one transaction.

    With ``lease_token``, only while that lease is held: LeaseLostError otherwise, as for every write
    of a leased attempt. Without one (the API ending a job), returns False and changes nothing when
    the job is no longer running. A succeeded job always has its artifacts: both are written together.
    """
    now = utcnow()
    done = _rows_changed(
        session,
        update(Job)
        .where(*_leased(job_id, lease_token))
        .values(
            status=status.value,
            finished_at=now,
            updated_at=now,
            error_code=error_code.value if error_code else None,
            error_message=error_message,
            lease_token=None,
            lease_expires_at=None,
        ),
    )
    if not done:
        if lease_token is not None:
            raise LeaseLostError(f"job {job_id}: lease lost before its outcome was recorded")
        return False
    for name, value in (metrics or {}).items():
        session.add(Metric(job_id=job_id, name=name, value=value))
    for artifact in artifacts or []:
        session.add(Artifact(job_id=job_id, **artifact))
    details = {"error_code": error_code, "error_message": error_message} if error_code else {}
    add_event(session, job_id, StatusEvent(status=status, **details))
    return True


def requeue_lapsed(session: Session, max_attempts: int) -> list[Job]:
    """Put running jobs whose lease has lapsed (their worker died) back in the queue; return them.

    A job that has already used ``max_attempts`` ends failed instead, with a message saying so: a
    job that kills its worker every time must not loop forever.
    """
    now = utcnow()
    lapsed = session.scalars(
        select(Job).where(Job.status == JobStatus.running.value, Job.lease_expires_at < now).with_for_update()
    ).all()
    requeued = []
    for job in lapsed:
        condition = [Job.id == job.id, Job.lease_token == job.lease_token, Job.status == JobStatus.running.value]
        if job.attempts >= max_attempts:
            message = (
                f"the job's worker stopped without finishing it {job.attempts} times "
                f"(attempt limit {max_attempts}); last worker: {job.worker}"
            )
            event = StatusEvent(status=JobStatus.failed, error_code=ErrorCode.worker_lost, error_message=message)
            ending: dict[str, Any] = {"finished_at": now, "error_code": event.error_code, "error_message": message}
        else:
            event = StatusEvent(status=JobStatus.queued, reason=f"worker {job.worker} lost", attempts=job.attempts)
            ending = {}
        changed = _rows_changed(
            session,
            update(Job)
            .where(*condition)
            .values(status=event.status.value, **ending, updated_at=now, lease_token=None, lease_expires_at=None)
            .execution_options(synchronize_session=False),
        )
        if changed:
            add_event(session, job.id, event)
            if event.status == JobStatus.queued:
                requeued.append(job)
    return requeued


def claim_resend(session: Session, older_than_s: float, waiting_ids: set[str]) -> list[Job]:
    """Queued jobs not waiting in the broker (``waiting_ids``) and untouched for ``older_than_s``.

    Each is stamped (``updated_at``) by a conditional update, so of several reapers looking at the
    same moment only one re-sends a job.
    """
    now = utcnow()
    stale = session.scalars(
        select(Job).where(Job.status == JobStatus.queued.value, Job.updated_at < now - timedelta(seconds=older_than_s))
    ).all()
    taken = []
    for job in stale:
        if job.id in waiting_ids:
            continue
        stamped = _rows_changed(
            session,
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.queued.value, Job.updated_at == job.updated_at)
            .values(updated_at=now)
            .execution_options(synchronize_session=False),
        )
        if stamped:
            add_event(
                session, job.id, MessageEvent(message="re-sent to the queue: the broker no longer held it", resent=True)
            )
            taken.append(job)
    return taken


# --- pagination ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next_cursor: str | None
    has_more: bool


def encode_cursor(created_at: datetime, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{job_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The position a cursor we issued points at; anything else (forged, garbled) is refused."""
    try:
        created, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        when = datetime.fromisoformat(created)
        when.astimezone(UTC)  # must be representable in UTC, where the database compares it
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidCursorError("cursor is not valid") from exc
    if not is_id(job_id):
        raise InvalidCursorError("cursor is not valid")
    return when, job_id


class LabelFilterError(ValueError):
    """A label filter that is not ``KEY=VALUE``; the message names the item."""


def parse_label_filters(items: Iterable[str]) -> dict[str, str]:
    """``["team=nlp", "run=3"]`` -> labels: the one rule the REST API and the dashboard share.

    Each item is ``KEY=VALUE`` with a non-empty key and no NUL character (PostgreSQL's text refuses
    NUL, so a filter holding one could never match and would fail in the database instead).
    """
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or "\x00" in item:
            raise LabelFilterError(f"{item!r} is not KEY=VALUE (a non-empty key, no NUL character)")
        labels[key] = value
    return labels


def list_jobs(
    session: Session,
    tenant_id: str,
    *,
    limit: int,
    cursor: str | None = None,
    statuses: list[str] | None = None,
    labels: dict[str, str] | None = None,
) -> Page:
    """Newest first, keyset-paginated on (created_at, id) so pages stay stable while jobs are added."""
    query = select(Job).where(Job.tenant_id == tenant_id).options(selectinload(Job.metrics))
    if statuses:
        query = query.where(Job.status.in_(statuses))
    for key, value in (labels or {}).items():
        query = query.where(Job.labels[key].as_string() == value)
    if cursor is not None:
        created, job_id = decode_cursor(cursor)
        query = query.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None, more)


def list_events(session: Session, job_id: str, *, after: int = 0, limit: int = 100) -> Page:
    """Events in order; the cursor is the last event id seen (always set), so polling never misses one."""
    rows = list(
        session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.id > after)
            .order_by(JobEvent.id)
            .limit(limit + 1)
        )
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, str(rows[-1].id) if rows else str(after), more)
