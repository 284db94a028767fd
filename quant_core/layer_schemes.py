"""Each quantized linear's grid by its full module name: one spec for the whole model, or a size
budget's allocation (quant_core.bit_budget) that gives linears their own.

Everything that reads a linear's grid after calibration (rounding to the export dtype, the packed
export and its config groups, the runtimes' checks) asks this one object, so a uniform job and an
allocated one take the same path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from quant_core.quantizer import QuantSpec


@dataclass(frozen=True)
class LayerSchemes:
    """``default`` for every linear that ``allocated`` (full module name to spec) does not name."""

    default: QuantSpec
    allocated: Mapping[str, QuantSpec] = field(default_factory=dict)

    def of(self, name: str) -> QuantSpec:
        return self.allocated.get(name, self.default)

    def grouped(self, names: Iterable[str]) -> dict[QuantSpec, list[str]]:
        """The linears ``names`` under each scheme they use, schemes in order of first use."""
        groups: dict[QuantSpec, list[str]] = {}
        for name in names:
            groups.setdefault(self.of(name), []).append(name)
        return groups
