"""Round-to-nearest: every weight to its nearest grid point. The baseline every method must beat."""

from __future__ import annotations

from typing import Any

from torch import nn

from quant_core.methods.base import BlockData, QuantMethod, register_method, rtn_quantized, write_quantized


@register_method
class RTN(QuantMethod):
    name = "rtn"

    def calibrate(self, block: nn.Module, data: BlockData) -> dict[str, Any]:
        write_quantized(block, rtn_quantized(block, self.spec))
        return {}
