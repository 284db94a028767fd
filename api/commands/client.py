"""A small Python client for the SWQuant REST API; the ``swquant`` service commands are built on it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"succeeded", "failed", "cancelled"}


class ApiError(RuntimeError):
    """The server refused a request; ``status`` is the HTTP code and the message its explanation."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {_describe(detail)}")
        self.status, self.detail = status, detail


def _describe(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
    return str(detail)


class PatientTransport(httpx.HTTPTransport):
    """Retries answers that say "later" (429 rate limit, 503 database or queue down) after Retry-After.

    Gives up once the waits would pass ``max_wait_s`` and returns that last answer. Safe for every
    request this client sends: reads are idempotent and job submissions carry an Idempotency-Key.
    """

    RETRY_STATUSES = (429, 503)

    def __init__(self, max_wait_s: float = 60.0) -> None:
        super().__init__()
        self.max_wait_s = max_wait_s

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        waited = 0.0
        while True:
            response = super().handle_request(request)
            if response.status_code not in self.RETRY_STATUSES:
                return response
            try:
                delay = max(float(response.headers.get("retry-after", "1")), 0.1)
            except ValueError:  # an HTTP date: not sent by this service
                delay = 1.0
            if waited + delay > self.max_wait_s:
                return response
            response.close()
            time.sleep(delay)
            waited += delay


class SWQuantClient:
    def __init__(self, base_url: str, api_key: str, timeout: float = 30.0, max_wait_s: float = 60.0) -> None:
        """``max_wait_s``: how long to keep retrying answers that ask to come back later (429, 503)."""
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=PatientTransport(max_wait_s),
        )

    def close(self) -> None:
        self.http.close()

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ApiError(response.status_code, detail)
        return response.json()

    def submit(self, spec: dict[str, Any] | str, idempotency_key: str | None = None) -> dict[str, Any]:
        """Queue a job from a JobRequest dict or a LightCompress YAML string.

        Without ``idempotency_key`` one is drawn, so a retried submission never makes a second job.
        """
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        if isinstance(spec, str):
            headers["Content-Type"] = "application/yaml"
            return self._json(self.http.post("/v1/jobs", content=spec.encode(), headers=headers))
        return self._json(self.http.post("/v1/jobs", json=spec, headers=headers))

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/jobs/{job_id}"))

    def jobs(self, **filters: Any) -> dict[str, Any]:
        return self._json(self.http.get("/v1/jobs", params=filters))

    def cancel(self, job_id: str, force: bool = False) -> dict[str, Any]:
        return self._json(self.http.post(f"/v1/jobs/{job_id}/cancel", params={"force": force}))

    def events(self, job_id: str, cursor: int = 0, limit: int = 100) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/jobs/{job_id}/events", params={"cursor": cursor, "limit": limit}))

    def follow(self, job_id: str, poll_s: float = 2.0) -> Iterator[dict[str, Any]]:
        """Every event of the job as it happens, until the job ends."""
        cursor = 0
        while True:
            page = self.events(job_id, cursor)
            yield from page["items"]
            cursor = int(page["next_cursor"])
            if page["has_more"]:
                continue
            if self.job(job_id)["status"] in TERMINAL:
                yield from self.events(job_id, cursor)["items"]
                return
            time.sleep(poll_s)

    def wait(self, job_id: str, timeout_s: float = 3600, poll_s: float = 2.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while (job := self.job(job_id))["status"] not in TERMINAL:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s:.0f}s")
            time.sleep(poll_s)
        return job

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self._json(self.http.get(f"/v1/jobs/{job_id}/artifacts"))

    def download(self, job_id: str, name: str, dest: Path) -> Path:
        """Stream an artifact to ``dest``, resuming a partial file with an HTTP Range request."""
        done = dest.stat().st_size if dest.exists() else 0
        headers = {"Range": f"bytes={done}-"} if done else {}
        with self.http.stream(
            "GET", f"/v1/jobs/{job_id}/artifacts/{name}", headers=headers, follow_redirects=True
        ) as response:
            if response.status_code == 416:  # already complete
                return dest
            if response.status_code >= 400:
                response.read()
                self._json(response)
            mode = "ab" if response.status_code == 206 else "wb"
            with dest.open(mode) as out:
                for chunk in response.iter_bytes(1 << 20):
                    out.write(chunk)
        return dest
