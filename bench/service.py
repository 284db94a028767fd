"""The API under load, open loop, on the embedded and the production stack; and how long a job waits for a worker.

A job service must stay fast while many clients poll, and degrade gracefully beyond its capacity.
For each stack (``embedded``: SQLite; ``production``: PostgreSQL; both with Redis and local-folder
storage, as ``swquant serve`` and docker-compose run them), this bench starts ``uvicorn
api.app:create_app --factory`` with N processes and one Celery worker, mints a key with ``swquant
create-key``, runs two tiny RTN jobs to completion (their ids are what the pollers ask for), stops the
worker (so jobs submitted under load wait in the queue instead of taking the CPU), and then

1. sends ``GET /v1/jobs/{id}`` open loop (:mod:`bench.open_loop`) at each fixed rate (50 ... 800 a
   second, rate limiting off), from generator processes of its own, and reports per rate: the rate
   actually sent, answered/s, p50, p99 and max latency of every answer, answers by status (a 503 is
   the admission control refusing), requests with no answer, and the API's CPU and memory;
2. the same with a mixed profile: 90% status polls, 8% listings, 2% submissions;
3. on the production stack, submits a tiny job to an idle worker and times submit -> running.

Prints markdown tables and writes ``bench/results/service.json``. Everything it starts (processes,
databases, queue keys) is removed on exit, Ctrl-C and SIGTERM included. Heavy imports sit inside the
functions that use them, so the spawned generator processes start light. Run it on free cores: the
generators share the machine with the API.

    python -m bench.service [--stacks embedded production] [--rates 50 100 200 400 800] [--api-workers 1]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import multiprocessing
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from api.commands.client import TERMINAL, SWQuantClient
from bench.profile_shares import shares as profile_shares
from bench.profile_shares import table as profile_table
from bench.random_llama import save_random_llama

RESULTS = Path(__file__).with_name("results") / "service.json"
PG_ADMIN_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
READY_TIMEOUT_S = 120
STOP_TIMEOUT_S = 20
JOB_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 30
PICKUP_POLL_S = 0.01
LIST_LIMIT = 20

POLL, LIST, SUBMIT = "GET /v1/jobs/{id}", "GET /v1/jobs", "POST /v1/jobs"
ENDPOINTS = (POLL, LIST, SUBMIT)
# The last line of a traceback in the API log: what a 5xx under load came from.
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Timeout|Exit)\w*(: .*)?$")
ACCESS_5XX = re.compile(r'" 5\d\d ')


# --- the stack -------------------------------------------------------------------------------------


def tiny_job(model_dir: Path) -> dict[str, Any]:
    """RTN on the tiny model: the cheapest job that still loads, quantizes, evaluates and uploads."""
    return {
        "model": str(model_dir),
        "bits": 4,
        "group_size": 32,
        "method": "rtn",
        "calibration": {"n_samples": 4, "seq_len": 32},
        "evaluation": {"max_windows": 2},
        "metadata": {"suite": "bench-service"},
    }


@contextmanager
def fresh_database(admin_dsn: str) -> Iterator[str]:
    """A database ``swq_bench_<random>`` migrated to head; yields its SQLAlchemy URL, drops it on exit."""
    import psycopg
    from psycopg import sql

    from swq_shared.migrate import upgrade

    params = dict(item.split("=", 1) for item in admin_dsn.split())
    name = f"swq_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = f"postgresql+psycopg://{params['user']}@{params['host']}:{params['port']}/{name}"
        upgrade(url)
        yield url
    finally:
        # FORCE closes the connections the API's and the bench's pools still hold.
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@dataclass
class Stack:
    url: str
    api_key: str
    api_pid: int  # the uvicorn main process; its process group holds the worker processes too
    logs: dict[str, Path]
    ready_s: float
    worker: subprocess.Popen | None
    front_pid: int | None  # HAProxy before the API (``--front haproxy``), else None


def log_tail(logs: dict[str, Path], lines: int = 40) -> str:
    return "\n".join(
        f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        for path in logs.values()
        if path.exists()
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_process(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A child in its own session: Ctrl-C reaches only the bench, which then stops the child's whole group."""
    with log.open("wb") as out:
        return subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the process and its children (the job process it forked), then SIGKILL whatever of the group remains."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def purge_queue(broker_url: str, queue: str) -> None:
    """Delete this run's queue keys from Redis, and messages a killed worker left unacknowledged on it.

    The jobs submitted under load are still queued when the bench ends; the queue name is unique to
    the run, so nothing else on a shared Redis is touched.
    """
    import redis

    client = redis.Redis.from_url(broker_url)
    try:
        # The queue's lists (one per priority) and kombu's binding sets, which end in the queue's name.
        if keys := list(client.scan_iter(match=f"*{queue}*")):
            client.delete(*keys)
        for tag, raw in client.hscan_iter("unacked"):
            _message, exchange, routing_key = json.loads(raw)
            if queue in (exchange, routing_key):
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)
    finally:
        client.close()


def wait_ready(url: str, processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"service process {process.args[:4]} exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"service at {url} not ready after {READY_TIMEOUT_S}s")


@contextmanager
def service_stack(
    database_url: str, broker_url: str, storage_dir: Path, log_dir: Path, api_workers: int = 1, front: bool = False
) -> Iterator[Stack]:
    """uvicorn (``api_workers`` processes) + one Celery worker on a run-unique queue, a fresh key for tenant ``bench``.

    Rate limiting is off (the bench measures the service, not one key's budget); with several API
    processes the Prometheus counters go to a shared multiprocess folder, as in production. With
    ``front``, HAProxy (``api/front/haproxy.cfg``, sized for ``api_workers``) listens before uvicorn and
    the load goes to it.
    """
    from api.front.haproxy import API_ENV_BEHIND_FRONT, FrontSettings, start_front
    from swq_shared.queue import worker_argv

    run = uuid.uuid4().hex[:8]
    queue = f"swq-bench-{run}"
    metrics_dir = log_dir / f"prometheus-{run}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWQUANT_")} | {
        "SWQUANT_DATABASE_URL": database_url,
        "SWQUANT_BROKER_URL": broker_url,
        "SWQUANT_STORAGE_URL": storage_dir.resolve().as_uri(),
        "SWQUANT_DATA_DIR": str(storage_dir.parent),
        "SWQUANT_QUEUE": queue,
        "SWQUANT_RATE_LIMIT_PER_MINUTE": "0",
        "HF_HUB_OFFLINE": "1",
    }
    if api_workers > 1:
        metrics_dir.mkdir(parents=True, exist_ok=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    storage_dir.mkdir(parents=True, exist_ok=True)
    swquant = str(Path(sys.executable).with_name("swquant"))
    created = subprocess.run(
        [swquant, "create-key", "--tenant", "bench", "--name", "service bench"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    api_key = created.stdout.split()[-1]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stack_logs = {"api": log_dir / f"api-{run}.log", "worker": log_dir / f"worker-{run}.log"}
    front_settings = None
    if front:
        front_port = free_port()
        front_settings = FrontSettings.for_processes(f"127.0.0.1:{front_port}", f"127.0.0.1:{port}", api_workers)
        url = f"http://127.0.0.1:{front_port}"
        stack_logs["front"] = log_dir / f"front-{run}.log"
        env |= API_ENV_BEHIND_FRONT
    uvicorn = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host", "127.0.0.1"]
    uvicorn += ["--port", str(port), "--workers", str(api_workers), "--no-access-log"]
    # Gossip and mingle would talk to other workers on a shared Redis; this worker needs neither.
    celery = [*worker_argv(queue, f"{queue}@%h"), "--without-gossip", "--without-mingle"]
    started = time.perf_counter()
    with ExitStack() as cleanup:
        cleanup.callback(purge_queue, broker_url, queue)
        worker = start_process(celery, env, stack_logs["worker"])
        cleanup.callback(stop_process_group, worker)
        cleanup.callback(purge_queue, broker_url, queue)  # before the worker stops: no job is picked up any more
        api = start_process(uvicorn, env, stack_logs["api"])
        cleanup.callback(stop_process_group, api)
        services = [api, worker]
        front_pid = None
        if front_settings is not None:
            with stack_logs["front"].open("wb") as out:
                proxy = start_front(front_settings, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            cleanup.callback(stop_process_group, proxy)
            services.append(proxy)
            front_pid = proxy.pid
        try:
            wait_ready(url, services)
            yield Stack(url, api_key, api.pid, stack_logs, time.perf_counter() - started, worker, front_pid)
        except Exception:
            print(log_tail(stack_logs), file=sys.stderr)
            raise


def stop_worker(stack: Stack) -> None:
    """Stop the Celery worker: jobs submitted under load then wait in the queue instead of taking the CPU."""
    if stack.worker is not None:
        stop_process_group(stack.worker)
        stack.worker = None


def group_pids(pgid: int) -> list[int]:
    """Every live process in a process group (the uvicorn main process and its worker processes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    pids.append(int(entry.name))
    return pids


def cpu_seconds(pgid: int) -> float:
    """User + system CPU time so far of a process group's live processes (Linux ``/proc``)."""
    total = 0.0
    for pid in group_pids(pgid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rss_mib(pgid: int) -> float:
    """Resident memory of a process group's processes, MiB."""
    total = 0
    for pid in group_pids(pgid):
        with contextlib.suppress(OSError, ValueError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total / 2**20


# --- submit -> running with an idle worker ---------------------------------------------------------


def time_job(client: SWQuantClient, spec: dict[str, Any]) -> dict[str, float]:
    """Submit, poll until running and until it ends: times as the client saw them and as the server stamped them."""
    started = time.perf_counter()
    job = client.submit(spec)
    running_s = None
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while job["status"] not in TERMINAL:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job['id']} still {job['status']} after {JOB_TIMEOUT_S}s")
        time.sleep(PICKUP_POLL_S if running_s is None else 0.05)
        job = client.job(job["id"])
        if running_s is None and job["status"] != "queued":
            running_s = time.perf_counter() - started
    done_s = time.perf_counter() - started
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} ended {job['status']}: {job['error']}")
    created, began, finished = (datetime.fromisoformat(job[k]) for k in ("created_at", "started_at", "finished_at"))
    return {
        "id": job["id"],
        "submit_to_running_s": running_s,
        "submit_to_succeeded_s": done_s,
        "server_queued_s": (began - created).total_seconds(),
        "server_created_to_finished_s": (finished - created).total_seconds(),
    }


def measure_pickup(stack: Stack, spec: dict[str, Any], runs: int, settle_s: float) -> dict[str, Any]:
    """One job right after start, then ``runs`` jobs each submitted to a worker idle for ``settle_s``.

    The worker forks each job's process when the task arrives (worker.job_process); ``settle_s`` lets
    the previous job's process exit and its worker return to the broker before the next submit.
    """
    client = SWQuantClient(stack.url, stack.api_key)
    try:
        first = time_job(client, spec)
        idle = []
        for _ in range(runs):
            time.sleep(settle_s)
            idle.append(time_job(client, spec))
    finally:
        client.close()
    timings = [k for k in first if k != "id"] if idle else []
    summary = {
        k: {"median_s": statistics.median(r[k] for r in idle), "max_s": max(r[k] for r in idle)} for k in timings
    }
    return {"first_after_start": first, "idle_runs": idle, "summary": summary}


# --- load ------------------------------------------------------------------------------------------


def generator_processes(rate: float) -> int:
    """One generator process per 300 requests a second, so none of them falls behind its schedule."""
    return max(1, math.ceil(rate / 300))


def run_rate(
    stack: Stack,
    rate: float,
    shares: dict[str, float],
    ids: list[str],
    spec: dict[str, Any],
    args: Any,
    profile_to: Path | None = None,
    burst: int = 1,
) -> dict[str, Any]:
    """Open-loop load at ``rate`` requests a second (in bursts of ``burst`` requests that leave together),
    split over generator processes; one merged summary."""
    from bench.open_loop import EndpointStats, OpenLoopPlan, run_generator

    processes = generator_processes(rate)
    start_at = time.time() + 1.5  # every process starts its schedule at the same instant
    plans = [
        OpenLoopPlan(
            stack.url,
            stack.api_key,
            rate / processes,
            args.duration,
            args.warmup,
            args.timeout,
            shares,
            ids,
            spec,
            LIST_LIMIT,
            args.seed + 1000 * i,
            start_at + i / rate,
            max(1, burst // processes),
        )
        for i in range(processes)
    ]
    rss_before, cpu_before = rss_mib(stack.api_pid), cpu_seconds(stack.api_pid)
    front_cpu_before = cpu_seconds(stack.front_pid) if stack.front_pid else 0.0
    profiler = None
    if profile_to is not None:  # samples the API processes through warm-up and the measured window
        seconds = str(math.ceil(args.warmup + args.duration + 1.5))
        py_spy = [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(stack.api_pid)]
        py_spy += ["--subprocesses", "--nonblocking", "--format", "raw", "--rate", "200", "--duration", seconds]
        profiler = subprocess.Popen([*py_spy, "--output", str(profile_to)], stdout=subprocess.DEVNULL)
    began = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.map(run_generator, plans)
    wall_s = time.perf_counter() - began  # until the last answer (or timeout), not just the schedule
    cpu_s = cpu_seconds(stack.api_pid) - cpu_before
    front_cpu_s = cpu_seconds(stack.front_pid) - front_cpu_before if stack.front_pid else None
    profile = None
    if profiler is not None and profile_to is not None:
        profiler.wait()
        profile = profile_shares(profile_to.read_text()) if profile_to.exists() else None
    merged = {endpoint: EndpointStats() for endpoint in shares}
    for result in results:
        for endpoint, raw in result["endpoints"].items():
            merged[endpoint].merge(EndpointStats.from_dict(raw))
    total = EndpointStats()
    for stats in merged.values():
        total.merge(stats)
    return {
        "rate": rate,
        "burst": burst,
        "generator_processes": processes,
        "sent_per_s": sum(r["sent_per_s"] for r in results),
        "send_lateness_p99_ms": max(r["send_lateness_p99_ms"] or 0.0 for r in results),
        "connections_opened": sum(r["connections_opened"] for r in results),
        "endpoints": {endpoint: stats.summary(args.duration) for endpoint, stats in merged.items()},
        "total": total.summary(args.duration),
        "api_cores_used": cpu_s / wall_s,
        "front_cores_used": None if front_cpu_s is None else front_cpu_s / wall_s,
        "api_rss_mib_before": rss_before,
        "api_rss_mib_after": rss_mib(stack.api_pid),
        "py_spy": profile,
    }


# --- after the run ---------------------------------------------------------------------------------


def job_counts(database_url: str) -> dict[str, int]:
    """Jobs by status once the load stops: how far the one worker got through what was submitted."""
    from sqlalchemy import func, select

    from swq_shared.db import get_engine, session_scope
    from swq_shared.models import Job

    with session_scope(database_url) as session:
        counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    get_engine(database_url).dispose()
    return counts


def server_log_summary(log: Path) -> dict[str, Any]:
    """Exception lines (the last line of each traceback) and 5xx access lines in the API's log."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    exceptions = Counter(line[:300] for line in lines if EXCEPTION_LINE.match(line))
    return {"exceptions": dict(exceptions.most_common()), "access_5xx": sum(bool(ACCESS_5XX.search(x)) for x in lines)}


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f}"


def pickup_table(pickup: dict[str, Any]) -> str:
    rows = [
        ("submit -> running, client poll every 10 ms", "submit_to_running_s"),
        ("created_at -> started_at (server)", "server_queued_s"),
        ("submit -> succeeded, client poll", "submit_to_succeeded_s"),
        ("created_at -> finished_at (server)", "server_created_to_finished_s"),
    ]
    n = len(pickup["idle_runs"])
    out = [
        f"| tiny RTN job, idle worker | median ms ({n} runs) | max ms | first job after start ms |",
        "| --- | --- | --- | --- |",
    ]
    for label, key in rows:
        summary = pickup["summary"].get(key, {})
        first = pickup["first_after_start"][key]
        out.append(f"| {label} | {ms(summary.get('median_s'))} | {ms(summary.get('max_s'))} | {ms(first)} |")
    return "\n".join(out)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def load_table(rows: list[dict[str, Any]]) -> str:
    """One line per stack, API processes, profile and rate."""
    out = [
        "| stack | front | API procs | profile | rate | sent/s | answered/s | p50 ms | p99 ms | max ms "
        "| admitted p99 ms | 503s | 503 p99 ms (after the write) | statuses | no answer | API cores | front cores "
        "| API RSS MiB before -> after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        t = row["total"]
        statuses = ", ".join(f"{k}: {v}" for k, v in t["statuses"].items())
        failures = ", ".join(f"{k}: {v}" for k, v in t["no_answer"].items()) or "0"
        front_cores = "-" if row["front_cores_used"] is None else f"{row['front_cores_used']:.2f}"
        out.append(
            f"| {row['stack']} | {row['front']} | {row['api_workers']} | {row['profile']} | {row['rate']:g} "
            f"| {row['sent_per_s']:.0f} "
            f"| {t['answered_per_s']:.0f} | {_ms(t['p50_ms'])} | {_ms(t['p99_ms'])} | {_ms(t['max_ms'])} "
            f"| {_ms(t['admitted']['p99_ms'])} | {t['refused']['count']} "
            f"| {_ms(t['refused']['p99_ms'])} ({_ms(t['refused']['p99_after_write_ms'])}) "
            f"| {statuses} | {failures} | {row['api_cores_used']:.2f} | {front_cores} "
            f"| {row['api_rss_mib_before']:.0f} -> {row['api_rss_mib_after']:.0f} |"
        )
    return "\n".join(out)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def stack_database(kind: str, workdir: Path, pg_dsn: str) -> Iterator[str]:
    """A fresh, migrated database: SQLite in the work folder (embedded) or one on the PostgreSQL server."""
    if kind == "production":
        with fresh_database(pg_dsn) as url:
            yield url
        return
    from swq_shared.migrate import upgrade

    url = f"sqlite:///{workdir / f'embedded-{uuid.uuid4().hex[:8]}.db'}"
    upgrade(url)
    yield url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stacks", nargs="+", choices=["embedded", "production"], default=["embedded", "production"])
    parser.add_argument("--api-workers", type=int, nargs="+", default=[1], help="API process counts to run")
    parser.add_argument(
        "--front", nargs="+", choices=["none", "haproxy"], default=["none"], help="run without and/or behind HAProxy"
    )
    parser.add_argument("--rates", type=float, nargs="*", default=[50, 100, 200, 400, 800], help="requests a second")
    parser.add_argument("--mixed-rates", type=float, nargs="*", default=[100, 400], help="rates of the mixed profile")
    parser.add_argument(
        "--bursts", type=int, nargs="*", default=[32], help="poll rows in bursts of this many requests, at --burst-rate"
    )
    parser.add_argument("--burst-rate", type=float, default=100, help="mean requests a second of the burst rows")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per rate")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before a request counts as unanswered")
    parser.add_argument("--profile-rate", type=float, help="also sample the API with py-spy at this poll rate")
    parser.add_argument("--pickup-runs", type=int, default=5, help="idle-worker jobs timed to running (production)")
    parser.add_argument("--settle", type=float, default=6.0, help="seconds the worker idles before each timed job")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pg-dsn", default=os.environ.get("SWQUANT_BENCH_PG_DSN", PG_ADMIN_DSN))
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--log-dir", type=Path, help="keep the API and worker logs here (default: removed)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    profiles = {"poll": {POLL: 1.0}, "mixed": {POLL: 0.90, LIST: 0.08, SUBMIT: 0.02}}

    started = time.perf_counter()
    machine = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_before": os.getloadavg(),
    }
    rows: list[dict[str, Any]] = []
    pickup: dict[str, Any] | None = None
    server_logs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="swq-bench-service-") as tmp:
        workdir = Path(tmp)
        log_dir = args.log_dir or workdir
        log_dir.mkdir(parents=True, exist_ok=True)
        spec = tiny_job(save_random_llama(workdir / "tiny-llama"))  # cheap: the bench measures the service
        for kind, front, workers in itertools.product(args.stacks, args.front, args.api_workers):
            with ExitStack() as cleanup:
                database_url = cleanup.enter_context(stack_database(kind, workdir, args.pg_dsn))
                stack = cleanup.enter_context(
                    service_stack(
                        database_url,
                        args.broker_url,
                        workdir / f"storage-{kind}",
                        log_dir,
                        workers,
                        front == "haproxy",
                    )
                )
                if kind == "production" and pickup is None:
                    pickup = measure_pickup(stack, spec, args.pickup_runs, args.settle)
                    ids = [pickup["first_after_start"]["id"], *(r["id"] for r in pickup["idle_runs"])]
                else:
                    client = SWQuantClient(stack.url, stack.api_key)
                    ids = [time_job(client, spec)["id"] for _ in range(2)]
                    client.close()
                stop_worker(stack)
                plan = [("poll", rate, 1) for rate in args.rates] + [("mixed", rate, 1) for rate in args.mixed_rates]
                plan += [(f"poll, bursts of {b}", args.burst_rate, b) for b in args.bursts]
                if args.profile_rate:
                    plan.append(("poll, py-spy", args.profile_rate, 1))
                for profile, rate, burst in plan:
                    profile_to = log_dir / f"py-spy-{kind}-{front}-{workers}.txt" if "py-spy" in profile else None
                    shares = profiles[profile.split(",")[0]]
                    row = run_rate(stack, rate, shares, ids, spec, args, profile_to, burst)
                    row |= {"stack": kind, "front": front, "api_workers": workers, "profile": profile}
                    rows.append(row)
                    print(load_table([row]).splitlines()[-1], flush=True)
                    time.sleep(2)  # let the API drain what the last rate left before the next
            server_logs[f"{kind}/{front}/{workers}"] = server_log_summary(stack.logs["api"])
    machine["loadavg_after"] = os.getloadavg()
    wall_s = time.perf_counter() - started

    print()
    if pickup is not None:
        print(pickup_table(pickup) + "\n")
    print(load_table(rows) + "\n")
    for row in rows:
        if row["py_spy"]:
            print(f"py-spy, {row['stack']}, {row['rate']:g} polls/s:\n{profile_table(row['py_spy'])}\n")
    for name, summary in server_logs.items():
        if summary["exceptions"] or summary["access_5xx"]:
            print(f"API log ({name}): {summary['access_5xx']} 5xx; exceptions: {summary['exceptions']}")
    print(f"wall time {wall_s:.1f} s")
    payload = {
        "settings": {
            "stacks": args.stacks,
            "api_workers": args.api_workers,
            "front": args.front,
            "rates": args.rates,
            "mixed_rates": args.mixed_rates,
            "bursts": args.bursts,
            "burst_rate": args.burst_rate,
            "profiles": profiles,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "timeout_s": args.timeout,
            "list_limit": LIST_LIMIT,
            "pickup_runs": args.pickup_runs,
            "settle_s": args.settle,
            "seed": args.seed,
            "job": {k: v for k, v in spec.items() if k != "model"},
            "stack": "uvicorn (N processes, no access log, rate limit off) + Redis + local-folder storage; "
            "the Celery worker stopped during the load",
        },
        "machine": machine,
        "pickup": pickup,
        "load": [{k: v for k, v in row.items()} for row in rows],
        "server_logs": server_logs,
        "wall_s": wall_s,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
