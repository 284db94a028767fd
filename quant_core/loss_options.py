"""The losses' names and options, declared without torch.

A job names its loss and its options where the request enters (the API, the command line), which
must not load the numerical stack; quant_core.losses builds each loss under these names from these
options. Option names follow LightCompress's ``loss_kwargs`` so configs carry over.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, Field, StrictInt

from quant_core.errors import ConfigError
from quant_core.options import NonNegativeNumber, Number, Options, PositiveCount, one_of

BLOCK_SIZE_ERROR = "seq_len must be divisible by sw_block_size"
SCALE_ERROR = "seq_len must be divisible by every entry of sw_scales"
POINTWISE_LOSSES = ("mse", "l2", "dist", "kl", "kd")
# The SW family by the suffix its losses carry: alone (``max_sw``) and after a base (``mse_max_sw``).
SW_TERMS = ("sw", "max_sw", "learned_sw", "ms_sw")
SW_ALIASES = {"sliced_wasserstein": "sw"}
# (base, term): the hybrid ``base_term``; ``site_sw`` aligns the block's submodules' outputs too
HYBRIDS: tuple[tuple[str, str], ...] = (
    *((base, "sw") for base in ("mse", "l2", "kd")),
    *((base, term) for base in ("mse", "l2") for term in ("max_sw", "learned_sw", "ms_sw", "site_sw")),
)
LOSS_NAMES: tuple[str, ...] = (
    *POINTWISE_LOSSES,
    *SW_ALIASES,
    *SW_TERMS,
    *(f"{base}_{term}" for base, term in HYBRIDS),
)
MULTI_SCALE_TERM = "ms_sw"


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


def known_loss(name: str, field: str = "loss") -> str:
    """``name`` if a loss is declared under it, else an error that lists them."""
    if name not in LOSS_NAMES:
        raise ConfigError(f"Unknown loss method: {name}. Valid methods: {', '.join(LOSS_NAMES)}", field)
    return name


def token_blocks(loss: str, options: LossOptions) -> tuple[int, ...]:
    """The token-block sizes ``loss``'s samples take, each of which must divide the window length."""
    if loss.endswith(MULTI_SCALE_TERM):
        return tuple(scale for scale in options.sw_scales if scale > 1)
    return () if options.sw_block_size is None else (options.sw_block_size,)
