"""The job request on the wire (pydantic v2) and its translation into quant_core's JobSpec.

The API validates a request in two steps: pydantic checks types and ranges, then the same JobSpec the
worker will run checks the semantics (known method and loss, their options, sw_block_size against
seq_len). Both report the offending field, so a bad spec is refused at submission, not found later
by a worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from quant_core.accuracy import MAX_TASKS, LmEvalSpec
from quant_core.errors import ConfigError
from quant_core.job import CalibSpec, EvalSpec, JobSpec
from quant_core.lightcompress_config import parse_lightcompress
from quant_core.quantizer import MAX_BITS, MIN_BITS, QuantSpec

UPLOAD_PREFIX = "upload:"
ExportFormat = Literal["auto", "fake_quant", "pack_quantized"]
DEFAULT_EXPORT: ExportFormat = "auto"
MAX_SAMPLES = 4096
MAX_SEQ_LEN = 32768


class CalibrationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field("austen", description="bundled corpus name, upload:<dataset id>, or a path visible to workers")
    n_samples: int = Field(128, ge=1, le=MAX_SAMPLES)
    seq_len: int = Field(512, ge=8, le=MAX_SEQ_LEN)


class LmEvalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(
        ..., min_length=1, max_length=MAX_TASKS, description="lm-eval task names, or task YAML paths visible to workers"
    )
    limit: int | None = Field(None, ge=1, le=1_000_000, description="documents per task; null: all")
    num_fewshot: int | None = Field(None, ge=0, le=64, description="null: each task's default")
    baseline: bool = Field(True, description="also score the float model (cached per model and task)")


class EvaluationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(default_factory=lambda: ["persuasion"], max_length=8)
    seq_len: int | None = Field(None, ge=8, le=MAX_SEQ_LEN)
    max_windows: int | None = Field(None, ge=1, le=100_000)
    lm_eval: LmEvalRequest | None = None


class JobRequest(BaseModel):
    """What a user submits. Defaults match the CLI's."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, max_length=500, description="hub id, worker path, or upload:<model id>")
    bits: int = Field(4, ge=MIN_BITS, le=MAX_BITS)
    group_size: int | None = Field(128, ge=1, le=65536, description="null for one scale per output channel")
    symmetric: bool = False
    method: str = Field("omniquant", max_length=64)
    method_options: dict[str, Any] = Field(default_factory=dict)
    loss: str | None = Field(None, max_length=64, description="training loss; default: the method's own")
    loss_options: dict[str, Any] = Field(default_factory=dict)
    calibration: CalibrationRequest = Field(default_factory=CalibrationRequest)
    evaluation: EvaluationRequest = Field(default_factory=EvaluationRequest)
    export_formats: list[ExportFormat] = Field(default_factory=lambda: [DEFAULT_EXPORT], min_length=1, max_length=2)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="model dtype for calibration; grids, Hessians and losses stay float32"
    )
    lazy_load: bool = Field(False, description="stream blocks from the checkpoint: for models larger than memory")
    queue: Literal["gpu", "cpu"] | None = Field(None, description="worker pool to run on; default: the server's")
    metadata: dict[str, str] = Field(default_factory=dict, max_length=32)

    def to_job_spec(self, resolve: Callable[[str], str] = lambda s: s, device: str = "cpu") -> JobSpec:
        """The runnable spec; ``resolve`` maps ``upload:<id>`` references to local paths on a worker.

        Raises ConfigError whose field uses this request's names (``calibration.seq_len``...).
        """
        try:
            return JobSpec(
                model=resolve(self.model),
                quant=QuantSpec(bits=self.bits, symmetric=self.symmetric, group_size=self.group_size),
                method=self.method,
                method_options=self.method_options,
                loss=self.loss,
                loss_options=self.loss_options,
                calib=CalibSpec(
                    text=resolve(self.calibration.text),
                    n_samples=self.calibration.n_samples,
                    seq_len=self.calibration.seq_len,
                ),
                eval=EvalSpec(
                    texts=tuple(resolve(t) for t in self.evaluation.texts),
                    seq_len=self.evaluation.seq_len,
                    max_windows=self.evaluation.max_windows,
                    lm_eval=LmEvalSpec(**self.evaluation.lm_eval.model_dump()) if self.evaluation.lm_eval else None,
                ),
                seed=self.seed,
                device=device,
                dtype=self.dtype,
                lazy_load=self.lazy_load,
                export_formats=tuple(dict.fromkeys(self.export_formats)),
            )
        except ConfigError as exc:
            raise ConfigError(str(exc), _request_field(exc.field)) from exc

    def upload_ids(self) -> dict[str, str]:
        """Uploads this job reads (its model and texts) by request field, so ownership can be checked."""
        refs = {"model": self.model, "calibration.text": self.calibration.text}
        refs.update({f"evaluation.texts.{i}": text for i, text in enumerate(self.evaluation.texts)})
        return {field: r.removeprefix(UPLOAD_PREFIX) for field, r in refs.items() if r.startswith(UPLOAD_PREFIX)}

    @model_validator(mode="before")
    @classmethod
    def _no_control_characters(cls, data: Any) -> Any:
        """NUL can be neither stored nor used in a path: refuse it anywhere in the request, by field."""
        for path, value in _strings(data):
            if "\x00" in value:
                raise ValueError(f"{path or 'body'}: NUL characters are not allowed")
        return data


def _strings(value: Any, path: str = "") -> list[tuple[str, str]]:
    """Every string in a parsed JSON value (keys included) with its dotted path."""
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, dict):
        found = []
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            found += [(child, str(key)), *_strings(item, child)]
        return found
    if isinstance(value, list):
        return [pair for i, item in enumerate(value) for pair in _strings(item, f"{path}.{i}")]
    return []


def _request_field(core_field: str | None) -> str | None:
    """Rename quant_core's field paths to the request's (``calib.n_samples`` -> ``calibration.n_samples``)."""
    if core_field is None:
        return None
    head, _, rest = core_field.partition(".")
    renamed = {"calib": "calibration", "eval": "evaluation"}.get(head, head)
    return f"{renamed}.{rest}" if rest else renamed


def request_from_settings(settings: dict[str, Any]) -> JobRequest:
    """A JobRequest from the CLI's flat settings (``swquant submit`` flags or a LightCompress file)."""
    body: dict[str, Any] = {
        key: settings[key]
        for key in (
            "model",
            "bits",
            "symmetric",
            "method",
            "loss",
            "loss_options",
            "method_options",
            "seed",
            "dtype",
            "lazy_load",
        )
        if settings.get(key) is not None
    }
    if "group_size" in settings:
        body["group_size"] = settings["group_size"] or None
    if settings.get("export"):
        body["export_formats"] = settings["export"]
    pairs = {
        "calibration": (("text", "calib"), ("n_samples", "n_samples"), ("seq_len", "seq_len")),
        "evaluation": (("texts", "eval"), ("seq_len", "eval_seq_len"), ("max_windows", "eval_max_windows")),
    }
    for section, names in pairs.items():
        values = {field: settings[key] for field, key in names if settings.get(key) is not None}
        if values:
            body[section] = values
    if settings.get("lm_eval_task"):  # the request model validates these, as for the sections above
        body.setdefault("evaluation", {})["lm_eval"] = {
            "tasks": list(settings["lm_eval_task"]),
            "limit": settings.get("lm_eval_limit"),
            "num_fewshot": settings.get("lm_eval_fewshot"),
        }
    return JobRequest.model_validate(body)


def request_from_lightcompress(text: str) -> JobRequest:
    """A JobRequest from a LightCompress-style YAML document (the same mapping as ``swquant --config``)."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", "config") from exc
    return request_from_settings(parse_lightcompress(document))
