"""The training loop shared by the methods that fit block parameters with a loss.

Each step runs the block on a shuffled batch of calibration windows with some parameters replaced
(clipping factors, norm weights, rounding variables), compares with the full-precision targets under
the method's loss and takes one optimizer step. Shuffling draws from the block's seeded generator,
so a run is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor

from quant_core.losses import Loss
from quant_core.methods.base import BlockData


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Index batches over ``n`` windows, a fresh permutation each epoch, forever."""
    while True:
        yield from torch.randperm(n, generator=generator).split(batch_size)


def epochs_to_steps(epochs: int, data: BlockData, batch_size: int) -> int:
    """Optimizer steps in ``epochs`` passes over the block's windows."""
    return epochs * math.ceil(data.inputs.shape[0] / batch_size)


def train_parameters(
    loss_fn: Loss,
    data: BlockData,
    overrides: Callable[[], Mapping[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    steps: int,
    batch_size: int,
    label: str,
) -> list[float]:
    """Run ``steps`` optimizer steps; return the mean loss of each epoch (pass over the windows).

    ``overrides`` builds the replaced parameters from the trainable tensors at every step, so the
    gradient flows through whatever maps them to weights (straight-through rounding, clipping).
    """
    n = data.inputs.shape[0]
    steps_per_epoch = epochs_to_steps(1, data, batch_size)
    batches = shuffled_batches(n, batch_size, data.generator)
    epoch_losses: list[float] = []
    total, seen = 0.0, 0
    for step in range(steps):
        idx = next(batches).to(data.inputs.device)
        loss = loss_fn(data.forward(data.inputs[idx], overrides()), data.targets[idx])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{label}: the loss became {loss.item()} in block {data.index}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * idx.numel()
        seen += idx.numel()
        if (step + 1) % steps_per_epoch == 0 or step + 1 == steps:
            epoch_losses.append(total / seen)
            total, seen = 0.0, 0
    return epoch_losses
