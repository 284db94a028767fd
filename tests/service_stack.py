"""Running the real service for tests: uvicorn and a Celery worker as processes, or ``swquant serve``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from swq_shared.auth import create_api_key
from swq_shared.db import session_scope
from swq_shared.migrate import upgrade
from swq_shared.queue import worker_argv
from tests.databases import fresh_postgres_database
from tests.s3_server import S3Endpoint, free_ports

STARTUP_TIMEOUT_S = 90


class WorkerPool:
    """Celery worker processes that a test may kill; ``restart_dead`` plays the supervisor.

    Each worker runs in its own process group (its main process and the child running a job), as a
    container or a systemd unit would; a restart keeps the worker's hostname and log file.
    """

    def __init__(self, env: dict[str, str], workdir: Path, count: int) -> None:
        self.env, self.workdir = env, workdir
        self.logs = [workdir / f"worker{i}.log" for i in range(count)]
        self.processes: list[subprocess.Popen] = [self._start(i) for i in range(count)]
        self.restarts = 0

    def _start(self, index: int) -> subprocess.Popen:
        queues = worker_argv(self.env["SWQUANT_QUEUE"], f"w{index}@%h", int(self.env.get("SWQUANT_RANKS", "1")))
        argv = [*queues, "--without-gossip", "--without-mingle"]
        with self.logs[index].open("ab") as out:
            return subprocess.Popen(
                argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def restart_dead(self) -> int:
        """Start again every worker whose main process has exited; return how many."""
        dead = [i for i, process in enumerate(self.processes) if process.poll() is not None]
        for index in dead:
            self.processes[index] = self._start(index)
        self.restarts += len(dead)
        return len(dead)

    def owner(self, pid: int) -> subprocess.Popen | None:
        """The worker whose process group holds ``pid`` (its main process or its job's child)."""
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            return None
        return next((p for p in self.processes if p.pid == group and p.poll() is None), None)

    def stop(self) -> None:
        for process in self.processes:
            stop_process_group(process)


@dataclass(frozen=True)
class Stack:
    url: str
    api_key: str
    env: dict[str, str]
    logs: list[Path]
    workers: WorkerPool | None = None
    api_pid: int | None = None  # the process answering HTTP, where a test needs to stop it

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(
            f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) for log in self.logs
        )


def _wait_ready(url: str, processes: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                tails = "\n".join(log.read_text(errors="replace")[-3000:] for log in logs)
                raise RuntimeError(f"a service process exited with {process.returncode}:\n{tails}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"service at {url} not ready after {STARTUP_TIMEOUT_S}s")


@contextmanager
def _process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    try:
        yield process
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen, timeout_s: float = 20) -> None:
    """SIGTERM the process and its children (the job process it forked), then SIGKILL what remains."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def migrated_backing(s3_server: S3Endpoint, prefix: str) -> Iterator[tuple[str, str, dict[str, str]]]:
    """A fresh migrated PostgreSQL database and a fresh S3 bucket: (database URL, storage URL, env)."""
    bucket = f"{prefix}-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    extra = {**s3_server.env(), "SWQUANT_S3_ENDPOINT_URL": s3_server.url}
    with fresh_postgres_database() as database_url:
        upgrade(database_url)
        yield database_url, f"s3://{bucket}", extra


def service_env(
    workdir: Path, database_url: str, broker_url: str, storage_url: str, extra_env: dict[str, str]
) -> dict[str, str]:
    """The environment of every service process, as docker-compose sets it; ``extra_env`` wins."""
    return {
        **os.environ,
        "SWQUANT_DATABASE_URL": database_url,
        "SWQUANT_BROKER_URL": broker_url,
        "SWQUANT_STORAGE_URL": storage_url,
        "SWQUANT_DATA_DIR": str(workdir),
        "SWQUANT_QUEUE": f"test-{workdir.name}",
        "HF_HUB_OFFLINE": "1",
        "SWQUANT_MAX_TEXT_UPLOAD_BYTES": "2000000",
        **extra_env,
    }


@contextmanager
def _api_server(env: dict[str, str], log: Path, processes: int = 1) -> Iterator[tuple[str, subprocess.Popen]]:
    """uvicorn serving the app on a free port with ``processes`` worker processes: (its URL, its main process)."""
    (port,) = free_ports(1)
    argv = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--workers", str(processes)]
    with _process(argv, env, log) as api:
        yield f"http://127.0.0.1:{port}", api


@contextmanager
def production_stack(
    workdir: Path,
    database_url: str,
    broker_url: str,
    storage_url: str,
    extra_env: dict[str, str],
    workers: int = 1,
) -> Iterator[Stack]:
    """uvicorn + Celery workers against the given PostgreSQL, Redis and S3, as in docker-compose."""
    env = service_env(workdir, database_url, broker_url, storage_url, extra_env)
    key = (
        subprocess.run(
            [sys.executable, "-m", "api.commands.cli", "create-key", "--tenant", "e2e"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    logs = [workdir / "api.log"]
    with ExitStack() as stack:
        url, api = stack.enter_context(_api_server(env, logs[0]))
        pool = WorkerPool(env, workdir, workers)
        stack.callback(pool.stop)
        logs += pool.logs
        _wait_ready(url, [api, *pool.processes], logs)
        yield Stack(url, key, env, logs, pool)


@contextmanager
def api_only_stack(
    workdir: Path,
    database_url: str,
    broker_url: str,
    storage_url: str,
    extra_env: dict[str, str],
    api_key: str,
    api_processes: int = 1,
) -> Iterator[Stack]:
    """uvicorn as in ``production_stack``, without a worker: jobs are queued and never consumed."""
    env = service_env(workdir, database_url, broker_url, storage_url, extra_env)
    logs = [workdir / "api.log"]
    with _api_server(env, logs[0], api_processes) as (url, api):
        _wait_ready(url, [api], logs)
        yield Stack(url, api_key, env, logs)


@contextmanager
def embedded_stack(workdir: Path, *serve_flags: str, env_extra: dict[str, str] | None = None) -> Iterator[Stack]:
    """``swquant serve [serve_flags]``: API, one worker, its own Redis, SQLite and a local folder, nothing else."""
    # The service's own settings start from their defaults; where the runtimes live is the machine's.
    kept = {k: v for k, v in os.environ.items() if not k.startswith("SWQUANT_") or k.endswith("_PYTHON")}
    env = kept | {"HF_HUB_OFFLINE": "1"} | (env_extra or {})
    port, redis_port = free_ports(2)
    url = f"http://127.0.0.1:{port}"
    logs = [workdir / "serve.log"]
    args = [
        sys.executable,
        "-m",
        "api.commands.cli",
        "serve",
        "--port",
        str(port),
        "--redis-port",
        str(redis_port),
        "--data-dir",
        str(workdir / "data"),
        *serve_flags,
    ]
    with _process(args, env, logs[0]) as serve:
        _wait_ready(url, [serve], logs)
        key = (workdir / "data" / "api_key").read_text().strip()
        yield Stack(url, key, env, logs, api_pid=serve.pid)


@dataclass(frozen=True)
class KeyedApi:
    """A running API with its database at hand, to mint keys and send authenticated requests."""

    stack: Stack
    database_url: str

    def new_key(self, tenant: str) -> str:
        with session_scope(self.database_url) as session:
            return create_api_key(session, tenant, "test")

    def get(self, key: str | None, path: str = "/v1/jobs", headers: dict[str, str] | None = None) -> httpx.Response:
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(f"{self.stack.url}{path}", headers={**auth, **(headers or {})}, timeout=30)
