"""The end-to-end tuning stage's settings, declared without torch (a request is checked without it)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from quant_core.options import MAX_SAMPLES, Count, Options, PositiveCount, PositiveNumber, one_of

if TYPE_CHECKING:
    from torch import Tensor

MODEL_LOSSES = ("kd", "kd_sw")  # losses whose model_objective compares next-token distributions
PRECISIONS = ("auto", "bfloat16", "float32")


class FinetuneOptions(Options):
    """The stage's settings; ``epochs: 0`` (the default) skips it.

    The learning rates were chosen on held-out windows of the calibration text, never on an
    evaluation text (``python -m bench.finetune_lr``; the sweep is in bench/HISTORY.md, "End-to-end
    tuning after the blocks").
    """

    what = "finetune option"

    epochs: Count = Field(0, description="passes over the calibration windows; 0 skips end-to-end tuning")
    lr: PositiveNumber = Field(3e-3, description="learning rate of the log step sizes (relative change per step)")
    norm_lr: PositiveNumber = Field(3e-4, description="learning rate of the normalization weights")
    batch_size: PositiveCount = Field(1, description="windows per optimizer step")
    n_samples: int = Field(
        0,
        ge=0,
        le=MAX_SAMPLES,
        strict=True,
        description="calibration windows the tuning sees; 0: the blocks' windows (calibration.n_samples); more: "
        "those and further ones drawn the same way, while the blocks still see calibration.n_samples",
    )
    loss: Annotated[str, one_of(*MODEL_LOSSES)] = Field(
        "kd", description="kd: KL divergence of the next-token distributions; kd_sw adds SW on the last hidden states"
    )
    precision: Annotated[str, one_of(*PRECISIONS)] = Field(
        "auto",
        description="the forward and backward matmuls' type (step sizes, optimizer and loss stay float32); "
        "auto: bfloat16 where the device computes it natively, else float32",
    )

    @property
    def enabled(self) -> bool:
        return self.epochs > 0

    def steps(self, windows: int) -> int:
        """Optimizer steps over ``windows`` windows: a batch a step, every epoch."""
        return self.epochs * math.ceil(windows / self.batch_size)

    def windows_to_draw(self, calibration: int) -> int:
        """How many calibration windows a job draws when its blocks see ``calibration`` of them."""
        return max(calibration, self.n_samples) if self.enabled else calibration

    def split(self, drawn: Tensor, calibration: int) -> tuple[Tensor, Tensor]:
        """The blocks' windows (the first ``calibration`` of ``drawn``, :meth:`windows_to_draw`) and the tuning's.

        Tuning on more windows than the blocks see buys the gains of more data where they are
        cheapest: a window costs the tuning one step, and the blockwise method a pass through every
        block (GPTQ's Hessians) besides (bench/HISTORY.md, "Tuning on more windows than the blocks see").
        """
        return drawn[:calibration], drawn[: self.n_samples or calibration]
