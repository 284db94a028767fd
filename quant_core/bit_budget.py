"""A size budget instead of one bit width: the job measures what each candidate scheme costs each
unit of linears (quant_core.sensitivity), chooses one scheme per unit with the least summed cost that
fits the budget (quant_core.allocation), and calibrates every block at its allocation.

The budget counts what a checkpoint stores: codes, 16-bit scales and zero points of the decoder
blocks' linears (``bits_per_weight``: their average bits per weight), or the whole checkpoint
(``size_mb``: those plus every tensor stored in floats, embeddings, head and norms).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from quant_core.allocation import allocate
from quant_core.errors import ConfigError
from quant_core.layer_schemes import LayerSchemes
from quant_core.losses import Loss
from quant_core.model_structure import block_names, find_decoder_blocks, quantizable_linears, weight_matrix
from quant_core.quantizer import QuantSpec
from quant_core.sensitivity import measure_unit_costs

MEGABYTE_BITS = 8_000_000


@dataclass(frozen=True)
class BudgetSpec:
    """How much the quantized model may store, and the schemes it is spent on (every width with every
    group size, at the job's symmetry)."""

    bits_per_weight: float | None = None
    size_mb: float | None = None
    widths: tuple[int, ...] = (2, 3, 4, 8)
    group_sizes: tuple[int, ...] = (32, 64, 128)
    # calibration windows the sensitivity pass runs: every candidate of every unit is one block forward
    # over them, so they, not the calibration, set the pass's time
    samples: int = 8

    def candidates(self, symmetric: bool) -> list[QuantSpec]:
        return [
            QuantSpec(bits=bits, symmetric=symmetric, group_size=group)
            for bits in sorted(set(self.widths))
            for group in sorted(set(self.group_sizes))
        ]

    def linear_bits(self, linear_weights: int, float_bits: int) -> int:
        """The bits the block linears may take: ``float_bits`` is what the checkpoint's other tensors take."""
        if self.bits_per_weight is not None:
            return math.floor(self.bits_per_weight * linear_weights)
        assert self.size_mb is not None  # one of the two, checked where the settings enter
        left = math.floor(self.size_mb * MEGABYTE_BITS) - float_bits
        if left <= 0:
            raise ConfigError(
                f"budget.size_mb {self.size_mb:g} does not even hold the tensors stored in floats "
                f"({float_bits / MEGABYTE_BITS:.1f} MB of embeddings, head and norms)",
                "budget.size_mb",
            )
        return left


@dataclass(frozen=True)
class AllocatedUnit:
    """A unit's scheme, what it stores, and its measured cost at that scheme and at every candidate."""

    block: int
    linears: tuple[str, ...]
    scheme: QuantSpec
    size_bits: int
    cost: float
    costs: dict[str, float]  # by candidate label

    def to_dict(self) -> dict[str, Any]:
        scheme = self.scheme
        return {
            "block": self.block,
            "linears": list(self.linears),
            "scheme": scheme.label,
            "bits": scheme.bits,
            "group_size": scheme.group_size,
            "symmetric": scheme.symmetric,
            "size_bits": self.size_bits,
            "cost": self.cost,
            "costs": self.costs,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AllocatedUnit:
        scheme = QuantSpec(bits=data["bits"], symmetric=data["symmetric"], group_size=data["group_size"])
        return cls(data["block"], tuple(data["linears"]), scheme, data["size_bits"], data["cost"], dict(data["costs"]))


@dataclass(frozen=True)
class Allocation:
    """The scheme of every unit of linears, the budget it was chosen under and what choosing took."""

    units: tuple[AllocatedUnit, ...]
    budget_bits: int
    linear_weights: int  # weights of the block linears the units cover
    seconds: float  # the sensitivity pass and the allocation
    windows: int  # calibration windows the sensitivity pass ran

    @property
    def stored_bits(self) -> int:
        return sum(unit.size_bits for unit in self.units)

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bits / self.linear_weights

    def block_schemes(self, blocks: int) -> list[dict[str, QuantSpec]]:
        """Per block, each linear's scheme by its name in the block (calibrate_blocks' ``schemes``)."""
        schemes: list[dict[str, QuantSpec]] = [{} for _ in range(blocks)]
        for unit in self.units:
            schemes[unit.block].update(dict.fromkeys(unit.linears, unit.scheme))
        return schemes

    def layer_schemes(self, model: nn.Module, default: QuantSpec) -> LayerSchemes:
        """The schemes by full module name."""
        prefixes = block_names(model)
        allocated = {f"{prefixes[unit.block]}.{name}": unit.scheme for unit in self.units for name in unit.linears}
        return LayerSchemes(default, allocated)

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_bits": self.budget_bits,
            "stored_bits": self.stored_bits,
            "linear_weights": self.linear_weights,
            "bits_per_weight": self.bits_per_weight,
            "seconds": self.seconds,
            "windows": self.windows,
            "units": [unit.to_dict() for unit in self.units],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Allocation:
        units = tuple(AllocatedUnit.from_dict(unit) for unit in data["units"])
        return cls(units, data["budget_bits"], data["linear_weights"], data["seconds"], data["windows"])


def plan_allocation(
    model: nn.Module,
    windows: Tensor,
    budget: BudgetSpec,
    symmetric: bool,
    loss: Loss,
    float_bits_per_value: int,
    *,
    device: str = "cpu",
    seed: int = 0,
    on_block: Callable[[int, int], None] | None = None,
) -> Allocation:
    """Measure every unit's cost under every candidate on the first ``budget.samples`` of ``windows``
    and choose the schemes; ``float_bits_per_value`` is the export dtype's width, what every tensor
    outside the block linears is stored in."""
    started = time.perf_counter()
    candidates = budget.candidates(symmetric)
    sample = windows[: budget.samples]
    measured = measure_unit_costs(model, sample, candidates, loss, device=device, seed=seed, on_block=on_block)
    linear_weights = sum(
        weight_matrix(layer).numel()
        for block in find_decoder_blocks(model)
        for layer in quantizable_linears(block).values()
    )
    stored_values = sum({id(p): p.numel() for p in model.parameters()}.values())
    float_bits = (stored_values - linear_weights) * float_bits_per_value
    budget_bits = budget.linear_bits(linear_weights, float_bits)
    chosen = allocate([unit.choices for unit in measured], budget_bits)
    units = tuple(
        AllocatedUnit(
            unit.block,
            unit.linears,
            unit.schemes[k],
            unit.choices[k].size_bits,
            unit.choices[k].cost,
            {spec.label: choice.cost for spec, choice in zip(unit.schemes, unit.choices, strict=True)},
        )
        for unit, k in zip(measured, chosen, strict=True)
    )
    return Allocation(units, budget_bits, linear_weights, time.perf_counter() - started, int(sample.shape[0]))


def describe(units: Sequence[AllocatedUnit]) -> str:
    """How many units took each scheme, for the job's stage message."""
    counts = Counter(unit.scheme.label for unit in units)
    return ", ".join(f"{label} x{count}" for label, count in sorted(counts.items()))
