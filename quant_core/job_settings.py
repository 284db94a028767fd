"""A job's settings as a user writes them, declared once.

Every way of asking for a job reads this one declaration: the ``swquant quantize`` / ``swquant
submit`` flags (built from each field's :class:`Flag`, type, description and default by
quant_core.cli), the REST request (swq_shared.jobspec.JobRequest adds only the service's own fields),
the LightCompress YAML mapping (which produces this shape) and the dashboard's form (which lays out
these fields). A new setting is one field here plus its use in :meth:`JobSettings.to_job_spec`.

Pydantic checks types and ranges; :class:`~quant_core.job.JobSpec`, built by ``to_job_spec``, checks
what needs the registries (known method and loss, their options, sw_block_size against seq_len).
Both name the offending field in this model's terms (``calibration.seq_len``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from quant_core.absorbed_rotation import RotationName
from quant_core.accuracy import MAX_TASKS, LmEvalSpec
from quant_core.corpus import MAX_SAMPLES
from quant_core.errors import ConfigError, config_error
from quant_core.export_dtype import ExportDtypeName
from quant_core.job import CalibSpec, DtypeName, EvalSpec, ExportFormat, JobSpec
from quant_core.losses import LOSSES
from quant_core.methods import METHODS
from quant_core.quantizer import MAX_BITS, MIN_BITS, QuantSpec
from quant_core.runtimes import RuntimeName

MAX_SEQ_LEN = 32768
MAX_WORLD_SIZE = 64
AUTO_EXPORT: ExportFormat = "auto"
SettingsT = TypeVar("SettingsT", bound=BaseModel)


@dataclass(frozen=True)
class Flag:
    """A setting's command-line flag. ``kind``: ``repeat`` (the flag once per list item),
    ``key_value`` (repeated NAME=VALUE pairs into a mapping) or ``group_size`` (0, -1 or none mean
    per channel); otherwise the field's type decides."""

    name: str
    kind: Literal["repeat", "key_value", "group_size"] | None = None
    metavar: str | None = None


@dataclass(frozen=True)
class Choices:
    """The names a string setting takes, read from a registry when asked (new entries show up)."""

    names: Callable[[], list[str]]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrationSettings(_Section):
    text: Annotated[str, Flag("--calib")] = Field(
        "austen", description="bundled corpus name, upload:<dataset id>, or a path visible to workers"
    )
    n_samples: Annotated[int, Flag("--n-samples")] = Field(
        128, ge=1, le=MAX_SAMPLES, title="Samples", description="calibration windows"
    )
    seq_len: Annotated[int, Flag("--seq-len")] = Field(
        512, ge=8, le=MAX_SEQ_LEN, title="Sequence length", description="tokens per calibration window"
    )
    expert_min_tokens: Annotated[int | None, Flag("--expert-min-tokens", metavar="N")] = Field(
        None,
        ge=0,
        title="Expert minimum tokens",
        description="mixtures of experts: an expert routed fewer calibration tokens takes its statistics from "
        "every token; unset: its input width",
    )


class LmEvalSettings(_Section):
    tasks: Annotated[list[str], Flag("--lm-eval-task", "repeat", "TASK")] = Field(
        ...,
        min_length=1,
        max_length=MAX_TASKS,
        title="lm-eval tasks",
        description="lm-eval task names or task YAML files, run on the float and the quantized model",
    )
    limit: Annotated[int | None, Flag("--lm-eval-limit", metavar="N")] = Field(
        None, ge=1, le=1_000_000, title="lm-eval limit", description="documents per task; unset: all"
    )
    num_fewshot: Annotated[int | None, Flag("--lm-eval-fewshot", metavar="K")] = Field(
        None, ge=0, le=64, title="lm-eval few-shot", description="few-shot examples; unset: each task's default"
    )
    baseline: bool = Field(
        True, title="lm-eval on the float model too", description="cached per model and task, for the gap"
    )


class EvaluationSettings(_Section):
    texts: Annotated[list[str], Flag("--eval", "repeat")] = Field(
        default_factory=lambda: ["persuasion"],
        max_length=8,
        description="bundled corpus names, upload:<dataset id> or text files, for perplexity",
    )
    seq_len: Annotated[int | None, Flag("--eval-seq-len")] = Field(
        None,
        ge=8,
        le=MAX_SEQ_LEN,
        title="Sequence length",
        description="tokens per evaluation window; unset: the calibration length",
    )
    max_windows: Annotated[int | None, Flag("--eval-max-windows")] = Field(
        None, ge=1, le=100_000, description="evaluation windows per text; unset: the whole text"
    )
    batch_size: Annotated[int, Flag("--eval-batch-size")] = Field(
        4, ge=1, le=1024, description="evaluation windows per forward pass (memory against speed)"
    )
    lm_eval: LmEvalSettings | None = None


class JobSettings(_Section):
    """What determines a quantization run (with the seed, its result)."""

    model: Annotated[str, Flag("--model")] = Field(
        ..., min_length=1, max_length=500, description="Hugging Face directory, hub id, or upload:<model id>"
    )
    bits: Annotated[int, Flag("--bits")] = Field(4, ge=MIN_BITS, le=MAX_BITS, description="bits per weight")
    # 64 divides the hidden and MLP widths of the common families (SmolLM2's 576 and 960 among them,
    # which 128 does not), so the packed format can hold the result; 128 leaves a ragged last group there.
    group_size: Annotated[int | None, Flag("--group-size", "group_size")] = Field(
        64,
        ge=1,
        le=65536,
        description="columns per scale; unset (0 or -1 on the command line): one per output channel",
    )
    symmetric: Annotated[bool, Flag("--symmetric")] = Field(False, title="Symmetric grid", description="no zero point")
    method: Annotated[str, Flag("--method"), Choices(lambda: sorted(METHODS))] = Field(
        "omniquant", max_length=64, description="calibration method (swquant methods)"
    )
    method_options: Annotated[dict[str, Any], Flag("--method-opt", "key_value")] = Field(
        default_factory=dict, description='the method\'s options (swquant methods), e.g. {"epochs": 20}'
    )
    loss: Annotated[str | None, Flag("--loss"), Choices(lambda: list(LOSSES))] = Field(
        None, max_length=64, description="training loss; unset: the method's own (swquant methods)"
    )
    loss_options: Annotated[dict[str, Any], Flag("--loss-opt", "key_value")] = Field(
        default_factory=dict, description='the loss\'s options (swquant methods), e.g. {"sw_num_projections": 16}'
    )
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    export_formats: Annotated[list[ExportFormat], Flag("--export")] = Field(
        default_factory=lambda: [AUTO_EXPORT],
        min_length=1,
        max_length=3,
        description="auto (pack_quantized where the format can hold the result, else fake_quant), or some of "
        "fake_quant (dequantized floats), pack_quantized (int codes in compressed-tensors, for vLLM and "
        "transformers) and gguf (llama.cpp's blocks, 4/5-bit or symmetric 8-bit, groups of 32k)",
    )
    targets: Annotated[list[RuntimeName], Flag("--targets")] = Field(
        default_factory=list,
        title="Runtime targets",
        description="runtimes the checkpoint must run in (vllm, llama.cpp, transformers): the grid is checked "
        "against each before calibration, the format each loads is written, and each scores it after the job",
    )
    rotation: Annotated[RotationName, Flag("--rotation")] = Field(
        "none",
        description="hadamard: rotate the residual stream and each head's values by seeded Hadamard transforms "
        "absorbed into the weights before calibration (QuaRot/SpinQuant), so the rotated model packs and runs in "
        "every runtime; unties a tied head",
    )
    export_dtype: Annotated[ExportDtypeName, Flag("--export-dtype")] = Field(
        "auto",
        title="Export dtype",
        description="the checkpoint's floats (weights of fake_quant, scales, norms, embeddings); auto: float16 "
        "for a float16 model, else bfloat16; the quantized model is scored as stored",
    )
    finetune: Annotated[dict[str, Any], Flag("--finetune", "key_value")] = Field(
        default_factory=dict,
        title="End-to-end tuning",
        description="after calibration, tune step sizes and norms on the whole model's next-token "
        'distributions (swquant methods), e.g. {"epochs": 2}; empty: none',
    )
    seed: Annotated[int, Flag("--seed")] = Field(0, ge=0, le=2**31 - 1, description="seed of every random draw")
    dtype: Annotated[DtypeName, Flag("--dtype")] = Field(
        "float32", title="Model dtype", description="for calibration; grids, Hessians and losses stay float32"
    )
    lazy_load: Annotated[bool, Flag("--lazy-load")] = Field(
        False, title="Lazy load", description="stream blocks from the checkpoint: for models larger than memory"
    )
    world_size: Annotated[int, Flag("--world-size")] = Field(
        1,
        ge=1,
        le=MAX_WORLD_SIZE,
        title="Ranks",
        description="processes the calibration windows are split over (one per device, or per share of the CPU "
        "cores), on torch.distributed, for every method; 1: one process",
    )

    def to_job_spec(self, resolve: Callable[[str], str] = lambda s: s, device: str = "cpu") -> JobSpec:
        """The runnable spec; ``resolve`` maps ``upload:<id>`` references to local paths on a worker.

        Raises ConfigError whose field uses this model's names (``calibration.seq_len``...).
        """
        calibration, evaluation = self.calibration, self.evaluation
        lm_eval = evaluation.lm_eval
        try:
            return JobSpec(
                model=resolve(self.model),
                quant=QuantSpec(bits=self.bits, symmetric=self.symmetric, group_size=self.group_size),
                method=self.method,
                method_options=self.method_options,
                loss=self.loss,
                loss_options=self.loss_options,
                calib=CalibSpec(
                    text=resolve(calibration.text),
                    n_samples=calibration.n_samples,
                    seq_len=calibration.seq_len,
                    expert_min_tokens=calibration.expert_min_tokens,
                ),
                eval=EvalSpec(
                    texts=tuple(resolve(t) for t in evaluation.texts),
                    seq_len=evaluation.seq_len,
                    max_windows=evaluation.max_windows,
                    batch_size=evaluation.batch_size,
                    lm_eval=LmEvalSpec(**lm_eval.model_dump()) if lm_eval else None,
                ),
                seed=self.seed,
                device=device,
                dtype=self.dtype,
                lazy_load=self.lazy_load,
                export_formats=tuple(dict.fromkeys(self.export_formats)),
                export_dtype=self.export_dtype,
                targets=tuple(dict.fromkeys(self.targets)),
                rotation=self.rotation,
                finetune=self.finetune,
                world_size=self.world_size,
            )
        except ConfigError as exc:
            raise ConfigError(str(exc), settings_field(exc.field)) from exc


def settings_field(core_field: str | None) -> str | None:
    """A JobSpec field path in this model's names (``calib.n_samples`` -> ``calibration.n_samples``)."""
    if core_field is None:
        return None
    head, _, rest = core_field.partition(".")
    renamed = {"calib": "calibration", "eval": "evaluation"}.get(head, head)
    return f"{renamed}.{rest}" if rest else renamed


def set_path(body: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path (``calibration.seq_len``) in a nested body, creating its sections."""
    head, _, rest = path.partition(".")
    if rest:
        set_path(body.setdefault(head, {}), rest, value)
    else:
        body[head] = value


@dataclass(frozen=True)
class Setting:
    """One leaf of a settings model: its dotted path, its declaration, its flag (None: no flag), the
    names it takes (None: any; a Literal's are in its type) and whether it sits in a section that
    may be left out altogether (``evaluation.lm_eval``)."""

    path: str
    info: FieldInfo
    flag: Flag | None
    choices: Choices | None
    in_optional_section: bool

    @property
    def default(self) -> Any:
        return self.info.get_default(call_default_factory=True)


def leaf_settings(model: type[BaseModel] = JobSettings, prefix: str = "", optional: bool = False) -> Iterator[Setting]:
    """Every leaf setting, depth first in declaration order; sections (nested models) are walked into."""
    for name, info in model.model_fields.items():
        section = _section_model(info.annotation)
        if section is not None:
            yield from leaf_settings(section, f"{prefix}{name}.", optional or info.default is None)
            continue
        flag = next((m for m in info.metadata if isinstance(m, Flag)), None)
        choices = next((m for m in info.metadata if isinstance(m, Choices)), None)
        yield Setting(f"{prefix}{name}", info, flag, choices, optional)


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds (``LmEvalSettings | None`` counts), else None."""
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def validated(model: type[SettingsT], body: dict[str, Any]) -> SettingsT:
    """``model`` from a body, pydantic's first complaint as a ConfigError naming its field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise config_error(exc) from exc
