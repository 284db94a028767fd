"""Bits where they matter: one scheme per unit of linears, the least summed cost under a size budget.

A *unit* is a set of linears that must share a quantization scheme because a runtime fuses them
(q/k/v into one matrix, gate/up into another), or a single linear. Each unit offers candidates: a
scheme, the storage it costs, and the loss measured with that scheme. Choosing one candidate per unit
so that the summed storage stays within the budget and the summed loss is least is a multiple-choice
knapsack.

It is solved exactly, by dynamic programming over storage counted in granules, rather than by a
Lagrangian relaxation (minimise ``cost + lambda * size`` per unit and bisect ``lambda``): the relaxation
only reaches allocations on the lower convex hull of each unit's cost-size curve and, between two
values of ``lambda``, leaves part of the budget unspent, which is exactly the regime of a budget between
two uniform widths. The dynamic program costs ``units x candidates x granules`` vectorised operations:
with a granule of the sizes' greatest common divisor it is exact; when that would need more than
``max_granules`` granules, sizes are rounded *up* to a coarser granule and the budget down, so the
answer can only waste a little budget, never exceed it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .quantizer import QuantSpec

SCALE_BITS = 16
"""Each group's scale is stored in 16 bits (float16 or bfloat16) in every export."""


def storage_bits(out_features: int, in_features: int, scheme: QuantSpec) -> int:
    """The bits a ``[out_features, in_features]`` weight takes under ``scheme``: the codes, one 16-bit
    scale per group and, when asymmetric, one ``bits``-wide zero point per group (packed beside the codes
    in compressed-tensors, a byte or less in GGUF's block formats)."""
    groups = math.ceil(in_features / scheme.group_size) if scheme.group_size else 1
    per_group = SCALE_BITS + (0 if scheme.symmetric else scheme.bits)
    return out_features * (in_features * scheme.bits + groups * per_group)


@dataclass(frozen=True)
class Choice:
    """One candidate of one unit: the storage it takes and the loss it was measured to cost."""

    size_bits: int
    cost: float


def allocate(units: Sequence[Sequence[Choice]], budget_bits: int, max_granules: int = 200_000) -> list[int]:
    """The index of each unit's chosen candidate: least summed cost with summed size at most
    ``budget_bits``. Raises :class:`ConfigError` (field ``budget``) when even the smallest candidates
    exceed the budget."""
    if not units or any(not unit for unit in units):
        raise ValueError("every unit needs at least one candidate")
    smallest = sum(min(choice.size_bits for choice in unit) for unit in units)
    if smallest > budget_bits:
        raise ConfigError(
            f"budget of {budget_bits} bits is below the smallest allocation ({smallest} bits, every unit at "
            "its narrowest allowed scheme): raise the budget or allow narrower widths",
            "budget",
        )
    granule = _granule(units, budget_bits, max_granules)
    capacity = budget_bits // granule
    best = np.zeros(capacity + 1)
    picks = np.empty((len(units), capacity + 1), dtype=np.int16)
    for index, unit in enumerate(units):
        merged = np.full(capacity + 1, np.inf)
        pick = np.zeros(capacity + 1, dtype=np.int16)
        for k, choice in enumerate(unit):
            width = -(-choice.size_bits // granule)
            if width > capacity:
                continue
            # best[c - width] + cost for every capacity c that holds this candidate.
            shifted = np.full(capacity + 1, np.inf)
            shifted[width:] = best[: capacity + 1 - width] + choice.cost
            better = shifted < merged
            merged[better], pick[better] = shifted[better], k
        best, picks[index] = merged, pick
    if not np.isfinite(best[capacity]):
        # Rounding sizes up to a coarse granule can make a budget that barely holds the smallest
        # allocation infeasible; the exact granule never does.
        raise ConfigError(
            f"budget of {budget_bits} bits is too close to the smallest allocation ({smallest} bits) to allocate",
            "budget",
        )
    chosen = [0] * len(units)
    remaining = capacity
    for index in range(len(units) - 1, -1, -1):
        k = int(picks[index, remaining])
        chosen[index] = k
        remaining -= -(-units[index][k].size_bits // granule)
    return chosen


def _granule(units: Sequence[Sequence[Choice]], budget_bits: int, max_granules: int) -> int:
    """The sizes' greatest common divisor (exact), or a coarser unit that keeps the table within
    ``max_granules`` entries."""
    common = math.gcd(*(choice.size_bits for unit in units for choice in unit))
    common = max(common, 1)
    return common if budget_bits // common <= max_granules else -(-budget_bits // max_granules)
