"""Round-to-nearest: every weight to its nearest grid point. The baseline every method must beat.

With ``clip_search`` each row and group first gets the clipping ratio that minimises its output
error on the calibration inputs (:mod:`quant_core.clip_search`); without it RTN needs no data.
With ``incoherence: hadamard`` the rounding happens in QuIP's rotated basis (:mod:`quant_core.incoherence`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from quant_core.method_options import RtnOptions
from quant_core.methods.base import (
    BlockData,
    QuantMethod,
    register_method,
    rotated_rtn_weights,
    rtn_quantized,
    write_dequantized,
    write_quantized,
)
from quant_core.methods.clipping import block_clip_factors, mean_ratio


@register_method
class RTN(QuantMethod):
    options_type = RtnOptions
    options: RtnOptions

    def calibrate(self, block: nn.Module, data: BlockData) -> dict[str, Any]:
        schemes = self.block_schemes(block, data)
        if self.rotates:
            write_dequantized(block, rotated_rtn_weights(block, schemes, data.generator))
            return {}
        clip = block_clip_factors(block, data, schemes) if self.options.clip_search else None
        write_quantized(block, rtn_quantized(block, schemes, clip))
        return {"clip_ratio": mean_ratio(clip)} if clip else {}
