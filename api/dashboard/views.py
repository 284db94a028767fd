"""What the dashboard's pages show, built from the same business functions as the REST API.

Nothing here touches SQL: jobs, events and their ownership come from ``swq_shared.jobs`` and the
API's own lookups; the submit form is turned into the same ``JobRequest`` and refused with the same
field paths (pydantic ``loc`` and quant_core ``ConfigError.field``) the API answers with in a 422.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from api.routes.submission import own_job
from swq_shared import jobs
from swq_shared.auth import Caller
from swq_shared.errors import NotFoundInTenantError
from swq_shared.events import BlockEvent, EventKind, TuningEvent, read_event
from swq_shared.models import Job, JobStatus, utcnow

log = logging.getLogger(__name__)

SORTS = {"created": "newest first", "duration": "longest first", "ppl": "lowest perplexity after first"}
LIST_LIMIT = 100
PPL_PREFIX = "perplexity."
NOTICES = {
    "cancel-requested": "Cancellation requested: a queued job stops at once, a running one after its current block.",
    "already-finished": "This job had already finished; nothing was cancelled.",
}


class PageError(Exception):
    """An error page (404 for another tenant's job, 503 for a queue that is down...)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


class LoginRequired(Exception):
    """No valid browser session: the user is sent to the login page and back to ``next_url``."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


# --- submitting ------------------------------------------------------------------------------------


# --- jobs as rows ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRow:
    """One job as the list and the compare view show it."""

    id: str
    status: str
    model: str
    method: str
    loss: str
    bits: int
    group_size: int | None
    labels: dict[str, Any]
    created_at: datetime
    duration_s: float | None
    blocks_done: int
    num_blocks: int | None
    ppl: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    recipe: list[str] = field(default_factory=list)  # every stage the job runs, in order (see `recipe`)
    # lm-eval scores as "task metric" -> (float model, quantized)
    accuracy: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)

    @property
    def around_method(self) -> list[str]:
        """The stages before and after the method that the list's method column mentions."""
        return [stage for stage in self.recipe if stage.startswith(("rotation", "tuning"))]

    @property
    def short_id(self) -> str:
        return self.id[:8]

    @property
    def first_ppl(self) -> tuple[str, float | None, float | None]:
        if not self.ppl:
            return "", None, None
        text, (before, after) = next(iter(self.ppl.items()))
        return text, before, after

    @property
    def terminal(self) -> bool:
        return JobStatus(self.status).terminal


def _options(options: Any) -> str:
    return ", ".join(f"{key}={value}" for key, value in options.items()) if isinstance(options, dict) else ""


def recipe(spec: dict[str, Any]) -> list[str]:
    """The job's stages as the page names them: rotation, grid, method (with its options), loss,
    end-to-end tuning (with its loss) and the runtimes it targets; what gives a run its quality is
    rarely the method alone."""
    stages = [f"rotation {spec['rotation']}"] if spec.get("rotation", "none") != "none" else []
    budget = spec.get("budget")
    if isinstance(budget, dict):
        size = (
            f"{budget['bits_per_weight']} bits per weight"
            if budget.get("bits_per_weight")
            else f"{budget.get('size_mb')} MB"
        )
        grid = f"budget {size} over W{'/'.join(map(str, budget.get('widths', [])))}"
    else:
        grid = f"W{spec.get('bits', '?')} " + (f"g{spec['group_size']}" if spec.get("group_size") else "per channel")
    stages.append(grid + (" sym" if spec.get("symmetric") else ""))
    method, options = str(spec.get("method", "")), _options(spec.get("method_options"))
    stages.append(f"{method} ({options})" if options else method)
    stages.append(f"loss {spec['loss']}" if spec.get("loss") else "the method's loss")
    tuning = spec.get("finetune") or {}
    if isinstance(tuning, dict) and tuning.get("epochs"):
        epochs = tuning["epochs"]
        stages.append(f"tuning {epochs} epoch{'s' if epochs != 1 else ''}, loss {tuning.get('loss', 'kd')}")
    if spec.get("targets"):
        stages.append("for " + ", ".join(spec["targets"]))
    return stages


def job_row(job: Job, now: datetime | None = None) -> JobRow:
    spec = job.spec
    metrics = {m.name: m.value for m in job.metrics}
    texts = list(spec.get("evaluation", {}).get("texts", []))
    texts += [n.split(".", 2)[2] for n in metrics if n.startswith(PPL_PREFIX) and n.split(".", 2)[2] not in texts]
    ppl = {
        text: (metrics.get(f"{PPL_PREFIX}before.{text}"), metrics.get(f"{PPL_PREFIX}after.{text}")) for text in texts
    }
    end = job.finished_at or (now or utcnow())
    return JobRow(
        id=job.id,
        status=job.status,
        model=str(spec.get("model", "")),
        method=str(spec.get("method", "")),
        loss=str(spec.get("loss", "")),
        bits=int(spec.get("bits", 0)),
        group_size=spec.get("group_size"),
        labels=dict(job.labels or {}),
        created_at=job.created_at,
        duration_s=(end - job.started_at).total_seconds() if job.started_at else None,
        blocks_done=job.blocks_done,
        num_blocks=job.num_blocks,
        ppl={t: v for t, v in ppl.items() if v != (None, None)},
        recipe=recipe(spec),
        accuracy=_accuracy(metrics),
    )


def _accuracy(metrics: dict[str, float]) -> dict[str, tuple[float | None, float | None]]:
    """lm-eval metrics (``lm_eval.{before,after}.TASK.METRIC``) paired per task and metric."""
    pairs: dict[str, tuple[float | None, float | None]] = {}
    for name, value in metrics.items():
        prefix, _, rest = name.partition(".")
        phase, _, task_metric = rest.partition(".")
        if prefix != "lm_eval" or phase not in ("before", "after") or "." not in task_metric:
            continue
        key = " ".join(task_metric.rsplit(".", 1))
        before, after = pairs.get(key, (None, None))
        pairs[key] = (value, after) if phase == "before" else (before, value)
    return pairs


def parse_label_filter(text: str) -> tuple[dict[str, str], str | None]:
    """``team=nlp, run=3`` -> labels, by the REST API's rule; an error message instead of labels."""
    try:
        return jobs.parse_label_filters(text.replace(",", " ").split()), None
    except jobs.LabelFilterError as exc:
        return {}, str(exc)


def parse_status_filter(status: str) -> str | None:
    """An error message for a status that is no job status ("" means any), as the REST API refuses it."""
    if status and status not in JobStatus.__members__:
        return f"{status!r} is not a job status: one of {', '.join(JobStatus.__members__)}"
    return None


def list_job_rows(
    session: Session, tenant: Caller, status: str, labels: dict[str, str], sort: str, cursor: str | None
) -> tuple[list[JobRow], str | None]:
    """One page of the tenant's jobs (newest first, as the API pages them), sorted for display."""
    statuses = [status] if status else []
    page = jobs.list_jobs(session, tenant.id, limit=LIST_LIMIT, cursor=cursor, statuses=statuses, labels=labels)
    rows = [job_row(j) for j in page.items]
    if sort == "duration":
        rows.sort(key=lambda r: -(r.duration_s or -1))
    elif sort == "ppl":
        rows.sort(key=lambda r: (r.first_ppl[2] is None, r.first_ppl[2] or 0.0))
    return rows, page.next_cursor


# --- one job ---------------------------------------------------------------------------------------


def owned_job(session: Session, tenant: Caller, job_id: str) -> Job:
    """The tenant's job; another tenant's is missing (404), as in the REST API."""
    try:
        return own_job(session, tenant, job_id)
    except NotFoundInTenantError as exc:
        raise PageError(404, str(exc)) from exc


def job_events(session: Session, job_id: str) -> list[dict[str, Any]]:
    """The job's whole event log, oldest first."""
    events: list[dict[str, Any]] = []
    cursor = 0
    while True:
        page = jobs.list_events(session, job_id, after=cursor, limit=1000)
        events += [{"id": e.id, "kind": e.kind, "at": e.created_at, "data": e.data} for e in page.items]
        cursor = int(page.next_cursor)
        if not page.has_more:
            return events


def block_records(events: list[dict[str, Any]]) -> list[BlockEvent]:
    """The last record per block (a resumed job may report a block twice), in block order."""
    blocks = [BlockEvent.model_validate(e["data"]) for e in events if e["kind"] == EventKind.block]
    latest = {block.index: block for block in blocks}
    return [latest[i] for i in sorted(latest)]


def event_summary(event: dict[str, Any]) -> str:
    return read_event(event["kind"], event["data"]).summary()


def chart(
    x: list[int], series: list[dict[str, Any]], y_label: str, log_scale: bool = True, x_label: str = "block"
) -> dict[str, Any]:
    """The data a uPlot chart is drawn from; a log axis only when every value is positive."""
    values = [v for s in series for v in s["values"] if v is not None]
    log = log_scale and bool(values) and min(values) > 0
    return {"x": x, "series": series, "y_label": y_label, "x_label": x_label, "log": log}


def tuning_steps(events: list[dict[str, Any]]) -> list[TuningEvent]:
    """The end-to-end tuning's steps, the last record per step (a resumed job may tune again), in order."""
    steps = [TuningEvent.model_validate(e["data"]) for e in events if e["kind"] == EventKind.tuning]
    latest = {step.step: step for step in steps}
    return [latest[i] for i in sorted(latest)]


def tuning_chart(steps: list[TuningEvent]) -> dict[str, Any]:
    series = [{"label": "tuning loss", "values": [s.loss for s in steps], "color": 0}]
    return chart([s.step for s in steps], series, "loss", x_label="step")


def job_charts(blocks: list[BlockEvent]) -> dict[str, dict[str, Any]]:
    x = [b.index for b in blocks]
    return {
        "loss": chart(
            x,
            [
                {"label": "after calibration", "values": [b.loss_after for b in blocks], "color": 0},
                {"label": "with RTN weights", "values": [b.loss_before for b in blocks], "color": 1, "dash": True},
            ],
            "loss",
        ),
        "mse": chart(
            x,
            [
                {"label": "after calibration", "values": [b.mse_after for b in blocks], "color": 0},
                {"label": "with RTN weights", "values": [b.mse_before for b in blocks], "color": 1, "dash": True},
            ],
            "MSE",
        ),
        **_allocation_chart(blocks, x),
    }


def _allocation_chart(blocks: list[BlockEvent], x: list[int]) -> dict[str, dict[str, Any]]:
    """A size budget's bits per weight by block, as bars; nothing for a job of one width."""
    if not any(b.schemes for b in blocks):
        return {}
    series = [{"label": "bits per weight", "values": [b.bits_per_weight for b in blocks], "color": 2, "bars": True}]
    return {"bits": chart(x, series, "bits per weight", log_scale=False)}


# --- comparing runs --------------------------------------------------------------------------------


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"calibration": {"seq_len": 32}}`` -> ``{"calibration.seq_len": 32}``; an empty mapping adds nothing."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def spec_diff(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every spec field as a row of values per run, ``differs`` set where the runs disagree (those first)."""
    flat = [flatten(s) for s in specs]
    rows = []
    for name in sorted({name for f in flat for name in f}):
        values = [f.get(name) for f in flat]
        shown = ["—" if v is None else json.dumps(v) if isinstance(v, list | dict | bool) else str(v) for v in values]
        rows.append({"field": name, "values": shown, "differs": len(set(shown)) > 1})
    return sorted(rows, key=lambda r: not r["differs"])


LABEL_FIELDS = ("method", "loss", "bits", "group_size", "symmetric")


def run_labels(rows: list[JobRow], diff: list[dict[str, Any]], fields: int = 3) -> list[str]:
    """Short legend names: the job id and what sets the run apart (``3f2a1c0b loss=mse_sw``)."""
    differing = [d for d in diff if d["differs"] and not d["field"].startswith("metadata")]
    differing.sort(key=lambda d: LABEL_FIELDS.index(d["field"]) if d["field"] in LABEL_FIELDS else len(LABEL_FIELDS))
    labels = []
    for i, row in enumerate(rows):
        parts = [f"{d['field'].split('.')[-1]}={d['values'][i]}" for d in differing if d["values"][i] != "—"]
        labels.append(" ".join([row.short_id, *parts[:fields]]))
    return labels


def compare_charts(runs: list[list[BlockEvent]], labels: list[str]) -> dict[str, dict[str, Any]]:
    """Per-block curves of several runs on one x axis (block index); a missing block is a gap."""
    x = sorted({b.index for blocks in runs for b in blocks})

    def aligned(blocks: list[BlockEvent], key: str) -> list[float | None]:
        by_index = {b.index: getattr(b, key) for b in blocks}
        return [by_index.get(i) for i in x]

    named = list(enumerate(zip(labels, runs, strict=True)))
    mse = [{"label": label, "values": aligned(blocks, "mse_after"), "color": i} for i, (label, blocks) in named]
    mse += [
        {"label": f"{label} (RTN)", "values": aligned(blocks, "mse_before"), "color": i, "dash": True}
        for i, (label, blocks) in named
    ]
    loss = [{"label": label, "values": aligned(blocks, "loss_after"), "color": i} for i, (label, blocks) in named]
    return {"mse": chart(x, mse, "MSE"), "loss": chart(x, loss, "loss")}


def gap_recovered(reference: float | None, value: float | None, full_precision: float | None) -> float | None:
    """Percent of the reference run's gap to the float model that ``value`` closes (the SW paper's metric).

    The same formula serves perplexity (lower is better) and accuracy (higher is better):
    ``(value - reference) / (full_precision - reference)``; negative when the run is worse.
    """
    if reference is None or value is None or full_precision is None or full_precision == reference:
        return None
    return 100.0 * (value - reference) / (full_precision - reference)


def _paired_table(rows: list[JobRow], attribute: str) -> list[dict[str, Any]]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in getattr(row, attribute) if k not in keys]
    table = []
    for key in keys:
        values = [getattr(row, attribute).get(key, (None, None)) for row in rows]
        before, reference = values[0]
        recovered = [None] + [gap_recovered(reference, after, before) for _, after in values[1:]]
        table.append({"text": key, "values": values, "recovered": recovered})
    return table


def ppl_table(rows: list[JobRow]) -> list[dict[str, Any]]:
    """One row per evaluation text, one (before, after) pair per run, and the gap each run recovers
    relative to the first run (e.g. an SW hybrid against its point-wise baseline)."""
    return _paired_table(rows, "ppl")


def accuracy_table(rows: list[JobRow]) -> list[dict[str, Any]]:
    """The same for lm-eval task metrics."""
    return _paired_table(rows, "accuracy")
