"""The precision a checkpoint stores its floats in, and rounding the quantized model to it before it is scored.

Users quantize to shrink a model, so a checkpoint must never be larger than the half-precision model it
came from: the fake-quantized weights, the scales, the norms and the embeddings are written in half
precision unless a job asks for float32. Rounding changes the model a little (a scale rounded to
bfloat16 moves every weight of its group by up to 2^-9 of itself), so the job rounds *before* the
quantized model is evaluated: the perplexity in the report is that of the weights the user downloads,
computed in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from quant_core.dtype_names import holds_grid as grid_fits
from quant_core.layer_schemes import LayerSchemes
from quant_core.methods.base import GRID_BUFFERS, layer_grid
from quant_core.model_structure import LinearLike, stored_layout, weight_matrix
from quant_core.quantizer import QuantSpec, dequantize, grid_codes, group_columns, ungroup_columns

_NAMED = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def holds_grid(dtype: torch.dtype, spec: QuantSpec) -> bool:
    """Whether ``dtype`` stores ``spec``'s grid so that each weight tells its code (quant_core.dtype_names)."""
    return grid_fits(str(dtype).removeprefix("torch."), spec.bits, spec.symmetric)


def resolve_export_dtype(name: str, declared: torch.dtype | None, spec: QuantSpec) -> torch.dtype:
    """The dtype ``name`` stands for, ``declared`` being the dtype the source model says it is in:
    ``auto`` takes float16 over bfloat16 where bfloat16 cannot hold the grid (see :func:`holds_grid`)."""
    if name != "auto":
        return _NAMED[name]
    return torch.float16 if declared == torch.float16 or not holds_grid(torch.bfloat16, spec) else torch.bfloat16


def round_to_export_dtype(model: nn.Module, dtype: torch.dtype, schemes: LayerSchemes) -> None:
    """Make every parameter of ``model`` hold the value it will have in a checkpoint stored in ``dtype``.

    A linear with a grid keeps its codes: its scale is rounded to ``dtype`` and its weight rebuilt as
    ``(code - zero) * scale`` from the rounded scale, then rounded once more (the packed checkpoint
    stores that scale, and a loader computes exactly this weight). Every other parameter is rounded to
    ``dtype``. The tensors keep their own dtype, so the model still computes as before.
    """
    with torch.no_grad():
        for name, module in model.named_modules():
            grid = layer_grid(module)
            if grid is None or not isinstance(module, LinearLike):
                continue
            spec = schemes.of(name)
            scale, zero = (t.unsqueeze(-1).float() for t in grid)
            matrix = weight_matrix(module).float()
            codes = grid_codes(group_columns(matrix, spec.group_size), scale, zero, spec)
            stored_scale = scale.to(dtype).float()
            rebuilt = ungroup_columns(dequantize(codes, stored_scale, zero), matrix.shape[1]).to(dtype)
            module.weight.data.copy_(stored_layout(module, rebuilt))
            module.register_buffer(GRID_BUFFERS[0], stored_scale.squeeze(-1).to(grid[0].device), persistent=False)
        for parameter in {id(p): p for p in model.parameters()}.values():
            if parameter.is_floating_point():
                parameter.copy_(parameter.to(dtype))
