"""Searched clipping for a whole block: every linear's input Gram matrix from one pass, then the search.

See :mod:`quant_core.clip_search` for the criterion. The block runs with its current (full-precision)
weights on the quantized chain's inputs, which is what each linear will see when it is quantized alone.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from quant_core.clip_search import search_clipping
from quant_core.methods.base import BlockData
from quant_core.methods.layer_inputs import input_grams
from quant_core.model_structure import quantizable_linears, weight_matrix
from quant_core.quantizer import QuantSpec

GRAM_BATCH = 8  # windows per forward while collecting Gram matrices


def block_clip_factors(block: nn.Module, data: BlockData, schemes: Mapping[str, QuantSpec]) -> dict[str, Tensor]:
    """Each linear's best clipping ratio per row and group at its scheme, ``[out, groups, 1]``, by name."""
    grams = input_grams(block, data, data.inputs, GRAM_BATCH)
    return {
        name: search_clipping(weight_matrix(layer), grams[name], schemes[name])[0]
        for name, layer in quantizable_linears(block).items()
    }


def mean_ratio(factors: dict[str, Tensor]) -> dict[str, float]:
    """The average chosen ratio of each linear, for the report."""
    return {name: float(f.mean()) for name, f in factors.items()}
