"""The training loop shared by the methods that fit block parameters with a loss.

Each step runs the block on a shuffled batch of calibration windows with some parameters replaced
(clipping factors, norm weights, rounding variables), compares with the full-precision targets under
the method's loss and takes one optimizer step. Shuffling draws from the block's seeded generator,
so a run is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from quant_core.distributed import SOLO, HeldBatch, Ranks
from quant_core.losses import Loss
from quant_core.methods.base import BlockData
from quant_core.methods.layer_inputs import recorded_outputs


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Index batches over ``n`` windows, a fresh permutation each epoch, forever."""
    while True:
        yield from torch.randperm(n, generator=generator).split(batch_size)


def epochs_to_steps(epochs: int, data: BlockData, batch_size: int) -> int:
    """Optimizer steps in ``epochs`` passes over the block's windows."""
    return epochs * math.ceil(data.windows / batch_size)


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor of optimizer step ``step`` (0-based): linear warm-up, then cosine to 0.

    Short schedules need both ends: warm-up keeps Adam's first, poorly normalised steps small, and the
    decay lets the last steps settle instead of jittering at full learning rate.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainLog:
    """What a block's training did: the mean loss of each epoch, and each loss term's share of the gradient.

    ``gradient_share`` holds, at the first and the last step, each term's gradient norm over the
    trained tensors divided by the sum of the terms' norms: whether a hybrid's SW term steers the
    training or is a rounding error next to the point-wise term.
    """

    epoch_losses: list[float] = field(default_factory=list)
    gradient_share: dict[str, dict[str, float]] = field(default_factory=dict)


def _gradient_shares(terms: Mapping[str, Tensor], params: list[Tensor]) -> dict[str, float]:
    """Each term's gradient norm over ``params`` divided by the sum of the terms' norms."""
    norms = {}
    for name, term in terms.items():
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        norms[name] = math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))
    total = sum(norms.values())
    return {name: norm / total if total > 0 else 0.0 for name, norm in norms.items()}


def take_step(
    terms: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    position: tuple[int, int],
    shares: dict[str, dict[str, float]],
    where: str,
    ranks: Ranks = SOLO,
) -> float:
    """One optimizer step on the sum of the loss ``terms``; returns the loss.

    A non-finite loss stops the run (naming ``where``) before it can write NaN into the weights. At
    the first and last of ``position = (step, steps)`` each term's share of the gradient is recorded
    in ``shares`` (a hybrid loss only; on several ranks, of this rank's part of the gradient). On
    several ``ranks`` every rank holds the same loss of the whole batch
    (:meth:`~quant_core.distributed.Ranks.gather_differentiable`): each back-propagates its world-size-th
    and the gradients are summed over ranks before the step, so every rank takes the same step.
    """
    loss = sum(terms.values())
    assert isinstance(loss, Tensor)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{where}: the loss became {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    step, steps = position
    if len(terms) > 1 and step in (0, steps - 1):
        shares["first" if step == 0 else "last"] = _gradient_shares(terms, params)
    (loss / ranks.world_size if ranks.distributed else loss).backward()
    ranks.sum_gradients(params)
    optimizer.step()
    return loss.item()


def train_parameters(
    loss_fn: Loss,
    block: nn.Module,
    data: BlockData,
    overrides: Callable[[], Mapping[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    steps: int,
    batch_size: int,
    label: str,
    lr_factor: Callable[[int], float] | None = None,
) -> TrainLog:
    """Run ``steps`` optimizer steps and log the loss of each epoch (pass over the windows).

    ``overrides`` builds the replaced parameters from the trainable tensors at every step, so the
    gradient flows through whatever maps them to weights (straight-through rounding, clipping).
    ``lr_factor(step)`` scales every parameter group's learning rate at that step (a schedule).
    A loss with ``sites`` also compares the outputs of those submodules of ``block`` with
    ``data.site_targets``.
    """
    if data.targets is None:
        raise RuntimeError(f"{label} trains against the full-precision targets: declare needs_targets = True")
    steps_per_epoch = epochs_to_steps(1, data, batch_size)
    batches = shuffled_batches(data.windows, batch_size, data.generator)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    log = TrainLog()
    total, seen = 0.0, 0
    for step in range(steps):
        if lr_factor is not None:
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * lr_factor(step)
        idx = next(batches).to(data.inputs.device)
        batch = HeldBatch(data.ranks, data.windows, idx, data.inputs[:0])
        with recorded_outputs(block, loss_fn.sites) as site_outputs:
            output = data.forward(data.inputs[batch.mine], overrides()) if batch.mine.numel() else None
        terms = loss_fn.terms(batch.whole(output, params[0]), batch.whole(data.targets))
        if loss_fn.sites:
            terms |= loss_fn.site_terms(
                {site: batch.whole(torch.cat(out) if out else None, params[0]) for site, out in site_outputs.items()},
                {site: batch.whole(t) for site, t in data.site_targets.items()},
            )
        where = f"{label} in block {data.index}"
        loss = take_step(terms, optimizer, params, (step, steps), log.gradient_share, where, data.ranks)
        total += loss * idx.numel()
        seen += idx.numel()
        if (step + 1) % steps_per_epoch == 0 or step + 1 == steps:
            log.epoch_losses.append(total / seen)
            total, seen = 0.0, 0
    return log
