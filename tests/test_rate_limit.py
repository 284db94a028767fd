"""Requests per API key: the token bucket's arithmetic in Redis, and the limit as a client of the API meets it.

The arithmetic runs the real Lua script in a real Redis on a fixed clock and is compared, request
by request, with a plain Python bucket in exact fractions. The API runs as in production (uvicorn
against PostgreSQL, Redis and S3) with 60 requests a minute in bursts of 5, and is reached over HTTP.
"""

from __future__ import annotations

import logging
import math
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import httpx
import pytest
import redis

from api.commands.client import ApiError, SWQuantClient
from api.front import rate_limit
from api.front.rate_limit import KEY_PREFIX, RateLimiter, RateLimitExceeded
from swq_shared.auth import digest
from swq_shared.db import get_engine
from swq_shared.settings import Settings
from tests.s3_server import S3Endpoint, free_ports
from tests.service_stack import KeyedApi, api_only_stack, migrated_backing

REDIS_URL = "redis://127.0.0.1:6379/6"
PER_MINUTE = 60  # one token a second
BURST = 5
LIMITED = "/v1/jobs"


# --- the bucket's arithmetic -------------------------------------------------------------------------


class ReferenceBucket:
    """The token bucket as written in words, in exact fractions of a token and milliseconds."""

    def __init__(self, per_minute: int, burst: int) -> None:
        self.rate = Fraction(per_minute, 60_000)  # tokens per millisecond
        self.burst = burst
        self.tokens = Fraction(burst)
        self.at: int | None = None

    def take(self, now_ms: int) -> tuple[bool, int]:
        """(allowed, milliseconds until a token is there)."""
        if self.at is None:
            self.at = now_ms
        if now_ms > self.at:
            self.tokens = min(Fraction(self.burst), self.tokens + (now_ms - self.at) * self.rate)
            self.at = now_ms
        if self.tokens >= 1:
            self.tokens -= 1
            return True, 0
        return False, math.ceil((1 - self.tokens) / self.rate)


@dataclass
class FakeClock:
    now_ms: int = 1_764_000_000_000

    def __call__(self) -> int:
        return self.now_ms


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


def _fresh_key() -> str:
    return f"swq_test_{uuid.uuid4().hex}"


@pytest.mark.parametrize(("per_minute", "burst"), [(60, 5), (7, 3), (600, 60), (1, 1), (1000, 2)])
def test_bucket_in_redis_matches_the_reference_request_by_request(
    redis_client: redis.Redis, per_minute: int, burst: int
) -> None:
    rng = random.Random(per_minute * 1000 + burst)
    clock = FakeClock()
    limiter = RateLimiter(redis_client, per_minute, burst, clock=clock)
    reference = ReferenceBucket(per_minute, burst)
    key = _fresh_key()
    bucket = KEY_PREFIX + digest(key)
    period_ms, full_ms = 60_000 // per_minute, burst * 60_000 // per_minute

    def gap() -> int:
        """Mostly under a token's period (so the bucket drains), at times a full refill or a step back."""
        draw = rng.random()
        if draw < 0.005:
            return rng.choice([full_ms, full_ms + 1])
        if draw < 0.025:
            return -1500
        return rng.choice([0, 0, 1, period_ms - 1, period_ms, period_ms + 1, rng.randrange(0, period_ms)])

    outcomes = []
    try:
        for _ in range(400):
            clock.now_ms += gap()
            decision = limiter.take(key)
            redis_client.persist(bucket)  # the clock is fake, expiry real: only the arithmetic is tested here
            expected = reference.take(clock.now_ms)
            assert (decision.allowed, decision.retry_after_ms) == expected, (clock.now_ms, decision)
            outcomes.append(decision.allowed)
    finally:
        redis_client.delete(bucket)
    assert any(outcomes) and not all(outcomes)  # the sequence exercised both answers


def test_a_full_bucket_serves_exactly_its_burst_then_names_the_wait(redis_client: redis.Redis) -> None:
    clock = FakeClock()
    limiter = RateLimiter(redis_client, PER_MINUTE, BURST, clock=clock)
    key = _fresh_key()
    try:
        assert [limiter.take(key).allowed for _ in range(BURST + 1)] == [True] * BURST + [False]
        clock.now_ms += 400
        assert limiter.take(key).retry_after_ms == 600
        clock.now_ms += 599
        assert not limiter.take(key).allowed
        clock.now_ms += 1
        assert limiter.take(key).allowed
    finally:
        redis_client.delete(KEY_PREFIX + digest(key))


def test_the_bucket_is_stored_under_the_key_digest_and_expires_once_full_again(redis_client: redis.Redis) -> None:
    limiter = RateLimiter(redis_client, PER_MINUTE, BURST, clock=FakeClock())
    key = _fresh_key()
    bucket = KEY_PREFIX + digest(key)
    try:
        limiter.take(key)
        limiter.take(key)
        # Two tokens short: full again after 2 s; the extra second covers clocks a little apart.
        assert 2000 < redis_client.pttl(bucket) <= 3000
        assert not any(key.encode() in name for name in redis_client.keys(f"{KEY_PREFIX}*"))
    finally:
        redis_client.delete(bucket)


def test_redis_time_is_used_without_a_clock(redis_client: redis.Redis) -> None:
    limiter = RateLimiter(redis_client, PER_MINUTE, 2)
    key = _fresh_key()
    try:
        assert [limiter.take(key).allowed for _ in range(3)] == [True, True, False]
        seconds, micros = redis_client.time()
        stored_at = int(redis_client.hget(KEY_PREFIX + digest(key), "at"))
        assert abs(seconds * 1000 + micros // 1000 - stored_at) < 5000
    finally:
        redis_client.delete(KEY_PREFIX + digest(key))


@pytest.mark.parametrize(("wait_ms", "seconds"), [(0, 1), (1, 1), (999, 1), (1000, 1), (1001, 2), (59_001, 60)])
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(wait_ms: int, seconds: int) -> None:
    refused = RateLimitExceeded(PER_MINUTE, BURST, wait_ms)
    assert refused.retry_after_s == seconds
    assert "60 requests per minute" in str(refused) and f"retry after {seconds} s" in str(refused)


def test_unreachable_redis_lets_requests_through_and_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(rate_limit, "OUTAGE_RETRY_S", 0.0)  # ask Redis again on every request
    (port,) = free_ports(1)
    password = "redis-pass-" + uuid.uuid4().hex
    dead = redis.Redis.from_url(f"redis://:{password}@127.0.0.1:{port}/0", socket_connect_timeout=0.5)
    limiter = RateLimiter(dead, PER_MINUTE, 1)
    with caplog.at_level(logging.WARNING, logger=rate_limit.__name__):
        for _ in range(3):
            limiter.check(_fresh_key())
    assert len(caplog.records) == 1, caplog.text
    assert "Redis unreachable" in caplog.text and password not in caplog.text and str(port) not in caplog.text


@pytest.mark.parametrize("broker_url", ["sentinel://127.0.0.1:26379", "redis+socket:///tmp/redis.sock"])
def test_a_broker_url_redis_cannot_open_switches_the_limit_off_instead_of_the_api(broker_url: str) -> None:
    assert RateLimiter.from_settings(Settings(broker_url=broker_url)) is None


def test_zero_per_minute_switches_the_limit_off() -> None:
    assert RateLimiter.from_settings(Settings(rate_limit_per_minute=0)) is None


# --- the limit as the API's clients meet it ----------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Endpoint) -> Iterator[KeyedApi]:
    with migrated_backing(s3_server, "rate") as (database_url, storage_url, extra):
        try:
            limits = {"SWQUANT_RATE_LIMIT_PER_MINUTE": str(PER_MINUTE), "SWQUANT_RATE_LIMIT_BURST": str(BURST)}
            workdir = tmp_path_factory.mktemp("rate")
            with api_only_stack(workdir, database_url, REDIS_URL, storage_url, {**extra, **limits}, "") as stack:
                yield KeyedApi(stack, database_url)
        finally:
            get_engine(database_url).dispose()  # before the database is dropped


def _until_refused(api: KeyedApi, key: str) -> tuple[int, httpx.Response, float]:
    """Requests with ``key`` until one is refused: (how many were served, the refusal, seconds taken)."""
    started = time.monotonic()
    for served in range(10 * BURST):
        response = api.get(key)
        if response.status_code != 200:
            return served, response, time.monotonic() - started
    raise AssertionError(f"no request refused in {10 * BURST}")


def test_a_key_gets_its_burst_then_429_with_retry_after_and_a_message(api: KeyedApi) -> None:
    served, refused, seconds = _until_refused(api, api.new_key("burst"))
    # Exactly the burst, plus a token for each whole second the requests took (one a second).
    assert BURST <= served <= BURST + math.floor(seconds * PER_MINUTE / 60), (served, seconds)
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "1"  # a token a second: never more than a second away
    assert refused.json()["detail"].startswith("rate limit exceeded: 60 requests per minute per API key")
    assert "bursts of at most 5" in refused.json()["detail"]


def test_another_tenants_key_is_served_while_one_is_limited(api: KeyedApi) -> None:
    """Checked within one refill period of the refusal; a busy machine may need a few tries to fit in it."""
    limited, other = api.new_key("noisy"), api.new_key("quiet")
    for _ in range(5):
        _until_refused(api, limited)
        refused_at = time.monotonic()
        assert api.get(other).status_code == 200
        still_limited = api.get(limited).status_code
        if time.monotonic() - refused_at < 60 / PER_MINUTE:  # no token can have arrived yet
            assert still_limited == 429
            return
    raise AssertionError("never fit two requests within one refill period")


def test_a_limited_key_is_served_again_after_retry_after(api: KeyedApi) -> None:
    key = api.new_key("patient")
    _, refused, _ = _until_refused(api, key)
    time.sleep(int(refused.headers["retry-after"]))
    assert api.get(key).status_code == 200


def test_requests_without_a_valid_key_are_401_never_429(api: KeyedApi) -> None:
    key = api.new_key("anonymous-neighbour")
    _until_refused(api, key)
    strangers = [_fresh_key() for _ in range(2 * BURST)]
    for stranger in strangers:
        assert api.get(None).status_code == 401
        assert api.get(stranger).status_code == 401
    buckets = redis.Redis.from_url(REDIS_URL)
    try:  # no bucket was made for a key the service did not recognise, and the valid key kept its own
        assert not any(buckets.exists(KEY_PREFIX + digest(stranger)) for stranger in strangers)
        assert buckets.exists(KEY_PREFIX + digest(key))
    finally:
        buckets.close()


def test_health_checks_and_static_files_are_not_limited(api: KeyedApi) -> None:
    key = api.new_key("prober")
    _until_refused(api, key)
    for _ in range(2 * BURST):
        for path in ("/healthz", "/readyz", "/ui/static/dashboard.css"):
            assert api.get(key, path).status_code == 200, path


def test_every_operation_taking_a_key_declares_429_with_retry_after(api: KeyedApi) -> None:
    paths = httpx.get(f"{api.stack.url}/openapi.json", timeout=30).json()["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            declared = operation["responses"]
            if "401" in declared:  # it takes a key (public reads such as /v1/methods take none)
                assert "429" in declared and "Retry-After" in declared["429"]["headers"], (method, path)
            else:
                assert "429" not in declared, (method, path)
    assert "401" in paths["/v1/jobs"]["post"]["responses"] and "401" not in paths["/v1/methods"]["get"]["responses"]


def test_the_client_waits_out_its_rate_limit_and_says_so_when_it_cannot(api: KeyedApi) -> None:
    key = api.new_key("client")
    patient = SWQuantClient(api.stack.url, key)
    started = time.monotonic()
    for _ in range(BURST + 3):
        assert patient.jobs()["items"] == []
    assert time.monotonic() - started >= 2  # three requests past the burst, a token a second
    hasty = SWQuantClient(api.stack.url, key, max_wait_s=0)
    _until_refused(api, key)
    with pytest.raises(ApiError, match="HTTP 429: rate limit exceeded"):
        hasty.jobs()
