"""Run one job by id: claim it, fetch its inputs, call quant_core, upload artifacts, record the outcome.

Everything a user sees comes from the database, written as the job goes (per block), so progress
survives the worker. A job is marked succeeded only in the same transaction that records its
uploaded artifacts.
"""

from __future__ import annotations

import logging
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from quant_core.engine import BlockRecord
from quant_core.errors import CancelledError, ConfigError
from quant_core.pipeline import REPORT_NAME, JobHooks, run_job
from swq_shared.artifacts import EXPORT_ARCHIVES, artifact_key, open_settings_storage
from swq_shared.db import session_scope
from swq_shared.jobs import add_event, claim_job, finish_job, is_cancel_requested, record_block
from swq_shared.jobspec import UPLOAD_PREFIX, JobRequest
from swq_shared.models import JobStatus, Upload
from swq_shared.settings import Settings
from swq_shared.storage import Storage, StorageError

log = logging.getLogger(__name__)


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


def execute_job(job_id: str, settings: Settings, worker_name: str) -> str:
    """Run the job if it is still queued; return its final status (or ``skipped``)."""
    with session_scope(settings.resolved_database_url) as session:
        job = claim_job(session, job_id, worker_name)
        if job is None:
            log.info("job %s is not queued any more; skipping", job_id)
            return "skipped"
        tenant_id, spec = job.tenant_id, job.spec
    storage = open_settings_storage(settings)
    with tempfile.TemporaryDirectory(prefix=f"swquant-{job_id}-") as tmp:
        workdir = Path(tmp)
        try:
            request = JobRequest.model_validate(spec)
            core_spec = request.to_job_spec(UploadResolver(settings, storage, tenant_id, workdir), settings.device)
            hooks = JobHooks(
                on_block=lambda record: _block(settings, job_id, record),
                on_stage=lambda message: _message(settings, job_id, message),
                should_cancel=lambda: _cancel_requested(settings, job_id),
            )
            report = run_job(core_spec, workdir / "out", hooks)
            artifacts = _upload_artifacts(storage, job_id, workdir / "out")
            metrics = _metrics(request, report)
            outcome, details = JobStatus.succeeded, {"metrics": metrics, "artifacts": artifacts}
        except CancelledError:
            outcome, details = JobStatus.cancelled, {}
        except ConfigError as exc:
            where = f"{exc.field}: " if exc.field else ""
            outcome, details = JobStatus.failed, {"error_code": "invalid_spec", "error_message": f"{where}{exc}"}
        except StorageError as exc:
            outcome, details = JobStatus.failed, {"error_code": "storage_error", "error_message": str(exc)}
        except Exception as exc:  # the job must end recorded as failed, whatever broke
            log.exception("job %s failed", job_id)
            outcome = JobStatus.failed
            details = {"error_code": "internal_error", "error_message": f"{type(exc).__name__}: {exc}"}
    with session_scope(settings.resolved_database_url) as session:
        finish_job(session, job_id, outcome, **details)
    return outcome.value


def _message(settings: Settings, job_id: str, message: str) -> None:
    with session_scope(settings.resolved_database_url) as session:
        add_event(session, job_id, "message", message=message)


def _block(settings: Settings, job_id: str, record: BlockRecord) -> None:
    with session_scope(settings.resolved_database_url) as session:
        record_block(session, job_id, record.to_dict())


def _cancel_requested(settings: Settings, job_id: str) -> bool:
    with session_scope(settings.resolved_database_url) as session:
        return is_cancel_requested(session, job_id)


def _upload_artifacts(storage: Storage, job_id: str, out_dir: Path) -> list[dict[str, Any]]:
    """Each exported checkpoint as one uncompressed tar (safetensors do not compress; tar streams and resumes)."""
    files = []
    for directory, archive_name in EXPORT_ARCHIVES.items():
        if (out_dir / directory).is_dir():
            archive = out_dir / archive_name
            with tarfile.open(archive, "w") as tar:
                tar.add(out_dir / directory, arcname=directory)
            files.append((archive_name, archive, "application/x-tar"))
    files.append((REPORT_NAME, out_dir / REPORT_NAME, "application/json"))
    uploaded = []
    for name, path, content_type in files:
        key = artifact_key(job_id, name)
        size = storage.put_file(key, path)
        uploaded.append({"name": name, "storage_key": key, "size": size, "content_type": content_type})
    return uploaded


def _metrics(request: JobRequest, report: dict[str, Any]) -> dict[str, float]:
    metrics = {
        "seconds.total": report["seconds"]["total"],
        "seconds.calibration": report["seconds"]["calibration"],
        "peak_host_mb": report["peak_host_mb"],
    }
    for name, ppl in zip(request.evaluation.texts, report["perplexity"].values(), strict=True):
        metrics[f"perplexity.before.{name}"] = ppl["before"]
        metrics[f"perplexity.after.{name}"] = ppl["after"]
    return metrics
