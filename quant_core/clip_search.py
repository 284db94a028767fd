"""Per-row, per-group clipping ratios chosen by the layer-output error they cause on calibration inputs.

Shrinking a group's range before rounding trades a larger error on its few extreme weights for a
finer grid on all the others; whether that pays depends on the inputs the group multiplies. AWQ's
``auto_clip`` (Lin et al., MLSys 2024, Sec. 3.3; LightCompress's ``search_clip_init``) tries a grid of
ratios and keeps, for every output row and input group, the one whose quantized partial output
``x_g · q(w_g)`` is closest to ``x_g · w_g`` over the calibration tokens.

That error is a quadratic form in the weight error of the group, ``d_g^T B_g d_g`` with
``B_g = X_g^T X_g / n`` the group's diagonal block of the layer's input Gram matrix, so the search
never holds a ``[tokens, out]`` output: it needs the Gram matrix (which GPTQ computes anyway) and
memory of one weight-sized tensor per ratio, chunked over rows. Every method starts from it: RTN
(``clip_search``), AWQ's clipping, GPTQ's static group scales, OmniQuant's starting factors and
TesseraQ's starting scales.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quant_core.quantizer import QuantSpec, fake_quantize, num_groups

# LightCompress/llm-awq defaults: ratios 1, 0.95, ..., 0.55 (20 steps of 5%, shrinking at most by half).
DEFAULT_GRID = 20
DEFAULT_MAX_SHRINK = 0.5
ROWS_PER_CHUNK = 4096  # rows searched at once: bounds memory to a few copies of 4096 rows of weights


def clip_ratios(n_grid: int = DEFAULT_GRID, max_shrink: float = DEFAULT_MAX_SHRINK) -> list[float]:
    """The candidate ratios ``1 - i / n_grid`` for ``i < max_shrink * n_grid`` (1.0 always included)."""
    return [1 - step / n_grid for step in range(max(1, int(max_shrink * n_grid)))]


def group_gram_blocks(gram: Tensor, group_size: int | None) -> Tensor:
    """The diagonal ``g x g`` blocks of an ``[in, in]`` Gram matrix, ``[groups, g, g]``, zero-padded.

    A ragged last group (see :mod:`quant_core.quantizer`) gets zero rows and columns for its padding,
    so padded weights never count.
    """
    width = gram.shape[0]
    size = width if group_size is None or group_size >= width else group_size
    groups = num_groups(width, group_size)
    padded = torch.zeros(groups * size, groups * size, dtype=gram.dtype, device=gram.device)
    padded[:width, :width] = gram
    index = torch.arange(groups, device=gram.device)
    return padded.reshape(groups, size, groups, size)[index, :, index, :]


def _grouped_error(delta: Tensor, blocks: Tensor) -> Tensor:
    """``d_g^T B_g d_g`` per row and group for an ``[rows, in]`` weight error: ``[rows, groups]``."""
    groups, size = blocks.shape[0], blocks.shape[1]
    padded = torch.zeros(delta.shape[0], groups * size, dtype=delta.dtype, device=delta.device)
    padded[:, : delta.shape[1]] = delta
    grouped = padded.reshape(delta.shape[0], groups, size)
    return torch.einsum("rgk,gkl,rgl->rg", grouped, blocks, grouped)


@torch.no_grad()
def search_clipping(
    weight: Tensor, gram: Tensor, spec: QuantSpec, ratios: list[float] | None = None
) -> tuple[Tensor, Tensor]:
    """Best ratio per row and group, ``[out, groups, 1]``, and the output error it leaves, ``[out, groups]``.

    ``weight`` is ``[out, in]``; ``gram`` is ``X^T X`` (any positive scale) of the layer's inputs. The
    ratio shrinks both ends of the range (``scale_and_zero``'s ``low_factor`` and ``high_factor``);
    ties keep the larger ratio, so a group that gains nothing is left unclipped.
    """
    candidates = ratios if ratios is not None else clip_ratios()
    w = weight.detach().float()
    blocks = group_gram_blocks(gram.detach().to(w), spec.group_size)
    groups = blocks.shape[0]
    best_ratio = torch.ones(w.shape[0], groups, 1, dtype=torch.float32, device=w.device)
    best_error = torch.full((w.shape[0], groups), float("inf"), dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], ROWS_PER_CHUNK):
        rows = w[start : start + ROWS_PER_CHUNK]
        for ratio in candidates:
            factor = torch.tensor(ratio, dtype=w.dtype, device=w.device)
            error = _grouped_error(rows - fake_quantize(rows, spec, factor, factor), blocks)
            better = error < best_error[start : start + rows.shape[0]]
            best_error[start : start + rows.shape[0]][better] = error[better]
            best_ratio[start : start + rows.shape[0]][better] = ratio
    return best_ratio, best_error
