"""The precision a checkpoint stores its floats in, and rounding the quantized model to it before it is scored.

Users quantize to shrink a model, so a checkpoint must never be larger than the half-precision model it
came from: the fake-quantized weights, the scales, the norms and the embeddings are written in half
precision unless a job asks for float32. Rounding changes the model a little (a scale rounded to
bfloat16 moves every weight of its group by up to 2^-9 of itself), so the job rounds *before* the
quantized model is evaluated: the perplexity in the report is that of the weights the user downloads,
computed in float32.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from quant_core.methods.base import GRID_BUFFERS, layer_grid
from quant_core.model_structure import LinearLike, stored_layout, weight_matrix
from quant_core.quantizer import QuantSpec, dequantize, grid_codes, group_columns, ungroup_columns

# ``auto``: float16 for a model declared float16 (its values may need float16's finer steps), bfloat16
# for every other (a bfloat16 model stays exact; a float32 one is halved).
ExportDtypeName = Literal["auto", "bfloat16", "float16", "float32"]
EXPORT_DTYPES: tuple[str, ...] = get_args(ExportDtypeName)
_NAMED = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def holds_grid(dtype: torch.dtype, spec: QuantSpec) -> bool:
    """Whether a weight ``(code - zero) * scale`` stored in ``dtype`` still tells its code.

    Rounding to a dtype of ``p`` significant bits moves a value by up to ``2^-p`` of itself, so the code
    read back from the stored weight is the right one while ``|code - zero| * 2^-p < 1/2``. The offsets
    are at most ``2^b - 1`` on an asymmetric grid and ``2^(b-1) - 1`` on a symmetric one (its far end
    ``-2^(b-1)`` is a power of two, exact in any dtype). bfloat16 (8 bits) holds every grid up to
    7 bits and symmetric 8-bit, not asymmetric 8-bit: one weight in a hundred of a one-sided group
    would come back a code away, some past the grid's end.
    """
    largest_offset = 2 ** (spec.bits - 1) - 1 if spec.symmetric else 2**spec.bits - 1
    return largest_offset < 1 / torch.finfo(dtype).eps  # eps = 2^(1 - p)


def resolve_export_dtype(name: str, declared: torch.dtype | None, spec: QuantSpec) -> torch.dtype:
    """The dtype ``name`` stands for, ``declared`` being the dtype the source model says it is in:
    ``auto`` takes float16 over bfloat16 where bfloat16 cannot hold the grid (see :func:`holds_grid`)."""
    if name != "auto":
        return _NAMED[name]
    return torch.float16 if declared == torch.float16 or not holds_grid(torch.bfloat16, spec) else torch.bfloat16


def round_to_export_dtype(model: nn.Module, dtype: torch.dtype, spec: QuantSpec) -> None:
    """Make every parameter of ``model`` hold the value it will have in a checkpoint stored in ``dtype``.

    A linear with a grid keeps its codes: its scale is rounded to ``dtype`` and its weight rebuilt as
    ``(code - zero) * scale`` from the rounded scale, then rounded once more (the packed checkpoint
    stores that scale, and a loader computes exactly this weight). Every other parameter is rounded to
    ``dtype``. The tensors keep their own dtype, so the model still computes as before.
    """
    with torch.no_grad():
        for module in model.modules():
            grid = layer_grid(module)
            if grid is None or not isinstance(module, LinearLike):
                continue
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
