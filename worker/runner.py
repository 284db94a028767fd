"""Run one job by id: claim it, fetch its inputs, call quant_core, upload artifacts, record the outcome.

Everything a user sees comes from the database, written as the job goes (per block), so progress
survives the worker, and each finished block's checkpoint goes to storage, so the work does too.
A job is marked succeeded only in the same transaction that records its uploaded artifacts.
"""

from __future__ import annotations

import enum
import logging
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from quant_core.block_record import BlockRecord
from quant_core.checkpoint import saved_files, stored_fingerprint
from quant_core.errors import CancelledError, ConfigError
from quant_core.job import JobSpec
from quant_core.job_settings import validated
from quant_core.launch import run_ranked
from quant_core.pipeline import REPORT_NAME, JobHooks, job_fingerprint
from quant_core.report import JobReport
from swq_shared.artifacts import EXPORT_ARCHIVES, artifact_key, checkpoint_prefix, open_settings_storage
from swq_shared.db import session_scope
from swq_shared.events import BlockEvent, EventData, MessageEvent, TuningEvent
from swq_shared.jobs import (
    LeaseLostError,
    add_leased_event,
    claim_job,
    finish_job,
    is_cancel_requested,
    record_block,
)
from swq_shared.jobspec import UPLOAD_PREFIX, JobRequest
from swq_shared.models import ErrorCode, JobStatus, Upload
from swq_shared.retry import DATABASE_DOWN, retry_call
from swq_shared.settings import Settings
from swq_shared.storage import Storage, StorageError
from worker.lease import LeaseKeeper

log = logging.getLogger(__name__)


class AttemptOutcome(enum.StrEnum):
    """How one attempt at a job ended: the job's final status, or why this attempt recorded none."""

    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    skipped = "skipped"  # the job was no longer queued when this attempt came to claim it
    lease_lost = "lease_lost"  # another attempt owns the job now; this one wrote no outcome


T = TypeVar("T")
# With back-off doubling from 0.5 s (capped at 30 s), about a minute: a database restart.
DATABASE_ATTEMPTS = 8


class UploadResolver:
    """Turns ``upload:<id>`` references into local paths, fetching the tenant's upload once."""

    def __init__(self, settings: Settings, storage: Storage, tenant_id: str, workdir: Path) -> None:
        self.settings, self.storage, self.tenant_id, self.workdir = settings, storage, tenant_id, workdir

    def __call__(self, reference: str) -> str:
        if not reference.startswith(UPLOAD_PREFIX):
            return reference
        upload_id = reference.removeprefix(UPLOAD_PREFIX)
        with session_scope(self.settings.resolved_database_url) as session:
            upload = session.get(Upload, upload_id)
            if upload is None or upload.tenant_id != self.tenant_id:
                raise ConfigError(f"no upload with id {upload_id}", "model")
            prefix, kind = upload.storage_prefix, upload.kind
        target = self.workdir / "uploads" / upload_id
        if not target.exists():
            for key in self.storage.list(prefix):
                self.storage.download_file(key, target / key.removeprefix(prefix).lstrip("/"))
        return str(target if kind == "model" else next(target.iterdir()))


def _database(settings: Settings, what: str, call: Callable[[Session], T]) -> T:
    """``call`` in a transaction, riding out a database restart of up to about a minute."""

    def attempt() -> T:
        with session_scope(settings.resolved_database_url) as session:
            return call(session)

    return retry_call(attempt, DATABASE_DOWN, attempts=DATABASE_ATTEMPTS, backoff_s=0.5, what=what)


class CheckpointMirror:
    """The job's per-block checkpoint, kept in storage so that another worker can resume the job.

    Restored before the run (discarded when it was written for other settings, e.g. a worker with
    another device), extended after every block, deleted when the job ends.
    """

    def __init__(self, settings: Settings, storage: Storage, job_id: str, directory: Path) -> None:
        self.settings, self.storage, self.directory = settings, storage, directory
        self.prefix = checkpoint_prefix(job_id)

    def _retry(self, call: Callable[[], T], what: str) -> T:
        attempts, backoff = self.settings.storage_attempts, self.settings.storage_backoff_seconds
        return retry_call(call, (StorageError,), attempts, backoff, what)

    def restore(self, fingerprint: str) -> int:
        """Fetch the stored checkpoint; return how many blocks it holds (0: start from the beginning)."""
        for key in self._retry(lambda: self.storage.list(self.prefix), "listing the checkpoint"):
            target = self.directory / key.removeprefix(self.prefix).lstrip("/")
            self._retry(lambda key=key, target=target: self.storage.download_file(key, target), f"fetching {key}")
        stored = stored_fingerprint(self.directory)
        if stored is None:
            return 0
        if stored != fingerprint:
            shutil.rmtree(self.directory)
            return 0
        return len(list(self.directory.glob("block_*.safetensors")))

    def store_block(self, index: int) -> None:
        for path in saved_files(self.directory, index):
            key = f"{self.prefix}/{path.name}"
            self._retry(lambda key=key, path=path: self.storage.put_file(key, path), f"storing {key}")

    def delete(self) -> None:
        try:
            self.storage.delete_prefix(self.prefix)
        except StorageError as exc:  # leftovers cost space, not correctness
            log.warning("could not delete the checkpoint under %s: %s", self.prefix, type(exc).__name__)


def execute_job(
    job_id: str, settings: Settings, worker_name: str, on_recorded: Callable[[], None] | None = None
) -> AttemptOutcome:
    """Run the job if it is queued and say how this attempt ended.

    The claim gives this attempt a lease, renewed by a heartbeat while the job runs; progress and
    the outcome are written only under that lease. An attempt that follows a dead worker's resumes
    from the checkpoint the dead one left in storage. ``on_recorded`` is called once the outcome is
    in the database, before the clean-up (see worker.job_process).
    """
    claimed = _database(
        settings,
        f"claiming job {job_id}",
        lambda session: _claim(session, job_id, worker_name, settings),
    )
    if claimed is None:
        log.info("job %s is not queued any more; skipping", job_id)
        return AttemptOutcome.skipped
    tenant_id, spec, token, attempt = claimed
    storage = open_settings_storage(settings)
    with tempfile.TemporaryDirectory(prefix=f"swquant-{job_id}-") as tmp, LeaseKeeper(settings, job_id, token) as lease:
        workdir = Path(tmp)
        mirror = CheckpointMirror(settings, storage, job_id, workdir / "checkpoint")
        try:
            request = validated(JobRequest, spec)
            core_spec = JobSpec.from_settings(
                request, UploadResolver(settings, storage, tenant_id, workdir), settings.device
            )
            checkpoint_dir = None
            if core_spec.resumable:  # a whole-model job restarts from the top
                checkpoint_dir = mirror.directory
                restored = mirror.restore(job_fingerprint(core_spec))
                if attempt > 1:
                    resumed = MessageEvent(
                        message=f"attempt {attempt}: resuming after {restored} finished blocks", resumed_blocks=restored
                    )
                    _event(settings, job_id, token, resumed)
            hooks = _hooks(settings, job_id, (token, attempt), lease, mirror if checkpoint_dir is not None else None)
            report = run_ranked(core_spec, workdir / "out", hooks, checkpoint_dir)
            lease.check()
            artifacts = _upload_artifacts(settings, storage, job_id, workdir / "out")
            metrics = _metrics(request, report)
            outcome, details = JobStatus.succeeded, {"metrics": metrics, "artifacts": artifacts}
        except LeaseLostError:
            log.error("job %s: lease lost; this attempt stops without recording an outcome", job_id)
            return AttemptOutcome.lease_lost
        except CancelledError:
            outcome, details = JobStatus.cancelled, {}
        except ConfigError as exc:
            where = f"{exc.field}: " if exc.field and not str(exc).startswith(f"{exc.field}:") else ""
            outcome, details = (
                JobStatus.failed,
                {"error_code": ErrorCode.invalid_spec, "error_message": f"{where}{exc}"},
            )
        except StorageError as exc:
            message = f"{exc}; gave up after {settings.storage_attempts} attempts"
            outcome, details = JobStatus.failed, {"error_code": ErrorCode.storage_error, "error_message": message}
        except Exception as exc:  # the job must end recorded as failed, whatever broke
            log.exception("job %s failed", job_id)
            outcome = JobStatus.failed
            details = {"error_code": ErrorCode.internal_error, "error_message": f"{type(exc).__name__}: {exc}"}
        lease.finishing()
        try:
            _database(
                settings,
                f"recording the outcome of job {job_id}",
                lambda session: finish_job(session, job_id, outcome, lease_token=token, **details),
            )
        except LeaseLostError:
            log.error("job %s: lease lost before the outcome was recorded", job_id)
            return AttemptOutcome.lease_lost
        if on_recorded is not None:
            on_recorded()
        mirror.delete()
    return AttemptOutcome(outcome.value)


def _hooks(
    settings: Settings,
    job_id: str,
    claim: tuple[str, int],
    lease: LeaseKeeper,
    mirror: CheckpointMirror | None,
) -> JobHooks:
    """What the job reports back while it runs, each write under the attempt's lease ``claim``
    (token, attempt): every finished block (and its checkpoint to ``mirror``), every stage, and
    whether a cancel was asked for."""
    token, attempt = claim

    def on_block(record: BlockRecord) -> None:
        lease.check()
        _database(
            settings,
            f"recording block {record.index} of job {job_id}",
            lambda session: record_block(session, job_id, _block_event(record, attempt), token),
        )
        if mirror is not None:
            mirror.store_block(record.index)

    def should_cancel() -> bool:
        lease.check()
        return _database(settings, "reading cancellation", lambda s: is_cancel_requested(s, job_id))

    return JobHooks(
        on_block=on_block,
        on_stage=lambda message: _event(settings, job_id, token, MessageEvent(message=message)),
        should_cancel=should_cancel,
        on_tuning_step=lambda step, steps, loss: _event(
            settings, job_id, token, TuningEvent(step=step, steps=steps, loss=loss)
        ),
    )


def _claim(session: Session, job_id: str, worker_name: str, settings: Settings) -> tuple[str, dict, str, int] | None:
    job = claim_job(session, job_id, worker_name, settings.lease_seconds, settings.max_attempts)
    if job is None:
        return None
    assert job.lease_token is not None
    return job.tenant_id, job.spec, job.lease_token, job.attempts


def _event(settings: Settings, job_id: str, token: str, event: EventData) -> None:
    _database(
        settings,
        f"logging an event of job {job_id}",
        lambda session: add_leased_event(session, job_id, token, event),
    )


def _block_event(record: BlockRecord, attempt: int) -> BlockEvent:
    """A block record as the job's event, with every figure the engine measured and the attempt."""
    return BlockEvent(**record.to_dict(), attempt=attempt)


def _shareable(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """Archive entries readable by everyone and owned by no one: the worker's private temp-file modes
    (0600) and its user would otherwise reach whoever unpacks the download."""
    member.mode = 0o755 if member.isdir() else 0o644
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    return member


def _upload_artifacts(settings: Settings, storage: Storage, job_id: str, out_dir: Path) -> list[dict[str, Any]]:
    """Each exported checkpoint as one uncompressed tar (safetensors do not compress; tar streams and resumes).

    Each upload is retried with back-off; if storage stays down the StorageError fails the job, whose
    status changes only after every artifact is stored.
    """
    files = []
    for directory, archive_name in EXPORT_ARCHIVES.items():
        if (out_dir / directory).is_dir():
            archive = out_dir / archive_name
            with tarfile.open(archive, "w") as tar:
                tar.add(out_dir / directory, arcname=directory, filter=_shareable)
            files.append((archive_name, archive, "application/x-tar"))
    files.append((REPORT_NAME, out_dir / REPORT_NAME, "application/json"))
    uploaded = []
    for name, path, content_type in files:
        key = artifact_key(job_id, name)
        size = retry_call(
            lambda key=key, path=path: storage.put_file(key, path),
            (StorageError,),
            settings.storage_attempts,
            settings.storage_backoff_seconds,
            f"uploading {key}",
        )
        uploaded.append({"name": name, "storage_key": key, "size": size, "content_type": content_type})
    return uploaded


def _metrics(request: JobRequest, report: JobReport) -> dict[str, float]:
    """The report's figures as the job's metrics, texts named as the request names them."""
    metrics = {
        "seconds.total": report.seconds.total,
        "seconds.calibration": report.seconds.calibration,
        "peak_host_mb": report.peak_host_mb,
    }
    for name, ppl in zip(request.evaluation.texts, report.perplexity.values(), strict=True):
        metrics[f"perplexity.before.{name}"] = ppl.before
        metrics[f"perplexity.after.{name}"] = ppl.after
    for task, values in report.lm_eval.items():
        for metric, pair in values.items():
            metrics.update({f"lm_eval.{phase}.{task}.{metric}": v for phase, v in pair.items() if v is not None})
    if report.allocation is not None:
        metrics["allocation.bits_per_weight"] = report.allocation.bits_per_weight
        metrics["allocation.seconds"] = report.allocation.seconds
    for runtime, score in report.runtimes.items():  # what each target runtime computed of the checkpoint
        scored = score.perplexity or {}
        for name, text in zip(request.evaluation.texts, report.perplexity, strict=True):
            if text in scored:
                metrics[f"runtime.{runtime}.perplexity.{name}"] = scored[text]
    return metrics
