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
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from quant_core.errors import ConfigError

REDUCTIONS = ("mean", "sum")
HYBRID_WEIGHT_DEFAULTS = {"base": 1.0, "sw": 0.1}
BLOCK_SIZE_ERROR = "seq_len must be divisible by sw_block_size"
# Projections beyond this cost memory and time without a measurable gain in the estimate.
MAX_PROJECTIONS = 65536


@dataclass(frozen=True)
class LossOptions:
    """The keyword options every loss accepts; each loss reads the ones that concern it."""

    sw_num_projections: int = 16
    sw_block_size: int | None = None
    hybrid_weights: Mapping[str, float] = field(default_factory=lambda: dict(HYBRID_WEIGHT_DEFAULTS))
    reduction: str = "mean"
    sw_p: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not _is_int(self.sw_num_projections) or not 1 <= self.sw_num_projections <= MAX_PROJECTIONS:
            raise ConfigError(
                f"sw_num_projections must be a positive integer up to {MAX_PROJECTIONS}", "sw_num_projections"
            )
        if self.sw_block_size is not None and (not _is_int(self.sw_block_size) or self.sw_block_size < 1):
            raise ConfigError("sw_block_size must be a positive integer or null", "sw_block_size")
        if self.reduction not in REDUCTIONS:
            raise ConfigError(f"reduction must be one of {', '.join(REDUCTIONS)}", "reduction")
        if self.sw_p not in (1, 2):
            raise ConfigError("sw_p must be 1 (sliced W1) or 2 (squared sliced W2)", "sw_p")
        if not _is_int(self.seed):
            raise ConfigError("seed must be an integer", "seed")
        if not isinstance(self.hybrid_weights, Mapping):
            raise ConfigError("hybrid_weights must be a mapping with keys 'base' and 'sw'", "hybrid_weights")
        unknown = set(self.hybrid_weights) - set(HYBRID_WEIGHT_DEFAULTS)
        if unknown:
            raise ConfigError(
                f"Unknown hybrid_weights key(s): {', '.join(sorted(unknown))}; valid keys: base, sw",
                "hybrid_weights",
            )
        for key, value in self.hybrid_weights.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"hybrid_weights.{key} must be a finite number", f"hybrid_weights.{key}")
            if value < 0:
                raise ConfigError(f"hybrid_weights.{key} must be non-negative", f"hybrid_weights.{key}")
        object.__setattr__(self, "hybrid_weights", {**HYBRID_WEIGHT_DEFAULTS, **self.hybrid_weights})

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> LossOptions:
        """Build options from user keywords, rejecting unknown names instead of ignoring typos."""
        valid = [f.name for f in fields(cls)]
        for name in kwargs:
            if name not in valid:
                raise ConfigError(f"Unknown loss option: {name}. Valid options: {', '.join(valid)}", name)
        return cls(**kwargs)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _compute_dtype(t: Tensor) -> Tensor:
    """Half-precision outputs are compared in fp32 (sorting and squaring lose too much in 16 bits)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _reduce(per_item: Tensor, reduction: str) -> Tensor:
    return per_item.mean() if reduction == "mean" else per_item.sum()


def _tokens(t: Tensor) -> Tensor:
    """Flatten ``[..., hidden]`` to ``[tokens, hidden]``."""
    return t.reshape(-1, t.shape[-1])


# --- point-wise losses: (output, target, reduction) -> scalar ------------------------------------


def mse(output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Mean squared error over every element."""
    return F.mse_loss(output, target, reduction=reduction)


def l2(output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Squared error summed over hidden, then reduced over tokens (TesseraQ's block loss)."""
    return _reduce((output - target).pow(2).sum(-1), reduction)


def dist(output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Match each channel's first two moments over tokens: MSE of means plus MSE of std devs."""
    o, t = _tokens(output), _tokens(target)
    mean_term = F.mse_loss(o.mean(0), t.mean(0), reduction=reduction)
    std_term = F.mse_loss(o.std(0), t.std(0), reduction=reduction)
    return mean_term + std_term


def kl(output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """KL(target || output) between softmax distributions over hidden, per token.

    Both sides go through log-softmax first: feeding raw activations to ``kl_div`` (as some tools
    do) is not a divergence at all.
    """
    log_q = F.log_softmax(_tokens(output), dim=-1)
    log_p = F.log_softmax(_tokens(target), dim=-1)
    per_token = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    return _reduce(per_token, reduction)


PointwiseFn = Callable[[Tensor, Tensor, str], Tensor]


# --- Sliced-Wasserstein ----------------------------------------------------------------------------


def sliced_wasserstein(x: Tensor, y: Tensor, directions: Tensor, p: int = 1) -> Tensor:
    """Sliced Wasserstein distance between two equal-size point clouds along given directions.

    ``x`` and ``y`` are ``[N, D]`` samples with uniform weights, ``directions`` is ``[D, K]`` with unit
    columns. Each cloud is projected with one matrix product (no copy of the clouds, and no gradient
    work for a target that needs none) and its K projections are sorted as contiguous rows; the 1-D
    distance along a direction is the mean ``|difference|`` of sorted projections (``p=1``, sliced W1)
    or its mean square (``p=2``, the squared sliced W2); the result averages over the K directions.
    """
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must both be [N, D] with equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    if directions.ndim != 2 or directions.shape[0] != x.shape[1]:
        raise ValueError(f"directions must be [D, K] with D={x.shape[1]}, got {tuple(directions.shape)}")
    if p not in (1, 2):
        raise ValueError("p must be 1 or 2")
    x, y = _compute_dtype(x), _compute_dtype(y)
    directions_t = directions.to(x.dtype).T.contiguous()  # [K, D]: projections come out as [K, N] rows
    diff = (directions_t @ x.T).sort(dim=1).values - (directions_t @ y.T).sort(dim=1).values
    per_direction = diff.abs().mean(1) if p == 1 else diff.pow(2).mean(1)
    return per_direction.mean()


def random_directions(dim: int, count: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """``count`` directions drawn uniformly on the unit sphere of R^dim, as the columns of [dim, count]."""
    gaussian = torch.randn(dim, count, generator=generator, device=generator.device, dtype=dtype)
    return gaussian / gaussian.norm(dim=0, keepdim=True)


def sw_samples(t: Tensor, block_size: int | None) -> Tensor:
    """The samples SW compares: tokens ``[B*S, D]``, or ``[B*S/b, b*D]`` blocks of b consecutive tokens."""
    if block_size is None:
        return _tokens(t)
    if t.ndim != 3:
        raise ValueError(f"sw_block_size needs outputs shaped [batch, seq, hidden], got {tuple(t.shape)}")
    batch, seq, hidden = t.shape
    if seq % block_size:
        raise ConfigError(BLOCK_SIZE_ERROR, "sw_block_size")
    return t.reshape(batch * seq // block_size, block_size * hidden)


# --- loss objects ----------------------------------------------------------------------------------


@dataclass
class ModelOutputs:
    """What a whole-model objective compares: next-token logits ``[batch, seq, vocab]`` and, when the
    loss needs them, the final hidden states ``[batch, seq, hidden]``."""

    logits: Tensor
    hidden: Tensor | None = None


class Loss:
    """A named objective ``loss(output, target) -> scalar``; ``reseed`` restarts its random draws."""

    name: str = ""
    needs_hidden_states: bool = False  # whether model_objective reads ModelOutputs.hidden

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def terms(self, output: Tensor, target: Tensor) -> dict[str, Tensor]:
        """The loss as its weighted terms, which sum to ``self(output, target)``: one term by default."""
        return {self.name: self(output, target)}

    def model_objective(self, student: ModelOutputs, teacher: ModelOutputs) -> Tensor:
        """The loss between two whole models' outputs: by default, on their next-token logits."""
        return self(student.logits, teacher.logits)

    def reseed(self, seed: int) -> None:
        """Deterministic losses have nothing to reseed."""


class PointwiseLoss(Loss):
    """Wraps a point-wise function with its reduction and the fp32 compute rule."""

    def __init__(self, name: str, fn: PointwiseFn, reduction: str) -> None:
        self.name, self.fn, self.reduction = name, fn, reduction

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        return self.fn(_compute_dtype(output), _compute_dtype(target), self.reduction)


class SlicedWassersteinLoss(Loss):
    """SW between outputs and targets with K fresh directions per call from a seeded generator.

    Redrawing at every call covers more of the sphere over training than a fixed set, while the
    seeded generator keeps whole runs reproducible; one generator per device avoids host transfers.
    """

    name = "sliced_wasserstein"
    needs_hidden_states = True

    def __init__(self, num_projections: int, block_size: int | None, p: int, seed: int) -> None:
        self.num_projections, self.block_size, self.p = num_projections, block_size, p
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self._generators.clear()

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        x, y = sw_samples(output, self.block_size), sw_samples(target, self.block_size)
        directions = random_directions(x.shape[1], self.num_projections, self.generator(x.device))
        return sliced_wasserstein(x, y, directions, self.p)

    def model_objective(self, student: ModelOutputs, teacher: ModelOutputs) -> Tensor:
        """Between whole models, SW compares the final hidden states."""
        if student.hidden is None or teacher.hidden is None:
            raise ValueError("the SW term of a whole-model objective needs both models' final hidden states")
        return self(student.hidden, teacher.hidden)


class HybridLoss(Loss):
    """``base_weight * base + sw_weight * SW``: point-wise fidelity plus distribution alignment.

    The SW weight is meant relative to a per-element base loss (``mse``). A base that sums over the
    hidden width (``l2``) is ``width`` times larger for the same error, so with ``per_width_sw`` the
    SW term is multiplied by the width as well: ``l2_sw`` is then exactly ``width * mse_sw`` and the
    same weight gives SW the same share of the gradient in both. Without it, SW at weight 0.1 was
    0.2% or less of ``l2_sw``'s gradient on SmolLM2 (576 wide): a hybrid in name only.
    """

    def __init__(
        self,
        name: str,
        base: Loss,
        sw: SlicedWassersteinLoss,
        weights: Mapping[str, float],
        per_width_sw: bool = False,
    ) -> None:
        self.name, self.base, self.sw = name, base, sw
        self.base_weight, self.sw_weight = float(weights["base"]), float(weights["sw"])
        self.per_width_sw = per_width_sw

    needs_hidden_states = True

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        terms = self.terms(output, target)
        return terms["base"] + terms["sw"]

    def terms(self, output: Tensor, target: Tensor) -> dict[str, Tensor]:
        sw_weight = self.sw_weight * (output.shape[-1] if self.per_width_sw else 1)
        return {"base": self.base_weight * self.base(output, target), "sw": sw_weight * self.sw(output, target)}

    def model_objective(self, student: ModelOutputs, teacher: ModelOutputs) -> Tensor:
        """The base loss on the logits plus the weighted SW term on the final hidden states."""
        base = self.base.model_objective(student, teacher)
        return self.base_weight * base + self.sw_weight * self.sw.model_objective(student, teacher)

    def reseed(self, seed: int) -> None:
        self.sw.reseed(seed)


# --- registry --------------------------------------------------------------------------------------

LossFactory = Callable[[LossOptions], Loss]
LOSSES: dict[str, LossFactory] = {}


def register_loss(*names: str) -> Callable[[LossFactory], LossFactory]:
    """Register a factory under one or more names (aliases share one entry)."""

    def decorate(factory: LossFactory) -> LossFactory:
        for name in names:
            LOSSES[name] = factory
        return factory

    return decorate


def _sw_from(options: LossOptions) -> SlicedWassersteinLoss:
    return SlicedWassersteinLoss(options.sw_num_projections, options.sw_block_size, options.sw_p, options.seed)


register_loss("mse")(lambda o: PointwiseLoss("mse", mse, o.reduction))
register_loss("l2")(lambda o: PointwiseLoss("l2", l2, o.reduction))
register_loss("dist")(lambda o: PointwiseLoss("dist", dist, o.reduction))
register_loss("kl")(lambda o: PointwiseLoss("kl", kl, o.reduction))
register_loss("kd")(lambda o: PointwiseLoss("kd", kl, o.reduction))
register_loss("sliced_wasserstein", "sw")(_sw_from)
register_loss("mse_sw")(lambda o: HybridLoss("mse_sw", LOSSES["mse"](o), _sw_from(o), o.hybrid_weights))
register_loss("l2_sw")(
    lambda o: HybridLoss("l2_sw", LOSSES["l2"](o), _sw_from(o), o.hybrid_weights, per_width_sw=o.reduction == "mean")
)
register_loss("kd_sw")(lambda o: HybridLoss("kd_sw", LOSSES["kd"](o), _sw_from(o), o.hybrid_weights))


def build_loss(method: str, **kwargs: Any) -> Loss:
    """The loss registered as ``method``, configured by LightCompress-style keyword options."""
    if method not in LOSSES:
        raise ConfigError(f"Unknown loss method: {method}. Valid methods: {', '.join(LOSSES)}", "method")
    return LOSSES[method](LossOptions.from_kwargs(**kwargs))
