"""Perplexity of a causal LM on evaluation windows: exp of the mean next-token NLL over all windows."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: Tensor,
    batch_size: int = 4,
    device: str = "cpu",
    on_progress: Callable[[int], None] | None = None,
) -> float:
    """Token-weighted perplexity over ``[windows, seq_len]``; each window predicts its own last S-1 tokens.

    ``on_progress`` receives the number of windows done after every batch.
    """
    total_nll, total_tokens, done = 0.0, 0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
        done += batch.shape[0]
        if on_progress is not None:
            on_progress(done)
    return math.exp(total_nll / total_tokens)
