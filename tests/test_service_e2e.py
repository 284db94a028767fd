"""End to end over real HTTP: PostgreSQL + Redis + S3 (SeaweedFS) + Celery worker, and ``swquant serve``.

Each test submits jobs on a tiny model, polls until they end, and checks what a user gets back.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from api.commands.client import SWQuantClient
from quant_core.catalog import catalog
from quant_core.runtimes import AGREEMENT, RuntimeUnavailable, runtime_interpreter
from swq_shared.db import session_scope
from swq_shared.models import Job
from tests.lm_eval_task import write_task
from tests.s3_server import S3Endpoint
from tests.service_stack import Stack, embedded_stack, migrated_backing, production_stack
from tests.tiny_models import build_model

JOB = {
    "bits": 3,
    "group_size": 32,
    "method": "omniquant",
    "method_options": {"epochs": 1, "batch_size": 4},
    "loss": "mse_sw",
    "loss_options": {"sw_num_projections": 8},
    "calibration": {"n_samples": 4, "seq_len": 32},
    "evaluation": {"max_windows": 2},
    "metadata": {"suite": "e2e"},
}
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def production(
    tmp_path_factory: pytest.TempPathFactory,
    s3_server: S3Endpoint,
) -> Iterator[Stack]:
    with migrated_backing(s3_server, "e2e") as (database_url, storage_url, extra):
        workdir = tmp_path_factory.mktemp("prod")
        extra = {**extra, "SWQUANT_RANKS": "2"}  # each worker takes jobs of one or two ranks
        with production_stack(workdir, database_url, "redis://127.0.0.1:6379/3", storage_url, extra) as stack:
            yield stack


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with embedded_stack(tmp_path_factory.mktemp("embedded")) as stack:
        yield stack


def _client(stack: Stack) -> SWQuantClient:
    return SWQuantClient(stack.url, stack.api_key)


def _wait(client: SWQuantClient, stack: Stack, job_id: str) -> dict:
    try:
        return client.wait(job_id, timeout_s=TIMEOUT_S, poll_s=0.5)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{stack.log_tail()}") from exc


def _model_archive(model_dir: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(model_dir, arcname="tiny-llama")
    return dest


def _check_succeeded_job(
    client: SWQuantClient, stack: Stack, job_id: str, tmp_path: Path, archives: tuple[str, ...] = ("packed.tar",)
) -> None:
    """The job succeeded with ``archives`` (the default export: the packed checkpoint); the first of
    them downloads resumably, keeps shareable modes and loads with transformers on the 3-bit grid."""
    job = _wait(client, stack, job_id)
    assert job["status"] == "succeeded", f"{job['error']}\n{stack.log_tail()}"
    assert job["progress"] == {"blocks_done": 2, "num_blocks": 2}
    assert job["metrics"]["perplexity.after.persuasion"] > 1
    events = client.events(job_id, limit=1000)["items"]
    blocks = [e["data"] for e in events if e["kind"] == "block"]
    assert [b["index"] for b in blocks] == [0, 1]
    assert all(b["loss_after"] <= b["loss_before"] * 1.5 and b["seconds"] > 0 for b in blocks)
    statuses = [e["data"]["status"] for e in events if e["kind"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    assert {a["name"] for a in client.artifacts(job_id)} == {*archives, "report.json"}

    # Download in two pieces through HTTP Range (a resumed download), then load it with transformers.
    archive = archives[0]
    size = next(a["size"] for a in client.artifacts(job_id) if a["name"] == archive)
    headers = {"Authorization": f"Bearer {stack.api_key}", "Range": f"bytes=0-{size // 2}"}
    first = httpx.get(f"{stack.url}/v1/jobs/{job_id}/artifacts/{archive}", headers=headers, timeout=30)
    assert first.status_code == 206 and first.headers["content-range"] == f"bytes 0-{size // 2}/{size}"
    partial = tmp_path / archive
    partial.write_bytes(first.content)
    client.download(job_id, archive, partial)
    assert partial.stat().st_size == size
    with tarfile.open(partial) as tar:
        assert {m.mode for m in tar.getmembers() if m.isfile()} == {0o644}
        tar.extractall(tmp_path / "unpacked", filter="data")
    directory = tmp_path / "unpacked" / archive.removesuffix(".tar")
    assert (directory / "README.md").read_text().startswith("---\nbase_model:")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    if archive == "packed.tar":
        config = json.loads((directory / "config.json").read_text())
        assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 3
        with safe_open(directory / "model.safetensors", "pt") as packed:
            assert packed.get_tensor("model.layers.1.mlp.down_proj.weight_packed").dtype == torch.int32
    else:
        weight = model.model.layers[1].mlp.down_proj.weight
        assert max(g.unique().numel() for g in weight.reshape(-1, 32)) <= 8  # 3-bit grid, group 32
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_job_from_uploaded_model_succeeds_on_postgres_redis_s3(
    production: Stack, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    client = _client(production)
    with _model_archive(tiny_llama_dir, tmp_path / "m.tar.gz").open("rb") as handle:
        upload = client.http.post("/v1/models", files={"file": ("m.tar.gz", handle)}, data={"name": "tiny"})
    assert upload.status_code == 201, upload.text
    reference = upload.json()["reference"]
    job = client.submit({**JOB, "model": reference}, idempotency_key="e2e-upload-1")
    assert client.submit({**JOB, "model": reference}, idempotency_key="e2e-upload-1")["id"] == job["id"]
    _check_succeeded_job(client, production, job["id"], tmp_path)
    listed = client.jobs(metadata="suite=e2e", status="succeeded")["items"]
    assert job["id"] in [j["id"] for j in listed]


def test_job_on_embedded_defaults_succeeds(embedded: Stack, tiny_llama_dir: Path, tmp_path: Path) -> None:
    client = _client(embedded)
    task = write_task(tmp_path / "tasks")
    evaluation = {**JOB["evaluation"], "lm_eval": {"tasks": [str(task)], "limit": 3}}
    spec = {**JOB, "model": str(tiny_llama_dir), "export_formats": ["fake_quant", "pack_quantized"]}
    job = client.submit({**spec, "evaluation": evaluation})
    _check_succeeded_job(client, embedded, job["id"], tmp_path, archives=("model.tar", "packed.tar"))
    metrics = client.job(job["id"])["metrics"]
    assert 0 <= metrics["lm_eval.before.next_word.acc"] <= 1 and 0 <= metrics["lm_eval.after.next_word.acc"] <= 1


def test_a_job_targeting_llama_cpp_downloads_its_gguf_with_llama_cpps_score(
    embedded: Stack, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    try:
        runtime_interpreter("llama.cpp")
    except RuntimeUnavailable as exc:
        pytest.skip(str(exc))
    client = _client(embedded)
    job = client.submit({**JOB, "model": str(tiny_llama_dir), "bits": 4, "targets": ["llama.cpp"]})
    finished = _wait(client, embedded, job["id"])
    assert finished["status"] == "succeeded", f"{finished['error']}\n{embedded.log_tail()}"
    assert {a["name"] for a in client.artifacts(job["id"])} == {"packed.tar", "gguf.tar", "report.json"}
    metrics = finished["metrics"]
    assert metrics["runtime.llama.cpp.perplexity.persuasion"] == pytest.approx(
        metrics["perplexity.after.persuasion"], rel=AGREEMENT
    )
    with tarfile.open(client.download(job["id"], "gguf.tar", tmp_path / "gguf.tar")) as tar:
        assert {"gguf/model.gguf", "gguf/README.md"} <= set(tar.getnames())


def _scrape(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``GET /metrics`` parsed by prometheus-client: sample name and sorted labels -> value."""
    response = httpx.get(f"{stack.url}/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_running_job_shows_in_metrics_and_is_cancelled_between_blocks(production: Stack, tmp_path: Path) -> None:
    model_dir = tmp_path / "deep"
    build_model("llama", layers=6).save_pretrained(model_dir)
    from tests.tiny_models import build_tokenizer

    build_tokenizer().save_pretrained(model_dir)
    client = _client(production)
    slow = {**JOB, "model": str(model_dir), "method_options": {"epochs": 40, "batch_size": 1}}
    job_id = client.submit(slow)["id"]
    deadline = time.monotonic() + TIMEOUT_S
    while client.job(job_id)["progress"]["blocks_done"] < 1:
        assert time.monotonic() < deadline, production.log_tail()
        time.sleep(0.3)
    metrics = _scrape(production)
    assert metrics[("swquant_job_blocks_done", (("job_id", job_id),))] >= 1
    assert metrics[("swquant_job_blocks", (("job_id", job_id),))] == 6
    assert metrics[("swquant_jobs", (("status", "running"),))] >= 1
    assert metrics[("swquant_blocks_calibrated_total", ())] >= 1 and metrics[("swquant_block_seconds_total", ())] > 0
    assert ("swquant_queue_depth", (("queue", "gpu"),)) in metrics
    polled = (("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "200"))
    assert metrics[("swquant_http_requests_total", polled)] >= 1
    assert client.cancel(job_id)["cancel_requested"]
    job = _wait(client, production, job_id)
    assert job["status"] == "cancelled"
    assert job["progress"]["blocks_done"] < 6
    assert client.artifacts(job_id) == []


def _process_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)  # a zombie still answers: the worker must also have reaped it
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_force_cancel_stops_the_job_process_at_once_and_the_worker_goes_on(
    production: Stack, tiny_llama_dir: Path
) -> None:
    client = _client(production)
    endless = {**JOB, "model": str(tiny_llama_dir), "method_options": {"epochs": 100000, "batch_size": 1}}
    job_id = client.submit(endless)["id"]
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        with session_scope(production.env["SWQUANT_DATABASE_URL"]) as session:
            job = session.get(Job, job_id)
            status, worker = job.status, job.worker
        if status == "running":
            break
        assert time.monotonic() < deadline and status == "queued", production.log_tail()
        time.sleep(0.2)
    pid = int(worker.rsplit(":", 1)[1])
    cancelled = client.cancel(job_id, force=True)
    assert cancelled["status"] == "cancelled" and cancelled["cancel_requested"]
    assert _process_gone(pid, 10.0), f"job process {pid} outlived a forced cancel\n{production.log_tail()}"
    assert client.job(job_id)["status"] == "cancelled" and client.artifacts(job_id) == []
    # The worker that ran it takes the next job (the one worker of this stack).
    follow_up = client.submit({**JOB, "model": str(tiny_llama_dir)})["id"]
    assert _wait(client, production, follow_up)["status"] == "succeeded"


def test_jobs_sent_back_to_back_to_one_worker_all_run(production: Stack, tiny_llama_dir: Path) -> None:
    """Each job's process ends as the next task arrives: none may be left received but never run."""
    client = _client(production)
    quick = {**JOB, "model": str(tiny_llama_dir), "method": "rtn", "method_options": {}, "loss": "mse"}
    job_ids = [client.submit(quick)["id"] for _ in range(5)]
    assert [_wait(client, production, job_id)["status"] for job_id in job_ids] == ["succeeded"] * 5


def test_a_job_that_fails_reports_a_code_and_message(production: Stack) -> None:
    client = _client(production)
    job_id = client.submit({**JOB, "model": "/nonexistent/model"})["id"]
    job = _wait(client, production, job_id)
    assert job["status"] == "failed"
    assert _scrape(production)[("swquant_job_failures_total", (("code", job["error"]["code"]),))] >= 1
    assert job["error"]["code"] == "invalid_spec" and "model" in job["error"]["message"]


def test_artifacts_are_in_s3(production: Stack, tiny_llama_dir: Path, s3_server: S3Endpoint) -> None:
    client = _client(production)
    job = _wait(
        client,
        production,
        client.submit({**JOB, "model": str(tiny_llama_dir), "method": "rtn", "method_options": {}})["id"],
    )
    bucket = production.env["SWQUANT_STORAGE_URL"].removeprefix("s3://")
    s3 = s3_server.client()
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"jobs/{job['id']}/")["Contents"]}
    assert keys == {f"jobs/{job['id']}/packed.tar", f"jobs/{job['id']}/report.json"}
    body = s3.get_object(Bucket=bucket, Key=f"jobs/{job['id']}/report.json")["Body"].read()
    assert b'"method": "rtn"' in body


def test_uploaded_dataset_calibrates_a_job(production: Stack, tiny_llama_dir: Path) -> None:
    client = _client(production)
    text = ("It was a bright cold day in April, and the clocks were striking thirteen. " * 400).encode()
    upload = client.http.post("/v1/datasets", files={"file": ("corpus.txt", text)}, data={"name": "orwell"})
    assert upload.status_code == 201, upload.text
    assert upload.json()["size"] == len(text)
    spec = {
        **JOB,
        "model": str(tiny_llama_dir),
        "method": "rtn",
        "method_options": {},
        "calibration": {"text": upload.json()["reference"], "n_samples": 4, "seq_len": 32},
    }
    job = _wait(client, production, client.submit(spec)["id"])
    assert job["status"] == "succeeded", job["error"]
    report = client.http.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    assert report["spec"]["calibration"]["text"].endswith("corpus.txt")


def test_a_whole_model_method_runs_through_the_service(production: Stack, tiny_llama_dir: Path) -> None:
    """DiscQuant trains the whole model at once: no per-block checkpoint, the same outcome and metrics."""
    client = _client(production)
    spec = {**JOB, "model": str(tiny_llama_dir), "method": "discquant", "loss": "kd"}
    job = _wait(client, production, client.submit({**spec, "method_options": {"n_samples": 2, "grad_accum": 2}})["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["metrics"]["perplexity.after.persuasion"] > 1
    assert {a["name"] for a in client.artifacts(job["id"])} == {"packed.tar", "report.json"}


def test_a_job_on_two_ranks_runs_on_a_worker_that_has_two_and_waits_for_one_with_three(
    production: Stack, tiny_llama_dir: Path
) -> None:
    client = _client(production)
    spec = {**JOB, "model": str(tiny_llama_dir), "method": "gptq", "method_options": {}, "loss": "mse"}
    waiting = client.submit({**spec, "world_size": 3})
    job = _wait(client, production, client.submit({**spec, "world_size": 2})["id"])
    assert job["status"] == "succeeded", job["error"]
    report = client.http.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    assert report["parallel"]["world_size"] == 2 and report["parallel"]["calibration_windows_by_rank"] == [2, 2]
    assert all(len(block["peak_host_mb_by_rank"]) == 2 for block in report["blocks"])
    assert client.job(waiting["id"])["status"] == "queued"  # no worker here has three ranks
    assert client.http.post(f"/v1/jobs/{waiting['id']}/cancel").status_code in (200, 202)


def test_uploads_are_checked_and_limited(production: Stack, tmp_path: Path) -> None:
    client = _client(production)
    too_big = b"a" * (int(production.env["SWQUANT_MAX_TEXT_UPLOAD_BYTES"]) + 1)
    response = client.http.post("/v1/datasets", files={"file": ("big.txt", too_big)}, data={"name": "big"})
    assert response.status_code == 413
    binary = client.http.post("/v1/datasets", files={"file": ("x.txt", b"\xff\xfe\x00bin")}, data={"name": "x"})
    assert binary.status_code == 422 and "UTF-8" in binary.text
    pickled = tmp_path / "evil.tar.gz"
    with tarfile.open(pickled, "w:gz") as tar:
        for name, data in {"m/config.json": b"{}", "m/pytorch_model.bin": b"\x80\x04pickle"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    refused = client.http.post(
        "/v1/models", files={"file": ("evil.tar.gz", pickled.read_bytes())}, data={"name": "evil"}
    )
    assert refused.status_code == 422 and "pytorch_model.bin" in refused.text


def test_another_tenant_sees_nothing(production: Stack, tiny_llama_dir: Path) -> None:
    owner = _client(production)
    job_id = owner.submit({**JOB, "model": str(tiny_llama_dir), "method": "rtn", "method_options": {}})["id"]
    other_key = (
        subprocess.run(
            [sys.executable, "-m", "api.commands.cli", "create-key", "--tenant", "other"],
            env=production.env,
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    other = SWQuantClient(production.url, other_key)
    for path in (
        f"/v1/jobs/{job_id}",
        f"/v1/jobs/{job_id}/events",
        f"/v1/jobs/{job_id}/artifacts",
        f"/v1/jobs/{job_id}/artifacts/packed.tar",
    ):
        assert other.http.get(path).status_code == 404, path
    assert other.http.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
    assert job_id not in [j["id"] for j in other.jobs()["items"]]
    # Uploads: another tenant neither lists them nor can use their reference in a job.
    upload = owner.http.post("/v1/datasets", files={"file": ("c.txt", b"a corpus " * 50)}, data={"name": "mine"})
    assert upload.status_code == 201, upload.text
    reference = upload.json()["reference"]
    assert reference in [u["reference"] for u in owner.http.get("/v1/datasets").json()]
    assert other.http.get("/v1/datasets").json() == []
    borrowed = other.http.post(
        "/v1/jobs", json={**JOB, "model": str(tiny_llama_dir), "calibration": {"text": reference}}
    )
    assert borrowed.status_code == 422
    assert borrowed.json()["detail"][0]["loc"][-1] == "text"
    _wait(owner, production, job_id)


def test_bad_specs_are_refused_with_the_field_named(production: Stack) -> None:
    client = _client(production)
    cases = {
        "bits": {"model": "m", "bits": 1},
        "method": {"model": "m", "method": "nope"},
        "loss": {"model": "m", "loss": "nope"},
        "loss_options.sw_block_size": {"model": "m", "loss": "mse_sw", "loss_options": {"sw_block_size": 100}},
        "calibration.n_samples": {"model": "m", "calibration": {"n_samples": -1}},
        "method_options.epochs": {"model": "m", "method_options": {"epochs": "many"}},
        # Huge values: each would hold a worker for years or exhaust its memory.
        "calibration.seq_len": {"model": "m", "calibration": {"seq_len": 10**9}},
        "group_size": {"model": "m", "group_size": 2**40},
        "seed": {"model": "m", "seed": 2**70},
        "loss_options.sw_num_projections": {
            "model": "m",
            "loss": "mse_sw",
            "loss_options": {"sw_num_projections": 10**9},
        },
    }
    huge_counts = [
        (f"method_options.{k}", {"model": "m", "method_options": {k: 10**12}}) for k in ("epochs", "batch_size")
    ]
    for field, body in [*cases.items(), *huge_counts]:
        response = client.http.post("/v1/jobs", json=body)
        assert response.status_code == 422, (field, response.text)
        locs = [".".join(str(p) for p in d["loc"][1:]) for d in response.json()["detail"]]
        assert any(loc.startswith(field) for loc in locs), (field, locs)
    assert (
        client.http.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}).status_code
        == 422
    )
    anonymous = httpx.post(f"{production.url}/v1/jobs", json={"model": "m", "bits": 1}, timeout=30)
    assert anonymous.status_code == 401  # authentication is checked before the body is read


def test_values_the_database_cannot_hold_are_refused_not_500(production: Stack) -> None:
    """Inputs found by fuzzing that once reached PostgreSQL and failed there (NUL, out-of-range numbers)."""
    client = _client(production)
    forged_cursor = base64.urlsafe_b64encode(b"9999-12-31T23:59:59-14:00|x").decode()
    nul_id_cursor = base64.urlsafe_b64encode(b"2024-01-01T00:00:00|\x00").decode()
    job_id = client.submit({**JOB, "model": "/nonexistent"})["id"]
    requests = [
        ("GET", "/v1/jobs/%5E%0F%C3%BF%00", {}),
        ("POST", "/v1/jobs/abc%00/cancel", {}),
        ("GET", f"/v1/jobs/{job_id}/artifacts/report.json%00", {}),
        ("GET", "/v1/jobs?metadata=a%3D%00", {}),
        ("GET", f"/v1/jobs?cursor={forged_cursor}", {}),
        ("GET", f"/v1/jobs?cursor={nul_id_cursor}", {}),
        ("GET", f"/v1/jobs/{job_id}/events?cursor=9223372036854775808", {}),
        ("POST", "/v1/jobs", {"json": {"model": "upload:\u0000"}}),
        ("POST", "/v1/jobs", {"json": {"model": "m", "metadata": {"team": "a\u0000"}}}),
        ("POST", "/v1/datasets", {"files": {"file": ("t.txt", b"text")}, "data": {"name": "a\x00b"}}),
    ]
    for method, path, kwargs in requests:
        response = client.http.request(method, path, **kwargs)
        assert 400 <= response.status_code < 500, (method, path, response.status_code, response.text)
    assert client.http.get("/v1/jobs?metadata=team=x").status_code == 200  # filters still work afterwards


def test_the_methods_route_serves_the_catalog_without_a_key(production: Stack) -> None:
    response = httpx.get(f"{production.url}/v1/methods", timeout=30)
    assert response.status_code == 200 and response.json() == catalog()
