"""A quantization job as the pipeline runs it: the validated settings with paths resolved and a device.

Requests are checked once, as :class:`~quant_core.job_settings.JobSettings`, where they enter;
:meth:`JobSpec.from_settings` carries the same option objects on. A spec built in code (a test, a
bench, a report read back) may name its options as mappings; they become the same models here, with
the same messages, and nothing else is checked again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from quant_core.accuracy import LmEvalSpec
from quant_core.bit_budget import BudgetSpec
from quant_core.errors import ConfigError
from quant_core.finetune_options import FinetuneOptions
from quant_core.job_settings import JobSettings
from quant_core.loss_options import LossOptions, known_loss
from quant_core.losses import Loss, loss_from_options
from quant_core.method_options import METHOD_OPTIONS, MethodOptions, method_options_type
from quant_core.methods import QuantMethod, build_method
from quant_core.options import Options, as_options
from quant_core.quantizer import QuantSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPTION_FIELDS = ("method_options", "loss_options", "finetune")


@dataclass(frozen=True)
class CalibrationSpec:
    """Calibration data: a bundled corpus name or a text file, cut into seeded random windows."""

    text: str = "austen"
    n_samples: int = 128
    seq_len: int = 512
    # mixtures of experts: fewer routed tokens than this and an expert's statistics come from every
    # token (quant_core.experts); None: the expert's input width
    expert_min_tokens: int | None = None


@dataclass(frozen=True)
class EvaluationSpec:
    """Perplexity evaluation: texts, window length (default: the calibration length), optional cap."""

    texts: tuple[str, ...] = ("persuasion",)
    seq_len: int | None = None
    max_windows: int | None = None
    batch_size: int = 4
    lm_eval: LmEvalSpec | None = None  # lm-evaluation-harness tasks, on the float and the quantized model

    def __post_init__(self) -> None:
        if isinstance(self.lm_eval, Mapping):  # from a report or a YAML file
            unknown = set(self.lm_eval) - set(LmEvalSpec.__dataclass_fields__)
            if unknown:
                raise ConfigError(f"unknown lm_eval option(s): {', '.join(sorted(unknown))}", "evaluation.lm_eval")
            tasks = self.lm_eval.get("tasks", ())
            tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
            object.__setattr__(self, "lm_eval", LmEvalSpec(**{**self.lm_eval, "tasks": tasks}))


@dataclass(frozen=True)
class JobSpec:
    """Everything that determines a quantization run; with the seed, it fixes the result."""

    model: str
    quant: QuantSpec = field(default_factory=QuantSpec)
    method: str = "omniquant"
    method_options: MethodOptions = field(default_factory=MethodOptions)  # bare: the method's defaults
    loss: str = ""  # empty: the method's own default (l2 for TesseraQ, mse otherwise)
    loss_options: LossOptions = field(default_factory=LossOptions)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    lazy_load: bool = False  # stream blocks from the safetensors shards: for models larger than memory
    trust_remote_code: bool = False
    export_formats: tuple[str, ...] = ("auto",)
    export_dtype: str = "auto"  # the checkpoint's floats (quant_core.export_dtype)
    targets: tuple[str, ...] = ()  # runtimes the checkpoint must run in, scored there after the job
    rotation: str = "none"  # a rotation absorbed into the weights before calibration (quant_core.absorbed_rotation)
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)  # end-to-end tuning after calibration
    world_size: int = 1  # processes the calibration windows are split over (quant_core.distributed)
    budget: BudgetSpec | None = (
        None  # a size budget allocated over schemes instead of ``quant`` (quant_core.bit_budget)
    )

    def __post_init__(self) -> None:
        if isinstance(self.budget, Mapping):  # from a report
            fields = {key: tuple(value) if isinstance(value, list) else value for key, value in self.budget.items()}
            object.__setattr__(self, "budget", BudgetSpec(**fields))
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError("device must be 'cpu', 'cuda' or 'cuda:N'", "device")
        declared = method_options_type(self.method)
        if not self.loss:
            object.__setattr__(self, "loss", declared.default_loss)
        known_loss(self.loss)
        kinds: tuple[type[Options], ...] = (declared, LossOptions, FinetuneOptions)
        for name, kind in zip(OPTION_FIELDS, kinds, strict=True):
            given = getattr(self, name)  # a bare MethodOptions (the default) stands for the method's defaults
            object.__setattr__(self, name, as_options(kind, {} if type(given) is MethodOptions else given, name))

    @classmethod
    def from_settings(
        cls, settings: JobSettings, resolve: Callable[[str], str] = lambda s: s, device: str = "cpu"
    ) -> JobSpec:
        """The runnable spec of validated ``settings``; ``resolve`` maps ``upload:<id>`` references to
        local paths on a worker."""
        calibration, evaluation, budget = settings.calibration, settings.evaluation, settings.budget
        lm_eval, lm_eval_spec = evaluation.lm_eval, None
        if lm_eval is not None:
            lm_eval_spec = LmEvalSpec(tuple(lm_eval.tasks), **lm_eval.model_dump(exclude={"tasks"}))
        return cls(
            model=resolve(settings.model),
            quant=QuantSpec(bits=settings.bits, symmetric=settings.symmetric, group_size=settings.group_size),
            method=settings.method,
            method_options=settings.method_options,
            loss=settings.loss or "",
            loss_options=settings.loss_options,
            calibration=CalibrationSpec(
                text=resolve(calibration.text),
                n_samples=calibration.n_samples,
                seq_len=calibration.seq_len,
                expert_min_tokens=calibration.expert_min_tokens,
            ),
            evaluation=EvaluationSpec(
                texts=tuple(resolve(t) for t in evaluation.texts),
                seq_len=evaluation.seq_len,
                max_windows=evaluation.max_windows,
                batch_size=evaluation.batch_size,
                lm_eval=lm_eval_spec,
            ),
            seed=settings.seed,
            device=device,
            dtype=settings.dtype,
            lazy_load=settings.lazy_load,
            export_formats=tuple(dict.fromkeys(settings.export_formats)),
            export_dtype=settings.export_dtype,
            targets=tuple(dict.fromkeys(settings.targets)),
            rotation=settings.rotation,
            finetune=settings.finetune,
            world_size=settings.world_size,
            budget=None
            if budget is None
            else BudgetSpec(
                **{**budget.model_dump(), "widths": tuple(budget.widths), "group_sizes": tuple(budget.group_sizes)}
            ),
        )

    @property
    def schemes(self) -> list[QuantSpec]:
        """Every scheme a linear of this job may get: ``quant``, or the budget's candidates."""
        return [self.quant] if self.budget is None else self.budget.candidates(self.quant.symmetric)

    @property
    def widest(self) -> QuantSpec:
        """The scheme with the most bits, the one a dtype must hold."""
        return max(self.schemes, key=lambda spec: spec.bits)

    @property
    def resumable(self) -> bool:
        """Whether ``run_job`` can keep per-block progress for this job: any blockwise method."""
        return not METHOD_OPTIONS[self.method].whole_model

    def build_loss(self) -> Loss:
        """The training loss; its direction draws are seeded by the job seed unless set explicitly."""
        options = self.loss_options
        if "seed" not in options.model_fields_set:
            options = options.model_copy(update={"seed": self.seed})
        return loss_from_options(self.loss, options)

    def build_method(self) -> QuantMethod:
        return build_method(self.method, self.quant, self.build_loss(), self.method_options)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the report's ``spec``, the resume fingerprint); options as given, defaults implicit."""
        data = asdict(self)
        for name in OPTION_FIELDS:
            options: Options = getattr(self, name)
            data[name] = options.model_dump(mode="json", exclude_unset=True)
        return data
