"""Job state rules and migrations on a real PostgreSQL and on SQLite: the same code for both."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect

from api.routes.metrics import ServiceCollector
from swq_shared import jobs
from swq_shared.auth import create_api_key, tenant_for_key
from swq_shared.db import get_engine, session_scope
from swq_shared.events import MessageEvent
from swq_shared.migrate import downgrade, upgrade
from swq_shared.models import ApiKey, ErrorCode, Job, JobEvent, JobStatus
from swq_shared.settings import Settings
from tests.databases import fresh_postgres_database
from tests.job_records import block_event

TABLES = {"tenants", "api_keys", "jobs", "job_events", "metrics", "artifacts", "uploads"}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
        upgrade(url)
        yield url
        return
    with fresh_postgres_database() as url:
        upgrade(url)
        yield url


@pytest.fixture
def tenant_id(db_url: str) -> str:
    with session_scope(db_url) as session:
        key = create_api_key(session, "acme")
        return tenant_for_key(session, key).id


def _new_job(db_url: str, tenant_id: str, key: str | None = None, **labels: str) -> str:
    with session_scope(db_url) as session:
        job, _ = jobs.create_job(session, tenant_id, {"model": "m"}, labels, key)
        return job.id


def test_migrations_upgrade_and_downgrade(db_url: str) -> None:
    assert set(inspect(get_engine(db_url)).get_table_names()) >= TABLES
    downgrade(db_url)
    assert not TABLES & set(inspect(get_engine(db_url)).get_table_names())
    upgrade(db_url)
    assert set(inspect(get_engine(db_url)).get_table_names()) >= TABLES


def test_api_keys_are_stored_as_digests_and_revocable(db_url: str) -> None:
    with session_scope(db_url) as session:
        key = create_api_key(session, "beta")
        stored = session.query(ApiKey).one()
        assert key not in stored.digest and len(stored.digest) == 64
        assert tenant_for_key(session, key).name == "beta"
        assert tenant_for_key(session, key + "x") is None
        stored.revoked_at = stored.created_at
    with session_scope(db_url) as session:
        assert tenant_for_key(session, key) is None


def test_only_one_worker_can_claim_a_job(db_url: str, tenant_id: str) -> None:
    job_id = _new_job(db_url, tenant_id)
    with session_scope(db_url) as session:
        assert jobs.claim_job(session, job_id, "w1").status == "running"
    with session_scope(db_url) as session:
        assert jobs.claim_job(session, job_id, "w2") is None
        assert session.get(Job, job_id).worker == "w1"


def _lease_of(db_url: str, job_id: str, worker: str, lease_seconds: float = 60.0, max_attempts: int = 3) -> str:
    with session_scope(db_url) as session:
        return jobs.claim_job(session, job_id, worker, lease_seconds, max_attempts).lease_token


def test_a_lapsed_lease_puts_the_job_back_and_fences_the_old_attempt(db_url: str, tenant_id: str) -> None:
    job_id = _new_job(db_url, tenant_id)
    old = _lease_of(db_url, job_id, "w1", lease_seconds=-1)  # already lapsed: its worker is gone
    with session_scope(db_url) as session:
        assert [j.id for j in jobs.requeue_lapsed(session, max_attempts=3)] == [job_id]
        assert session.get(Job, job_id).status == "queued"
    new = _lease_of(db_url, job_id, "w2")
    with session_scope(db_url) as session:
        assert session.get(Job, job_id).attempts == 2
        jobs.renew_lease(session, job_id, new, 60)
        jobs.record_block(session, job_id, block_event(0, 2), new)
    with session_scope(db_url) as session:
        with pytest.raises(jobs.LeaseLostError):
            jobs.renew_lease(session, job_id, old, 60)
        with pytest.raises(jobs.LeaseLostError):
            jobs.record_block(session, job_id, block_event(1, 2), old)
        with pytest.raises(jobs.LeaseLostError):
            jobs.add_leased_event(session, job_id, old, MessageEvent(message="late"))
        with pytest.raises(jobs.LeaseLostError):
            jobs.finish_job(session, job_id, JobStatus.failed, error_code=ErrorCode.internal_error, lease_token=old)
    with session_scope(db_url) as session:
        assert jobs.requeue_lapsed(session, max_attempts=3) == []  # the live lease is left alone
        assert jobs.finish_job(session, job_id, JobStatus.succeeded, lease_token=new)
        job = session.get(Job, job_id)
        assert (job.status, job.blocks_done, job.lease_token) == ("succeeded", 1, None)


def test_a_job_whose_worker_keeps_dying_fails_at_the_attempt_cap(db_url: str, tenant_id: str) -> None:
    job_id = _new_job(db_url, tenant_id)
    for attempt in range(1, 3):
        _lease_of(db_url, job_id, f"w{attempt}", lease_seconds=-1, max_attempts=2)
        with session_scope(db_url) as session:
            jobs.requeue_lapsed(session, max_attempts=2)
    with session_scope(db_url) as session:
        job = session.get(Job, job_id)
        assert (job.status, job.attempts, job.error_code) == ("failed", 2, "worker_lost")
        assert "2 times (attempt limit 2); last worker: w2" in job.error_message
        assert jobs.claim_job(session, job_id, "w3", 60, 2) is None


def test_a_queued_job_the_broker_forgot_is_resent_once(db_url: str, tenant_id: str) -> None:
    forgotten, waiting = _new_job(db_url, tenant_id), _new_job(db_url, tenant_id)
    with session_scope(db_url) as session:
        assert jobs.claim_resend(session, 60, set()) == []  # too recent: maybe on its way to the broker
        assert {j.id for j in jobs.claim_resend(session, 0, {waiting})} == {forgotten}
    with session_scope(db_url) as session:
        assert jobs.claim_resend(session, 1, set()) == []  # just re-sent: not again at once


def test_finish_records_metrics_artifacts_and_events_once(db_url: str, tenant_id: str) -> None:
    job_id = _new_job(db_url, tenant_id)
    with session_scope(db_url) as session:
        jobs.claim_job(session, job_id, "w1")
        jobs.record_block(session, job_id, block_event(0, 2))
    artifact = {
        "name": "report.json",
        "storage_key": f"jobs/{job_id}/report.json",
        "size": 3,
        "content_type": "application/json",
    }
    with session_scope(db_url) as session:
        assert jobs.finish_job(session, job_id, JobStatus.succeeded, metrics={"ppl": 9.5}, artifacts=[artifact])
    with session_scope(db_url) as session:
        assert not jobs.finish_job(
            session, job_id, JobStatus.failed, error_code=ErrorCode.internal_error, error_message="late"
        )
        job = session.get(Job, job_id)
        assert job.status == "succeeded" and job.blocks_done == 1 and job.num_blocks == 2
        assert [a.name for a in job.artifacts] == ["report.json"] and job.metrics[0].value == 9.5
        kinds = [(e.kind, e.data.get("status")) for e in jobs.list_events(session, job_id).items]
        assert kinds == [("status", "queued"), ("status", "running"), ("block", None), ("status", "succeeded")]


def test_cancel_is_immediate_when_queued_and_a_flag_when_running(db_url: str, tenant_id: str) -> None:
    queued, running = _new_job(db_url, tenant_id), _new_job(db_url, tenant_id)
    with session_scope(db_url) as session:
        jobs.claim_job(session, running, "w1")
    with session_scope(db_url) as session:
        assert jobs.request_cancel(session, session.get(Job, queued)).status == "cancelled"
        job = jobs.request_cancel(session, session.get(Job, running))
        assert job.status == "running" and jobs.is_cancel_requested(session, running)
    with session_scope(db_url) as session, pytest.raises(jobs.JobStateError, match="already cancelled"):
        jobs.request_cancel(session, session.get(Job, queued))


def test_idempotency_key_returns_the_same_job(db_url: str, tenant_id: str) -> None:
    first = _new_job(db_url, tenant_id, key="k-1")
    assert _new_job(db_url, tenant_id, key="k-1") == first
    assert _new_job(db_url, tenant_id, key="k-2") != first


def test_listing_pages_newest_first_without_gaps_and_filters(db_url: str, tenant_id: str) -> None:
    ids = [_new_job(db_url, tenant_id, team="a" if i % 2 else "b") for i in range(7)]
    seen, cursor = [], None
    with session_scope(db_url) as session:
        while True:
            page = jobs.list_jobs(session, tenant_id, limit=3, cursor=cursor)
            seen += [j.id for j in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert seen == list(reversed(ids))
        team_a = jobs.list_jobs(session, tenant_id, limit=50, labels={"team": "a"}).items
        assert {j.id for j in team_a} == {ids[i] for i in range(7) if i % 2}
        assert jobs.list_jobs(session, tenant_id, limit=50, statuses=["running"]).items == []
        with pytest.raises(jobs.InvalidCursorError):
            jobs.list_jobs(session, tenant_id, limit=3, cursor="not-a-cursor")


def test_the_metrics_collector_reads_jobs_blocks_and_failures_from_the_database(db_url: str, tenant_id: str) -> None:
    first, second = _new_job(db_url, tenant_id), _new_job(db_url, tenant_id)
    with session_scope(db_url) as session:
        session.add_all(
            JobEvent(job_id=first, kind="block", data={"index": i, "seconds": s}) for i, s in enumerate((1.5, 2.5))
        )
        job = session.get(Job, second)
        job.status, job.error_code, job.attempts = JobStatus.failed.value, "worker_lost", 3
    collector = ServiceCollector(Settings(database_url=db_url), lambda: {"gpu": 4, "cpu": 0})
    samples = {(s.name, tuple(s.labels.values())): s.value for family in collector.collect() for s in family.samples}
    assert samples[("swquant_jobs", ("queued",))] == 1 and samples[("swquant_jobs", ("failed",))] == 1
    assert samples[("swquant_job_failures_total", ("worker_lost",))] == 1
    assert samples[("swquant_job_attempts_total", ())] == 3
    assert samples[("swquant_blocks_calibrated_total", ())] == 2
    assert samples[("swquant_block_seconds_total", ())] == pytest.approx(4.0)
    assert samples[("swquant_queue_depth", ("gpu",))] == 4 and samples[("swquant_database_up", ())] == 1
