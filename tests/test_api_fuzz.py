"""The running API fuzzed against its own OpenAPI schema (schemathesis, property-based).

The API runs as in production (uvicorn against PostgreSQL, Redis and S3) and is reached over real
HTTP; the schema is the one the running server publishes at ``/openapi.json``. Every operation is
called with a valid API key on schema-valid and schema-violating inputs (schemathesis' coverage and
fuzzing phases, both generation modes). Two tests send the same inputs: one checks that no response
is a 5xx, the other that each response has a status code the schema declares for the operation, the
declared content type and a body matching the declared schema. They are separate because a failing
case ends its operation's search, and an undeclared 404 must not hide a 500.

No worker is started, so no fuzzed job can ever run: submitted jobs are stored and published to
queues nobody consumes (the deployment's own queue and the ``gpu``/``cpu`` queues a spec may name),
in a Redis database kept for this test (``BROKER_URL``) and emptied of them at teardown. A worker
would fork a child per job and try to load whatever model the fuzzer named, hundreds of times, on
cores shared with other work, and a fuzzed spec naming a real local model would run a real job.

Fuzzed ids almost never exist, so three jobs of the key's tenant are written directly to the
database first (queued, failed, and succeeded with a ``report.json`` artifact in S3). Schema hooks
make part of the generated path parameters name them and part of the download ranges real ones, so
the 200, 206, 409 and 416 answers are checked too, not only 404s; they also push some path and query
values past limits the schema does not state (a NUL byte, an integer past PostgreSQL's bigint), which
random generation reaches too rarely within this budget.

Inputs are reproducible: a fixed schemathesis seed (mixed per operation), ``derandomize`` and no
example database. ``MAX_EXAMPLES`` bounds the fuzzing phase per operation; the coverage phase adds
its boundary cases. The cases sent are counted per test and operation, printed and checked last.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import redis
import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from swq_shared import jobs
from swq_shared.artifacts import artifact_key
from swq_shared.auth import create_api_key, tenant_for_key
from swq_shared.db import get_engine, session_scope
from swq_shared.jobspec import JobRequest
from swq_shared.models import ErrorCode, JobStatus
from tests.job_records import block_event
from tests.s3_server import S3Endpoint
from tests.service_stack import Stack, api_only_stack, migrated_backing

SEED = 20260101
MAX_EXAMPLES = 20
BROKER_URL = "redis://127.0.0.1:6379/5"  # nobody consumes it; the fuzzed jobs' messages are deleted at teardown
SPEC_QUEUES = ("gpu", "cpu")  # JobRequest.queue: a fuzzed spec may route its job there
CONFORMANCE_CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]
NUL = "\x00"
BEYOND_BIGINT = 2**63
REPORT = b'{"method": "rtn", "perplexity": {}}'
CASES: Counter[tuple[str, str]] = Counter()  # (test, operation) -> cases sent


@dataclass(frozen=True)
class Seeded:
    """Jobs of the fuzzing tenant that exist before the fuzzer starts."""

    queued: str
    failed: str
    succeeded: str
    artifact: str = "report.json"


@dataclass(frozen=True)
class Target:
    stack: Stack
    seeded: Seeded


@contextmanager
def fuzz_stack(workdir: Path, database_url: str, storage_url: str, extra_env: dict[str, str]) -> Iterator[Stack]:
    """The API alone with a key for the fuzzing tenant; the queues it filled are emptied afterwards."""
    with session_scope(database_url) as session:
        key = create_api_key(session, "fuzz", "schemathesis")
    # Fuzz every operation, not the limiter's 429.
    env = {**extra_env, "SWQUANT_RATE_LIMIT_PER_MINUTE": "0"}
    with api_only_stack(workdir, database_url, BROKER_URL, storage_url, env, key) as stack:
        try:
            yield stack
        finally:
            _drop_queues([stack.env["SWQUANT_QUEUE"], *SPEC_QUEUES])


def _drop_queues(queues: list[str]) -> None:
    client = redis.Redis.from_url(BROKER_URL)
    bindings = [f"_kombu.{kind}.{queue}" for queue in queues for kind in ("binding", "binding_permanent")]
    client.delete(*queues, *bindings)
    client.close()


def _seed_jobs(database_url: str, api_key: str, s3: S3Endpoint, bucket: str) -> Seeded:
    """A queued, a failed and a succeeded job (with a report.json in S3), as a worker would leave them."""
    spec = JobRequest(model="seed/model", method="rtn").model_dump(mode="json")
    ids = []
    with session_scope(database_url) as session:
        tenant = tenant_for_key(session, api_key)
        assert tenant is not None
        for name in ("queued", "failed", "succeeded"):
            job, _ = jobs.create_job(session, tenant.id, spec, {"seed": name}, None)
            ids.append(job.id)
        session.commit()
        queued, failed, succeeded = ids
        for job_id in (failed, succeeded):
            jobs.claim_job(session, job_id, "seed-worker")
        jobs.record_block(
            session,
            succeeded,
            block_event(0, 1),
        )
        jobs.finish_job(
            session, failed, JobStatus.failed, error_code=ErrorCode.invalid_spec, error_message="model: missing"
        )
        key = artifact_key(succeeded, "report.json")
        s3.client().put_object(Bucket=bucket, Key=key, Body=REPORT)
        jobs.finish_job(
            session,
            succeeded,
            JobStatus.succeeded,
            metrics={"perplexity.after.persuasion": 40.0},
            artifacts=[
                {"name": "report.json", "storage_key": key, "size": len(REPORT), "content_type": "application/json"}
            ],
        )
    return Seeded(queued=queued, failed=failed, succeeded=succeeded)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Endpoint) -> Iterator[Target]:
    with migrated_backing(s3_server, "fuzz") as (database_url, storage_url, extra):
        workdir = tmp_path_factory.mktemp("fuzz")
        bucket = storage_url.removeprefix("s3://")
        try:
            with fuzz_stack(workdir, database_url, storage_url, extra) as stack:
                yield Target(stack, _seed_jobs(database_url, stack.api_key, s3_server, bucket))
        finally:
            get_engine(database_url).dispose()  # before the database is dropped


def _with_boundaries(values: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """The values as generated, or one of them pushed past a limit the schema does not state.

    A string gets a NUL byte (PostgreSQL text refuses it), a list of strings gets one more holding a NUL,
    and an integer becomes 2**63 (one past PostgreSQL's bigint). Drawn in a third to a half of the cases.
    """
    variants = []
    for key, value in values.items():
        if isinstance(value, str):
            variants.append({**values, key: f"{value}{NUL}"})
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            variants.append({**values, key: [*value, f"k={NUL}"]})
        elif isinstance(value, int) and not isinstance(value, bool):
            variants.append({**values, key: BEYOND_BIGINT})
    return st.sampled_from([values, values, *variants])


@pytest.fixture(scope="module")
def api_schema(target: Target) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(f"{target.stack.url}/openapi.json", timeout=30)
    schema.config.update(headers={"Authorization": f"Bearer {target.stack.api_key}"}, request_timeout=30)
    schema.config.seed = SEED
    seeded = {
        "job_id": [target.seeded.queued, target.seeded.failed, target.seeded.succeeded],
        "name": [target.seeded.artifact],
    }

    @schema.hook
    def flatmap_path_parameters(_context: schemathesis.HookContext, path_parameters: dict[str, Any] | None) -> Any:
        """Fuzzed ids or the seeded jobs (and their artifact's name), sometimes past a limit."""
        if not path_parameters:
            return st.just(path_parameters)
        choices = {name: st.sampled_from([value, *seeded.get(name, [])]) for name, value in path_parameters.items()}
        return st.fixed_dictionaries(choices).flatmap(_with_boundaries)

    @schema.hook
    def flatmap_query(_context: schemathesis.HookContext, query: dict[str, Any] | None) -> Any:
        return _with_boundaries(query) if query else st.just(query)

    @schema.hook
    def flatmap_headers(context: schemathesis.HookContext, headers: dict[str, Any] | None) -> Any:
        """Fuzzed Range headers, or byte ranges inside, across and past the seeded artifact."""
        if context.operation is None or not context.operation.path.endswith("/artifacts/{name}"):
            return st.just(headers)
        size = len(REPORT)
        ranges = ["bytes=0-9", f"bytes=5-{size * 2}", "bytes=-7", f"bytes={size}-", "bytes=0-0,5-6", "items=0-3"]
        others = {k: v for k, v in (headers or {}).items() if k.lower() != "range"}
        fuzzed = next((v for k, v in (headers or {}).items() if k.lower() == "range"), None)
        return st.sampled_from([fuzzed, *ranges]).map(
            lambda value: others | ({"Range": value} if value is not None else {})
        )

    return schema


schema = schemathesis.pytest.from_fixture("api_schema")
FUZZING = hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32's lazy schemas read ``item._nodeid``, which pytest 9.2 no longer sets: provide it."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@schema.parametrize()
@FUZZING
def test_no_request_gets_a_server_error(case: schemathesis.Case) -> None:
    CASES["server_error", case.operation.label] += 1
    case.call_and_validate(checks=[not_a_server_error])


@schema.parametrize()
@FUZZING
def test_every_response_conforms_to_the_schema(case: schemathesis.Case) -> None:
    """Separate from the 5xx test, so an undeclared status does not stop the search for server errors."""
    CASES["conformance", case.operation.label] += 1
    case.call_and_validate(checks=CONFORMANCE_CHECKS)


def test_every_operation_was_fuzzed(
    request: pytest.FixtureRequest, api_schema: schemathesis.BaseSchema, capsys: pytest.CaptureFixture[str]
) -> None:
    fuzz_tests = ("test_no_request_gets_a_server_error", "test_every_response_conforms_to_the_schema")
    if not all(any(item.name == name for item in request.session.items) for name in fuzz_tests):
        pytest.skip(f"the counts come from {' and '.join(fuzz_tests)}; select both")
    labels = sorted(op.ok().label for op in api_schema.get_all_operations())
    with capsys.disabled():
        print(f"\nschemathesis {schemathesis.__version__}, seed {SEED}: cases sent (5xx test, conformance test)")
        for label in labels:
            print(f"  {CASES['server_error', label]:5d} {CASES['conformance', label]:5d}  {label}")
        print(f"  {sum(CASES.values()):11d}  in all")
    assert all(CASES[test, label] > 0 for test in ("server_error", "conformance") for label in labels), CASES
