"""How heavy one API process is: start-up time, first-request latency, resident memory, heavy imports.

The API only validates, stores and queues; the numerical work runs in the worker. Whatever the API
process imports beyond that (torch, transformers) it pays for at every start (a restart, one more
process behind the front) and in memory for as long as it runs. This bench measures that weight so
a change to the API's imports can be compared before and after (``--label`` and ``--result`` keep
the two runs in two files).

Each run starts a fresh ``uvicorn api.app:create_app --factory`` (one process, no access log) on the
embedded stack, as ``swquant serve`` runs it: a SQLite database migrated to head, local-folder storage
(both in a temporary folder) and Redis as the broker. It records

- start-up: seconds from starting the process until ``/readyz`` first answers 200 (polled every
  0.25 s by ``bench.service.wait_ready``, so up to 0.25 s late);
- the latency of the first ``GET /v1/methods`` (the catalog is read from the method and loss option
  models, the schema of a job request; unauthenticated, so no key is needed) and the median of the
  next 20, on a connection opened beforehand by a ``/healthz`` request;
- the resident memory (VmRSS) of the process group after start-up and after those requests;
- whether ``torch`` and ``transformers`` are in the process's ``sys.modules`` after start-up and after
  the requests. No endpoint can tell, and transformers has no shared library of its own to look for
  in ``/proc/PID/maps``, so a ``sitecustomize`` module on the process's ``PYTHONPATH`` makes it write
  its module names to a file on ``SIGUSR1``; the command line stays the service's own.

Prints a markdown table (one row per run and the median) and writes JSON. Everything it starts is
stopped on exit, Ctrl-C and SIGTERM included.

    python -m bench.api_weight [--runs 5] [--label TEXT] [--result bench/results/api_weight.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import httpx

from bench.service import (
    PG_ADMIN_DSN,
    free_port,
    log_tail,
    rss_mib,
    stack_database,
    start_process,
    stop_process_group,
    wait_ready,
)

RESULTS = Path(__file__).with_name("results") / "api_weight.json"
ROUTE = "/v1/methods"
FOLLOW_UPS = 20
WATCHED = ("torch", "transformers")
REQUEST_TIMEOUT_S = 60  # the first request may import torch on a busy machine
SNAPSHOT_TIMEOUT_S = 10
MODULES_FILE_ENV = "BENCH_API_WEIGHT_MODULES"
SNAPSHOT_HOOK = f'''"""Written by bench.api_weight: on SIGUSR1, list the imported modules in ${MODULES_FILE_ENV}."""
import os
import signal
import sys


def _write_modules(_signum, _frame):
    path = os.environ["{MODULES_FILE_ENV}"]
    with open(path + ".part", "w") as out:
        out.write("\\n".join(sorted(sys.modules)))
    os.replace(path + ".part", path)  # the bench never reads a half-written list


signal.signal(signal.SIGUSR1, _write_modules)
'''


@dataclass(frozen=True)
class Weight:
    """The numbers of one run, or the median of several."""

    startup_s: float
    first_request_ms: float
    next_requests_median_ms: float
    rss_after_startup_mib: float
    rss_after_requests_mib: float


@dataclass(frozen=True)
class Run:
    weight: Weight
    imported_after_startup: tuple[str, ...]  # which of WATCHED the process had imported
    imported_after_requests: tuple[str, ...]


def api_env(workdir: Path, database_url: str, broker_url: str, hook_dir: Path) -> dict[str, str]:
    """The embedded stack's settings, in ``workdir``; no ``SWQUANT_*`` variable of the caller leaks in."""
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWQUANT_")}
    python_path = os.pathsep.join(filter(None, [str(hook_dir), env.get("PYTHONPATH")]))
    return env | {
        "SWQUANT_DATA_DIR": str(workdir),
        "SWQUANT_DATABASE_URL": database_url,
        "SWQUANT_STORAGE_URL": storage.resolve().as_uri(),
        "SWQUANT_BROKER_URL": broker_url,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": python_path,
        MODULES_FILE_ENV: str(workdir / "modules.txt"),
    }


def write_snapshot_hook(folder: Path) -> Path:
    """A folder holding only the hook: first on ``PYTHONPATH``, its ``sitecustomize`` is the one ``site`` imports."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SNAPSHOT_HOOK)
    return folder


def imported(pid: int, modules_file: Path) -> tuple[str, ...]:
    """Which of WATCHED the process has imported, from the module list it writes on SIGUSR1."""
    modules_file.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + SNAPSHOT_TIMEOUT_S
    while not modules_file.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the API process wrote no module list to {modules_file} within {SNAPSHOT_TIMEOUT_S}s of SIGUSR1: "
                "is another sitecustomize module ahead of the bench's on its path?"
            )
        time.sleep(0.05)
    names = set(modules_file.read_text().split())
    return tuple(name for name in WATCHED if name in names)


def time_requests(url: str) -> tuple[float, float]:
    """Milliseconds of the first ``GET ROUTE`` and the median of the next FOLLOW_UPS, one after another."""
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        client.get("/healthz").raise_for_status()  # opens the connection: the timings below are the route's
        timings = []
        for _ in range(1 + FOLLOW_UPS):
            started = time.perf_counter()
            client.get(ROUTE).raise_for_status()
            timings.append(1000 * (time.perf_counter() - started))
    return timings[0], statistics.median(timings[1:])


def measure_once(broker_url: str) -> Run:
    """Start a fresh API process on a fresh database, measure it, stop it."""
    with ExitStack() as cleanup:
        workdir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="swq-bench-api-weight-")))
        database_url = cleanup.enter_context(stack_database("embedded", workdir, PG_ADMIN_DSN))
        env = api_env(workdir, database_url, broker_url, write_snapshot_hook(workdir / "hook"))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        uvicorn = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host", "127.0.0.1"]
        uvicorn += ["--port", str(port), "--workers", "1", "--no-access-log"]
        logs = {"api": workdir / "api.log"}
        started = time.perf_counter()
        api = start_process(uvicorn, env, logs["api"])
        cleanup.callback(stop_process_group, api)
        try:
            wait_ready(url, [api])
            startup_s = time.perf_counter() - started
            rss_after_startup = rss_mib(api.pid)
            after_startup = imported(api.pid, Path(env[MODULES_FILE_ENV]))
            first_ms, next_ms = time_requests(url)
            rss_after_requests = rss_mib(api.pid)
            after_requests = imported(api.pid, Path(env[MODULES_FILE_ENV]))
        except Exception:
            print(log_tail(logs), file=sys.stderr)
            raise
    weight = Weight(startup_s, first_ms, next_ms, rss_after_startup, rss_after_requests)
    return Run(weight, after_startup, after_requests)


def median_weight(runs: list[Run]) -> Weight:
    return Weight(*(statistics.median(getattr(run.weight, f.name) for run in runs) for f in fields(Weight)))


def table_row(name: str, weight: Weight, after_startup: str, after_requests: str) -> str:
    return (
        f"| {name} | {weight.startup_s:.2f} | {weight.first_request_ms:.1f} | {weight.next_requests_median_ms:.2f} "
        f"| {weight.rss_after_startup_mib:.0f} | {weight.rss_after_requests_mib:.0f} "
        f"| {after_startup} | {after_requests} |"
    )


def listed(names: tuple[str, ...]) -> str:
    return ", ".join(names) or "-"


def table(runs: list[Run]) -> str:
    out = [
        f"| run | start-up s | first {ROUTE} ms | median of next {FOLLOW_UPS} ms | RSS after start-up MiB "
        "| RSS after requests MiB | imported after start-up | imported after requests |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, run in enumerate(runs, 1):
        startup, requests = listed(run.imported_after_startup), listed(run.imported_after_requests)
        out.append(table_row(str(i), run.weight, startup, requests))
    out.append(table_row("median", median_weight(runs), "", ""))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="API processes started, one after another")
    parser.add_argument("--label", default="", help="stored in the JSON, e.g. 'before' or a commit")
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--result", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # unwinds like Ctrl-C, so the API is stopped

    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    machine["loadavg_before"] = os.getloadavg()
    runs: list[Run] = []
    for i in range(args.runs):
        runs.append(measure_once(args.broker_url))
        print(f"run {i + 1}/{args.runs}: start-up {runs[-1].weight.startup_s:.2f} s", flush=True)
    machine["loadavg_after"] = os.getloadavg()

    print()
    print(table(runs))
    payload = {
        "label": args.label,
        "settings": {
            "runs": args.runs,
            "route": ROUTE,
            "follow_up_requests": FOLLOW_UPS,
            "broker_url": args.broker_url,
            "stack": "uvicorn api.app:create_app --factory, 1 process, no access log; SQLite, local-folder storage",
        },
        "machine": machine,
        "runs": [asdict(run) for run in runs],
        "median": asdict(median_weight(runs)),
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.result}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
