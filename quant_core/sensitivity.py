"""What each candidate width costs each unit of linears, measured on the calibration windows.

The allocation (quant_core.allocation) needs, for every unit (linears that share an input and hence a
scheme, :func:`~quant_core.methods.layer_inputs.input_groups`) and every candidate scheme, the loss
that scheme causes. It is measured on the full-precision chain, one block at a time: the block's
full-precision output on its full-precision inputs is the target, and each candidate is the same
block with only that unit rounded to nearest at that scheme. Measuring each unit alone, on
full-precision inputs, makes the costs of different units add up (to first order) as the knapsack
assumes; round-to-nearest rather than the job's method keeps the pass to one forward per candidate,
and a method that improves on round-to-nearest improves every unit's candidates alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quant_core.allocation import Choice, storage_bits
from quant_core.engine import batched_loss, block_forward, capture_block_inputs, run_block_batched
from quant_core.errors import ConfigError
from quant_core.losses import Loss
from quant_core.methods.base import BlockData, rtn_weights
from quant_core.methods.layer_inputs import input_groups
from quant_core.model_structure import LinearLike, find_decoder_blocks, quantizable_linears, weight_matrix
from quant_core.quantizer import QuantSpec


@dataclass(frozen=True)
class UnitCosts:
    """One unit's candidates: its block, its linears (names inside the block) and, per scheme it was
    offered, the storage and the measured loss."""

    block: int
    linears: tuple[str, ...]
    schemes: tuple[QuantSpec, ...]
    choices: tuple[Choice, ...]


@torch.no_grad()
def measure_unit_costs(
    model: nn.Module,
    windows: Tensor,
    schemes: Sequence[QuantSpec],
    loss: Loss,
    *,
    device: str = "cpu",
    seed: int = 0,
    batch_size: int = 8,
    on_block: Callable[[int, int], None] | None = None,
) -> list[UnitCosts]:
    """Every unit's cost under every scheme, block by block along the full-precision chain (the
    model is left unchanged); a scheme whose groups would leave a ragged last group in a unit is not
    offered to it. ``loss`` is reseeded with the block's seed before each candidate, so a
    loss with random draws compares the candidates of a block on the same draws."""
    model.eval()
    blocks = find_decoder_blocks(model)
    captured = capture_block_inputs(model, windows, device)
    hidden, kwargs = captured.hidden.cpu(), captured.kwargs
    units: list[UnitCosts] = []
    for index, block in enumerate(blocks):
        block.to(device).eval()
        inputs = hidden.to(device)
        targets = run_block_batched(block, inputs, kwargs, batch_size)
        data = BlockData(index, len(blocks), inputs, targets, block_forward(block, kwargs), torch.Generator())
        linears = quantizable_linears(block)
        for group in input_groups(block, data):
            offered = _whole_groups(schemes, [linears[name] for name in group], group)
            choices = []
            for scheme in offered:
                overrides = rtn_weights(block, dict.fromkeys(group, scheme))
                outputs = run_block_batched(block, inputs, kwargs, batch_size, overrides)
                size = sum(_storage(linears[name], scheme) for name in group)
                choices.append(Choice(size, batched_loss(loss, outputs, targets, batch_size, seed + index)))
            units.append(UnitCosts(index, group, offered, tuple(choices)))
        hidden = targets.cpu()
        del inputs, targets
        block.to("cpu")
        if on_block is not None:
            on_block(index, len(blocks))
    return units


def _whole_groups(
    schemes: Sequence[QuantSpec], layers: Sequence[LinearLike], names: tuple[str, ...]
) -> tuple[QuantSpec, ...]:
    """The schemes whose groups divide every input width of the unit: a ragged last group is not held
    by the packed export (compressed-tensors), so such a scheme is not offered to that unit."""
    widths = {weight_matrix(layer).shape[1] for layer in layers}
    offered = tuple(s for s in schemes if s.group_size is None or all(w % s.group_size == 0 for w in widths))
    if not offered:
        raise ConfigError(
            f"no candidate group size divides the input widths {sorted(widths)} of {', '.join(names)}: "
            "add one that does",
            "budget.group_sizes",
        )
    return offered


def _storage(layer: LinearLike, scheme: QuantSpec) -> int:
    out_features, in_features = weight_matrix(layer).shape
    return storage_bits(out_features, in_features, scheme)
