"""AWQ: activation-aware per-channel scales and clipping, searched with any loss.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"
(MLSys 2024). Input channels that carry large activations matter most, so each group of linears
that reads one input is quantized as ``Q(W diag(s)) diag(s)^-1`` with ``s = mean|x|^alpha``
(normalized), and ``diag(s)^-1`` is folded into the module that produces the input (a norm, or the
linear before). The exponent ``alpha`` is a grid search that compares the output of the smallest
module containing the group (attention for q/k/v, the MLP for gate/up, the linear itself otherwise)
with its full-precision output. Then each linear's clipping ratio per row and group is searched on
the linear's own output (:mod:`quant_core.clip_search`, AWQ's ``auto_clip``). Query and key are not
clipped: the softmax amplifies their error.

The scale search's criterion is the job's loss (``mse`` reproduces AWQ's; ``mse_sw`` gives AWQ+SW).
Every candidate is scored with the same random SW directions, so the comparison is not noise.

Which module feeds which linears is a per-architecture layout, checked against a real forward pass
(the norm's output must be the very tensor the linears read) and by folding without quantization,
which must leave the block's output unchanged; an unknown architecture gets a clear error. A norm
that multiplies by ``1 + weight`` (Gemma's) takes the fold as ``weight <- (1 + weight) / s - 1``. A
fused projection (Phi-3's qkv and gate_up, GPT-2's c_attn) is scaled as a whole from its norm; the
mapping into the projection after it is left out, since only part of its outputs feed that one.

On several ranks each runs the sampled windows it holds: the activation means and the clipping's
Gram matrices are summed over ranks, and every candidate's output is gathered, so each candidate is
scored on the whole sample's tokens (an SW term sees their distribution, as in one process) and
every rank picks the same exponent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from quant_core.clip_search import clip_ratios, search_clipping
from quant_core.distributed import HeldBatch
from quant_core.errors import ConfigError
from quant_core.method_options import AwqOptions
from quant_core.methods.base import (
    BlockData,
    QuantMethod,
    register_method,
    rtn_quantized,
    stage_scheme,
    write_quantized,
)
from quant_core.methods.clipping import mean_ratio
from quant_core.methods.layer_inputs import capture_call, first_argument, input_grams, input_groups, layer_input
from quant_core.model_structure import LinearLike, linear_named, quantizable_linears, stored_layout, weight_matrix
from quant_core.quantizer import fake_quantize

FOLD_TOLERANCE = 1e-3  # relative change of the block output allowed by folding scales in float32
FOLD_TOLERANCE_EPS = 8  # in 16-bit dtypes, folding rounds every weight: allow a few machine epsilons


@dataclass(frozen=True)
class ScaleMapping:
    """``previous``'s output is the input of ``layers``: scales divide the one and multiply the others."""

    previous: str
    layers: tuple[str, ...]


_LLAMA_STYLE = (
    ScaleMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",)),
    ScaleMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScaleMapping("mlp.up_proj", ("mlp.down_proj",)),
)
_GEMMA = (  # each sublayer's output passes a norm of its own before the residual: the MLP reads the pre-FF norm
    ScaleMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",)),
    ScaleMapping("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScaleMapping("mlp.up_proj", ("mlp.down_proj",)),
)
_PHI3 = (
    ScaleMapping("input_layernorm", ("self_attn.qkv_proj",)),
    ScaleMapping("post_attention_layernorm", ("mlp.gate_up_proj",)),
)
_GPT2 = (ScaleMapping("ln_1", ("attn.c_attn",)), ScaleMapping("ln_2", ("mlp.c_fc",)))
_OPT = (
    ScaleMapping("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleMapping("self_attn.v_proj", ("self_attn.out_proj",)),
    ScaleMapping("final_layer_norm", ("fc1",)),
    ScaleMapping("fc1", ("fc2",)),  # ReLU between them commutes with positive scales
)
LAYOUTS: dict[str, tuple[ScaleMapping, ...]] = {  # the first whose names all exist is taken: Gemma before Llama
    "Gemma 2 and 3": _GEMMA,
    "llama-style (Llama, Mistral, Qwen2, Qwen3)": _LLAMA_STYLE,
    "Phi-3": _PHI3,
    "OPT": _OPT,
    "GPT-2": _GPT2,
}
UNCLIPPED = ("q_proj", "k_proj")


def find_layout(block: nn.Module) -> tuple[ScaleMapping, ...]:
    """The scale layout whose module names all exist in ``block``."""
    names = {name for name, _ in block.named_modules()}
    for layout in LAYOUTS.values():
        if all(m.previous in names and set(m.layers) <= names for m in layout):
            return layout
    raise ConfigError(f"AWQ has no scale layout for {type(block).__name__}; supported: {', '.join(LAYOUTS)}", "method")


def _inspected(layers: tuple[str, ...]) -> str:
    """The smallest module containing every layer of the group (the layer itself when alone)."""
    parts = [name.split(".") for name in layers]
    common: list[str] = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) > 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _scale_rows(module: nn.Module, scales: Tensor) -> None:
    """Divide a producer's output channels by ``scales``: a norm's weight (and bias) or a linear's rows."""
    with torch.no_grad():
        if isinstance(module, LinearLike):
            weight_matrix(module).div_(scales.to(module.weight.dtype).unsqueeze(1))
        else:
            weight = module.weight  # a norm's scale vector, multiplying as offset + weight
            assert isinstance(weight, Tensor)
            offset = _norm_offset(module)
            weight.add_(offset).div_(scales.to(weight.dtype)).sub_(offset)
        bias: Tensor | None = getattr(module, "bias", None)
        if bias is not None:
            bias.div_(scales.to(bias.dtype))


def _norm_offset(norm: nn.Module) -> float:
    """1 for a norm that multiplies by ``1 + weight`` (Gemma's), 0 for one that multiplies by ``weight``:
    what the norm gives with its weight at zero tells them apart, whatever the class."""
    weight = norm.weight
    assert isinstance(weight, Tensor)
    saved = weight.detach().clone()
    try:
        weight.zero_()
        bias: Tensor | None = getattr(norm, "bias", None)
        probe = torch.linspace(-1, 1, weight.numel(), dtype=weight.dtype, device=weight.device)[None]
        output = norm(probe) - (0 if bias is None else bias)
    finally:
        weight.copy_(saved)
    return 1.0 if bool(output.abs().max() > 0) else 0.0


def _scale_columns(layer: LinearLike, scales: Tensor) -> None:
    with torch.no_grad():
        weight_matrix(layer).mul_(scales.to(layer.weight.dtype))


class _Sample:
    """The windows AWQ's searches measure on, of which this rank holds ``held`` (``hidden``'s first rows).

    Each rank runs the sampled windows it holds and :meth:`gather` brings every rank's rows back in
    the sample's order, so each candidate is scored on the whole sample, as in one process. A block
    cannot run on no window, so a rank that holds none of the sample runs one window of its own to
    keep in step with the others' collectives and contributes none of it (``held`` is 0).
    """

    def __init__(self, batch: HeldBatch, inputs: Tensor) -> None:
        self.batch, self.held = batch, batch.mine.numel()
        self.hidden = inputs[batch.mine] if self.held else inputs[:1]

    def gather(self, rows: Tensor) -> Tensor:
        return self.batch.gather(rows[: self.held])


@register_method
class Awq(QuantMethod):
    options_type = AwqOptions
    options: AwqOptions

    def check(self, blocks: nn.ModuleList) -> None:
        find_layout(blocks[0])

    def calibrate(self, block: nn.Module, data: BlockData) -> dict[str, Any]:
        stats = self.prepare(block, data)
        write_quantized(block, rtn_quantized(block, self.block_schemes(block, data), stats.pop("clip_factors")))
        return stats

    def prepare(self, block: nn.Module, data: BlockData) -> dict[str, Any]:
        """Fold the searched scales into the block (still full precision) and choose clipping ratios."""
        layout = find_layout(block)
        self._check_layout(block, data, layout)
        count = min(data.windows, self.options.search_samples)
        chosen = torch.randperm(data.windows, generator=data.generator)[:count].sort().values
        batch = HeldBatch(data.ranks, data.windows, chosen, data.inputs[:0])
        seed = int(torch.randint(2**31 - 1, (1,), generator=data.generator))
        sample = _Sample(batch, data.inputs)
        reference = data.forward(sample.hidden, None).detach()
        alphas: dict[str, float] = {}
        for mapping in layout:
            alpha = self._search_scales(block, data, sample, mapping, seed)
            if alpha is not None:
                alphas["+".join(mapping.layers)] = alpha
        folded = data.forward(sample.hidden, None).detach()
        change = (folded - reference)[: sample.held].float().square().sum()
        size = reference[: sample.held].float().square().sum()
        drift = math.sqrt(data.ranks.total(float(change))) / max(math.sqrt(data.ranks.total(float(size))), 1e-12)
        if drift > max(FOLD_TOLERANCE, FOLD_TOLERANCE_EPS * torch.finfo(reference.dtype).eps):
            raise ConfigError(
                f"AWQ scale folding changed the output of {type(block).__name__} by {drift:.2e} (relative); "
                "this architecture's normalization cannot absorb the scales",
                "method",
            )
        clip = self._search_clipping(block, data, sample.hidden[: sample.held]) if self.options.clip else {}
        return {"alpha": alphas, "clip_ratio": mean_ratio(clip), "clip_factors": clip}

    def _check_layout(self, block: nn.Module, data: BlockData, layout: tuple[ScaleMapping, ...]) -> None:
        """Each mapping's layers must read one input, produced by ``previous`` when that is a norm."""
        groups = {frozenset(g) for g in input_groups(block, data)}
        for mapping in layout:
            previous = block.get_submodule(mapping.previous)
            if frozenset(mapping.layers) not in groups:
                raise ConfigError(
                    f"AWQ layout mismatch in {type(block).__name__}: {', '.join(mapping.layers)} do not read one input",
                    "method",
                )
            if isinstance(previous, LinearLike):
                continue
            outputs: list[Tensor] = []
            handle = previous.register_forward_hook(lambda _m, _a, out, seen=outputs: seen.append(_first(out)))
            try:
                received = layer_input(block, data, data.inputs[:1], mapping.layers[0])
            finally:
                handle.remove()
            if not outputs or outputs[-1] is not received:
                raise ConfigError(
                    f"AWQ layout mismatch in {type(block).__name__}: {mapping.previous} does not feed {mapping.layers}",
                    "method",
                )

    def _score(self, output: Tensor, target: Tensor, seed: int) -> float:
        self.loss.reseed(seed)
        return float(self.loss(output, target))

    @torch.no_grad()
    def _search_scales(
        self, block: nn.Module, data: BlockData, sample: _Sample, mapping: ScaleMapping, seed: int
    ) -> float | None:
        """Best exponent for one mapping, folded into the block; None when the shapes cannot be folded."""
        previous = block.get_submodule(mapping.previous)
        layers = {name: linear_named(block, name) for name in mapping.layers}
        width = weight_matrix(next(iter(layers.values()))).shape[1]
        if isinstance(previous, LinearLike) and weight_matrix(previous).shape[0] != width:
            return None  # grouped-query attention: v has fewer output channels than o has inputs
        spec = stage_scheme(self.block_schemes(block, data), mapping.layers)
        inspect_name = _inspected(mapping.layers)
        inspect = block.get_submodule(inspect_name)
        args, kwargs = capture_call(block, data, sample.hidden, inspect)
        prefix = f"{inspect_name}." if inspect_name not in mapping.layers else ""
        # A single linear is its own inspected module: its input is already in hand.
        x = layer_input(block, data, sample.hidden, mapping.layers[0]) if prefix else first_argument(args, kwargs)
        x = x[: sample.held].float().abs().reshape(-1, width)
        x_mean = data.ranks.sum(x.sum(0)) / data.ranks.total(x.shape[0])
        target = sample.gather(_first(inspect(*args, **kwargs)).float())
        best: tuple[float, float, Tensor] | None = None
        for step in range(self.options.n_grid):
            alpha = step / self.options.n_grid
            scales = x_mean.pow(alpha).clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            overrides = {}
            for name, layer in layers.items():
                weight = weight_matrix(layer).float()
                candidate = fake_quantize(weight * scales, spec) / scales
                key = f"{name.removeprefix(prefix)}.weight" if prefix else "weight"
                overrides[key] = stored_layout(layer, candidate.to(layer.weight.dtype))
            output = sample.gather(_first(functional_call(inspect, overrides, args, kwargs)).float())
            score = self._score(output, target, seed)
            if best is None or score < best[0]:
                best = (score, alpha, scales)
        assert best is not None
        _scale_rows(previous, best[2])
        for layer in layers.values():
            _scale_columns(layer, best[2])
        return best[1]

    @torch.no_grad()
    def _search_clipping(self, block: nn.Module, data: BlockData, sample: Tensor) -> dict[str, Tensor]:
        """Per linear (but query and key), the ratio per row and group that best keeps its output.

        Every linear's input Gram matrix comes from one pass of the (scaled, still float) block.
        """
        ratios = clip_ratios(self.options.n_grid, self.options.max_shrink)
        if len(ratios) < 2:
            return {}
        grams = input_grams(block, data, sample, max(1, len(sample)))
        schemes = self.block_schemes(block, data)
        return {
            name: search_clipping(weight_matrix(layer), grams[name], schemes[name], ratios)[0]
            for name, layer in quantizable_linears(block).items()
            if name.rsplit(".", 1)[-1] not in UNCLIPPED
        }
