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

A new loss is one function plus one ``@register_loss`` line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar

import torch.nn.functional as F
from pydantic import AfterValidator, Field, StrictInt
from torch import Tensor

from quant_core.errors import ConfigError
from quant_core.loss_base import Loss, ModelOutputs, compute_dtype, per_token_over_logits, tokens
from quant_core.options import NonNegativeNumber, Number, Options, PositiveCount, one_of
from quant_core.sliced import (
    BLOCK_SIZE_ERROR,
    SCALE_ERROR,
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

REDUCTIONS = ("mean", "sum")
HYBRID_WEIGHT_DEFAULTS = {"base": 1.0, "sw": 0.1}
# Projections beyond this cost memory and time without a measurable gain in the estimate.
MAX_PROJECTIONS = 65536
MAX_ASCENT_STEPS = 100


def _hybrid_weights(value: dict[str, float]) -> dict[str, float]:
    unknown = set(value) - set(HYBRID_WEIGHT_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}; valid keys: base, sw")
    return {**HYBRID_WEIGHT_DEFAULTS, **value}


def _distinct(value: tuple[Any, ...]) -> tuple[Any, ...]:
    if len(set(value)) != len(value):
        raise ValueError("must hold distinct values")
    return value


def _sw_p(value: int) -> int:
    if value not in (1, 2):
        raise ValueError("must be 1 (sliced W1) or 2 (squared sliced W2)")
    return value


class LossOptions(Options):
    """The keyword options every loss accepts; each loss reads the ones that concern it."""

    what: ClassVar[str] = "loss option"

    sw_num_projections: Annotated[StrictInt, Field(ge=1, le=MAX_PROJECTIONS)] = Field(
        16, description="random directions per SW estimate"
    )
    sw_block_size: PositiveCount | None = Field(
        None, description="SW over blocks of this many tokens (it must divide seq_len); unset: token level"
    )
    hybrid_weights: Annotated[dict[str, NonNegativeNumber], AfterValidator(_hybrid_weights)] = Field(
        default_factory=lambda: dict(HYBRID_WEIGHT_DEFAULTS),
        description="weights of the point-wise (base) and SW (sw) terms of a hybrid loss",
    )
    reduction: Annotated[str, one_of(*REDUCTIONS)] = Field("mean", description="mean or sum over items")
    sw_p: Annotated[StrictInt, AfterValidator(_sw_p)] = Field(1, description="1: sliced W1; 2: squared sliced W2")
    seed: StrictInt = Field(0, description="seed of the SW directions (default: the job's)")
    sw_ascent_steps: Annotated[StrictInt, Field(ge=0, le=MAX_ASCENT_STEPS)] = Field(
        4, description="max-sliced: ascent steps per call"
    )
    sw_step_size: Annotated[Number, Field(gt=0, le=math.pi)] = Field(
        0.2, description="max-sliced and learned projections: first ascent step, in radians"
    )
    sw_scales: Annotated[
        tuple[Annotated[StrictInt, Field(ge=1)], ...], Field(min_length=1), AfterValidator(_distinct)
    ] = Field((1, 4, 16), description="multi-scale: 1 is the token level, b > 1 blocks of b tokens")
    sw_sites: Annotated[
        tuple[Annotated[str, Field(min_length=1)], ...], Field(min_length=1), AfterValidator(_distinct)
    ] = Field(("self_attn", "mlp"), description="site SW: the block's submodules whose outputs align")


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


# The SW family by the suffix its losses carry: alone (``max_sw``) and after a base (``mse_max_sw``).
SW_TERMS: dict[str, LossFactory] = {
    "sw": _sw_from,
    "max_sw": lambda o: MaxSlicedLoss(
        o.sw_num_projections, o.sw_block_size, o.sw_p, o.seed, o.sw_ascent_steps, o.sw_step_size
    ),
    "learned_sw": lambda o: LearnedProjectionLoss(
        o.sw_num_projections, o.sw_block_size, o.sw_p, o.seed, o.sw_step_size
    ),
    "ms_sw": lambda o: MultiScaleLoss(o.sw_num_projections, o.sw_scales, o.sw_p, o.seed),
}


def _hybrid(base: str, term: str, sites: bool = False) -> LossFactory:
    name = f"{base}_{term}" if not sites else f"{base}_site_sw"

    def build(o: LossOptions) -> HybridLoss:
        site_sw = (
            {site: _sw_from(o, o.seed + SITE_SEED_STRIDE * i) for i, site in enumerate(o.sw_sites, start=1)}
            if sites
            else None
        )
        per_width = base == "l2" and o.reduction == "mean"
        return HybridLoss(name, LOSSES[base](o), SW_TERMS[term](o), o.hybrid_weights, per_width, site_sw)

    return build


register_loss("mse")(lambda o: PointwiseLoss("mse", mse, o.reduction))
register_loss("l2")(lambda o: PointwiseLoss("l2", l2, o.reduction))
register_loss("dist")(lambda o: PointwiseLoss("dist", dist, o.reduction))
register_loss("kl")(lambda o: PointwiseLoss("kl", kl, o.reduction))
register_loss("kd")(lambda o: PointwiseLoss("kd", kl, o.reduction, per_token=True))
register_loss("sliced_wasserstein", "sw")(_sw_from)
for _term in ("max_sw", "learned_sw", "ms_sw"):
    register_loss(_term)(SW_TERMS[_term])
for _base in ("mse", "l2", "kd"):
    register_loss(f"{_base}_sw")(_hybrid(_base, "sw"))
for _base in ("mse", "l2"):
    for _term in ("max_sw", "learned_sw", "ms_sw"):
        register_loss(f"{_base}_{_term}")(_hybrid(_base, _term))
    register_loss(f"{_base}_site_sw")(_hybrid(_base, "sw", sites=True))


def build_loss(method: str, **kwargs: Any) -> Loss:
    """The loss registered as ``method``, configured by LightCompress-style keyword options."""
    if method not in LOSSES:
        raise ConfigError(f"Unknown loss method: {method}. Valid methods: {', '.join(LOSSES)}", "method")
    return LOSSES[method](LossOptions.from_dict(kwargs))
