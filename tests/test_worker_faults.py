"""Faults injected for real into a running service: workers killed, Redis and PostgreSQL crashed,
storage cut off. Nothing may be lost, nothing may run twice at once, results must not change.

The stack: uvicorn and two Celery workers against a private PostgreSQL and Redis (restartable
without touching the machine's own) and SeaweedFS behind a TCP relay that can refuse connections.
Leases are short here (3 s) so that recovery takes seconds; production uses a minute.
"""

from __future__ import annotations

import os
import random
import signal
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load
from sqlalchemy import select

from api.commands.client import SWQuantClient
from swq_shared.db import get_engine, session_scope
from swq_shared.migrate import upgrade
from swq_shared.models import Job
from tests.private_services import PrivatePostgres, PrivateRedis, TcpProxy, private_postgres, private_redis
from tests.s3_server import S3Endpoint
from tests.service_stack import Stack, production_stack
from tests.tiny_models import build_model

LAYERS = 6
MAX_ATTEMPTS = 5
FAULT_ENV = {
    "SWQUANT_LEASE_SECONDS": "3",
    "SWQUANT_HEARTBEAT_SECONDS": "0.5",
    "SWQUANT_REAPER_INTERVAL_SECONDS": "0.5",
    "SWQUANT_RESEND_AFTER_SECONDS": "2",
    "SWQUANT_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    "SWQUANT_STORAGE_ATTEMPTS": "4",
    "SWQUANT_STORAGE_BACKOFF_SECONDS": "0.5",
    "SWQUANT_RATE_LIMIT_PER_MINUTE": "0",  # the tests poll eight jobs several times a second
}
TIMEOUT_S = 300


@dataclass
class FaultStack:
    stack: Stack
    redis: PrivateRedis
    postgres: PrivatePostgres
    s3_relay: TcpProxy
    model_dir: Path

    @property
    def client(self) -> SWQuantClient:
        return SWQuantClient(self.stack.url, self.stack.api_key)

    def spec(self, **overrides: object) -> dict:
        return {
            "model": str(self.model_dir),
            "bits": 3,
            "group_size": 32,
            "method": "omniquant",
            "method_options": {"epochs": 2, "batch_size": 4},
            "loss": "mse",
            "calibration": {"n_samples": 8, "seq_len": 64},
            "evaluation": {"max_windows": 2},
            **overrides,
        }

    def jobs(self) -> list[Job]:
        with session_scope(self.postgres.url) as session:
            return list(session.scalars(select(Job)))

    def wait_all(self, job_ids: list[str], timeout_s: float = TIMEOUT_S) -> dict[str, dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.stack.workers.restart_dead()  # the supervisor (docker, systemd) restarting dead workers
            done = {j: self.client.job(j) for j in job_ids}
            if all(job["status"] in ("succeeded", "failed", "cancelled") for job in done.values()):
                return done
            time.sleep(0.3)
        raise AssertionError(f"jobs not finished in {timeout_s}s: {done}\n{self.stack.log_tail()}")


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Endpoint, tokenizer) -> Iterator[FaultStack]:
    workdir = tmp_path_factory.mktemp("faults")
    model_dir = workdir / "deep-llama"
    build_model("llama", layers=LAYERS).save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    bucket = f"faults-{os.getpid()}"
    s3_server.client().create_bucket(Bucket=bucket)
    relay = TcpProxy(int(s3_server.url.rsplit(":", 1)[1]))
    relay.up()
    extra = {**s3_server.env(), "SWQUANT_S3_ENDPOINT_URL": f"http://127.0.0.1:{relay.port}", **FAULT_ENV}
    with private_postgres() as postgres, private_redis(workdir) as redis_server:
        upgrade(postgres.url)
        with production_stack(workdir, postgres.url, redis_server.url, f"s3://{bucket}", extra, workers=2) as stack:
            yield FaultStack(stack, redis_server, postgres, relay, model_dir)
        get_engine(postgres.url).dispose()
    relay.down()


def _weights(client: SWQuantClient, job_id: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    archive = client.download(job_id, "packed.tar", tmp_path / f"{job_id}.tar")
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".safetensors"))
        return load(tar.extractfile(member).read())


def _worker_pid(job: Job) -> int:
    return int(job.worker.rsplit(":", 1)[1])


def _events(client: SWQuantClient, job_id: str) -> list[dict]:
    return client.events(job_id, limit=1000)["items"]


def _attempt_order_holds(events: list[dict]) -> bool:
    """No write of an attempt after the next attempt started: attempts never overlapped."""
    current, seen = 0, []
    for event in events:
        data = event["data"]
        if event["kind"] == "status" and data["status"] == "running":
            current = data["attempt"]
        if event["kind"] == "block":
            seen.append(data["attempt"] == current)
    return all(seen)


def test_twenty_kills_of_workers_lose_no_job_and_change_no_result(faults: FaultStack, tmp_path: Path) -> None:
    client = faults.client
    reference = client.submit(faults.spec(), idempotency_key="uninterrupted")["id"]
    assert faults.wait_all([reference])[reference]["status"] == "succeeded"
    finished = client.job(reference)
    assert finished["attempts"] == 1
    # Kill moments are drawn over an attempt's lifetime on this machine, so kills land mid-job whether
    # the machine is idle or loaded.
    lifetime = (
        datetime.fromisoformat(finished["finished_at"]) - datetime.fromisoformat(finished["started_at"])
    ).total_seconds()

    job_ids = [client.submit(faults.spec(), idempotency_key=f"killed-{i}")["id"] for i in range(6)]
    rng = random.Random(20261125)
    kills: Counter[str] = Counter()
    killed_attempts: set[tuple[str, int]] = set()
    whole_worker_kills = 0
    deadline = time.monotonic() + 2 * TIMEOUT_S
    kill_at: dict[tuple[str, int], float] = {}  # each attempt dies at a random moment after it is seen
    # A third of the attempts die instead once they have recorded a block of their own, so that some
    # resume from a checkpoint however the random moments fall (most land while a job loads or
    # evaluates, before its first block).
    after_block: dict[tuple[str, int], int] = {}  # such an attempt -> the job's blocks_done when first seen
    while sum(kills.values()) < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
        faults.stack.workers.restart_dead()
        now = time.monotonic()
        snapshot = [j for j in faults.jobs() if j.id in job_ids]
        if sum(j.status in ("queued", "running") for j in snapshot) < 3 and len(job_ids) < 40:
            job_ids.append(client.submit(faults.spec(), idempotency_key=f"killed-{len(job_ids)}")["id"])
        running = [
            j
            for j in snapshot
            if j.status == "running"
            and kills[j.id] < MAX_ATTEMPTS - 1
            and (j.id, j.attempts) not in killed_attempts  # killed already, its lease not yet lapsed
        ]
        for job in running:
            if (job.id, job.attempts) not in kill_at:
                kill_at[(job.id, job.attempts)] = now + rng.uniform(0.05, 0.9) * lifetime
                if rng.random() < 1 / 3:
                    after_block[(job.id, job.attempts)] = job.blocks_done
        due = [
            j
            for j in running
            if (
                j.blocks_done > after_block[(j.id, j.attempts)]
                if (j.id, j.attempts) in after_block
                else kill_at[(j.id, j.attempts)] <= now
            )
        ]
        if not due:
            continue
        victim = due[0]
        pid = _worker_pid(victim)
        owner = faults.stack.workers.owner(pid)
        if owner is None:
            continue
        whole = rng.random() < 0.2  # the whole worker (machine lost) or only the process running the job
        os.killpg(owner.pid, signal.SIGKILL) if whole else os.kill(pid, signal.SIGKILL)
        with session_scope(faults.postgres.url) as session:
            still_running = session.get(Job, victim.id).status == "running"
        if still_running:  # the kill interrupted the job (it had not just finished)
            killed_attempts.add((victim.id, victim.attempts))
            kills[victim.id] += 1
            whole_worker_kills += whole
    states = [(j.status, j.attempts, j.blocks_done) for j in faults.jobs() if j.id in job_ids]
    assert sum(kills.values()) == 20, f"only {sum(kills.values())} kills landed: {states}\n{faults.stack.log_tail()}"

    results = faults.wait_all(job_ids)
    failed = {j: r["error"] for j, r in results.items() if r["status"] != "succeeded"}
    assert not failed, f"{failed}\n{faults.stack.log_tail()}"
    expected = _weights(client, reference, tmp_path)
    reference_metrics = client.job(reference)["metrics"]
    resumed_blocks = 0
    for job_id in job_ids:
        job = client.job(job_id)
        history = [e["data"] for e in _events(client, job_id) if e["kind"] in ("status", "message")]
        assert job["attempts"] == 1 + kills[job_id], history
        assert job["metrics"]["perplexity.after.persuasion"] == reference_metrics["perplexity.after.persuasion"]
        weights = _weights(client, job_id, tmp_path)
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[name], expected[name]) for name in expected), job_id
        events = _events(client, job_id)
        assert _attempt_order_holds(events)
        blocks = [e["data"]["index"] for e in events if e["kind"] == "block"]
        assert set(blocks) == set(range(LAYERS))
        # A kill between recording a block and storing its checkpoint redoes that one block at most.
        assert len(blocks) <= LAYERS + kills[job_id]
        resumed_blocks += sum(e["data"].get("resumed_blocks", 0) for e in events if e["kind"] == "message")
    assert resumed_blocks > 0, "no attempt resumed from a checkpoint"
    print(
        f"\nkills: {sum(kills.values())} ({whole_worker_kills} whole workers) over {len(kills)} jobs; "
        f"jobs lost: 0; blocks carried over by resumed attempts: {resumed_blocks}; "
        f"worker restarts: {faults.stack.workers.restarts}"
    )


def test_a_job_that_kills_its_worker_every_time_fails_at_the_attempt_cap(faults: FaultStack) -> None:
    client = faults.client
    job_id = client.submit(faults.spec(), idempotency_key="doomed")["id"]
    killed_attempts: set[int] = set()
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        faults.stack.workers.restart_dead()
        with session_scope(faults.postgres.url) as session:
            job = session.get(Job, job_id)
            status, attempts, worker = job.status, job.attempts, job.worker
        if status not in ("queued", "running"):
            break
        if status == "running" and attempts not in killed_attempts:
            os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)
            killed_attempts.add(attempts)
        time.sleep(0.1)
    job = client.job(job_id)
    assert job["status"] == "failed"
    assert job["attempts"] == MAX_ATTEMPTS
    assert job["error"]["code"] == "worker_lost"
    assert f"attempt limit {MAX_ATTEMPTS}" in job["error"]["message"]
    assert killed_attempts == set(range(1, MAX_ATTEMPTS + 1))


def test_redis_crash_loses_neither_queued_nor_running_jobs(faults: FaultStack) -> None:
    client = faults.client
    job_ids = [client.submit(faults.spec(seed=i), idempotency_key=f"redis-{i}")["id"] for i in range(4)]
    deadline = time.monotonic() + 60
    while not any(j.status == "running" for j in faults.jobs() if j.id in job_ids):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    faults.redis.kill()  # every queued message is gone: Redis keeps nothing on disk
    time.sleep(1)
    faults.redis.start()
    results = faults.wait_all(job_ids)
    assert {j: r["status"] for j, r in results.items()} == dict.fromkeys(job_ids, "succeeded")
    resent = [j for j in job_ids if any(e["data"].get("resent") for e in _events(client, j) if e["kind"] == "message")]
    assert resent, "no queued job needed re-sending: the crash did not hit a queued job"
    print(f"\nredis crash: {len(job_ids)} jobs, {len(resent)} re-sent from the database, 0 lost")


def test_postgres_crash_answers_503_then_recovers_and_jobs_finish(faults: FaultStack) -> None:
    client = faults.client
    job_id = client.submit(faults.spec(), idempotency_key="pg-crash")["id"]
    deadline = time.monotonic() + 60
    while client.job(job_id)["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    headers = {"Authorization": f"Bearer {faults.stack.api_key}"}
    faults.postgres.stop("immediate")
    try:
        during = httpx.get(f"{faults.stack.url}/v1/jobs/{job_id}", headers=headers, timeout=30)
        assert during.status_code == 503
        assert "database unavailable" in during.json()["detail"]
        assert during.headers["retry-after"]
        time.sleep(2)
    finally:
        faults.postgres.start()
    after = httpx.get(f"{faults.stack.url}/v1/jobs/{job_id}", headers=headers, timeout=30)
    assert after.status_code == 200
    assert faults.wait_all([job_id])[job_id]["status"] == "succeeded"


def _wait_for_stage(client: SWQuantClient, job_id: str, text: str) -> None:
    deadline = time.monotonic() + 120
    while not any(text in e["data"].get("message", "") for e in _events(client, job_id)):
        job = client.job(job_id)
        assert job["status"] in ("queued", "running"), job["error"]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_storage_cut_during_upload_is_retried_then_fails_clearly(faults: FaultStack) -> None:
    client = faults.client
    # Evaluation long enough to cut storage after the last checkpoint is stored, before the artifacts.
    slow_eval = {"evaluation": {"texts": ["persuasion"], "seq_len": 256, "max_windows": 32}}
    brief = client.submit(faults.spec(**slow_eval), idempotency_key="storage-brief")["id"]
    _wait_for_stage(client, brief, "evaluating the quantized model")
    faults.s3_relay.down()
    try:
        _wait_for_stage(client, brief, "saving the quantized model")
        time.sleep(1.0)  # the first upload attempts are refused
    finally:
        faults.s3_relay.up()
    assert faults.wait_all([brief])[brief]["status"] == "succeeded"
    assert {a["name"] for a in client.artifacts(brief)} == {"packed.tar", "report.json"}

    lasting = client.submit(faults.spec(**slow_eval), idempotency_key="storage-down")["id"]
    _wait_for_stage(client, lasting, "evaluating the quantized model")
    faults.s3_relay.down()
    try:
        job = faults.wait_all([lasting])[lasting]
    finally:
        faults.s3_relay.up()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "storage_error"
    assert "packed.tar" in job["error"]["message"]
    assert "gave up after 4 attempts" in job["error"]["message"]
    assert client.artifacts(lasting) == []
