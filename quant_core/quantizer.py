"""The one uniform weight grid every method quantizes onto.

Codes are signed integers in ``[-2^(b-1), 2^(b-1) - 1]`` and ``w ≈ (code - zero) * scale``, the layout
compressed-tensors packs, so a fake-quant weight can later be exported losslessly.

- Asymmetric: the range ``[min(w, 0), max(w, 0)]`` maps onto the full code range with an integer zero
  point. Keeping 0 inside the range keeps the zero point a valid code.
- Symmetric: ``scale = max|w| / (2^b - 1) * 2`` and ``zero = 0``, so both signs use the grid evenly.
- Granularity: one scale per output channel (``group_size=None``) or per run of ``group_size``
  consecutive input columns. **Rule when g does not divide the input width:** groups are taken from
  the left, and the last group holds the remaining ``width % g`` columns with its own scale and zero
  (internally it is padded by repeating its last column, which leaves its min and max unchanged).
- Training uses straight-through rounding: the forward pass rounds, the backward pass is identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quant_core.errors import ConfigError
from quant_core.options import MAX_BITS, MIN_BITS

_MIN_SCALE = 1e-8


@dataclass(frozen=True)
class QuantSpec:
    """Weight quantization settings: bit width, symmetry and granularity."""

    bits: int = 4
    symmetric: bool = False
    group_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}", "bits")
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ConfigError("group_size must be a positive integer, or null for per-channel", "group_size")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def label(self) -> str:
        """Short name used in reports, e.g. ``W3A16 g64 asym``."""
        gran = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"W{self.bits}A16 {gran} {'sym' if self.symmetric else 'asym'}"


def round_ste(x: Tensor) -> Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (x.round() - x).detach()


def group_columns(weight: Tensor, group_size: int | None) -> Tensor:
    """View ``[out, in]`` as ``[out, groups, g]``; a ragged last group is padded by edge repetition."""
    out_features, in_features = weight.shape
    if group_size is None or group_size >= in_features:
        return weight.unsqueeze(1)
    pad = -in_features % group_size
    if pad:
        weight = torch.cat((weight, weight[:, -1:].expand(out_features, pad)), dim=1)
    return weight.reshape(out_features, -1, group_size)


def ungroup_columns(grouped: Tensor, in_features: int) -> Tensor:
    """Inverse of :func:`group_columns`: back to ``[out, in]``, dropping the padding."""
    return grouped.reshape(grouped.shape[0], -1)[:, :in_features]


def num_groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None or group_size >= in_features else -(-in_features // group_size)


def scale_and_zero(
    grouped: Tensor, spec: QuantSpec, low_factor: Tensor | None = None, high_factor: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Scale and zero point (``[out, groups, 1]``) from each group's range, optionally clipped.

    ``low_factor``/``high_factor`` (``[out, groups, 1]``, near 1) shrink the range: OmniQuant's
    learnable weight clipping trains them. The zero point is rounded straight-through so clipping
    receives gradient through it as well as through the scale.
    """
    zeros = torch.zeros((), dtype=grouped.dtype, device=grouped.device)
    low = torch.minimum(grouped.amin(-1, keepdim=True), zeros)
    high = torch.maximum(grouped.amax(-1, keepdim=True), zeros)
    if low_factor is not None:
        low = low * low_factor
    if high_factor is not None:
        high = high * high_factor
    if spec.symmetric:
        amax = torch.maximum(-low, high)
        scale = (amax / ((spec.qmax - spec.qmin) / 2)).clamp(min=_MIN_SCALE)
        return scale, torch.zeros_like(scale)
    scale = ((high - low) / (spec.qmax - spec.qmin)).clamp(min=_MIN_SCALE)
    zero = (spec.qmin - round_ste(low / scale)).clamp(spec.qmin, spec.qmax)
    return scale, zero


def grid_codes(grouped: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec, ste: bool = False) -> Tensor:
    """Integer codes (as floats) of each weight on the grid; ``ste`` keeps a training gradient."""
    rounded = round_ste(grouped / scale) if ste else torch.round(grouped / scale)
    return (rounded + zero).clamp(spec.qmin, spec.qmax)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return (codes - zero) * scale


def grid_params(
    weight: Tensor, spec: QuantSpec, low_factor: Tensor | None = None, high_factor: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The grid :func:`fake_quantize` puts ``weight`` on: scale and zero point as ``[out, groups]``."""
    weight = weight.detach()
    if weight.dtype in (torch.float16, torch.bfloat16):  # grids are computed in float32 at least
        weight = weight.float()
    scale, zero = scale_and_zero(group_columns(weight, spec.group_size), spec, low_factor, high_factor)
    return scale.squeeze(-1).detach(), zero.squeeze(-1).detach()


def fake_quantize(
    weight: Tensor,
    spec: QuantSpec,
    low_factor: Tensor | None = None,
    high_factor: Tensor | None = None,
    ste: bool = False,
) -> Tensor:
    """Quantize-dequantize an ``[out, in]`` weight onto the grid (round-to-nearest when unclipped)."""
    grouped = group_columns(weight, spec.group_size)
    scale, zero = scale_and_zero(grouped, spec, low_factor, high_factor)
    return ungroup_columns(dequantize(grid_codes(grouped, scale, zero, spec, ste), scale, zero), weight.shape[1])
