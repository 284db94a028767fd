"""Where job outputs and uploads live in storage, and the storage a deployment is configured with."""

from __future__ import annotations

from quant_core.output_names import FAKE_QUANT_DIR, GGUF_DIR, PACKED_DIR
from swq_shared.settings import Settings
from swq_shared.storage import Storage, open_storage

# Export directory in a job's output -> the archive it is uploaded as.
EXPORT_ARCHIVES = {FAKE_QUANT_DIR: "model.tar", PACKED_DIR: "packed.tar", GGUF_DIR: "gguf.tar"}


def open_settings_storage(settings: Settings) -> Storage:
    return open_storage(settings.resolved_storage_url, settings.s3_endpoint_url, settings.s3_region)


def artifact_key(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/{name}"


def upload_prefix(tenant_id: str, upload_id: str) -> str:
    return f"uploads/{tenant_id}/{upload_id}"


def checkpoint_prefix(job_id: str) -> str:
    """Where a running job keeps its per-block progress, so another worker can resume it."""
    return f"checkpoints/{job_id}"
