"""TesseraQ: progressive adaptive rounding plus dequantization-scale tuning, with any loss.

Li et al., "TesseraQ: Ultra Low-Bit LLM Post-Training Quantization with Block Reconstruction"
(ICLR 2025). Each weight ``w`` with grid step ``s`` is ``floor(w/s) + h(v)`` steps from the zero
point, where ``h`` is AdaRound's rectified sigmoid and ``v`` starts where ``h(v)`` equals the
fractional part, i.e. where the block reproduces its float weights. Then, over ``rounds`` rounds:

1. harden: the soft variables that are most decided (``|h(v) - 1/2|`` largest) are fixed to 0 or 1,
   until the hardened fraction reaches ``1 - (1 - r/R)^2`` (most in the first rounds, all in the last);
2. train the variables still soft, and the per-group scale factors ``2 sigmoid(u)`` (starting at 1),
   to match the full-precision block output under the loss.

After the last round every variable is hard, so the weights are integer codes times the tuned
scales: plain rounding of a stored weight by its stored scale gives back exactly the learned code.

Starting points (``init``):

- ``rtn``: the grid of round-to-nearest with the searched clipping (``clip_search``, default on).
- ``awq``: AWQ's activation-aware scales folded into the block and its searched clipping.
- ``gptq``: GPTQ's grid and codes, so training refines the best closed-form result. The variables
  then round GPTQ's error-compensated weights ``w~`` (not the float ones), and start shifted so that
  every soft variable equals GPTQ's decision: the block starts exactly at GPTQ's weights, and the
  hardening order (most decided first) breaks ties by how far ``w~`` was from the rounding midpoint.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from quant_core.method_options import AwqOptions, GptqOptions, TesseraQOptions
from quant_core.methods.awq import Awq, find_layout
from quant_core.methods.base import BlockData, QuantMethod, layer_grid, register_method, write_quantized
from quant_core.methods.clipping import block_clip_factors, mean_ratio
from quant_core.methods.gptq import Gptq
from quant_core.methods.training import train_parameters
from quant_core.model_structure import quantizable_linears, stored_layout, weight_matrix
from quant_core.quantizer import QuantSpec, dequantize, group_columns, scale_and_zero, ungroup_columns

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches exactly 0 and 1


def rectified_sigmoid(v: Tensor) -> Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def hardened_fraction(round_index: int, rounds: int) -> float:
    """Fraction of rounding variables fixed after round ``round_index`` (1-based) of ``rounds``."""
    return 1.0 - (1.0 - round_index / rounds) ** 2


class LearnedRounding:
    """One linear's rounding variables, hardening mask and scale factors.

    ``weight`` is what the variables round (the float weight, or GPTQ's compensated one). The grid is
    ``grid`` (``scale``, ``zero`` as ``[out, groups]``) when given, else the range shrunk by ``clip``
    (a ratio, or ratios per row and group). With ``start_rounded`` the soft variables start at the
    nearest grid point instead of the weight itself.
    """

    def __init__(
        self,
        weight: Tensor,
        spec: QuantSpec,
        clip: Tensor | float = 1.0,
        grid: tuple[Tensor, Tensor] | None = None,
        start_rounded: bool = False,
    ) -> None:
        self.spec, self.in_features = spec, weight.shape[1]
        grouped = group_columns(weight.detach().float(), spec.group_size)
        if grid is None:
            factor = torch.as_tensor(clip, dtype=torch.float32, device=weight.device)
            scale, zero = scale_and_zero(grouped, spec, factor, factor)
        else:
            scale, zero = (t.to(grouped).unsqueeze(-1) for t in grid)
        self.scale, self.zero = scale.detach(), zero.detach()
        steps = grouped / self.scale
        self.floor = steps.floor()
        fraction = ((steps - self.floor - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
        self.logits = torch.log(fraction / (1 - fraction)).requires_grad_(True)
        self.shift = torch.zeros_like(self.floor)
        if start_rounded:
            with torch.no_grad():
                self.shift = (steps - self.floor).round() - rectified_sigmoid(self.logits)
        self.scale_logits = torch.zeros_like(self.scale, requires_grad=True)
        self.hard = torch.zeros_like(self.floor, dtype=torch.bool)
        self.hard_value = torch.zeros_like(self.floor)

    def soft(self) -> Tensor:
        return (rectified_sigmoid(self.logits) + self.shift).clamp(0.0, 1.0)

    def offsets(self) -> Tensor:
        """0..1 per weight: the learned round-up amount, hard where decided."""
        return torch.where(self.hard, self.hard_value, self.soft())

    def tuned_scale(self) -> Tensor:
        return self.scale * 2 * torch.sigmoid(self.scale_logits)

    def codes(self) -> Tensor:
        return (self.floor + self.offsets() + self.zero).clamp(self.spec.qmin, self.spec.qmax)

    def weight(self) -> Tensor:
        """The ``[out, in]`` weight these variables produce, differentiable in both."""
        return ungroup_columns(dequantize(self.codes(), self.tuned_scale(), self.zero), self.in_features)

    @torch.no_grad()
    def harden(self, fraction: float) -> None:
        """Fix the most decided soft variables until ``fraction`` of all are hard."""
        target = math.ceil(fraction * self.hard.numel())
        count = target - int(self.hard.sum())
        if count <= 0:
            return
        soft = self.soft()
        tie_break = 1e-3 * (rectified_sigmoid(self.logits) - 0.5).abs()  # the unshifted variable's own certainty
        confidence = torch.where(self.hard, -1.0, (soft - 0.5).abs() + tie_break).flatten()
        chosen = confidence.topk(count).indices
        self.hard.view(-1)[chosen] = True
        self.hard_value.view(-1)[chosen] = (soft.flatten()[chosen] >= 0.5).float()

    def qparams(self) -> tuple[Tensor, Tensor]:
        """The stored grid of the final weight: tuned scale and zero point, ``[out, groups]``."""
        return self.tuned_scale().detach().squeeze(-1), self.zero.squeeze(-1)


@register_method
class TesseraQ(QuantMethod):
    options_type = TesseraQOptions
    needs_targets = True
    options: TesseraQOptions

    def check(self, blocks: nn.ModuleList) -> None:
        if self.options.init == "awq":
            find_layout(blocks[0])

    def _start(self, block: nn.Module, data: BlockData) -> tuple[dict[str, LearnedRounding], dict[str, Any]]:
        """Each linear's rounding variables at the chosen starting point, and what that start reported."""
        layers = quantizable_linears(block)
        schemes = self.block_schemes(block, data)
        if self.options.init == "gptq":
            start = Gptq(self.spec, self.loss, GptqOptions(clip_search=self.options.clip_search)).quantize_block(
                block, data
            )
            rounding = {
                name: LearnedRounding(
                    start.compensated[name], schemes[name], grid=layer_grid(layer), start_rounded=True
                )
                for name, layer in layers.items()
            }
            return rounding, {"gptq_error": start.errors}
        if self.options.init == "awq":
            stats = Awq(self.spec, self.loss, AwqOptions(clip=self.options.clip_search)).prepare(block, data)
            clip = stats.pop("clip_factors")
        else:
            clip = block_clip_factors(block, data, schemes) if self.options.clip_search else {}
            stats = {"clip_ratio": mean_ratio(clip)} if clip else {}
        rounding = {
            name: LearnedRounding(weight_matrix(layer), schemes[name], clip.get(name, 1.0))
            for name, layer in layers.items()
        }
        return rounding, stats

    def calibrate(self, block: nn.Module, data: BlockData) -> dict[str, Any]:
        rounding, init_stats = self._start(block, data)
        layers = quantizable_linears(block)
        optimizer = torch.optim.Adam(
            [
                {"params": [r.logits for r in rounding.values()], "lr": self.options.lr},
                {"params": [r.scale_logits for r in rounding.values()], "lr": self.options.scale_lr},
            ]
        )

        def overrides() -> dict[str, Tensor]:
            return {
                f"{name}.weight": stored_layout(layers[name], r.weight().to(layers[name].weight.dtype))
                for name, r in rounding.items()
            }

        round_losses: list[float] = []
        gradient_share: dict[str, dict[str, float]] = {}
        for round_index in range(1, self.options.rounds + 1):
            for r in rounding.values():
                r.harden(hardened_fraction(round_index, self.options.rounds))
            if self.options.steps_per_round:
                log = train_parameters(
                    self.loss,
                    block,
                    data,
                    overrides,
                    optimizer,
                    self.options.steps_per_round,
                    self.options.batch_size,
                    "TesseraQ",
                )
                round_losses.append(log.epoch_losses[-1])
                if log.gradient_share:  # the first round's first step and the last round's last
                    gradient_share.setdefault("first", log.gradient_share["first"])
                    gradient_share["last"] = log.gradient_share["last"]
        with torch.no_grad():
            write_quantized(
                block, {name: (r.weight().to(layers[name].weight.dtype), *r.qparams()) for name, r in rounding.items()}
            )
        rounded_up = sum(int(r.hard_value.sum()) for r in rounding.values())
        total = sum(r.hard_value.numel() for r in rounding.values())
        stats = {"init": init_stats, "round_losses": round_losses, "rounded_up_fraction": rounded_up / total}
        if gradient_share:
            stats["gradient_share"] = gradient_share
        return stats
