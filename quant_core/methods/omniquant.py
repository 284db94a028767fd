"""OmniQuant's learnable weight clipping (LWC), with any alignment loss.

Shao et al., "OmniQuant: Omnidirectionally Calibrated Quantization for LLMs" (ICLR 2024), Sec. 3.2:
each output channel (or group) gets two learnable factors that shrink the weight range before
rounding, ``low * sigmoid(gamma)`` and ``high * sigmoid(beta)``. They are trained with AdamW so that
the quantized block's output matches the full-precision target under the chosen loss, with
straight-through rounding. Here each factor is ``sigmoid(theta) / sigmoid(theta0)`` so training starts
at exactly the full range (round-to-nearest) and keeps the sigmoid's useful gradient around theta0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from quant_core.methods.base import BlockData, MethodOptions, QuantMethod, register_method, write_quantized
from quant_core.methods.training import epochs_to_steps, train_parameters
from quant_core.model_structure import quantizable_linears, stored_layout, weight_matrix
from quant_core.quantizer import fake_quantize, grid_params, num_groups


@dataclass(frozen=True)
class OmniQuantOptions(MethodOptions):
    """``epochs=None`` picks the paper's schedule: 40 epochs at 2 bits, 20 above."""

    epochs: int | None = None
    lr: float = 1e-2
    weight_decay: float = 0.0
    batch_size: int = 1
    init_logit: float = 4.0

    def __post_init__(self) -> None:
        self.require("int>=0", "epochs")
        self.require("int>0", "batch_size")
        self.require("num>0", "lr")
        self.require("num>=0", "weight_decay")
        self.require("num", "init_logit")


@register_method
class OmniQuant(QuantMethod):
    name = "omniquant"
    options_type = OmniQuantOptions
    options: OmniQuantOptions

    @property
    def epochs(self) -> int:
        if self.options.epochs is not None:
            return self.options.epochs
        return 40 if self.spec.bits <= 2 else 20

    def calibrate(self, block: nn.Module, data: BlockData) -> dict[str, Any]:
        layers = quantizable_linears(block)
        weights = {name: weight_matrix(layer).detach() for name, layer in layers.items()}
        logits = {name: self._initial_logits(w) for name, w in weights.items()}
        optimizer = torch.optim.AdamW(
            [t for pair in logits.values() for t in pair], lr=self.options.lr, weight_decay=self.options.weight_decay
        )
        epoch_losses = train_parameters(
            self.loss,
            data,
            lambda: {
                f"{name}.weight": stored_layout(layers[name], self._clipped(weights[name], *logits[name], ste=True))
                for name in layers
            },
            optimizer,
            epochs_to_steps(self.epochs, data, self.options.batch_size),
            self.options.batch_size,
            "OmniQuant",
        )
        with torch.no_grad():
            final = {
                name: (
                    self._clipped(weights[name], *logits[name], ste=False),
                    *grid_params(weights[name], self.spec, *self._factors(*logits[name])),
                )
                for name in layers
            }
        write_quantized(block, final)
        return {"epochs": self.epochs, "epoch_losses": epoch_losses}

    def _initial_logits(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        shape = (weight.shape[0], num_groups(weight.shape[1], self.spec.group_size), 1)
        init = torch.full(shape, float(self.options.init_logit), device=weight.device, dtype=torch.float32)
        return init.clone().requires_grad_(True), init.clone().requires_grad_(True)

    def _factors(self, low_logit: Tensor, high_logit: Tensor) -> tuple[Tensor, Tensor]:
        reference = 1.0 / (1.0 + math.exp(-self.options.init_logit))  # sigmoid(theta0): factor 1 at init
        return torch.sigmoid(low_logit) / reference, torch.sigmoid(high_logit) / reference

    def _clipped(self, weight: Tensor, low_logit: Tensor, high_logit: Tensor, ste: bool) -> Tensor:
        low, high = self._factors(low_logit, high_logit)
        return fake_quantize(weight.float(), self.spec, low, high, ste=ste).to(weight.dtype)
