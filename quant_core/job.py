"""A quantization job's settings: one validated description shared by the CLI, the report and the service."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import torch

from quant_core.absorbed_rotation import ROTATIONS
from quant_core.accuracy import LmEvalSpec
from quant_core.corpus import calibrated_on_evaluation
from quant_core.errors import ConfigError
from quant_core.export_dtype import EXPORT_DTYPES, holds_grid
from quant_core.finetune import FinetuneOptions
from quant_core.incoherence import UNPACKABLE_ROTATION
from quant_core.losses import BLOCK_SIZE_ERROR, SCALE_ERROR, Loss, build_loss
from quant_core.methods import QuantMethod, build_method
from quant_core.methods.base import method_class
from quant_core.quantizer import QuantSpec
from quant_core.runtimes import RUNTIMES


@contextmanager
def registry_fields(name_field: str, options_field: str) -> Iterator[None]:
    """Place a registry's ConfigError under the job's field names.

    Registries report an unknown name as field ``method`` and a bad option by its bare name; in a job
    those are ``loss``/``method`` and ``loss_options.<name>``/``method_options.<name>``.
    """
    try:
        yield
    except ConfigError as exc:
        field_name = name_field if exc.field == "method" else f"{options_field}.{exc.field}"
        raise ConfigError(str(exc), field_name) from exc


def _positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer", name)


@dataclass(frozen=True)
class CalibSpec:
    """Calibration data: a bundled corpus name or a text file, cut into seeded random windows."""

    text: str = "austen"
    n_samples: int = 128
    seq_len: int = 512
    # mixtures of experts: fewer routed tokens than this and an expert's statistics come from every
    # token (quant_core.experts); None: the expert's input width
    expert_min_tokens: int | None = None

    def __post_init__(self) -> None:
        _positive_int(self.n_samples, "calib.n_samples")
        _positive_int(self.seq_len, "calib.seq_len")


@dataclass(frozen=True)
class EvalSpec:
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
                raise ConfigError(f"unknown lm_eval option(s): {', '.join(sorted(unknown))}", "eval.lm_eval")
            object.__setattr__(self, "lm_eval", LmEvalSpec(**self.lm_eval))
        if self.seq_len is not None:
            _positive_int(self.seq_len, "eval.seq_len")
        if self.max_windows is not None:
            _positive_int(self.max_windows, "eval.max_windows")
        _positive_int(self.batch_size, "eval.batch_size")


# ``auto``: the packed checkpoint wherever compressed-tensors can hold the result, else the
# fake-quantized one (rotated weights, streamed blocks, layers the format refuses); see
# pipeline.export_formats_for. ``gguf``: llama.cpp's file (quant_core.gguf_export).
ExportFormat = Literal["auto", "fake_quant", "pack_quantized", "gguf"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
# Dtype the model is loaded and run in. Quantization parameters, Hessians and losses stay in float32
# whatever this is; bfloat16 halves the memory of weights and activations on a GPU.
DtypeName = Literal["float32", "bfloat16", "float16"]
DTYPES = dict(zip(get_args(DtypeName), (torch.float32, torch.bfloat16, torch.float16), strict=True))


@dataclass(frozen=True)
class JobSpec:
    """Everything that determines a quantization run; with the seed, it fixes the result."""

    model: str
    quant: QuantSpec = field(default_factory=QuantSpec)
    method: str = "omniquant"
    method_options: Mapping[str, Any] = field(default_factory=dict)
    loss: str | None = None  # None: the method's own default (l2 for TesseraQ, mse otherwise)
    loss_options: Mapping[str, Any] = field(default_factory=dict)
    calib: CalibSpec = field(default_factory=CalibSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    lazy_load: bool = False  # stream blocks from the safetensors shards: for models larger than memory
    trust_remote_code: bool = False
    export_formats: tuple[str, ...] = ("auto",)
    export_dtype: str = "auto"  # the checkpoint's floats (quant_core.export_dtype)
    targets: tuple[str, ...] = ()  # runtimes the checkpoint must run in, scored there after the job
    rotation: str = "none"  # a rotation absorbed into the weights before calibration (quant_core.absorbed_rotation)
    finetune: Mapping[str, Any] = field(default_factory=dict)  # end-to-end tuning after calibration
    world_size: int = 1  # processes the calibration windows are split over (quant_core.distributed)

    def __post_init__(self) -> None:
        unknown = [f for f in self.export_formats if f not in EXPORT_FORMATS]
        if unknown or not self.export_formats:
            raise ConfigError(f"export_formats must be some of: {', '.join(EXPORT_FORMATS)}", "export_formats")
        if "auto" in self.export_formats and len(self.export_formats) > 1:
            raise ConfigError("export_formats: auto chooses the format itself; give it alone", "export_formats")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError("seed must be an integer", "seed")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError("device must be 'cpu', 'cuda' or 'cuda:N'", "device")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of: {', '.join(DTYPES)}", "dtype")
        if self.lazy_load and self.eval.lm_eval is not None:
            raise ConfigError(
                "lm-eval needs the whole model in memory; it is not available with lazy_load", "lazy_load"
            )
        if self.export_dtype not in EXPORT_DTYPES:
            raise ConfigError(f"export_dtype must be one of: {', '.join(EXPORT_DTYPES)}", "export_dtype")
        for name, value in (("dtype", self.dtype), ("export_dtype", self.export_dtype)):
            if value != "auto" and not holds_grid(getattr(torch, value), self.quant):
                raise ConfigError(
                    f"{name} {value} cannot hold the {self.quant.label} grid: a stored weight would come back a "
                    "code away from its own; use float16 or float32",
                    name,
                )
        if self.lazy_load and self.export_dtype not in ("auto", self.dtype):
            raise ConfigError(
                f"streamed blocks are written as calibrated, in dtype {self.dtype}: with lazy_load, export_dtype "
                f"must be auto or {self.dtype}",
                "export_dtype",
            )
        if self.calib.text in self.eval.texts:  # the same file under another name is refused at load
            raise calibrated_on_evaluation(self.calib.text)
        if self.rotation not in ROTATIONS:
            raise ConfigError(f"rotation must be one of: {', '.join(ROTATIONS)}", "rotation")
        if self.lazy_load and self.rotation != "none":
            raise ConfigError(
                "rotation rewrites the whole model before calibration; it cannot stream blocks", "rotation"
            )
        unknown = [t for t in self.targets if t not in RUNTIMES]
        if unknown:
            raise ConfigError(f"targets must be some of: {', '.join(RUNTIMES)}", "targets")
        if self.lazy_load and "gguf" in self.export_formats:
            raise ConfigError("gguf export is not available with lazy_load yet", "export_formats")
        if self.lazy_load and "llama.cpp" in self.targets:
            raise ConfigError("llama.cpp runs the GGUF export, not available with lazy_load yet", "targets")
        if self.loss is None:
            object.__setattr__(self, "loss", method_class(self.method).default_loss)
        block_size = self.loss_options.get("sw_block_size")
        if isinstance(block_size, int) and block_size > 0 and self.calib.seq_len % block_size:
            raise ConfigError(BLOCK_SIZE_ERROR, "loss_options.sw_block_size")
        method = self.build_method()
        if any(self.calib.seq_len % size for size in method.loss.block_sizes):  # a multi-scale loss's scales
            raise ConfigError(SCALE_ERROR, "loss_options.sw_scales")
        if method.whole_model and self.lazy_load:
            raise ConfigError(f"{self.method} trains the whole model at once; it cannot stream blocks", "lazy_load")
        if method.rotates and "pack_quantized" in self.export_formats:
            raise ConfigError(
                f"{UNPACKABLE_ROTATION}; export fake_quant only, or use incoherence: none",
                f"method_options.{method.rotation_option}",
            )

        if self.build_finetune().enabled and method.whole_model:
            raise ConfigError(
                f"end-to-end tuning needs blockwise calibration: {self.method} already trains the whole model",
                "finetune.epochs",
            )
        self._check_world_size()

    def _check_world_size(self) -> None:
        """Refuse up front what several ranks cannot run yet, naming the setting that asks for it."""
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise ConfigError("world_size must be a positive integer", "world_size")
        if self.world_size == 1:
            return
        ranks = f"world_size {self.world_size}"
        if self.calib.n_samples < self.world_size:
            raise ConfigError(f"{ranks} needs at least one calibration window per rank", "calib.n_samples")
        if self.eval.lm_eval is not None:
            raise ConfigError(f"{ranks}: lm-eval runs in one process; use world_size 1", "eval.lm_eval")
        if self.lazy_load and self.build_finetune().enabled:
            raise ConfigError(
                f"{ranks}: end-to-end tuning of a streamed (lazy_load) model runs in one process; use world_size 1",
                "finetune.epochs",
            )

    @property
    def resumable(self) -> bool:
        """Whether ``run_job`` can keep per-block progress for this job: any blockwise method."""
        return not method_class(self.method).whole_model

    def build_loss(self) -> Loss:
        """The training loss; its direction draws are seeded by the job seed unless set explicitly."""
        with registry_fields("loss", "loss_options"):
            return build_loss(
                self.loss or method_class(self.method).default_loss, **{"seed": self.seed, **self.loss_options}
            )

    def build_method(self) -> QuantMethod:
        loss = self.build_loss()
        with registry_fields("method", "method_options"):
            return build_method(self.method, self.quant, loss, self.method_options)

    def build_finetune(self) -> FinetuneOptions:
        with registry_fields("finetune", "finetune"):
            return FinetuneOptions.from_dict(self.finetune)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
