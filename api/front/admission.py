"""Bounded work in front of the app: beyond capacity, a 503 instead of a growing queue.

An API process answers a few hundred polls a second. Past that, without a bound, every request
waits behind all the others, latency grows for as long as the overload lasts, clients time out and
retry, and throughput collapses to a fraction of capacity. Two bounds refuse the excess with ``503``
and ``Retry-After`` (the client honours it), written here without routing, authentication or a
database, so refusing costs a fraction of answering and admitted requests keep their latency:

- **Requests in the app**, at most ``limit``: the routes that run in the thread pool (writes,
  downloads) pile up there when the process is short of CPU. The bound is ``capacity x acceptable
  latency``. A slot is held until the response starts, so a long download streams outside it;
  uploads (``POST /v1/models``, ``/v1/datasets``) take no slot, as reading a multi-gigabyte body
  would hold one for minutes.
- **Event-loop lag**, at most ``max_lag_s``: the polling reads run on the event loop (see
  ``api/routes/jobs.py``), so under overload they never pile up in the app; they wait, unseen, in
  the sockets until the loop reaches them. A timer the loop should run every ``LAG_TICK_S`` measures
  how far behind it is, which is how long a request now waits before the app sees it.

Health, readiness and metrics are always answered, so an overloaded process is not mistaken for a
dead one. A refusal still waits its turn on the loop, so under heavy overload a 503 takes about
``max_lag_s``; refusing faster than that needs a proxy in front with its own connection limit.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ALWAYS_ANSWERED = ("/healthz", "/readyz", "/metrics")
UNBOUNDED_UPLOADS = ("/v1/models", "/v1/datasets")
RETRY_AFTER_S = 1
LAG_TICK_S = 0.01
# The front (api/front/haproxy.cfg) refuses with this body too: a client sees one 503 whoever wrote it.
BUSY_BODY = json.dumps({"detail": "the server is at capacity; retry after the Retry-After seconds"}).encode()
_BUSY_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BUSY_BODY)).encode()),
    (b"retry-after", str(RETRY_AFTER_S).encode()),
]


class LoopLag:
    """How far behind the event loop runs because of this process's own work.

    A timer due every ``LAG_TICK_S`` measures the loop's lateness. Lateness is charged in proportion
    to the share of the elapsed time this process spent on the CPU, so a loop that is late because
    other processes had the cores (a busy machine, a browser beside a test server) is not taken
    for an overloaded server, while one late because it is busy answering requests is. The lag is
    the median of the last ``WINDOW`` ticks: a pause that has ended (the first request of a new
    process, a garbage collection, one slow query: one or two late ticks, however late) refuses
    nothing once the loop has caught up, where an average would stay above the bound for as many
    ticks as the pause was long; a sustained overload makes most ticks late and refuses within three.
    A tick overdue right now counts as it stands, so requests are refused while the loop is stuck
    far behind, before any tick could tell.
    """

    WINDOW = 5

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.recent = self._on_time()
        self.next_due = 0.0
        self.last_tick = 0.0
        self.last_cpu = 0.0

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.recent = loop, self._on_time()
        self.last_tick, self.last_cpu = loop.time(), time.process_time()
        self.next_due = self.last_tick + LAG_TICK_S
        loop.call_at(self.next_due, self._tick)

    def _on_time(self) -> deque[float]:
        return deque([0.0] * self.WINDOW, maxlen=self.WINDOW)

    def _own_lateness(self, now: float, cpu: float) -> float:
        """Lateness of the tick due at ``next_due``, times our CPU share of the time since the last tick."""
        busy = min(1.0, (cpu - self.last_cpu) / max(now - self.last_tick, 1e-9))
        return max(0.0, now - self.next_due) * busy

    def _tick(self) -> None:
        assert self.loop is not None
        now, cpu = self.loop.time(), time.process_time()
        self.recent.append(self._own_lateness(now, cpu))
        self.last_tick, self.last_cpu = now, cpu
        self.next_due = now + LAG_TICK_S
        self.loop.call_at(self.next_due, self._tick)

    def seconds(self) -> float:
        """The recent ticks' median lateness, or that of the tick overdue now if larger (starts on first use)."""
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # first request, or a new loop (tests): start ticking on this one
            self._start(loop)
            return 0.0
        return max(statistics.median(self.recent), self._own_lateness(loop.time(), time.process_time()))


class AdmissionControl:
    """ASGI middleware: at most ``limit`` HTTP requests in the app, and none while the loop lags ``max_lag_s``."""

    def __init__(self, app: ASGIApp, limit: int, max_lag_s: float) -> None:
        self.app, self.limit, self.max_lag_s = app, limit, max_lag_s
        self.in_flight = 0  # the event loop is one thread: no lock needed
        self.lag = LoopLag()

    def _exempt(self, scope: Scope) -> bool:
        path: str = scope["path"]
        if path in ALWAYS_ANSWERED:
            return True
        return scope["method"] == "POST" and path in UNBOUNDED_UPLOADS

    def _busy(self) -> bool:
        if self.limit > 0 and self.in_flight >= self.limit:
            return True
        return self.max_lag_s > 0 and self.lag.seconds() > self.max_lag_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._exempt(scope):
            await self.app(scope, receive, send)
            return
        if self._busy():
            await send({"type": "http.response.start", "status": 503, "headers": _BUSY_HEADERS})
            await send({"type": "http.response.body", "body": BUSY_BODY})
            return
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1

        async def send_and_release(message: Message) -> None:
            if message["type"] == "http.response.start":
                release()
            await send(message)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            release()
