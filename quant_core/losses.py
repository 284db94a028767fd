"""Block-output alignment losses, built by name, including the Sliced-Wasserstein (SW) family.

Every loss compares a quantized block's output with its full-precision target, both shaped
``[batch, seq, hidden]``. Point-wise losses match each value; the SW term projects both outputs on
random unit directions and compares the sorted projections, so it aligns the *distribution* of
activations (Cao, Yin, Aref, arXiv 2601.07878, Sec. 3). The hybrids add a small SW term to a
point-wise base loss. Option names follow LightCompress's ``loss_kwargs`` so configs carry over.

Whole-model methods (DiscQuant) compare the student's and the teacher's :class:`ModelOutputs`
instead: ``kd`` is knowledge distillation, the KL of next-token distributions averaged over tokens,
and ``kd_sw`` adds SW between the two models' final hidden states (SW on logits would project
vocabulary-sized vectors). On a block's output ``kd`` is the same as ``kl``.

A new loss is its name among quant_core.loss_options' declarations (which requests are checked against
without torch) and its factory here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from quant_core.loss_base import Loss, ModelOutputs, compute_dtype, per_token_over_logits, tokens
from quant_core.loss_options import (
    BLOCK_SIZE_ERROR,
    HYBRIDS,
    POINTWISE_LOSSES,
    SCALE_ERROR,
    SW_ALIASES,
    SW_TERMS,
    LossOptions,
    known_loss,
)
from quant_core.sliced import (
    LearnedProjectionLoss,
    MaxSlicedLoss,
    MultiScaleLoss,
    SlicedWassersteinLoss,
    random_directions,
    sliced_wasserstein,
    sw_samples,
)

__all__ = [
    "BLOCK_SIZE_ERROR",
    "LOSSES",
    "SCALE_ERROR",
    "Loss",
    "LossOptions",
    "ModelOutputs",
    "build_loss",
    "random_directions",
    "register_loss",
    "sliced_wasserstein",
    "sw_samples",
]


def _reduce(per_item: Tensor, reduction: str) -> Tensor:
    return per_item.mean() if reduction == "mean" else per_item.sum()


# --- point-wise losses: (output, target, reduction) -> scalar ------------------------------------


def mse(output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Mean squared error over every element."""
    return F.mse_loss(output, target, reduction=reduction)


def l2(output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Squared error summed over hidden, then reduced over tokens (TesseraQ's block loss)."""
    return _reduce((output - target).pow(2).sum(-1), reduction)


def dist(output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Match each channel's first two moments over tokens: MSE of means plus MSE of std devs."""
    o, t = tokens(output), tokens(target)
    mean_term = F.mse_loss(o.mean(0), t.mean(0), reduction=reduction)
    std_term = F.mse_loss(o.std(0), t.std(0), reduction=reduction)
    return mean_term + std_term


def kl(output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """KL(target || output) between softmax distributions over hidden, per token.

    Both sides go through log-softmax first: feeding raw activations to ``kl_div`` (as some tools
    do) is not a divergence at all.
    """
    log_q = F.log_softmax(tokens(output), dim=-1)
    log_p = F.log_softmax(tokens(target), dim=-1)
    per_token = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    return _reduce(per_token, reduction)


PointwiseFn = Callable[[Tensor, Tensor, str], Tensor]


# --- loss objects ----------------------------------------------------------------------------------


class PointwiseLoss(Loss):
    """Wraps a point-wise function with its reduction and the fp32 compute rule.

    ``per_token``: the function's terms are one per token (``kl``), so on whole-model outputs it can run
    over logits made a chunk of positions at a time (:func:`per_token_over_logits`).
    """

    def __init__(self, name: str, fn: PointwiseFn, reduction: str, per_token: bool = False) -> None:
        self.name, self.fn, self.reduction, self.per_token = name, fn, reduction, per_token

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        return self.fn(compute_dtype(output), compute_dtype(target), self.reduction)

    def model_objective(self, student: ModelOutputs, teacher: ModelOutputs) -> Tensor:
        if self.per_token and (student.logits is None or teacher.logits is None):
            return per_token_over_logits(self.fn, student, teacher, self.reduction)
        return super().model_objective(student, teacher)


class HybridLoss(Loss):
    """``base_weight * base + sw_weight * SW``: point-wise fidelity plus distribution alignment.

    The SW weight is meant relative to a per-element base loss (``mse``). A base that sums over the
    hidden width (``l2``) is ``width`` times larger for the same error, so with ``per_width_sw`` the
    SW term is multiplied by the width as well: ``l2_sw`` is then exactly ``width * mse_sw`` and the
    same weight gives SW the same share of the gradient in both. Without it, SW at weight 0.1 was
    0.2% or less of ``l2_sw``'s gradient on SmolLM2 (576 wide): a hybrid in name only.

    ``site_sw`` adds one SW term, at the same weight, per submodule of the block (``self_attn``,
    ``mlp``): the distribution of what attention and MLP write into the residual stream is aligned
    too, not only their sum.
    """

    needs_hidden_states = True

    def __init__(
        self,
        name: str,
        base: Loss,
        sw: Loss,
        weights: Mapping[str, float],
        per_width_sw: bool = False,
        site_sw: Mapping[str, Loss] | None = None,
    ) -> None:
        self.name, self.base, self.sw = name, base, sw
        self.base_weight, self.sw_weight = float(weights["base"]), float(weights["sw"])
        self.per_width_sw = per_width_sw
        self.site_sw = dict(site_sw or {})
        self.sites = tuple(self.site_sw)
        self.block_sizes = sw.block_sizes

    def _sw_weight(self, output: Tensor) -> float:
        return self.sw_weight * (output.shape[-1] if self.per_width_sw else 1)

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        terms = self.terms(output, target)
        return terms["base"] + terms["sw"]

    def terms(self, output: Tensor, target: Tensor) -> dict[str, Tensor]:
        return {
            "base": self.base_weight * self.base(output, target),
            "sw": self._sw_weight(output) * self.sw(output, target),
        }

    def site_terms(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {
            f"sw_{site}": self._sw_weight(outputs[site]) * loss(outputs[site], targets[site])
            for site, loss in self.site_sw.items()
        }

    def model_objective(self, student: ModelOutputs, teacher: ModelOutputs) -> Tensor:
        """The base loss on the logits plus the weighted SW term on the final hidden states."""
        terms = self.model_terms(student, teacher)
        return terms["base"] + terms["sw"]

    def model_terms(self, student: ModelOutputs, teacher: ModelOutputs) -> dict[str, Tensor]:
        return {
            "base": self.base_weight * self.base.model_objective(student, teacher),
            "sw": self.sw_weight * self.sw.model_objective(student, teacher),
        }

    def reseed(self, seed: int, keep_learned: bool = False) -> None:
        self.sw.reseed(seed, keep_learned)
        for i, loss in enumerate(self.site_sw.values(), start=1):
            loss.reseed(seed + SITE_SEED_STRIDE * i, keep_learned)


# --- registry --------------------------------------------------------------------------------------

LossFactory = Callable[[LossOptions], Loss]
LOSSES: dict[str, LossFactory] = {}
# Site i's SW draws from seed + SITE_SEED_STRIDE * i: far from the block seeds (seed + block index).
SITE_SEED_STRIDE = 1_000_003


def register_loss(*names: str) -> Callable[[LossFactory], LossFactory]:
    """Register a factory under one or more names (aliases share one entry)."""

    def decorate(factory: LossFactory) -> LossFactory:
        for name in names:
            LOSSES[name] = factory
        return factory

    return decorate


def _sw_from(options: LossOptions, seed: int | None = None) -> SlicedWassersteinLoss:
    seed = options.seed if seed is None else seed
    return SlicedWassersteinLoss(options.sw_num_projections, options.sw_block_size, options.sw_p, seed)


SW_FACTORIES: dict[str, LossFactory] = {
    "sw": _sw_from,
    "max_sw": lambda o: MaxSlicedLoss(
        o.sw_num_projections, o.sw_block_size, o.sw_p, o.seed, o.sw_ascent_steps, o.sw_step_size
    ),
    "learned_sw": lambda o: LearnedProjectionLoss(
        o.sw_num_projections, o.sw_block_size, o.sw_p, o.seed, o.sw_step_size
    ),
    "ms_sw": lambda o: MultiScaleLoss(o.sw_num_projections, o.sw_scales, o.sw_p, o.seed),
}
POINTWISE_FACTORIES: dict[str, LossFactory] = {
    "mse": lambda o: PointwiseLoss("mse", mse, o.reduction),
    "l2": lambda o: PointwiseLoss("l2", l2, o.reduction),
    "dist": lambda o: PointwiseLoss("dist", dist, o.reduction),
    "kl": lambda o: PointwiseLoss("kl", kl, o.reduction),
    "kd": lambda o: PointwiseLoss("kd", kl, o.reduction, per_token=True),
}


def _hybrid(base: str, term: str) -> LossFactory:
    name, sites = f"{base}_{term}", term == "site_sw"

    def build(o: LossOptions) -> HybridLoss:
        site_sw = (
            {site: _sw_from(o, o.seed + SITE_SEED_STRIDE * i) for i, site in enumerate(o.sw_sites, start=1)}
            if sites
            else None
        )
        per_width = base == "l2" and o.reduction == "mean"
        sw = SW_FACTORIES["sw" if sites else term](o)
        return HybridLoss(name, LOSSES[base](o), sw, o.hybrid_weights, per_width, site_sw)

    return build


# every name quant_core.loss_options declares, in its order
for _name in POINTWISE_LOSSES:
    register_loss(_name)(POINTWISE_FACTORIES[_name])
for _alias, _term in SW_ALIASES.items():
    register_loss(_alias)(SW_FACTORIES[_term])
for _term in SW_TERMS:
    register_loss(_term)(SW_FACTORIES[_term])
for _base, _term in HYBRIDS:
    register_loss(f"{_base}_{_term}")(_hybrid(_base, _term))


def build_loss(method: str, **kwargs: Any) -> Loss:
    """The loss registered as ``method``, configured by LightCompress-style keyword options."""
    return loss_from_options(method, LossOptions.from_dict(kwargs))


def loss_from_options(method: str, options: LossOptions) -> Loss:
    """The loss registered as ``method`` with validated ``options``."""
    return LOSSES[known_loss(method, "method")](options)
