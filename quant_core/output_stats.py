"""How far a quantized block's output distribution is from the full-precision one.

The SW loss claims to align distributions, not only values; these are the statistics such an
alignment should move, measured the same way whatever loss trained the block, so that losses can be
compared on them: the shift of the per-channel means (relative to the typical channel's spread), the
mismatch of the per-channel variances (mean ``|log|`` of their ratio, symmetric in over- and
under-dispersion), and the sliced W1 distance along a fixed seeded set of directions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quant_core.loss_base import tokens
from quant_core.sliced import random_directions, sliced_wasserstein

# Directions for the SW statistic: averaged over blocks, 64 are a stable estimate at a 40th of a pass.
STATS_DIRECTIONS = 64
_TINY = 1e-12


@torch.no_grad()
def distribution_errors(output: Tensor, target: Tensor, seed: int) -> dict[str, float]:
    """``mean_shift``, ``log_var_ratio`` and ``sw`` between two ``[..., hidden]`` activation sets."""
    o, t = tokens(output).float(), tokens(target).float()
    target_var = t.var(0)
    mean_shift = (o.mean(0) - t.mean(0)).pow(2).mean().sqrt() / target_var.mean().sqrt().clamp_min(_TINY)
    log_var_ratio = (o.var(0).clamp_min(_TINY) / target_var.clamp_min(_TINY)).log().abs().mean()
    generator = torch.Generator(device=o.device).manual_seed(seed)
    directions = random_directions(o.shape[1], STATS_DIRECTIONS, generator)
    return {
        "mean_shift": float(mean_shift),
        "log_var_ratio": float(log_var_ratio),
        "sw": float(sliced_wasserstein(o, t, directions)),
    }
