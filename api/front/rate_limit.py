"""Requests per API key: a token bucket in Redis, shared by every API process of a deployment.

Why Redis: several uvicorn processes (often on several hosts) serve one deployment, and a bucket in
process memory would let a client multiply its limit by the number of processes. Redis is already
there as the Celery broker, so the buckets live in the broker's database, each under the SHA-256
digest of its key (the plain key never leaves the API process), and each expires once it would be
full again, so the buckets of idle keys vanish without changing any answer.

Why one Lua script: refilling by the elapsed time and taking a token must be one atomic step, or
two concurrent requests could read the same count and both be let through. The script takes the
time as an argument: Redis's own clock in production, so API hosts with skewed clocks agree, or a
fixed clock in tests.

Why whole numbers: so that the script and a reference in Python agree exactly, to the millisecond.
One token is 60 000 units and every millisecond adds ``per_minute`` units, so the bucket gains
``per_minute`` tokens a minute and holds at most ``burst`` tokens. A request takes one token; a
request that finds less is refused and told how many milliseconds its missing units take to arrive.

Why fail open: the limit shields the service from one noisy client, while an unreachable Redis is an
outage of the queue, not a reason to refuse reading jobs already in the database. Requests go
through, a warning is logged once per outage, and Redis is not asked again for a few seconds, so
requests do not each wait for a connection timeout.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from swq_shared.auth import digest
from swq_shared.settings import Settings

log = logging.getLogger(__name__)

UNITS_PER_TOKEN = 60_000  # milliseconds in a minute: a minute of refill at one unit per ms is one token
KEY_PREFIX = "swquant:rate:"
REDIS_TIMEOUT_S = 0.5
OUTAGE_RETRY_S = 5.0

# KEYS[1]: the bucket. ARGV: per_minute, burst, now in ms ("" for Redis's clock). Returns
# {allowed (1 or 0), milliseconds to wait for a token (0 when allowed), whole tokens left}.
BUCKET_SCRIPT = """
local per_token = UNITS_PER_TOKEN
local per_minute = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2]) * per_token
local now = tonumber(ARGV[3])
if now == nil then
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
end
local state = redis.call('HMGET', KEYS[1], 'units', 'at')
local units = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
if now > at then  -- a clock that steps back refills nothing, and nothing twice
  units = math.min(capacity, units + (now - at) * per_minute)
  at = now
end
local allowed, wait = 0, 0
if units >= per_token then
  units = units - per_token
  allowed = 1
else
  wait = math.ceil((per_token - units) / per_minute)
end
redis.call('HSET', KEYS[1], 'units', string.format('%.0f', units), 'at', string.format('%.0f', at))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - units) / per_minute) + 1000)
return {allowed, wait, math.floor(units / per_token)}
""".replace("UNITS_PER_TOKEN", str(UNITS_PER_TOKEN))


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_ms: int
    tokens_left: int


class RateLimitExceeded(Exception):
    """The key has used its burst; answered 429 with ``Retry-After`` (whole seconds, at least 1)."""

    def __init__(self, per_minute: int, burst: int, retry_after_ms: int) -> None:
        self.retry_after_s = max(1, math.ceil(retry_after_ms / 1000))
        super().__init__(
            f"rate limit exceeded: {per_minute} requests per minute per API key, in bursts of at most {burst}; "
            f"retry after {self.retry_after_s} s"
        )


class RateLimiter:
    """One bucket per API key in Redis; ``clock`` (milliseconds) replaces Redis's clock in tests."""

    def __init__(
        self, client: redis.Redis, per_minute: int, burst: int, clock: Callable[[], int] | None = None
    ) -> None:
        if per_minute < 1 or burst < 1:
            raise ValueError("per_minute and burst must be at least 1")
        self.client, self.per_minute, self.burst, self.clock = client, per_minute, burst, clock
        self._script = client.register_script(BUCKET_SCRIPT)
        self._lock = threading.Lock()
        self._outage_until: float | None = None  # monotonic time before which Redis is not asked

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimiter | None:
        """The deployment's limiter on the broker's Redis, or None when rate limiting is off."""
        if settings.rate_limit_per_minute == 0:
            return None
        try:
            client = redis.Redis.from_url(
                settings.broker_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
            )
        except ValueError:  # a broker URL that Celery reads but redis-py does not (sentinel://, redis+socket://)
            log.warning("rate limiting off: the broker URL is not one a Redis client opens directly")
            return None
        return cls(client, settings.rate_limit_per_minute, settings.rate_limit_burst)

    def take(self, api_key: str) -> Decision:
        """Take a token from the key's bucket, or learn how long until one is there; Redis errors propagate."""
        now = "" if self.clock is None else str(int(self.clock()))
        bucket = KEY_PREFIX + digest(api_key)
        allowed, wait_ms, left = self._script(keys=[bucket], args=[self.per_minute, self.burst, now])
        return Decision(bool(allowed), int(wait_ms), int(left))

    def check(self, api_key: str) -> None:
        """Raise :class:`RateLimitExceeded` when the key is over its limit; let it through if Redis is down."""
        if self._outage_until is not None and time.monotonic() < self._outage_until:
            return
        try:
            decision = self.take(api_key)
        except redis.RedisError as exc:
            self._note_outage(exc)
            return
        self._note_recovery()
        if not decision.allowed:
            raise RateLimitExceeded(self.per_minute, self.burst, decision.retry_after_ms)

    def _note_outage(self, exc: redis.RedisError) -> None:
        with self._lock:
            if self._outage_until is None:
                # The type only: a message could name the broker's address, and nothing here may name a key.
                log.warning("rate limiting paused, requests let through: Redis unreachable (%s)", type(exc).__name__)
            self._outage_until = time.monotonic() + OUTAGE_RETRY_S

    def _note_recovery(self) -> None:
        if self._outage_until is None:
            return
        with self._lock:
            if self._outage_until is not None:
                log.warning("rate limiting resumed: Redis answers again")
                self._outage_until = None
