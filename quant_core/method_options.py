"""Every method's options and what a job needs to know of a method before running it, without torch.

A request is checked where it enters (the API, the command line, the form), and the API must not load
the numerical stack to do it: each method's options model lives here, with the facts a job's checks
read (its name, default loss, whether it trains the whole model, which option rotates it). The
method classes (quant_core.methods) take these as their ``options_type`` and read the facts from it.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import Field, StrictBool

from quant_core.errors import ConfigError
from quant_core.options import (
    Count,
    Fraction,
    NonNegativeNumber,
    Number,
    Options,
    PositiveCount,
    PositiveNumber,
    one_of,
    typed_by,
)

INCOHERENCE_CHOICES = ("none", "hadamard")
# Why a rotated basis cannot be packed, and what packs instead (quant_core.absorbed_rotation).
UNPACKABLE_ROTATION = (
    "incoherence: hadamard keeps each linear in its own rotated basis, which no packed format holds "
    "(rotation: hadamard rotates the model instead, absorbed into its weights, and packs)"
)


class MethodOptions(Options):
    """Base for a method's options (quant_core.options) and the method's facts a job checks."""

    what: ClassVar[str] = "method option"
    method: ClassVar[str]  # the name a job asks for it by
    summary: ClassVar[str]  # one line for the catalog
    default_loss: ClassVar[str] = "mse"  # the loss a job gets when it names none
    whole_model: ClassVar[bool] = False  # trains the whole model at once instead of block by block
    rotation_option: ClassVar[str] = "incoherence"  # the option that turns the rotation on (where a refusal points)

    @property
    def rotates(self) -> bool:
        """Whether the method quantizes in a rotated basis, so its weights lie on no grid the export can pack."""
        return False


class IncoherenceOptions(MethodOptions):
    """Options of a method that can quantize in QuIP's rotated basis (:mod:`quant_core.incoherence`)."""

    incoherence: Annotated[str, one_of(*INCOHERENCE_CHOICES)] = Field(
        "none", description="hadamard: quantize in QuIP's randomized Hadamard basis (fake-quant export only)"
    )

    @property
    def rotates(self) -> bool:
        return self.incoherence == "hadamard"


class RtnOptions(IncoherenceOptions):
    method: ClassVar[str] = "rtn"
    summary: ClassVar[str] = (
        "Round-to-nearest: every weight to its nearest grid point. The baseline every method must beat."
    )
    clip_search: StrictBool = Field(False, description="each group's clipping from the searched ratio")

    def model_post_init(self, context: Any) -> None:
        if self.clip_search and self.rotates:
            raise ConfigError("clip_search is not available with incoherence for rtn", "clip_search")


class GptqOptions(IncoherenceOptions):
    """1% damping, lazy batches of 128 columns, and activation order with static groups.

    Act-order with static groups is what llm-compressor's GPTQModifier does by default; against the
    natural order on SmolLM2-135M: bench/HISTORY.md (`bench.quality`, W4 rows).
    """

    method: ClassVar[str] = "gptq"
    summary: ClassVar[str] = (
        "GPTQ: quantize one column at a time and spread each column's rounding error over the rest."
    )

    block_size: PositiveCount = Field(128, description="columns per lazy batch of the column walk")
    damp: PositiveNumber = Field(0.01, description="Hessian damping, a fraction of its mean diagonal")
    act_order: StrictBool = Field(True, description="walk the columns by decreasing Hessian diagonal")
    static_groups: StrictBool = Field(True, description="fix every group's grid before the walk")
    batch_size: PositiveCount = Field(8, description="windows per forward when collecting Hessians")
    clip_search: StrictBool | None = Field(
        None,
        description="also walk from the searched clipping's static grids, keeping whichever leaves the smaller "
        "error; unset: on whenever the grids are static",
    )
    true_sequential: StrictBool = Field(
        True, description="each stage's Hessian with the earlier stages already quantized"
    )
    staged_pass: StrictBool | None = Field(
        None,
        description="one suspended pass per block instead of a replay per stage; unset: on a GPU or one CPU thread",
    )
    match_float: StrictBool = Field(
        False,
        description="fit each stage to the full-precision model's outputs on its own inputs, absorbing the "
        "earlier layers' error (asymmetric calibration)",
    )
    match_float_damp: PositiveNumber = Field(
        1.0,
        description="with match_float, the fit's pull toward the float weights, times the mean Hessian diagonal",
    )

    def model_post_init(self, context: Any) -> None:
        if self.clip_search and not self.static_groups:
            raise ConfigError(
                "clip_search needs static_groups: true (scales fixed before the column walk)", "clip_search"
            )
        if self.match_float and not self.true_sequential:
            raise ConfigError("match_float needs true_sequential: true (inputs paired stage by stage)", "match_float")


class AwqOptions(MethodOptions):
    """AWQ's search grid: exponents 0, 1/20, ..., 19/20; clipping ratios 1, 0.95, ..., 0.55
    (``1 - i / n_grid`` for ``i < max_shrink * n_grid``, as in AWQ); fewer than two ratios means no
    clipping search."""

    method: ClassVar[str] = "awq"
    summary: ClassVar[str] = "AWQ: activation-aware per-channel scales and clipping, searched with any loss."

    n_grid: PositiveCount = Field(20, description="grid points of the scale exponent and of the clipping ratio")
    max_shrink: Fraction = Field(0.5, description="the largest share of the range the clipping may cut")
    search_samples: PositiveCount = Field(32, description="windows the searches measure on")
    clip: StrictBool = Field(True, description="search the clipping after the scales")


SCHEDULES = ("budget", "paper")
OMNIQUANT_INITS = ("clip_search", "full")


class OmniQuantOptions(MethodOptions):
    """Unset values are left to the schedule (see the module docstring)."""

    method: ClassVar[str] = "omniquant"
    summary: ClassVar[str] = "OmniQuant's learnable weight clipping (LWC), with any alignment loss."

    schedule: Annotated[str, one_of(*SCHEDULES)] = Field(
        "budget", description="budget: warm-up and cosine over a fixed step count; paper: constant rate, epochs"
    )
    epochs: Count | None = Field(None, description="passes over the windows per block (or give steps)")
    steps: Count | None = Field(None, description="optimizer steps per block (or give epochs)")
    lr: PositiveNumber | None = Field(None, description="learning rate of the clipping factors")
    init: Annotated[str, one_of(*OMNIQUANT_INITS)] | None = Field(
        None, description="starting factors: clip_search (searched clipping) or full (the paper's full range)"
    )
    weight_decay: NonNegativeNumber = Field(0.0, description="AdamW weight decay")
    batch_size: PositiveCount = Field(1, description="windows per step")
    init_logit: Number = Field(4.0, description="starting logit of the factors with init: full (sigmoid 0.98)")

    def model_post_init(self, context: Any) -> None:
        if self.epochs is not None and self.steps is not None:
            raise ConfigError("give either epochs or steps, not both", "steps")


TESSERAQ_INITS = ("awq", "rtn", "gptq")


class TesseraQOptions(MethodOptions):
    """The paper's schedule is 20 rounds of 250 steps on batches of 4; the paper starts from AWQ or
    OmniQuant, here from GPTQ by default (W3 on SmolLM2, a short CPU schedule: 48.6 perplexity on
    Persuasion, against 64.5 from plain round-to-nearest before; bench/HISTORY.md)."""

    method: ClassVar[str] = "tesseraq"
    summary: ClassVar[str] = "TesseraQ: progressive adaptive rounding plus dequantization-scale tuning, with any loss."
    default_loss: ClassVar[str] = "l2"

    rounds: PositiveCount = Field(20, description="rounds of progressive hardening of the rounding")
    steps_per_round: Count = Field(250, description="optimizer steps per round")
    batch_size: PositiveCount = Field(4, description="windows per step")
    lr: PositiveNumber = Field(1e-3, description="learning rate of the rounding variables")
    scale_lr: PositiveNumber = Field(1e-4, description="learning rate of the dequantization scales")
    init: Annotated[str, one_of(*TESSERAQ_INITS)] = Field(
        "gptq", description="starting codes and scales: awq, rtn or gptq"
    )
    clip_search: StrictBool = Field(True, description="the starting method uses the searched clipping")


INIT_CHOICES = ("rand", "orig")


class DiscQuantOptions(IncoherenceOptions):
    """The authors' options under short names (their ``discq.py`` flag in brackets).

    ``lr`` (learning_rate), ``clamp`` (clamp_value), ``rho`` (rho_factor): defaults from their
    published Phi-3 script. ``n_samples`` calibration windows are consumed in all (their
    number_of_iterations x batch x accumulation; default: each window once), ``batch_size`` per
    forward and ``grad_accum`` forwards per optimizer step; ``warmup`` (number_of_warmup) is in
    optimizer steps, default an eighth of them (128 of 1024 in their runs). ``init`` (init_x) starts
    ``x`` uniformly at random (``rand``) or at ``y``, the float weights (``orig``). ``early_save:
    greedy`` (early_save_mode) skips training and rounds greedily. ``grad_checkpoint`` (grad_ckpt),
    ``incoherence: hadamard`` (quip). ``weight_decay`` is 0 here where their AdamW kept torch's 0.01:
    decay pulls every ``x`` toward the round-down corner. ``memory_budget_gib`` caps the memory the
    job may assume (default: what the device has free).
    """

    method: ClassVar[str] = "discquant"
    summary: ClassVar[str] = (
        "DiscQuant: round every weight up or down so that the whole model's next-token distributions survive."
    )
    default_loss: ClassVar[str] = "kd"
    whole_model: ClassVar[bool] = True

    lr: PositiveNumber = Field(0.1, description="learning rate of x (learning_rate)")
    clamp: PositiveNumber = Field(1.0, description="gradient clamp (clamp_value)")
    rho: NonNegativeNumber = Field(200.0, description="weight of the linear term toward y (rho_factor)")
    n_samples: PositiveCount | None = Field(None, description="windows consumed in all; unset: each once")
    batch_size: PositiveCount = Field(1, description="windows per forward")
    grad_accum: PositiveCount = Field(8, description="forwards per optimizer step")
    warmup: Count | None = Field(None, description="warm-up optimizer steps; unset: an eighth of them")
    weight_decay: NonNegativeNumber = Field(0.0, description="AdamW weight decay")
    init: Annotated[str, one_of(*INIT_CHOICES)] = Field("rand", description="x starts at random (rand) or at y (orig)")
    early_save: Annotated[str, one_of("greedy")] | None = Field(
        None, description="greedy: skip training and round greedily; unset: train"
    )
    grad_checkpoint: StrictBool = Field(False, description="recompute activations in the backward pass")
    memory_budget_gib: PositiveNumber | None = Field(
        None, description="memory the job may assume; unset: what the device has free"
    )


BASES = ("gptq", "rtn")


class NormTweakOptions(MethodOptions):
    """``base_options`` configure the base method (e.g. ``{incoherence: hadamard, clip_search: true}``)."""

    method: ClassVar[str] = "normtweaking"
    summary: ClassVar[str] = "Norm tweaking: quantize the weights, then retrain only the block's normalization weights."
    rotation_option: ClassVar[str] = "base_options.incoherence"

    base: Annotated[str, one_of(*BASES)] = Field("gptq", description="the method whose weights the norms adapt to")
    base_options: Annotated[GptqOptions | RtnOptions, typed_by("base", lambda name: METHOD_OPTIONS.get(name))] = Field(
        default_factory=dict, validate_default=True, description="the base method's options"
    )
    epochs: Count = Field(1, description="passes over the windows per block")
    lr: PositiveNumber = Field(1e-5, description="learning rate of the norm weights (first block; grows with depth)")
    depth_scale: NonNegativeNumber = Field(5.0, description="how much the learning rate grows toward the last block")
    batch_size: PositiveCount = Field(1, description="windows per step")

    @property
    def rotates(self) -> bool:
        """The weights are the base method's, so its rotation decides what the export can hold."""
        return self.base_options.rotates


DECLARED: tuple[type[MethodOptions], ...] = (
    AwqOptions,
    DiscQuantOptions,
    GptqOptions,
    NormTweakOptions,
    OmniQuantOptions,
    RtnOptions,
    TesseraQOptions,
)
METHOD_OPTIONS: dict[str, type[MethodOptions]] = {options.method: options for options in DECLARED}  # listed by name
AnyMethodOptions = (
    RtnOptions | GptqOptions | AwqOptions | OmniQuantOptions | TesseraQOptions | DiscQuantOptions | NormTweakOptions
)


def method_options_type(name: str) -> type[MethodOptions]:
    """The options model of the method called ``name``, or an error that lists the methods."""
    if name not in METHOD_OPTIONS:
        raise ConfigError(f"Unknown quantization method: {name}. Valid methods: {', '.join(METHOD_OPTIONS)}", "method")
    return METHOD_OPTIONS[name]
