"""Every branch of the jobs, uploads and dashboard routes, in process and in seconds.

FastAPI's TestClient on SQLite and a local storage folder; the one stand-in is Celery's
``send_task``, the queue-publish boundary, which records what would have been sent. The real-stack
tests (test_service_e2e, test_dashboard) run the same routes behind real servers and workers.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from swq_shared import jobs
from swq_shared.artifacts import artifact_key, open_settings_storage
from swq_shared.auth import create_api_key
from swq_shared.db import session_scope
from swq_shared.migrate import upgrade
from swq_shared.models import ErrorCode, Job, JobStatus
from swq_shared.settings import Settings
from tests.job_records import block_event

JOB = {"model": "/models/none", "bits": 4, "group_size": 32, "method": "rtn"}
LLMC = "model: {path: /models/none}\nquant: {method: RTN, weight: {bit: 3, group_size: 32}}\n"


class SentTasks:
    """Stands in for Celery's ``send_task``: what the API published, by job id and queue."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def __call__(self, name: str, args: list[str], task_id: str, queue: str) -> None:
        self.sent.append((task_id, queue))


class Api:
    def __init__(self, http: TestClient, settings: Settings, mine: str, theirs: str, sent: SentTasks) -> None:
        self.http, self.settings, self.sent = http, settings, sent
        self.mine, self.theirs = {"Authorization": f"Bearer {mine}"}, {"Authorization": f"Bearer {theirs}"}
        self.key = mine

    def submit(self, body: dict[str, Any] | None = None, **headers: str) -> Any:
        answer = self.http.post("/v1/jobs", json=body or JOB, headers={**self.mine, **headers})
        assert answer.status_code in (200, 201), answer.text
        return answer.json()

    def finish(self, job_id: str, status: JobStatus = JobStatus.succeeded) -> None:
        """End a job as a worker would: claimed, one block recorded, an artifact stored."""
        key = artifact_key(job_id, "report.json")
        open_settings_storage(self.settings).put_bytes(key, b'{"ok": true}')
        block = block_event(0, 1)
        artifact = {"name": "report.json", "storage_key": key, "size": 12, "content_type": "application/json"}
        with session_scope(self.settings.resolved_database_url) as session:
            token = jobs.claim_job(session, job_id, "w1").lease_token
            jobs.record_block(session, job_id, block, token)
            details: dict[str, Any] = (
                {"metrics": {"perplexity.after.persuasion": 9.0}, "artifacts": [artifact]}
                if status == JobStatus.succeeded
                else {"error_code": ErrorCode.internal_error, "error_message": "boom"}
            )
            jobs.finish_job(session, job_id, status, lease_token=token, **details)


@pytest.fixture()
def api(tmp_path: Path) -> Iterator[Api]:
    # No load shedding: the routes' answers are what is tested here (overload: tests/test_hot_paths.py).
    settings = Settings(data_dir=tmp_path, rate_limit_per_minute=0, max_loop_lag_ms=0, max_text_upload_bytes=1000)
    upgrade(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as session:
        mine, theirs = create_api_key(session, "mine"), create_api_key(session, "theirs")
    sent = SentTasks()
    with TestClient(create_app(settings)) as http:
        http.app.state.celery.send_task = sent  # type: ignore[attr-defined]
        yield Api(http, settings, mine, theirs, sent)


# --- jobs ------------------------------------------------------------------------------------------


def test_a_submitted_job_is_stored_queued_and_published(api: Api) -> None:
    job = api.submit()
    assert job["status"] == "queued" and job["spec"]["loss"] == "mse"  # the method's default, by name
    assert api.sent.sent == [(job["id"], "gpu")]
    again = api.http.post("/v1/jobs", json={**JOB, "queue": "cpu"}, headers=api.mine)
    assert again.status_code == 201 and api.sent.sent[-1] == (again.json()["id"], "cpu")


def test_an_idempotency_key_returns_the_same_job_and_sends_a_queued_one_again(api: Api) -> None:
    first = api.http.post("/v1/jobs", json=JOB, headers={**api.mine, "Idempotency-Key": "k1"})
    second = api.http.post("/v1/jobs", json=JOB, headers={**api.mine, "Idempotency-Key": "k1"})
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"] and len(api.sent.sent) == 2
    api.finish(first.json()["id"])
    third = api.http.post("/v1/jobs", json=JOB, headers={**api.mine, "Idempotency-Key": "k1"})
    assert third.json()["status"] == "succeeded" and len(api.sent.sent) == 2  # an ended job is not re-sent


def test_a_lightcompress_yaml_body_is_a_job_and_bad_yaml_a_clear_error(api: Api) -> None:
    answer = api.http.post("/v1/jobs", content=LLMC, headers={**api.mine, "Content-Type": "application/yaml"})
    assert answer.status_code == 201 and answer.json()["spec"]["bits"] == 3
    bad = api.http.post("/v1/jobs", content="model: [", headers={**api.mine, "Content-Type": "application/yaml"})
    assert bad.status_code in (400, 422) and "YAML" in bad.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**JOB, "bits": 9}, "bits"),
        ({**JOB, "calibration": {"seq_len": 2}}, "calibration"),
        ({**JOB, "method": "nope"}, "method"),
        ({**JOB, "method_options": {"bogus": 1}}, "method_options"),
        ({**JOB, "finetune": {"epochs": "two"}}, "finetune.epochs"),
        ({**JOB, "export_formats": ["auto", "fake_quant"]}, "export_formats"),
        ({**JOB, "surprise": 1}, "surprise"),
    ],
)
def test_a_bad_job_is_a_422_naming_its_field_on_submit_and_validate(api: Api, body: dict, field: str) -> None:
    for path in ("/v1/jobs", "/v1/jobs/validate"):
        answer = api.http.post(path, json=body, headers=api.mine)
        assert answer.status_code == 422, answer.text
        locs = [".".join(str(p) for p in error["loc"]) for error in answer.json()["detail"]]
        assert any(field in loc for loc in locs), locs
    assert api.sent.sent == []


def test_validate_answers_the_normalised_request_without_storing_it(api: Api) -> None:
    answer = api.http.post("/v1/jobs/validate", json=JOB, headers=api.mine)
    assert answer.status_code == 200 and answer.json()["export_formats"] == ["auto"]
    assert api.http.get("/v1/jobs", headers=api.mine).json()["items"] == []


def test_the_list_filters_pages_and_answers_304_to_its_etag(api: Api) -> None:
    ids = [api.submit({**JOB, "metadata": {"team": "a" if i % 2 else "b"}})["id"] for i in range(5)]
    api.finish(ids[0])
    page = api.http.get("/v1/jobs?limit=2", headers=api.mine).json()
    rest = api.http.get(f"/v1/jobs?limit=10&cursor={page['next_cursor']}", headers=api.mine).json()
    assert [j["id"] for j in page["items"] + rest["items"]] == ids[::-1]
    team_a = api.http.get("/v1/jobs?metadata=team=a", headers=api.mine).json()["items"]
    assert {j["id"] for j in team_a} == {ids[1], ids[3]}
    done = api.http.get("/v1/jobs?status=succeeded", headers=api.mine).json()["items"]
    assert [j["id"] for j in done] == [ids[0]]
    listed = api.http.get("/v1/jobs", headers=api.mine)
    again = api.http.get("/v1/jobs", headers={**api.mine, "If-None-Match": listed.headers["etag"]})
    assert again.status_code == 304
    assert api.http.get("/v1/jobs", headers=api.theirs).json()["items"] == []


def test_a_job_its_events_and_artifacts_as_the_owner_sees_them(api: Api) -> None:
    job_id = api.submit()["id"]
    api.finish(job_id)
    job = api.http.get(f"/v1/jobs/{job_id}", headers=api.mine)
    assert job.json()["status"] == "succeeded" and job.json()["metrics"]["perplexity.after.persuasion"] == 9.0
    assert (
        api.http.get(f"/v1/jobs/{job_id}", headers={**api.mine, "If-None-Match": job.headers["etag"]}).status_code
        == 304
    )
    events = api.http.get(f"/v1/jobs/{job_id}/events", headers=api.mine).json()
    assert [e["kind"] for e in events["items"]] == ["status", "status", "block", "status"]
    later = api.http.get(f"/v1/jobs/{job_id}/events?cursor={events['items'][1]['id']}", headers=api.mine).json()
    assert [e["kind"] for e in later["items"]] == ["block", "status"]
    assert [a["name"] for a in api.http.get(f"/v1/jobs/{job_id}/artifacts", headers=api.mine).json()] == ["report.json"]
    whole = api.http.get(f"/v1/jobs/{job_id}/artifacts/report.json", headers=api.mine)
    assert whole.status_code == 200 and whole.json() == {"ok": True}
    part = api.http.get(f"/v1/jobs/{job_id}/artifacts/report.json", headers={**api.mine, "Range": "bytes=0-4"})
    assert part.status_code == 206 and part.content == b'{"ok"'
    assert api.http.get(f"/v1/jobs/{job_id}/artifacts/model.tar", headers=api.mine).status_code == 404


@pytest.mark.parametrize(
    "path", ["/v1/jobs/{id}", "/v1/jobs/{id}/events", "/v1/jobs/{id}/artifacts", "/v1/jobs/{id}/artifacts/report.json"]
)
def test_another_tenants_job_and_a_malformed_id_are_not_found(api: Api, path: str) -> None:
    job_id = api.submit()["id"]
    api.finish(job_id)
    assert api.http.get(path.format(id=job_id), headers=api.theirs).status_code == 404
    assert api.http.get(path.format(id="not-an-id"), headers=api.mine).status_code == 404
    assert api.http.get(path.format(id=job_id)).status_code == 401


def test_cancel_ends_a_queued_job_flags_a_running_one_and_refuses_an_ended_one(api: Api) -> None:
    queued, running, forced = api.submit()["id"], api.submit()["id"], api.submit()["id"]
    with session_scope(api.settings.resolved_database_url) as session:
        jobs.claim_job(session, running, "w1")
        jobs.claim_job(session, forced, "w2")
    assert api.http.post(f"/v1/jobs/{queued}/cancel", headers=api.mine).json()["status"] == "cancelled"
    flagged = api.http.post(f"/v1/jobs/{running}/cancel", headers=api.mine).json()
    assert flagged["status"] == "running" and flagged["cancel_requested"] is True
    assert api.http.post(f"/v1/jobs/{forced}/cancel?force=true", headers=api.mine).json()["status"] == "cancelled"
    ended = api.http.post(f"/v1/jobs/{queued}/cancel", headers=api.mine)
    assert ended.status_code == 409 and "already cancelled" in ended.json()["detail"]
    assert api.http.post(f"/v1/jobs/{running}/cancel", headers=api.theirs).status_code == 404


# --- uploads ---------------------------------------------------------------------------------------


def _model_archive(tiny_llama_dir: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(tiny_llama_dir, arcname="tiny")
    return buffer.getvalue()


def test_a_dataset_upload_is_listed_and_usable_only_by_its_tenant(api: Api) -> None:
    answer = api.http.post(
        "/v1/datasets", files={"file": ("c.txt", b"some text " * 20)}, data={"name": "c"}, headers=api.mine
    )
    assert answer.status_code == 201 and answer.json()["size"] == 200
    reference = answer.json()["reference"]
    assert [u["reference"] for u in api.http.get("/v1/datasets", headers=api.mine).json()] == [reference]
    assert api.http.get("/v1/datasets", headers=api.theirs).json() == []
    body = {**JOB, "calibration": {"text": reference}}
    assert api.http.post("/v1/jobs", json=body, headers=api.mine).status_code == 201
    theirs = api.http.post("/v1/jobs", json=body, headers=api.theirs)
    assert theirs.status_code == 422 and "calibration" in theirs.text


@pytest.mark.parametrize(
    ("content", "words"),
    [(b"", "empty"), (b"\xff\xfe binary", "UTF-8"), (b"a" * 1001, "1000")],
    ids=["empty", "not-utf8", "too-big"],
)
def test_a_bad_dataset_is_refused_with_its_reason(api: Api, content: bytes, words: str) -> None:
    answer = api.http.post("/v1/datasets", files={"file": ("c.txt", content)}, data={"name": "c"}, headers=api.mine)
    assert answer.status_code in (413, 422) and words in answer.text
    assert api.http.get("/v1/datasets", headers=api.mine).json() == []


def test_a_model_upload_is_listed_and_a_bad_archive_refused(api: Api, tiny_llama_dir: Path) -> None:
    good = api.http.post(
        "/v1/models",
        files={"file": ("m.tar.gz", _model_archive(tiny_llama_dir))},
        data={"name": "tiny"},
        headers=api.mine,
    )
    assert good.status_code == 201 and good.json()["reference"].startswith("upload:")
    assert [u["name"] for u in api.http.get("/v1/models", headers=api.mine).json()] == ["tiny"]
    bad = api.http.post(
        "/v1/models", files={"file": ("m.tar.gz", b"not an archive")}, data={"name": "bad"}, headers=api.mine
    )
    assert bad.status_code == 422 and "file" in bad.text


# --- dashboard -------------------------------------------------------------------------------------


def _signed_in(api: Api) -> None:
    answer = api.http.post("/ui/login", data={"api_key": api.key, "next": "/ui/jobs"}, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/jobs"


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, "no CSRF token in the page"
    return found.group(1)


def test_the_dashboard_asks_for_a_key_and_refuses_a_wrong_one(api: Api) -> None:
    away = api.http.get("/ui/jobs", follow_redirects=False)
    assert away.status_code == 303 and away.headers["location"].startswith("/ui/login")
    wrong = api.http.post("/ui/login", data={"api_key": "swq_wrong"})
    assert wrong.status_code == 401 and "not valid" in wrong.text
    empty = api.http.post("/ui/login", data={"api_key": ""})
    assert empty.status_code == 401 and "Enter your API key" in empty.text
    _signed_in(api)
    assert api.http.get("/ui", follow_redirects=False).headers["location"] == "/ui/jobs"


def test_the_form_submits_a_job_or_shows_the_errors_beside_their_fields(api: Api) -> None:
    _signed_in(api)
    form = api.http.get("/ui/jobs/new")
    assert form.status_code == 200 and 'name="evaluation.batch_size"' in form.text
    fields = {"csrf_token": _csrf(form.text), "model": "/models/none", "bits": "3", "group_size": "32"}
    fields |= {"method": "rtn", "export_formats": "auto", "evaluation.texts": "persuasion"}
    created = api.http.post("/ui/jobs/new", data=fields, follow_redirects=False)
    assert created.status_code == 303 and api.sent.sent
    job_id = created.headers["location"].rsplit("/", 1)[1]
    assert api.http.get(f"/ui/jobs/{job_id}").status_code == 200
    refused = api.http.post("/ui/jobs/new", data={**fields, "bits": "1", "method_options": "{"})
    assert refused.status_code == 422 and 'id="method_options-error"' in refused.text
    assert 'value="/models/none"' in refused.text  # what was typed is kept
    forged = api.http.post("/ui/jobs/new", data={**fields, "csrf_token": "forged"})
    assert forged.status_code == 403
    again = api.http.get(f"/ui/jobs/new?from={job_id}")
    assert 'value="3"' in again.text and 'value="rtn" selected' in again.text


def test_job_pages_fragments_artifacts_cancel_and_compare(api: Api) -> None:
    _signed_in(api)
    done, queued = api.submit()["id"], api.submit()["id"]
    api.finish(done)
    page = api.http.get(f"/ui/jobs/{done}")
    assert page.status_code == 200 and "succeeded" in page.text and "block 1/1" in page.text
    assert api.http.get(f"/ui/jobs/{done}/live").status_code == 200
    assert done in api.http.get("/ui/jobs/table").text
    assert api.http.get(f"/ui/jobs/{done}/artifacts/report.json").json() == {"ok": True}
    assert api.http.get("/ui/jobs/0123456789abcdef0123456789abcdef").status_code == 404
    token = _csrf(api.http.get(f"/ui/jobs/{queued}").text)
    cancelled = api.http.post(f"/ui/jobs/{queued}/cancel", data={"csrf_token": token}, follow_redirects=False)
    assert cancelled.status_code == 303 and cancelled.headers["location"].endswith("notice=cancel-requested")
    ended = api.http.post(f"/ui/jobs/{done}/cancel", data={"csrf_token": token}, follow_redirects=False)
    assert ended.headers["location"].endswith("notice=already-finished")
    assert api.http.get(f"/ui/compare?ids={done}").status_code == 400
    compared = api.http.get(f"/ui/compare?ids={done}&ids={queued}")
    assert compared.status_code == 200 and "chart-" in compared.text
    assert api.http.get("/ui/jobs?status=bogus").status_code == 200  # the filter error is shown on the page
    logout = api.http.post("/ui/logout", data={"csrf_token": token}, follow_redirects=False)
    assert logout.status_code == 303
    assert api.http.get("/ui/jobs", follow_redirects=False).status_code == 303


def test_a_failed_job_answers_its_error_code_and_message(api: Api) -> None:
    job_id = api.submit()["id"]
    api.finish(job_id, JobStatus.failed)
    error = api.http.get(f"/v1/jobs/{job_id}", headers=api.mine).json()["error"]
    assert error == {"code": "internal_error", "message": "boom"}
    with session_scope(api.settings.resolved_database_url) as session:
        assert session.get(Job, job_id).error_code == ErrorCode.internal_error.value
