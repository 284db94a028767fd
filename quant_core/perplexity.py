"""Perplexity of a causal LM on evaluation windows: exp of the mean next-token NLL over the scored
positions of all windows (quant_core/eval_windows.py says which positions a text's windows score)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quant_core.distributed import SOLO, Ranks
from quant_core.model_structure import last_hidden_state, output_layer

LOGIT_CHUNK = 512  # positions whose logits exist at once: chunk x vocabulary floats, whatever the batch


def scored_nll(model: nn.Module, ids: Tensor, scored: Tensor | None) -> Tensor:
    """Summed next-token NLL of ``ids`` under ``model``, over the ``scored`` predictions (all when None).

    The model runs to its last hidden states only, and the output layer makes the logits of
    ``LOGIT_CHUNK`` scored positions at a time: with a 262,144-token vocabulary (Gemma 3)
    a batch of 4 windows of 512 tokens would otherwise hold 2 GiB of logits, and as much again for
    their softmax.
    """
    hidden, targets = last_hidden_state(model, ids)[:, :-1], ids[:, 1:]
    if scored is not None:
        mask = scored.to(hidden.device)
        hidden, targets = hidden[mask], targets[mask]
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    head = output_layer(model)
    return sum(
        (
            F.cross_entropy(head(hidden[i : i + LOGIT_CHUNK]).float(), targets[i : i + LOGIT_CHUNK], reduction="sum")
            for i in range(0, targets.numel(), LOGIT_CHUNK)
        ),
        torch.zeros((), device=hidden.device),
    )


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
    ranks: Ranks = SOLO,
) -> float:
    """Token-weighted perplexity over ``[windows, seq_len]``: each window predicts its own last
    ``seq_len - 1`` tokens, of which ``scored`` (``[windows, seq_len - 1]``, default all) count.

    ``on_progress`` receives the number of windows done after every batch. On several ``ranks`` each
    scores its share of the windows and the summed NLL and token counts are summed over ranks.
    """
    windows, scored = shared_windows(windows, scored, ranks)
    total_nll, done = 0.0, 0
    for batch, mask in scored_batches(windows, scored, batch_size):
        batch = batch.to(device)
        total_nll += scored_nll(model, batch, mask).item()
        done += batch.shape[0]
        if on_progress is not None:
            on_progress(done)
    return ranked_perplexity(total_nll, windows, scored, ranks)


def shared_windows(windows: Tensor, scored: Tensor | None, ranks: Ranks) -> tuple[Tensor, Tensor | None]:
    """This rank's share of the evaluation windows and of their scored positions."""
    return ranks.share(windows), None if scored is None else ranks.share(scored)


def ranked_perplexity(total_nll: float, windows: Tensor, scored: Tensor | None, ranks: Ranks) -> float:
    """Perplexity from this rank's summed NLL over its share: NLL and scored tokens summed over ranks."""
    return math.exp(ranks.total(total_nll) / ranks.total(scored_tokens(windows, scored)))
