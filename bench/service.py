"""Service latency under load, and how long a job waits for an idle worker, on the production stack.

A deployment asks two things of the service around the numerics: does the API keep answering quickly
while many clients poll, list and submit at once, and how long does a submitted job sit in the queue
before an idle worker picks it up. This bench starts the stack the way docker-compose runs it (one
``uvicorn api.app:create_app --factory`` process and one Celery worker from ``worker_argv``) against
a fresh PostgreSQL database on the local server, the local Redis and a local-folder storage, mints a
key with ``swquant create-key``, then

1. submits a tiny RTN job with the worker idle and times submit -> running and submit -> succeeded,
   as a client polling every 10 ms sees them and from the server's own timestamps;
2. drives closed-loop clients from a separate process (so the load generator does not share the API's
   interpreter): mostly ``GET /v1/jobs/{id}``, some ``GET /v1/jobs``, a few ``POST /v1/jobs``.

Prints markdown tables and writes ``bench/results/service.json``. Everything it starts (processes,
database, queue keys) is removed on exit, Ctrl-C and SIGTERM included. Heavy imports sit inside the
functions that use them, so the spawned load process starts light.

    python -m bench.service [--clients 50] [--duration 30] [--pickup-runs 5] [--log-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import random
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
from collections.abc import Awaitable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx

from api.client import TERMINAL, SWQuantClient

RESULTS = Path(__file__).with_name("results") / "service.json"
PG_ADMIN_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
READY_TIMEOUT_S = 120
STOP_TIMEOUT_S = 20
JOB_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 30
PICKUP_POLL_S = 0.01
LIST_LIMIT = 20
VOCAB = 320

POLL, LIST, SUBMIT = "GET /v1/jobs/{id}", "GET /v1/jobs", "POST /v1/jobs"
ENDPOINTS = (POLL, LIST, SUBMIT)
# The last line of a traceback in the API log: what a 5xx under load came from.
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Timeout|Exit)\w*(: .*)?$")
ACCESS_5XX = re.compile(r'" 5\d\d ')


# --- the stack -------------------------------------------------------------------------------------


def build_tiny_model(path: Path) -> Path:
    """A seeded 2-layer Llama (hidden 64) and a BPE tokenizer trained on the bundled corpus, saved as a user would.

    The job must be cheap so the bench measures the service, not the quantizer.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from quant_core.corpus import BUNDLED_TEXTS

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    bpe.train_from_iterator(BUNDLED_TEXTS["austen"].read_text(encoding="utf-8")[:200_000].splitlines(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


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


@dataclass(frozen=True)
class Stack:
    url: str
    api_key: str
    api_pid: int
    logs: dict[str, Path]
    ready_s: float


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
    """SIGTERM the process and its children (Celery's pool), then SIGKILL whatever of the group remains."""
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
def production_stack(database_url: str, broker_url: str, storage_dir: Path, log_dir: Path) -> Iterator[Stack]:
    """uvicorn + one Celery worker on a run-unique queue, with a fresh key for tenant ``bench``."""
    from swq_shared.queue import worker_argv

    run = uuid.uuid4().hex[:8]
    queue = f"swq-bench-{run}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWQUANT_")} | {
        "SWQUANT_DATABASE_URL": database_url,
        "SWQUANT_BROKER_URL": broker_url,
        "SWQUANT_STORAGE_URL": storage_dir.resolve().as_uri(),
        "SWQUANT_DATA_DIR": str(storage_dir.parent),
        "SWQUANT_QUEUE": queue,
        "HF_HUB_OFFLINE": "1",
    }
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
    stack_logs = {"api": log_dir / "api.log", "worker": log_dir / "worker.log"}
    uvicorn = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host", "127.0.0.1"]
    # Gossip and mingle would talk to other workers on a shared Redis; this worker needs neither.
    celery = [*worker_argv(queue, f"{queue}@%h"), "--without-gossip", "--without-mingle"]
    started = time.perf_counter()
    with ExitStack() as cleanup:
        cleanup.callback(purge_queue, broker_url, queue)
        worker = start_process(celery, env, stack_logs["worker"])
        cleanup.callback(stop_process_group, worker)
        cleanup.callback(purge_queue, broker_url, queue)  # before the worker stops: no job is picked up any more
        api = start_process([*uvicorn, "--port", str(port)], env, stack_logs["api"])
        cleanup.callback(stop_process_group, api)
        try:
            wait_ready(url, [api, worker])
            yield Stack(url, api_key, api.pid, stack_logs, time.perf_counter() - started)
        except Exception:
            print(log_tail(stack_logs), file=sys.stderr)
            raise


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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

    The worker's child process exits after every job (``--max-tasks-per-child 1``) and the prefork pool
    forks its replacement on its maintenance timer (every 5 s) or when the next task arrives, so a job
    sent sooner than that after the last one also waits for a fork. Idle means longer than the timer.
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


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))]


@dataclass
class EndpointStats:
    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    exceptions: Counter[str] = field(default_factory=Counter)

    def record(self, latency_s: float, status: int | None, exception: str | None) -> None:
        self.latencies_s.append(latency_s)
        if status is not None:
            self.statuses[status] += 1
        if exception is not None:
            self.exceptions[exception] += 1

    def merge(self, other: EndpointStats) -> None:
        self.latencies_s += other.latencies_s
        self.statuses += other.statuses
        self.exceptions += other.exceptions

    def summary(self, window_s: float) -> dict[str, Any]:
        ordered = sorted(self.latencies_s)
        ok = sum(n for status, n in self.statuses.items() if 200 <= status < 300)
        return {
            "requests": len(ordered),
            "per_s": len(ordered) / window_s,
            "p50_ms": 1000 * percentile(ordered, 0.5) if ordered else None,
            "p99_ms": 1000 * percentile(ordered, 0.99) if ordered else None,
            "max_ms": 1000 * ordered[-1] if ordered else None,
            "errors": len(ordered) - ok,
            "server_5xx": sum(n for status, n in self.statuses.items() if status >= 500),
            "statuses": {str(s): n for s, n in sorted(self.statuses.items())},
            "exceptions": dict(self.exceptions),
        }


@dataclass(frozen=True)
class LoadPlan:
    url: str
    api_key: str
    job_ids: list[str]
    spec: dict[str, Any]
    clients: int
    duration_s: float
    warmup_s: float
    shares: dict[str, float]
    seed: int


def send(
    http: httpx.AsyncClient, endpoint: str, rng: random.Random, ids: list[str], plan: LoadPlan
) -> Awaitable[httpx.Response]:
    if endpoint == POLL:
        return http.get(f"/v1/jobs/{rng.choice(ids)}")
    if endpoint == LIST:
        return http.get("/v1/jobs", params={"limit": LIST_LIMIT})
    return http.post("/v1/jobs", json=plan.spec)


async def one_client(
    http: httpx.AsyncClient,
    rng: random.Random,
    ids: list[str],
    plan: LoadPlan,
    stats: dict[str, EndpointStats],
    window: tuple[float, float],
) -> None:
    """Closed loop: the next request leaves when the last answer is in; requests started in the window count."""
    measure_from, stop_at = window
    endpoints, weights = zip(*plan.shares.items(), strict=True)
    while (started := time.perf_counter()) < stop_at:
        endpoint = rng.choices(endpoints, weights)[0]
        status, exception = None, None
        try:
            response = await send(http, endpoint, rng, ids, plan)
            status = response.status_code
        except httpx.HTTPError as exc:
            exception = type(exc).__name__
        latency_s = time.perf_counter() - started
        if started >= measure_from:
            stats[endpoint].record(latency_s, status, exception)
        if endpoint == SUBMIT and status == 201:
            ids.append(response.json()["id"])


async def drive_load(plan: LoadPlan) -> dict[str, Any]:
    stats = {endpoint: EndpointStats() for endpoint in ENDPOINTS}
    ids = list(plan.job_ids)
    limits = httpx.Limits(max_connections=plan.clients, max_keepalive_connections=plan.clients)
    headers = {"Authorization": f"Bearer {plan.api_key}"}
    cpu_before = time.process_time()
    async with httpx.AsyncClient(base_url=plan.url, headers=headers, limits=limits, timeout=REQUEST_TIMEOUT_S) as http:
        begin = time.perf_counter()
        window = (begin + plan.warmup_s, begin + plan.warmup_s + plan.duration_s)
        await asyncio.gather(
            *(one_client(http, random.Random(plan.seed + i), ids, plan, stats, window) for i in range(plan.clients))
        )
        wall_s = time.perf_counter() - begin
    total = EndpointStats()
    for endpoint_stats in stats.values():
        total.merge(endpoint_stats)
    return {
        "endpoints": {endpoint: s.summary(plan.duration_s) for endpoint, s in stats.items()},
        "total": total.summary(plan.duration_s),
        "jobs_submitted_incl_warmup": len(ids) - len(plan.job_ids),
        "generator_wall_s": wall_s,
        "generator_cpu_s": time.process_time() - cpu_before,
    }


def load_process(plan: LoadPlan, conn: Connection) -> None:
    conn.send(asyncio.run(drive_load(plan)))
    conn.close()


def run_load(plan: LoadPlan, api_pid: int) -> dict[str, Any]:
    """The load generator in a spawned process; the API process's CPU time is read around it."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    generator = context.Process(target=load_process, args=(plan, sender), daemon=True)
    api_cpu_before = cpu_seconds(api_pid)
    generator.start()
    sender.close()
    try:
        try:
            result = receiver.recv()
        except EOFError as exc:
            generator.join()
            raise RuntimeError(f"the load generator exited with {generator.exitcode} before reporting") from exc
        generator.join()
    finally:
        if generator.is_alive():
            generator.terminate()
            generator.join()
    api_cpu_s = cpu_seconds(api_pid) - api_cpu_before
    return result | {"api_cpu_s": api_cpu_s, "api_cores_used": api_cpu_s / result["generator_wall_s"]}


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


def load_table(load: dict[str, Any]) -> str:
    out = [
        "| endpoint | requests | req/s | p50 ms | p99 ms | max ms | errors | 5xx |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in [*load["endpoints"].items(), ("all", load["total"])]:
        p50, p99, top = (f"{row[k]:.1f}" if row[k] is not None else "-" for k in ("p50_ms", "p99_ms", "max_ms"))
        out.append(
            f"| {name} | {row['requests']} | {row['per_s']:.1f} | {p50} | {p99} | {top} | {row['errors']} | "
            f"{row['server_5xx']} |"
        )
    return "\n".join(out)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent closed-loop clients")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds of load")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    parser.add_argument("--list-share", type=float, default=0.12, help="share of requests listing jobs")
    parser.add_argument("--submit-share", type=float, default=0.03, help="share of requests submitting a job")
    parser.add_argument("--pickup-runs", type=int, default=5, help="idle-worker jobs timed to running")
    parser.add_argument("--settle", type=float, default=6.0, help="seconds the worker idles before each timed job")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pg-dsn", default=os.environ.get("SWQUANT_BENCH_PG_DSN", PG_ADMIN_DSN))
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--log-dir", type=Path, help="keep api.log and worker.log here (default: removed)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    shares = {POLL: 1 - args.list_share - args.submit_share, LIST: args.list_share, SUBMIT: args.submit_share}
    signal.signal(signal.SIGTERM, _interrupt)

    started = time.perf_counter()
    machine = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_before": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="swq-bench-service-") as tmp:
        workdir = Path(tmp)
        log_dir = args.log_dir or workdir
        log_dir.mkdir(parents=True, exist_ok=True)
        with ExitStack() as cleanup:
            spec = tiny_job(build_tiny_model(workdir / "tiny-llama"))
            database_url = cleanup.enter_context(fresh_database(args.pg_dsn))
            stack = cleanup.enter_context(production_stack(database_url, args.broker_url, workdir / "storage", log_dir))
            pickup = measure_pickup(stack, spec, args.pickup_runs, args.settle)
            ids = [pickup["first_after_start"]["id"], *(r["id"] for r in pickup["idle_runs"])]
            plan = LoadPlan(
                stack.url, stack.api_key, ids, spec, args.clients, args.duration, args.warmup, shares, args.seed
            )
            load = run_load(plan, stack.api_pid)
            jobs_after_load = job_counts(database_url)
        server_log = server_log_summary(stack.logs["api"])
    machine["loadavg_after"] = os.getloadavg()
    wall_s = time.perf_counter() - started

    print(f"stack ready in {stack.ready_s:.1f} s; {args.clients} clients, {args.duration:g} s", end="")
    print(f" (+{args.warmup:g} s warm-up)\n")
    print(pickup_table(pickup) + "\n")
    print(load_table(load) + "\n")
    print(
        f"jobs by status after the load: {jobs_after_load}; API process used {load['api_cpu_s']:.1f} CPU-s "
        f"({load['api_cores_used']:.2f} cores), load generator {load['generator_cpu_s']:.1f} CPU-s"
    )
    if server_log["exceptions"] or server_log["access_5xx"]:
        print(f"API log: {server_log['access_5xx']} 5xx responses; exceptions: {server_log['exceptions']}")
    print(f"wall time {wall_s:.1f} s")
    payload = {
        "settings": {
            "clients": args.clients,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "shares": shares,
            "list_limit": LIST_LIMIT,
            "pickup_runs": args.pickup_runs,
            "settle_s": args.settle,
            "seed": args.seed,
            "job": {k: v for k, v in spec.items() if k != "model"},
            "stack": "uvicorn (1 process) + Celery worker (concurrency 1, max-tasks-per-child 1), "
            "PostgreSQL, Redis, local-folder storage",
        },
        "machine": machine,
        "stack_ready_s": stack.ready_s,
        "pickup": pickup,
        "load": load,
        "jobs_after_load": jobs_after_load,
        "server_log": server_log,
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
