"""An open-loop HTTP load generator: requests leave on a fixed schedule, whatever the server does.

A closed-loop client (send, wait for the answer, send again) slows down with the server, so it never
offers more than the server can take and never sees where its capacity ends. Here every request has
a scheduled departure (``rate`` a second, evenly spaced, or in bursts of ``burst`` leaving together
at the same mean rate) and leaves then, on an idle keep-alive
connection or a new one, as independent pollers would; latency counts from the scheduled departure,
so a generator that falls behind cannot hide the server's slowness (no coordinated omission).

The client is a minimal HTTP/1.1 over asyncio streams rather than httpx: at 800 requests a second a
general client's per-request cost would make the generator, not the server, the bottleneck on a
small machine. It speaks just what the API answers: ``Content-Length`` bodies, bodiless 304s and
chunked bodies. Each generator process reports the rate it actually sent, how late it sent, and
latency and status counts per endpoint for the requests scheduled inside the measured window.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

CONNECT_TIMEOUT_S = 5.0
# uvicorn closes a keep-alive connection idle for 5 s; a client that reused one that old would race it.
MAX_IDLE_S = 4.0
MAX_CONNECTIONS = 4000  # beyond this many open at once, a departure is counted as refused by the client


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))]


@dataclass
class EndpointStats:
    """Per request: latency from its scheduled departure, how much of it the request spent waiting to
    be written (the generator's own lateness, or a wait for a new connection), and its status (None:
    no HTTP answer). Latency counts from the schedule; the time after the request was written is kept
    beside it, so that a generator slowed by sharing the cores with the server can be told apart."""

    latencies_s: list[float] = field(default_factory=list)
    written_after_s: list[float] = field(default_factory=list)
    request_statuses: list[int | None] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)  # no HTTP answer: timeout, reset, refused

    def record(self, latency_s: float, written_after_s: float, status: int | None, failure: str | None) -> None:
        self.latencies_s.append(latency_s)
        self.written_after_s.append(written_after_s)
        self.request_statuses.append(status)
        if failure is not None:
            self.failures[failure] += 1

    def merge(self, other: EndpointStats) -> None:
        self.latencies_s += other.latencies_s
        self.written_after_s += other.written_after_s
        self.request_statuses += other.request_statuses
        self.failures += other.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "latencies_s": self.latencies_s,
            "written_after_s": self.written_after_s,
            "statuses": self.request_statuses,
            "failures": dict(self.failures),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EndpointStats:
        return cls(raw["latencies_s"], raw["written_after_s"], raw["statuses"], Counter(raw["failures"]))

    def _latency(self, keep: Callable[[int | None], bool]) -> dict[str, Any]:
        kept = [
            (latency, latency - written)
            for latency, written, status in zip(
                self.latencies_s, self.written_after_s, self.request_statuses, strict=True
            )
            if keep(status)
        ]
        if not kept:
            return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "p99_after_write_ms": None}
        ordered = sorted(latency for latency, _ in kept)
        after_write = sorted(since_write for _, since_write in kept)
        return {
            "count": len(ordered),
            "p50_ms": 1000 * percentile(ordered, 0.5),
            "p99_ms": 1000 * percentile(ordered, 0.99),
            "max_ms": 1000 * ordered[-1],
            "p99_after_write_ms": 1000 * percentile(after_write, 0.99),
        }

    def summary(self, window_s: float) -> dict[str, Any]:
        """Answered/s (2xx and 304); latency of every request, of the admitted ones and of the 503s; statuses."""
        statuses = Counter(self.request_statuses)
        answered = sum(
            n for status, n in statuses.items() if status is not None and (200 <= status < 300 or status == 304)
        )
        return {
            "requests": len(self.latencies_s),
            "answered_per_s": answered / window_s,
            **self._latency(lambda _status: True),
            "admitted": self._latency(lambda status: status is not None and status != 503),
            "refused": self._latency(lambda status: status == 503),
            "statuses": {
                str(s): n for s, n in sorted(statuses.items(), key=lambda item: item[0] or 0) if s is not None
            },
            "no_answer": dict(self.failures),
        }


@dataclass(frozen=True)
class OpenLoopPlan:
    url: str
    api_key: str
    rate: float  # requests a second from this process
    duration_s: float
    warmup_s: float
    timeout_s: float
    shares: dict[str, float]  # endpoint label -> share of requests
    job_ids: list[str]
    submit_body: dict[str, Any]
    list_limit: int
    seed: int
    start_at: float  # wall-clock (time.time) instant all generator processes start from
    # Requests that leave together: pollers that wake on the same tick (a dashboard's many tabs,
    # clients started by one script) send in bursts at the same mean rate.
    burst: int = 1


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Connections:
    """Idle keep-alive connections to one host; a departure takes the most recently used or opens one."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[Connection, float]] = []  # with the time each was given back
        self.open = 0
        self.opened = 0

    async def take(self) -> Connection:
        while self.idle:
            connection, since = self.idle.pop()
            if time.perf_counter() - since < MAX_IDLE_S:
                return connection
            self.discard(connection)
        if self.open >= MAX_CONNECTIONS:
            raise ConnectionRefusedError("client connection limit")
        self.open += 1
        self.opened += 1
        try:
            return await asyncio.wait_for(asyncio.open_connection(self.host, self.port), CONNECT_TIMEOUT_S)
        except BaseException:
            self.open -= 1
            raise

    def give_back(self, connection: Connection) -> None:
        self.idle.append((connection, time.perf_counter()))

    def discard(self, connection: Connection) -> None:
        self.open -= 1
        connection[1].close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Status code and whether the connection may be reused; the body is read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if status in (204, 304) or 100 <= status < 200:
        pass
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers.get("connection", "").lower() != "close"


class Generator:
    """Sends one process's share of the load and keeps the statistics of the measured window."""

    def __init__(self, plan: OpenLoopPlan) -> None:
        self.plan = plan
        parts = urlsplit(plan.url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.connections = Connections(self.host, self.port)
        self.rng = random.Random(plan.seed)
        self.stats = {endpoint: EndpointStats() for endpoint in plan.shares}
        self.lateness_s: list[float] = []
        self.sent_in_window = 0
        self.job_ids = list(plan.job_ids)
        auth = f"Authorization: Bearer {plan.api_key}\r\n"
        self.common = f"Host: {self.host}:{self.port}\r\n{auth}"

    def _request_bytes(self, endpoint: str) -> bytes:
        method, _, path = endpoint.partition(" ")
        if "{id}" in path:
            path = path.replace("{id}", self.rng.choice(self.job_ids))
        if method == "GET":
            if path == "/v1/jobs":
                path += f"?limit={self.plan.list_limit}"
            return f"GET {path} HTTP/1.1\r\n{self.common}\r\n".encode()
        body = json.dumps(self.plan.submit_body).encode()
        head = f"{method} {path} HTTP/1.1\r\n{self.common}Content-Type: application/json\r\n"
        return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def _one(self, endpoint: str, scheduled: float, measured: bool) -> None:
        status, failure = None, None
        connection = None
        written = time.perf_counter()
        try:
            async with asyncio.timeout(self.plan.timeout_s):
                connection = await self.connections.take()
                reader, writer = connection
                writer.write(self._request_bytes(endpoint))
                written = time.perf_counter()
                await writer.drain()
                status, reusable = await read_response(reader)
            if reusable:
                self.connections.give_back(connection)
            else:
                self.connections.discard(connection)
            connection = None
        except TimeoutError:
            failure = "timeout"
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            failure = type(exc).__name__
        finally:
            if connection is not None:
                self.connections.discard(connection)
        if measured:
            self.stats[endpoint].record(time.perf_counter() - scheduled, written - scheduled, status, failure)

    async def run(self) -> dict[str, Any]:
        plan = self.plan
        loop_start = time.perf_counter() + max(0.0, plan.start_at - time.time())
        measure_from, stop_at = loop_start + plan.warmup_s, loop_start + plan.warmup_s + plan.duration_s
        endpoints, weights = zip(*plan.shares.items(), strict=True)
        interval = 1.0 / plan.rate
        tasks: set[asyncio.Task[None]] = set()
        index = 0
        while (scheduled := loop_start + (index - index % plan.burst) * interval) < stop_at:
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            measured = scheduled >= measure_from
            if measured:
                self.sent_in_window += 1
                self.lateness_s.append(time.perf_counter() - scheduled)
            task = asyncio.create_task(self._one(self.rng.choices(endpoints, weights)[0], scheduled, measured))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            index += 1
        if tasks:
            await asyncio.wait(tasks)
        for (_reader, writer), _since in self.connections.idle:
            writer.close()
        lateness = sorted(self.lateness_s)
        return {
            "sent_per_s": self.sent_in_window / plan.duration_s,
            "send_lateness_p99_ms": 1000 * percentile(lateness, 0.99) if lateness else None,
            "connections_opened": self.connections.opened,
            "endpoints": {endpoint: stats.to_dict() for endpoint, stats in self.stats.items()},
        }


def run_generator(plan: OpenLoopPlan) -> dict[str, Any]:
    """Entry point of one generator process.

    The cyclic garbage collector is off for the run: its pauses would be charged to the server as
    latency. The run's garbage (finished tasks, closed connections) is freed by reference counting.
    """
    gc.disable()
    try:
        return asyncio.run(Generator(plan).run())
    finally:
        gc.enable()
