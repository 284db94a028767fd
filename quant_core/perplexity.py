"""Perplexity of a causal LM on evaluation windows: exp of the mean next-token NLL over the scored
positions of all windows (quant_core/eval_windows.py says which positions a text's windows score)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def scored_nll(logits: Tensor, ids: Tensor, scored: Tensor | None) -> Tensor:
    """Summed next-token NLL of ``ids`` under ``logits``, over the ``scored`` predictions (all when None)."""
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    return nll.sum() if scored is None else nll[scored.to(nll.device)].sum()


def scored_batches(windows: Tensor, scored: Tensor | None, batch_size: int) -> list[tuple[Tensor, Tensor | None]]:
    """``windows`` in batches, each with its rows of ``scored`` (None: every prediction counts)."""
    batches = windows.split(batch_size)
    masks = scored.split(batch_size) if scored is not None else [None] * len(batches)
    return list(zip(batches, masks, strict=True))


def scored_tokens(windows: Tensor, scored: Tensor | None) -> int:
    return windows[:, 1:].numel() if scored is None else int(scored.sum())


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: Tensor,
    batch_size: int = 4,
    device: str = "cpu",
    on_progress: Callable[[int], None] | None = None,
    scored: Tensor | None = None,
) -> float:
    """Token-weighted perplexity over ``[windows, seq_len]``: each window predicts its own last
    ``seq_len - 1`` tokens, of which ``scored`` (``[windows, seq_len - 1]``, default all) count.

    ``on_progress`` receives the number of windows done after every batch.
    """
    total_nll, done = 0.0, 0
    for batch, mask in scored_batches(windows, scored, batch_size):
        batch = batch.to(device)
        total_nll += scored_nll(model(input_ids=batch, use_cache=False).logits, batch, mask).item()
        done += batch.shape[0]
        if on_progress is not None:
            on_progress(done)
    return math.exp(total_nll / scored_tokens(windows, scored))
