"""Round-to-nearest: every weight to its nearest grid point. The baseline every method must beat.

With ``incoherence: hadamard`` the rounding happens in QuIP's rotated basis (:mod:`quant_core.incoherence`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from quant_core.methods.base import (
    BlockData,
    IncoherenceOptions,
    QuantMethod,
    register_method,
    rotated_rtn_weights,
    rtn_quantized,
    write_dequantized,
    write_quantized,
)


@register_method
class RTN(QuantMethod):
    name = "rtn"
    options_type = IncoherenceOptions

    def calibrate(self, block: nn.Module, data: BlockData) -> dict[str, Any]:
        if self.rotates:
            write_dequantized(block, rotated_rtn_weights(block, self.spec, data.generator))
        else:
            write_quantized(block, rtn_quantized(block, self.spec))
        return {}
