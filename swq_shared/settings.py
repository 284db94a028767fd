"""Service settings: one object, read from ``SWQUANT_*`` environment variables, with embedded defaults.

The defaults need nothing installed beyond the package: SQLite and a local folder under
``SWQUANT_DATA_DIR`` (``./swquant-data``), and a Redis on localhost.
"""

from __future__ import annotations

from functools import cached_property, lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SWQUANT_", extra="ignore")

    data_dir: Path = Path("swquant-data")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default: SQLite in data_dir")
    broker_url: str = "redis://127.0.0.1:6379/0"
    storage_url: str | None = Field(default=None, description="file:///path or s3://bucket; default: data_dir/storage")
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    presigned_downloads: bool = False
    queue: str = Field(default="gpu", description="Celery queue jobs are routed to (gpu or cpu workers)")
    ranks: int = Field(
        default=1,
        ge=1,
        le=64,
        description="devices (or CPU shares) a worker gives one job: it also takes jobs asking up to this many ranks",
    )
    max_upload_bytes: int = 20 * 2**30
    max_upload_files: int = 1000
    max_text_upload_bytes: int = 512 * 2**20
    trust_remote_code: bool = False
    secret_key: str | None = Field(default=None, description="signs dashboard sessions; default: random per process")
    device: str = "cpu"
    # Worker leases: a running job's worker renews its lease every heartbeat; a job whose lease has
    # lapsed (its worker died) is put back in the queue by the reaper, at most max_attempts times.
    lease_seconds: float = Field(default=60.0, gt=0)
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    reaper_interval_seconds: float = Field(default=15.0, gt=0)
    job_watch_seconds: float = Field(
        default=1.0, gt=0, description="how often a worker checks that its running job still belongs to it"
    )
    resend_after_seconds: float = Field(
        default=30.0, ge=0, description="a queued job the broker does not hold is re-sent after this long"
    )
    # Artifact uploads: attempts and the first back-off (doubled per attempt) before a job fails.
    storage_attempts: int = Field(default=5, ge=1)
    storage_backoff_seconds: float = Field(default=1.0, ge=0)
    # Requests per API key: a token bucket refilled at rate_limit_per_minute, holding rate_limit_burst.
    rate_limit_per_minute: int = Field(default=600, ge=0, description="0 switches rate limiting off")
    rate_limit_burst: int = Field(default=60, ge=1)
    # Requests inside one API process at once, and how far its event loop may fall behind, before
    # more get a 503 + Retry-After (api/front/admission.py).
    max_concurrent_requests: int = Field(default=16, ge=0, description="per API process; 0: unbounded")
    max_loop_lag_ms: float = Field(default=20.0, ge=0, description="0: no bound on the event loop's lag")
    # How long an API process trusts a key it has looked up: the longest a revoked key keeps working.
    api_key_cache_seconds: float = Field(default=5.0, ge=0, description="0 looks every key up on every request")

    @cached_property  # read on every request; resolving the path costs system calls
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'swquant.db').resolve()}"

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or (self.data_dir / "storage").resolve().as_uri()


@lru_cache
def get_settings() -> Settings:
    return Settings()
