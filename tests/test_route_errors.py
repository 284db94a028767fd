"""Domain errors of the request layer as a client meets them: one mapping to HTTP (api/routes/errors.py).

In process (FastAPI's TestClient) on SQLite and a local storage folder; the broker URL points at a
port nothing listens on, so the queue's absence is real, not a stub.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from swq_shared.auth import create_api_key
from swq_shared.db import session_scope
from swq_shared.migrate import upgrade
from swq_shared.settings import Settings

Clients = tuple[TestClient, dict[str, str], dict[str, str]]  # the app, my key's headers, another tenant's
JOB = {"model": "/models/none", "bits": 4, "group_size": 32, "method": "rtn"}


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[Clients]:
    settings = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0", rate_limit_per_minute=0)
    upgrade(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as session:
        mine, theirs = create_api_key(session, "mine"), create_api_key(session, "theirs")
    with TestClient(create_app(settings)) as http:
        yield http, {"Authorization": f"Bearer {mine}"}, {"Authorization": f"Bearer {theirs}"}


def _stored_job(http: TestClient, headers: dict[str, str]) -> str:
    """Submit with the queue down: 503 with Retry-After, and the job is stored all the same."""
    answer = http.post("/v1/jobs", json=JOB, headers=headers)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert "stored but the queue is unavailable" in answer.json()["detail"]
    (job,) = http.get("/v1/jobs", headers=headers).json()["items"]
    return str(job["id"])


def test_a_job_outside_the_tenant_is_missing_not_forbidden(client: Clients) -> None:
    http, mine, theirs = client
    job_id = _stored_job(http, mine)
    assert http.get(f"/v1/jobs/{job_id}", headers=mine).status_code == 200
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events", f"/v1/jobs/{'0' * 32}"):
        answer = http.get(path, headers=theirs if job_id in path else mine)
        assert answer.status_code == 404 and answer.json()["detail"].endswith("not found"), path
    answer = http.get(f"/v1/jobs/{job_id}/artifacts/model.tar", headers=mine)
    assert answer.status_code == 404 and answer.json()["detail"] == "artifact model.tar not found"


def test_an_unknown_upload_is_a_422_naming_its_field(client: Clients) -> None:
    http, mine, _ = client
    body = {**JOB, "calibration": {"text": "upload:" + "a" * 32}}
    answer = http.post("/v1/jobs", json=body, headers=mine)
    assert answer.status_code == 422
    (problem,) = answer.json()["detail"]
    assert problem["loc"] == ["body", "calibration", "text"] and "not found among your uploads" in problem["msg"]


def test_a_bad_label_filter_is_a_422_naming_the_query_field(client: Clients) -> None:
    http, mine, _ = client
    answer = http.get("/v1/jobs", params={"metadata": "team"}, headers=mine)
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["query", "metadata"]


def test_cancelling_an_ended_job_is_a_409(client: Clients) -> None:
    http, mine, _ = client
    job_id = _stored_job(http, mine)
    assert http.post(f"/v1/jobs/{job_id}/cancel", headers=mine).json()["status"] == "cancelled"
    again = http.post(f"/v1/jobs/{job_id}/cancel", headers=mine)
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
