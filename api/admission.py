"""Bounded concurrency in front of the app: beyond capacity, a fast 503 instead of a growing queue.

An API process answers a few hundred polls a second. Past that, without a bound, every request
waits behind all the others (uvicorn accepts them all, the thread pool queues them), latency grows
for as long as the overload lasts, clients time out and retry, and throughput collapses to a
fraction of capacity. With a bound, at most ``limit`` requests are inside the app at once; one more
gets ``503`` with ``Retry-After`` at once (the client honours it), written here without routing,
authentication or a database, so refusing costs far less than answering and admitted requests keep
their latency.

The bound is ``capacity x acceptable latency``: at about 300 answers a second and a 50 ms budget,
16 requests in flight. A slot is held until the response starts, so a long download streams outside
the bound; uploads (``POST /v1/models``, ``/v1/datasets``) are admitted without a slot, as reading
a multi-gigabyte body would hold one for minutes. Health, readiness and metrics are always answered,
so an overloaded process is not mistaken for a dead one.
"""

from __future__ import annotations

import json
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
_BUSY_BODY = json.dumps({"detail": "the server is at capacity; retry after the Retry-After seconds"}).encode()
_BUSY_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_BUSY_BODY)).encode()),
    (b"retry-after", str(RETRY_AFTER_S).encode()),
]


class AdmissionControl:
    """ASGI middleware: at most ``limit`` HTTP requests in the app until their responses start."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit
        self.in_flight = 0  # the event loop is one thread: no lock needed
        self.refused = 0

    def _exempt(self, scope: Scope) -> bool:
        path: str = scope["path"]
        if path in ALWAYS_ANSWERED:
            return True
        return scope["method"] == "POST" and path in UNBOUNDED_UPLOADS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.limit <= 0 or self._exempt(scope):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            self.refused += 1
            await send({"type": "http.response.start", "status": 503, "headers": _BUSY_HEADERS})
            await send({"type": "http.response.body", "body": _BUSY_BODY})
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
