"""A job's settings as a user writes them, declared once and checked once, without torch.

Every way of asking for a job reads this one declaration: the ``swquant quantize`` / ``swquant
submit`` flags (built from each field's :class:`Flag`, type, description and default by
quant_core.cli), the REST request (swq_shared.jobspec.JobRequest adds only the service's own fields),
the LightCompress YAML mapping (which produces this shape) and the dashboard's form (which lays out
these fields). A new setting is one field here plus its use in :meth:`quant_core.job.JobSpec.from_settings`.

Validating a :class:`JobSettings` is the whole check of a request: types and ranges, the options of
the method it names (``method_options`` are that method's options model: a union on ``method``), of
its loss and of the tuning stage, and every check across settings (:meth:`JobSettings._combinations`).
The API runs it and must not load torch or transformers to do it, so this module and everything it
imports declares names and options only (quant_core.method_options, quant_core.loss_options,
quant_core.finetune_options, quant_core.dtype_names). Errors name the field in this model's terms
(``calibration.seq_len``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from quant_core.dtype_names import DtypeName, ExportDtypeName, holds_grid
from quant_core.errors import ConfigError, config_error
from quant_core.finetune_options import FinetuneOptions
from quant_core.loss_options import BLOCK_SIZE_ERROR, LOSS_NAMES, SCALE_ERROR, LossOptions, known_loss, token_blocks
from quant_core.method_options import METHOD_OPTIONS, UNPACKABLE_ROTATION, AnyMethodOptions, method_options_type
from quant_core.options import MAX_BITS, MAX_SAMPLES, MIN_BITS, Options, options_of, typed_by

MAX_SEQ_LEN = 32768
MAX_WORLD_SIZE = 64
MAX_TASKS = 16  # lm-eval tasks a job may run
# ``auto``: the packed checkpoint wherever compressed-tensors can hold the result, else the
# fake-quantized one (rotated weights, streamed blocks, layers the format refuses); see
# pipeline.export_formats_for. ``gguf``: llama.cpp's file (quant_core.gguf_export).
ExportFormat = Literal["auto", "fake_quant", "pack_quantized", "gguf"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
AUTO_EXPORT: ExportFormat = "auto"
RuntimeName = Literal["transformers", "vllm", "llama.cpp"]
RUNTIMES: tuple[str, ...] = get_args(RuntimeName)
# absorbed into the weights before calibration (quant_core.absorbed_rotation)
RotationName = Literal["none", "hadamard"]
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
    tasks: Annotated[
        list[Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]],
        Flag("--lm-eval-task", "repeat", "TASK"),
    ] = Field(
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


class BudgetSettings(_Section):
    """A size budget in place of one width for all (quant_core.bit_budget): each unit of linears gets
    the scheme that costs least on the calibration windows within the budget."""

    bits_per_weight: Annotated[float | None, Flag("--budget-bits", metavar="BITS")] = Field(
        None,
        ge=1,
        le=16,
        title="Budget: bits per weight",
        description="average storage bits per weight of the block linears, scales and zero points included "
        "(uniform W4 in groups of 64: 4.31, or 4.25 symmetric)",
    )
    size_mb: Annotated[float | None, Flag("--budget-mb", metavar="MB")] = Field(
        None,
        gt=0,
        title="Budget: checkpoint size (MB)",
        description="the whole checkpoint in megabytes (10^6 bytes): the block linears take what the tensors "
        "stored in floats (embeddings, head, norms) leave",
    )
    widths: Annotated[list[int], Flag("--budget-widths", "repeat", "BITS")] = Field(
        default_factory=lambda: [2, 3, 4, 8],
        min_length=1,
        max_length=MAX_BITS,
        title="Budget: widths",
        description="the bit widths a unit may take",
    )
    group_sizes: Annotated[list[int], Flag("--budget-group-sizes", "repeat", "N")] = Field(
        default_factory=lambda: [32, 64, 128],
        min_length=1,
        max_length=8,
        title="Budget: group sizes",
        description="the group sizes a unit may take (each with every width)",
    )
    samples: Annotated[int, Flag("--budget-samples")] = Field(
        8,
        ge=1,
        le=MAX_SAMPLES,
        title="Budget: sensitivity windows",
        description="calibration windows the sensitivity pass measures each candidate on",
    )

    @field_validator("widths")
    @classmethod
    def _widths_in_range(cls, widths: list[int]) -> list[int]:
        if any(not MIN_BITS <= bits <= MAX_BITS for bits in widths):
            raise ValueError(f"every width must be from {MIN_BITS} to {MAX_BITS} bits")
        return widths

    @field_validator("group_sizes")
    @classmethod
    def _positive_groups(cls, sizes: list[int]) -> list[int]:
        if any(size < 1 for size in sizes):
            raise ValueError("every group size must be a positive number of columns")
        return sizes

    @model_validator(mode="after")
    def _one_measure(self) -> BudgetSettings:
        if (self.bits_per_weight is None) == (self.size_mb is None):
            raise ConfigError("a budget is bits_per_weight or size_mb: give exactly one", "budget.bits_per_weight")
        return self


class JobSettings(_Section):
    """What determines a quantization run (with the seed, its result)."""

    # the schema a request is written to, also where FastAPI meets this model as a response: the options'
    # models, not the plain mappings they are serialized as
    model_config = ConfigDict(extra="forbid", json_schema_mode_override="validation")

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
    method: Annotated[str, Flag("--method"), Choices(lambda: sorted(METHOD_OPTIONS))] = Field(
        "omniquant", max_length=64, description="calibration method (swquant methods)"
    )
    method_options: Annotated[
        AnyMethodOptions, Flag("--method-opt", "key_value"), typed_by("method", METHOD_OPTIONS.get)
    ] = Field(
        default_factory=dict,
        validate_default=True,
        description='the method\'s options (swquant methods), e.g. {"epochs": 20}',
    )
    loss: Annotated[str | None, Flag("--loss"), Choices(lambda: list(LOSS_NAMES))] = Field(
        None, max_length=64, description="training loss; unset: the method's own (swquant methods)"
    )
    loss_options: Annotated[LossOptions, Flag("--loss-opt", "key_value"), options_of(LossOptions)] = Field(
        default_factory=dict,
        validate_default=True,
        description='the loss\'s options (swquant methods), e.g. {"sw_num_projections": 16}',
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
    finetune: Annotated[FinetuneOptions, Flag("--finetune", "key_value"), options_of(FinetuneOptions)] = Field(
        default_factory=dict,
        validate_default=True,
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
    budget: BudgetSettings | None = None
    world_size: Annotated[int, Flag("--world-size")] = Field(
        1,
        ge=1,
        le=MAX_WORLD_SIZE,
        title="Ranks",
        description="processes the calibration windows are split over (one per device, or per share of the CPU "
        "cores), on torch.distributed, for every method; 1: one process",
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        method_options_type(name)
        return name

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, name: str | None) -> str | None:
        return name if name is None else known_loss(name)

    @field_serializer("method_options", "loss_options", "finetune")
    def _as_given(self, options: Options) -> dict[str, Any]:
        """Options as the user gave them: defaults stay implicit, as in the request."""
        return options.model_dump(mode="json", exclude_unset=True)

    @model_validator(mode="after")
    def _combinations(self) -> JobSettings:
        """What no single field can check: settings that cannot run together, each refusal naming the
        setting to change; an unset loss becomes the method's own."""
        method = METHOD_OPTIONS[self.method]
        if self.loss is None:
            self.loss = method.default_loss
        self._check_exports()
        self._check_streaming(method.whole_model)
        seq_len = self.calibration.seq_len
        block_size = self.loss_options.sw_block_size
        if block_size is not None and seq_len % block_size:
            raise ConfigError(BLOCK_SIZE_ERROR, "loss_options.sw_block_size")
        if any(seq_len % size for size in token_blocks(self.loss, self.loss_options)):
            raise ConfigError(SCALE_ERROR, "loss_options.sw_scales")
        if self.method_options.rotates and "pack_quantized" in self.export_formats:
            raise ConfigError(
                f"{UNPACKABLE_ROTATION}; export fake_quant only, or use incoherence: none",
                f"method_options.{method.rotation_option}",
            )
        if self.finetune.enabled and method.whole_model:
            raise ConfigError(
                f"end-to-end tuning needs blockwise calibration: {self.method} already trains the whole model",
                "finetune.epochs",
            )
        if self.calibration.text in self.evaluation.texts:  # the same file under another name is refused at load
            raise calibrated_on_evaluation(self.calibration.text)
        self._check_world_size()
        self._check_budget(method.whole_model)
        return self

    def _check_budget(self, whole_model: bool) -> None:
        """What an allocation cannot run with yet, or cannot hold: each refusal names its setting."""
        if self.budget is None:
            return
        refusals = (
            (
                whole_model,
                "method",
                f"{self.method} trains the whole model at once: a size budget needs blockwise calibration",
            ),
            (
                self.lazy_load,
                "lazy_load",
                "a size budget measures every block at every width: not available with lazy_load yet",
            ),
            (
                self.world_size > 1,
                "world_size",
                "a size budget runs its sensitivity pass in one process: use world_size 1",
            ),
            (
                "transformers" in self.targets and not self.symmetric,
                "symmetric",
                "transformers loads a checkpoint of several schemes with symmetric grids only: set symmetric: true",
            ),
        )
        for refused, field, message in refusals:
            if refused:
                raise ConfigError(message, field)
        widest = max(self.budget.widths)
        for name, value in (("dtype", self.dtype), ("export_dtype", self.export_dtype)):
            if value != "auto" and not holds_grid(value, widest, self.symmetric):
                raise ConfigError(
                    f"{name} {value} cannot hold the budget's W{widest} grid: drop {widest} from budget.widths or use "
                    "float16 or float32",
                    name,
                )

    def _check_exports(self) -> None:
        if AUTO_EXPORT in self.export_formats and len(set(self.export_formats)) > 1:
            raise ConfigError("export_formats: auto chooses the format itself; give it alone", "export_formats")
        for name, value in (("dtype", self.dtype), ("export_dtype", self.export_dtype)):
            if value != "auto" and not holds_grid(value, self.bits, self.symmetric):
                grid = f"W{self.bits}{' symmetric' if self.symmetric else ''}"
                raise ConfigError(
                    f"{name} {value} cannot hold the {grid} grid: a stored weight would come back a code away "
                    "from its own; use float16 or float32",
                    name,
                )

    def _check_streaming(self, whole_model: bool) -> None:
        """Streamed blocks (``lazy_load``) never hold the whole model: refuse what needs it."""
        if not self.lazy_load:
            return
        if self.evaluation.lm_eval is not None:
            raise ConfigError(
                "lm-eval needs the whole model in memory; it is not available with lazy_load", "lazy_load"
            )
        if self.export_dtype not in ("auto", self.dtype):
            raise ConfigError(
                f"streamed blocks are written as calibrated, in dtype {self.dtype}: with lazy_load, export_dtype "
                f"must be auto or {self.dtype}",
                "export_dtype",
            )
        if self.rotation != "none":
            raise ConfigError(
                "rotation rewrites the whole model before calibration; it cannot stream blocks", "rotation"
            )
        if "gguf" in self.export_formats:
            raise ConfigError("gguf export is not available with lazy_load yet", "export_formats")
        if "llama.cpp" in self.targets:
            raise ConfigError("llama.cpp runs the GGUF export, not available with lazy_load yet", "targets")
        if whole_model:
            raise ConfigError(f"{self.method} trains the whole model at once; it cannot stream blocks", "lazy_load")

    def _check_world_size(self) -> None:
        check_ranks(
            self.world_size,
            self.calibration.n_samples,
            lm_eval=self.evaluation.lm_eval is not None,
            streamed_tuning=self.lazy_load and self.finetune.enabled,
        )


def check_ranks(world_size: int, n_samples: int, *, lm_eval: bool, streamed_tuning: bool) -> None:
    """Refuse up front what several ranks cannot run yet, naming the setting that asks for it; also where
    torchrun, not the settings, gives the world size (quant_core.launch)."""
    if world_size == 1:
        return
    ranks = f"world_size {world_size}"
    if n_samples < world_size:
        raise ConfigError(f"{ranks} needs at least one calibration window per rank", "calibration.n_samples")
    if lm_eval:
        raise ConfigError(f"{ranks}: lm-eval runs in one process; use world_size 1", "evaluation.lm_eval")
    if streamed_tuning:
        raise ConfigError(
            f"{ranks}: end-to-end tuning of a streamed (lazy_load) model runs in one process; use world_size 1",
            "finetune.epochs",
        )


def calibrated_on_evaluation(name: str) -> ConfigError:
    """The refusal of a job whose calibration text is one of its evaluation texts."""
    return ConfigError(
        f"calibration.text is also the evaluation text {name!r}: the report would score the model on the text it "
        "was fitted to; calibrate or evaluate on another text",
        "calibration.text",
    )


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
    """The section a field holds (``LmEvalSettings | None`` counts), else None: options models
    (``method_options``) are one setting each, a mapping on the command line and in the form."""
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, _Section):
            return candidate
    return None


def validated(model: type[SettingsT], body: dict[str, Any]) -> SettingsT:
    """``model`` from a body, pydantic's first complaint as a ConfigError naming its field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise config_error(exc) from exc
