"""OmniQuant's learnable weight clipping (LWC), with any alignment loss.

Shao et al., "OmniQuant: Omnidirectionally Calibrated Quantization for LLMs" (ICLR 2024), Sec. 3.2:
each output channel (or group) gets two learnable factors that shrink the weight range before
rounding, ``low * sigmoid(gamma)`` and ``high * sigmoid(beta)``. They are trained with AdamW so that
the quantized block's output matches the full-precision target under the chosen loss, with
straight-through rounding. Here each factor is ``sigmoid(theta) / sigmoid(theta0)``, so a factor of 1
is the full range and the sigmoid keeps a useful gradient around theta0.

Two schedules:

- ``budget`` (default): training starts from the searched clipping (:mod:`quant_core.clip_search`),
  which is already most of what clipping can give, and refines it for ``steps`` AdamW steps
  (default 64 a block) with 10% linear warm-up and cosine decay. The learning rate follows the step
  count, ``lr = LR_STEP_PRODUCT / max(steps, 64)``: longer runs take smaller steps so the factors
  travel about the same distance in any budget, shorter ones keep lr 0.1 (larger steps overshoot
  on one or two windows), and the decay lets a short run settle.
- ``paper``: the published setting: the full range at start, 20 epochs (40 at 2 bits), constant
  lr 1e-2.

Any of ``epochs``/``steps``, ``lr`` and ``init`` given explicitly overrides the schedule's choice.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from quant_core.method_options import OmniQuantOptions
from quant_core.methods.base import BlockData, QuantMethod, register_method, write_quantized
from quant_core.methods.clipping import block_clip_factors, mean_ratio
from quant_core.methods.training import cosine_with_warmup, epochs_to_steps, train_parameters
from quant_core.model_structure import quantizable_linears, stored_layout, weight_matrix
from quant_core.quantizer import QuantSpec, fake_quantize, grid_params, num_groups

BUDGET_STEPS = 64
LR_STEP_PRODUCT = 6.4  # lr x steps of the budget schedule: lr 0.1 on 64 steps (and fewer), 0.025 on 256
WARMUP_SHARE = 0.1
PAPER_LR = 1e-2


@register_method
class OmniQuant(QuantMethod):
    options_type = OmniQuantOptions
    needs_targets = True
    options: OmniQuantOptions

    @property
    def paper(self) -> bool:
        return self.options.schedule == "paper"

    def steps(self, data: BlockData) -> int:
        """Optimizer steps for this block under the options and schedule."""
        if self.options.steps is not None:
            return self.options.steps
        epochs = self.options.epochs
        if epochs is None and self.paper:
            narrowest = min((spec.bits for spec in data.schemes.values()), default=self.spec.bits)
            epochs = 40 if narrowest <= 2 else 20
        if epochs is not None:
            return epochs_to_steps(epochs, data, self.options.batch_size)
        return BUDGET_STEPS

    def learning_rate(self, steps: int) -> float:
        if self.options.lr is not None:
            return self.options.lr
        return PAPER_LR if self.paper else LR_STEP_PRODUCT / max(steps, BUDGET_STEPS)

    def calibrate(self, block: nn.Module, data: BlockData) -> dict[str, Any]:
        layers = quantizable_linears(block)
        weights = {name: weight_matrix(layer).detach() for name, layer in layers.items()}
        schemes = self.block_schemes(block, data)
        init = self.options.init or ("full" if self.paper else "clip_search")
        start = block_clip_factors(block, data, schemes) if init == "clip_search" else {}
        logits = {name: self._initial_logits(w, schemes[name], start.get(name)) for name, w in weights.items()}
        steps = self.steps(data)
        lr = self.learning_rate(steps)
        optimizer = torch.optim.AdamW(
            [t for pair in logits.values() for t in pair], lr=lr, weight_decay=self.options.weight_decay
        )
        warmup = 0 if self.paper else math.ceil(WARMUP_SHARE * steps)
        log = train_parameters(
            self.loss,
            block,
            data,
            lambda: {
                f"{name}.weight": stored_layout(
                    layers[name], self._clipped(weights[name], schemes[name], *logits[name], ste=True)
                )
                for name in layers
            },
            optimizer,
            steps,
            self.options.batch_size,
            "OmniQuant",
            None if self.paper else lambda step: cosine_with_warmup(step, warmup, steps),
        )
        with torch.no_grad():
            final = {
                name: (
                    self._clipped(weights[name], schemes[name], *logits[name], ste=False),
                    *grid_params(weights[name], schemes[name], *self._factors(*logits[name])),
                )
                for name in layers
            }
        write_quantized(block, final)
        stats: dict[str, Any] = {"init": init, "steps": steps, "lr": lr, "epoch_losses": log.epoch_losses}
        if start:
            stats["start_clip_ratio"] = mean_ratio(start)
        if log.gradient_share:
            stats["gradient_share"] = log.gradient_share
        return stats

    def _initial_logits(self, weight: Tensor, spec: QuantSpec, ratio: Tensor | None) -> tuple[Tensor, Tensor]:
        """Logits whose factors are ``ratio`` (per row and group), or 1 (the full range) without one."""
        shape = (weight.shape[0], num_groups(weight.shape[1], spec.group_size), 1)
        init = torch.full(shape, float(self.options.init_logit), device=weight.device, dtype=torch.float32)
        if ratio is not None:
            target = (ratio.to(init) * self._reference()).clamp(1e-6, 1 - 1e-6)
            init = torch.log(target / (1 - target))
        return init.clone().requires_grad_(True), init.clone().requires_grad_(True)

    def _reference(self) -> float:
        """``sigmoid(theta0)``: the sigmoid value that means a factor of 1."""
        return 1.0 / (1.0 + math.exp(-self.options.init_logit))

    def _factors(self, low_logit: Tensor, high_logit: Tensor) -> tuple[Tensor, Tensor]:
        reference = self._reference()
        return torch.sigmoid(low_logit) / reference, torch.sigmoid(high_logit) / reference

    def _clipped(self, weight: Tensor, spec: QuantSpec, low_logit: Tensor, high_logit: Tensor, ste: bool) -> Tensor:
        low, high = self._factors(low_logit, high_logit)
        return fake_quantize(weight.float(), spec, low, high, ste=ste).to(weight.dtype)
