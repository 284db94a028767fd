"""The polling paths under pressure: admission control, the key cache and conditional requests.

The API runs as in production (uvicorn against PostgreSQL, Redis and S3) and is reached over HTTP,
with a bound of one request in flight and a one-second key cache so both limits can be reached on
purpose. Nothing here is timed except the cache's stated bound on revocation.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest
from pydantic import BaseModel
from starlette.requests import Request

from api.front.admission import AdmissionControl
from api.routes.conditional import entity_tag, tagged_json
from swq_shared.auth import Caller, KeyCache, digest
from swq_shared.db import get_engine
from tests.s3_server import S3Endpoint
from tests.service_stack import KeyedApi, api_only_stack, migrated_backing

REDIS_URL = "redis://127.0.0.1:6379/7"
KEY_CACHE_S = 1.0
JOB = {"model": "/models/none", "bits": 4, "group_size": 32, "method": "rtn"}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Endpoint) -> Iterator[KeyedApi]:
    with migrated_backing(s3_server, "hot") as (database_url, storage_url, extra):
        try:
            settings = {
                "SWQUANT_MAX_CONCURRENT_REQUESTS": "1",
                "SWQUANT_API_KEY_CACHE_SECONDS": str(KEY_CACHE_S),
                "SWQUANT_RATE_LIMIT_PER_MINUTE": "0",
            }
            workdir = tmp_path_factory.mktemp("hot")
            with api_only_stack(workdir, database_url, REDIS_URL, storage_url, {**extra, **settings}, "") as stack:
                yield KeyedApi(stack, database_url)
        finally:
            get_engine(database_url).dispose()


def _held_request(api: KeyedApi, key: str) -> socket.socket:
    """A submission whose body is only half sent: the app has admitted it and waits for the rest."""
    parts = urlsplit(api.stack.url)
    held = socket.create_connection((parts.hostname, parts.port), timeout=30)
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    held.sendall(head.encode() + b'{"model": ')
    return held


def _wait_until_busy(api: KeyedApi, key: str) -> httpx.Response:
    """The first refusal once the held request occupies the only slot (it gets there within moments)."""
    for _ in range(200):
        response = api.get(key, "/v1/jobs")
        if response.status_code == 503:
            return response
        time.sleep(0.01)
    raise AssertionError("the held request never occupied the slot")


def test_beyond_the_bound_requests_get_a_503_with_retry_after_and_health_still_answers(api: KeyedApi) -> None:
    key = api.new_key("busy")
    held = _held_request(api, key)
    try:
        refused = _wait_until_busy(api, key)
        assert refused.headers["retry-after"] == "1"
        assert "at capacity" in refused.json()["detail"]
        assert httpx.get(f"{api.stack.url}/healthz").status_code == 200
        assert httpx.get(f"{api.stack.url}/readyz").status_code == 200
        assert api.get(key, "/v1/jobs").status_code == 503  # still held: still refused, not queued
        held.sendall(b" " * 90)  # the rest of the body: an invalid document, answered with a 4xx
        answer = held.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 422"), answer[:200]
    finally:
        held.close()
    assert api.get(key, "/v1/jobs").status_code == 200  # the slot is free again


def _revoke(api: KeyedApi, key: str) -> subprocess.CompletedProcess[str]:
    """``swquant revoke-key`` against the stack's database, the key on standard input."""
    argv = [sys.executable, "-m", "api.commands.cli", "revoke-key"]
    return subprocess.run(argv, input=key + "\n", env=api.stack.env, capture_output=True, text=True)


def test_a_revoked_key_stops_working_within_the_cache_bound_and_unknown_keys_never_work(api: KeyedApi) -> None:
    key = api.new_key("revoked")
    assert api.get(key, "/v1/jobs").status_code == 200  # now in the cache
    revoke = _revoke(api, key)
    assert revoke.returncode == 0 and "revoked" in revoke.stdout
    revoked_at = time.monotonic()
    while api.get(key, "/v1/jobs").status_code == 200:
        assert time.monotonic() - revoked_at < KEY_CACHE_S + 2.0, "a revoked key outlived the cache bound"
        time.sleep(0.05)
    assert api.get(key, "/v1/jobs").status_code == 401
    assert api.get("swq_never-issued", "/v1/jobs").status_code == 401
    assert _revoke(api, key).returncode == 1  # nothing active left to revoke


def test_an_unchanged_job_is_a_bodiless_304_and_a_change_sends_the_new_state(api: KeyedApi) -> None:
    key = api.new_key("poller")
    job = httpx.post(f"{api.stack.url}/v1/jobs", json=JOB, headers={"Authorization": f"Bearer {key}"})
    assert job.status_code == 201, job.text
    path = f"/v1/jobs/{job.json()['id']}"
    first = api.get(key, path)
    tag = first.headers["etag"]
    assert first.headers["cache-control"] == "private, no-cache"
    assert tag == entity_tag(first.content)
    unchanged = api.get(key, path, {"If-None-Match": tag})
    assert unchanged.status_code == 304 and unchanged.content == b"" and unchanged.headers["etag"] == tag
    assert api.get(key, path, {"If-None-Match": f'"other", W/{tag}'}).status_code == 304
    cancel = httpx.post(f"{api.stack.url}{path}/cancel", headers={"Authorization": f"Bearer {key}"})
    assert cancel.status_code == 200, cancel.text
    changed = api.get(key, path, {"If-None-Match": tag})
    assert changed.status_code == 200 and changed.json()["status"] == "cancelled"
    assert changed.headers["etag"] != tag
    events = api.get(key, f"{path}/events")
    assert api.get(key, f"{path}/events", {"If-None-Match": events.headers["etag"]}).status_code == 304
    listing = api.get(key, "/v1/jobs")
    assert api.get(key, "/v1/jobs", {"If-None-Match": listing.headers["etag"]}).status_code == 304
    other_tenant = api.new_key("stranger")
    assert api.get(other_tenant, path, {"If-None-Match": tag}).status_code == 404  # a tag never bypasses ownership


# --- the key cache on its own, with a clock the test moves ------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_key_cache_looks_a_key_up_again_after_its_ttl_and_never_remembers_unknown_keys() -> None:
    clock, lookups = Clock(), []
    valid = {"good": Caller("t1", "one")}

    def lookup(key: str) -> Caller | None:
        lookups.append(key)
        return valid.get(key)

    cache = KeyCache(5.0, clock=clock)
    assert cache.caller("good", lookup) == Caller("t1", "one")
    clock.now = 4.9
    assert cache.caller("good", lookup) == Caller("t1", "one")
    assert lookups == ["good"]
    del valid["good"]  # revoked
    clock.now = 5.0
    assert cache.caller("good", lookup) is None
    assert cache.caller("bad", lookup) is None and cache.caller("bad", lookup) is None
    assert lookups == ["good", "good", "bad", "bad"]
    assert digest("good") not in cache._entries and digest("bad") not in cache._entries


def test_the_key_cache_holds_at_most_its_bound_dropping_the_least_recently_used() -> None:
    cache = KeyCache(60.0, max_keys=2, clock=Clock())
    lookups: list[str] = []

    def lookup(key: str) -> Caller:
        lookups.append(key)
        return Caller(key, key)

    for key in ("a", "b", "a", "c", "a", "b"):
        cache.caller(key, lookup)
    assert lookups == ["a", "b", "c", "b"]  # "b" was the least recently used when "c" came in
    assert len(cache._entries) == 2


def test_a_zero_ttl_looks_every_request_up() -> None:
    cache = KeyCache(0.0, clock=Clock())
    lookups: list[str] = []
    for _ in range(3):
        cache.caller("k", lambda key: lookups.append(key) or Caller("t", "n"))
    assert lookups == ["k", "k", "k"]


class Body(BaseModel):
    status: str


def _answer(if_none_match: str | None, method: str = "GET") -> int:
    headers = [(b"if-none-match", if_none_match.encode())] if if_none_match is not None else []
    request = Request({"type": "http", "method": method, "path": "/", "headers": headers, "query_string": b""})
    return tagged_json(request, Body(status="queued")).status_code


@pytest.mark.parametrize(
    ("if_none_match", "method", "status"),
    [
        (None, "GET", 200),
        ("TAG", "GET", 304),
        ("W/TAG", "GET", 304),  # weak comparison, as RFC 9110 asks of If-None-Match
        ('"nope", TAG', "GET", 304),
        ("*", "GET", 304),
        ('"nope"', "GET", 200),
        ("TAG", "POST", 200),  # only safe methods answer 304
    ],
)
def test_if_none_match_is_compared_as_the_rfc_says(if_none_match: str | None, method: str, status: int) -> None:
    tag = entity_tag(Body(status="queued").model_dump_json().encode())
    header = None if if_none_match is None else if_none_match.replace("TAG", tag)
    assert _answer(header, method) == status


# --- the event-loop lag bound, in process -------------------------------------------------------------


async def _status(app: AdmissionControl, path: str = "/v1/jobs") -> int:
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await app({"type": "http", "method": "GET", "path": path, "headers": []}, receive, send)
    return int(sent[0]["status"])  # type: ignore[call-overload]


async def _ok(scope: object, receive: object, send: Callable[[dict[str, object]], Awaitable[None]]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def _burn(seconds: float) -> None:
    """Keep the loop's thread on the CPU, as answering requests would."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_a_loop_lagging_from_its_own_work_refuses_until_it_catches_up_and_health_still_answers() -> None:
    async def scenario() -> list[int]:
        app = AdmissionControl(_ok, limit=0, max_lag_s=0.02)
        statuses = [await _status(app)]  # starts the ticking
        _burn(0.1)  # the loop is busy for 100 ms: the tick due in 10 ms is 90 ms late
        statuses += [await _status(app), await _status(app, "/healthz")]
        await asyncio.sleep(0.5)  # the loop runs freely again: the average lateness decays
        statuses.append(await _status(app))
        return statuses

    assert asyncio.run(scenario()) == [200, 503, 200, 200]


def test_one_pause_that_has_ended_refuses_nothing_but_a_sustained_lag_refuses() -> None:
    """A new process's first request, or a collection, stalls the loop once; overload keeps it behind."""

    async def scenario() -> list[int]:
        app = AdmissionControl(_ok, limit=0, max_lag_s=0.02)
        statuses = [await _status(app)]
        _burn(0.5)  # one tick 490 ms late from our own work ...
        await asyncio.sleep(0.05)  # ... then the loop catches up: a few ticks on time
        statuses.append(await _status(app))
        for _ in range(6):  # every tick about 70 ms late, as when requests keep the loop busy
            _burn(0.08)
            await asyncio.sleep(0.001)  # the late tick runs; the next one is not yet due
        statuses.append(await _status(app))
        return statuses

    assert asyncio.run(scenario()) == [200, 200, 503]


def test_a_loop_late_only_because_the_process_was_off_the_cpu_admits() -> None:
    """A busy machine (other processes on the cores) delays the loop without this server being overloaded."""

    async def scenario() -> list[int]:
        app = AdmissionControl(_ok, limit=0, max_lag_s=0.02)
        statuses = [await _status(app)]
        time.sleep(0.1)  # late by 90 ms, but not from our own work
        statuses.append(await _status(app))
        return statuses

    assert asyncio.run(scenario()) == [200, 200]


# --- several API processes behind one port -------------------------------------------------------------


def _requests_counted(metrics_text: str) -> float:
    """``swquant_http_requests_total`` for ``GET /v1/jobs`` answered 200, from a Prometheus text scrape."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("swquant_http_requests_total{") and 'route="/v1/jobs"' in line and 'status="200"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_two_api_processes_share_one_metrics_view(
    tmp_path_factory: pytest.TempPathFactory, s3_server: S3Endpoint
) -> None:
    """In multiprocess mode every scrape, whichever process answers it, counts every process's requests."""
    metrics_dir = tmp_path_factory.mktemp("prometheus")
    settings = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "SWQUANT_RATE_LIMIT_PER_MINUTE": "0"}
    with migrated_backing(s3_server, "multi") as (database_url, storage_url, extra):
        try:
            workdir = tmp_path_factory.mktemp("multi")
            with api_only_stack(workdir, database_url, REDIS_URL, storage_url, {**extra, **settings}, "", 2) as stack:
                api = KeyedApi(stack, database_url)
                key = api.new_key("counted")
                # A new connection each, 8 at a time, until both processes have answered some: which
                # process accepts a connection is the kernel's choice, and sequential ones may all
                # go to the same one.
                sent = 0
                with ThreadPoolExecutor(max_workers=8) as pool:
                    while sent == 0 or (len(list(metrics_dir.glob("counter_*.db"))) < 2 and sent < 400):
                        statuses = list(pool.map(lambda _: api.get(key, "/v1/jobs").status_code, range(8)))
                        assert statuses == [200] * 8
                        sent += 8
                counter_files = {path.name for path in metrics_dir.glob("counter_*.db")}
                assert len(counter_files) == 2, counter_files  # both processes answered some
                for _ in range(6):
                    assert _requests_counted(httpx.get(f"{stack.url}/metrics").text) == sent
        finally:
            get_engine(database_url).dispose()
