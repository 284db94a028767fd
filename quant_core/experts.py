"""Mixtures of experts: every expert as linear layers of its own, and calibration that routes as the model does.

transformers 5 keeps a sparse block's experts fused into 3D parameters (``gate_up_proj`` ``[E, 2I, H]``,
``down_proj`` ``[E, H, I]``) and loops over them in one module. Every method here works on
``nn.Linear`` layers (hooks on their inputs, a grid per layer, one packed tensor per layer), so at load
the fused module is replaced by an :class:`ExpertList`: one :class:`ExpertMLP` per expert whose gate,
up and down projections are ``nn.Linear`` named as the model's published checkpoint names them
(Mixtral's ``w1``/``w3``/``w2``, Qwen's ``gate_proj``/``up_proj``/``down_proj``, read from transformers'
own loading conversions). ``save_pretrained`` then writes, and vLLM reads, the per-expert layout the
model was published in, and transformers fuses it again when it loads the result.

Calibration (:func:`expert_calibration`) first routes the block's calibration inputs through the
router and counts the tokens each expert receives. While the method calibrates, every expert runs on
every token, so each of its linears is called once per forward in a fixed order (what GPTQ's staged
pass and the input groups expect) while the block's output stays the model's: an expert's output is
weighted by its routing weight, zero for a token routed elsewhere. A routed expert sees the tokens
not routed to it as zero rows, which add nothing to ``X^T X``, so its Hessian is built from exactly
the tokens the model sends it. An expert that receives fewer than ``min_tokens`` (by default its
input width, below which ``X^T X`` is singular; never fewer than one) falls back to every calibration
token for its statistics, as if the router had sent them all; its output is still weighted by the
real routing, so a trained method's loss is the model's. The routers (and Qwen's shared-expert gate)
are never quantized: a rounding error there changes which expert a token reaches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, revert_weight_conversion

from quant_core.errors import ConfigError

_FUSED = {"gate_up_proj", "down_proj"}  # the parameters of transformers' fused experts (no biases)
_ROUTER_NAMES = ("gate", "shared_expert_gate", "router")  # routing modules beside the experts


class ExpertMLP(nn.Module):
    """One expert, ``down(act(gate(x)) * up(x))``, its projections named as the checkpoint names them."""

    def __init__(self, names: tuple[str, str, str], gate: Tensor, up: Tensor, down: Tensor, act: nn.Module) -> None:
        super().__init__()
        self.names = names
        for name, weight in zip(names, (gate, up, down), strict=True):
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
            layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            self.add_module(name, layer)
        self.act_fn = act

    def forward(self, hidden: Tensor) -> Tensor:
        gate, up, down = (self.get_submodule(name) for name in self.names)
        return down(self.act_fn(gate(hidden)) * up(hidden))


class ExpertList(nn.ModuleList):
    """A sparse block's experts, called as transformers calls its fused experts module.

    ``forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`` sums each token's experts'
    outputs weighted by their routing weights, visiting experts in index order as transformers does.
    Between :func:`expert_calibration`'s enter and exit, ``fallback`` is set and every expert runs on
    every token (module docstring).
    """

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__(experts)
        self.fallback: frozenset[int] | None = None  # set while calibrating

    def forward(self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden)
        if self.fallback is not None:
            return self._every_expert(hidden, top_k_index, top_k_weights, out)
        for index in top_k_index.unique().tolist():
            tokens, slot = torch.where(top_k_index == index)
            weighted = self[index](hidden[tokens]) * top_k_weights[tokens, slot, None]
            out.index_add_(0, tokens, weighted.to(out.dtype))
        return out

    def _every_expert(self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, out: Tensor) -> Tensor:
        assert self.fallback is not None
        for index, expert in enumerate(self):
            hit = top_k_index == index  # [T, k]
            weight = (top_k_weights * hit).sum(-1, keepdim=True)
            routed = hidden if index in self.fallback else hidden * hit.any(-1, keepdim=True).to(hidden.dtype)
            out = out + (expert(routed) * weight).to(out.dtype)
        return out


def checkpoint_names(model: PreTrainedModel) -> tuple[str, str, str]:
    """The gate, up and down projections' names in the model's published per-expert checkpoint.

    Read from the conversion transformers applies when it loads that checkpoint (the sources of its
    ``gate_up_proj`` and ``down_proj`` converters), so every family transformers fuses is covered.
    """
    found: dict[str, list[str]] = {}
    for conversion in get_model_conversion_mapping(model, add_legacy=False):
        if isinstance(conversion, WeightConverter) and len(conversion.target_patterns) == 1:
            target = conversion.target_patterns[0].rsplit(".", 1)[-1]
            found[target] = [pattern.split(".")[-2] for pattern in conversion.source_patterns]
    gate_up, down = found.get("gate_up_proj", []), found.get("down_proj", [])
    if len(gate_up) != 2 or len(down) != 1:
        raise ConfigError(
            f"{type(model).__name__}: transformers gives no per-expert checkpoint layout for its fused experts", "model"
        )
    return gate_up[0], gate_up[1], down[0]


def is_fused_experts(module: nn.Module) -> bool:
    """transformers' fused experts: exactly 3D ``gate_up_proj`` and ``down_proj`` parameters and an activation."""
    params = dict(module.named_parameters(recurse=False))
    return set(params) == _FUSED and all(p.dim() == 3 for p in params.values()) and hasattr(module, "act_fn")


def unfuse_experts(model: PreTrainedModel) -> int:
    """Replace every fused experts module by an :class:`ExpertList`, in place; how many were replaced.

    Refuses, naming the module, fused experts of another shape (biases, interleaved gate and up).
    """
    fused = [(name, module) for name, module in model.named_modules() if is_fused_experts(module)]
    odd = [
        name
        for name, module in model.named_modules()
        if "experts" in type(module).__name__.lower()
        and not isinstance(module, ExpertList | ExpertMLP)
        and any(p.dim() == 3 for p in module.parameters(recurse=False))
        and not is_fused_experts(module)
    ]
    if odd:
        raise ConfigError(f"the experts of {odd[0]} are fused in a layout this library cannot split", "model")
    if not fused:
        return 0
    names = checkpoint_names(model)
    for name, module in fused:
        parent_name, _, attribute = name.rpartition(".")
        gate_up, down = module.get_parameter("gate_up_proj"), module.get_parameter("down_proj")
        width = gate_up.shape[1] // 2
        experts = [
            ExpertMLP(names, gate_up[e, :width], gate_up[e, width:], down[e], module.get_submodule("act_fn"))
            for e in range(gate_up.shape[0])
        ]
        setattr(model.get_submodule(parent_name), attribute, ExpertList(experts))
    return len(fused)


def expert_lists(module: nn.Module) -> dict[str, ExpertList]:
    """Every :class:`ExpertList` inside ``module`` by its name there."""
    return {name: m for name, m in module.named_modules() if isinstance(m, ExpertList)}


def routing_modules(module: nn.Module) -> dict[str, nn.Module]:
    """The routers and routing gates beside each expert list (what stays in full precision), by name."""
    found = {}
    for name, experts in expert_lists(module).items():
        parent_name = name.rpartition(".")[0]
        parent = module.get_submodule(parent_name) if parent_name else module
        for child_name, child in parent.named_children():
            if child is not experts and child_name in _ROUTER_NAMES:
                found[f"{parent_name}.{child_name}" if parent_name else child_name] = child
    return found


def checkpoint_module_names(model: PreTrainedModel, names: list[str]) -> list[str]:
    """``names`` (modules of ``model``) as the model's published checkpoint names them (Mixtral's
    ``block_sparse_moe`` where transformers says ``mlp``): what a runtime reading the checkpoint matches."""
    reverted = revert_weight_conversion(model, {f"{name}.weight": torch.empty(0) for name in names})
    return sorted(key.removesuffix(".weight") for key in reverted)


def default_min_tokens(experts: ExpertList) -> int:
    """An expert's input width: fewer tokens than that leave its Hessian singular."""
    first = experts[0]
    assert isinstance(first, ExpertMLP)
    return int(first.get_parameter(f"{first.names[0]}.weight").shape[1])


@torch.no_grad()
def routed_tokens(
    block: nn.Module, forward: Callable[[Tensor], Any], inputs: Tensor, batch_size: int
) -> dict[str, Tensor]:
    """Tokens each expert of each :class:`ExpertList` in ``block`` receives when the block runs on
    ``inputs`` (one routing slot per token and expert), as int64 ``[E]`` tensors by list name."""
    counts = {name: torch.zeros(len(experts), dtype=torch.int64) for name, experts in expert_lists(block).items()}

    def count(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            counts[name] += torch.bincount(args[1].reshape(-1).cpu(), minlength=len(counts[name]))

        return hook

    handles = [experts.register_forward_pre_hook(count(name)) for name, experts in expert_lists(block).items()]
    try:
        for batch in inputs.split(batch_size):
            forward(batch)
    finally:
        for handle in handles:
            handle.remove()
    return counts


@contextmanager
def expert_calibration(
    block: nn.Module, forward: Callable[[Tensor], Any], inputs: Tensor, batch_size: int, min_tokens: int | None
) -> Iterator[dict[str, Any]]:
    """While open, every expert of ``block`` runs on every token, routed experts seeing only their own.

    Yields what the block's report says of its experts (empty for a dense block): per expert list,
    the tokens routed to each expert on ``inputs``, the threshold, and the experts that fell back to
    every token (module docstring).
    """
    lists = expert_lists(block)
    if not lists:
        yield {}
        return
    counts = routed_tokens(block, forward, inputs, batch_size)
    report: dict[str, Any] = {}
    for name, experts in lists.items():
        threshold = max(1, default_min_tokens(experts) if min_tokens is None else min_tokens)
        fallback = frozenset(int(e) for e in torch.nonzero(counts[name] < threshold).flatten())
        experts.fallback = fallback
        report[name] = {
            "routed_tokens": counts[name].tolist(),
            "min_tokens": threshold,
            "fallback": sorted(fallback),
            "tokens": int(inputs.shape[0] * inputs.shape[1]),
        }
    try:
        yield report
    finally:
        for experts in lists.values():
            experts.fallback = None
