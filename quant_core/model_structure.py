"""Finding the parts of a Hugging Face decoder that blockwise calibration works on.

Architectures name their block list differently (``model.layers`` for Llama/Qwen2/Mistral/Gemma3/
Phi-3, ``model.decoder.layers`` for OPT, ``transformer.h`` for GPT-2), so the list is found by its
shape (a ``ModuleList`` with one entry per hidden layer) rather than by a table of names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from quant_core.errors import ConfigError
from quant_core.experts import routing_modules

LinearLike = nn.Linear | Conv1D


def text_config(model: nn.Module) -> Any:
    """The configuration of the model's text decoder (the model's own, or a multimodal model's text part)."""
    return cast(Any, model).config.get_text_config()


def output_layer(model: nn.Module, field: str = "model") -> Callable[[Tensor], Tensor]:
    """What turns the last hidden state into logits: transformers' output embeddings, then the model's
    logit soft-capping (Gemma 2's ``cap * tanh(logits / cap)``) where its config sets one. Applied a
    chunk of positions at a time, it bounds the logits' memory by the chunk, not by windows x tokens."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Module):
        raise ConfigError("the model has no output layer (get_output_embeddings) to compute logits with", field)
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    if not cap:
        return head
    return lambda hidden: torch.tanh(head(hidden) / cap) * cap


def last_hidden_state(model: nn.Module, ids: Tensor) -> Tensor:
    """The hidden state the output layer reads (after the final norm), from the model without its head:
    the causal LM's base model (``base_model_prefix``), so no logits are made for the whole window."""
    base = getattr(model, "base_model", model)
    return cast(Tensor, base(input_ids=ids, use_cache=False).last_hidden_state)


def linear_named(block: nn.Module, name: str) -> LinearLike:
    """The block's linear layer ``name``; a ConfigError when the model has something else there."""
    module = block.get_submodule(name)
    if not isinstance(module, LinearLike):
        raise ConfigError(f"{name} of the decoder block is a {type(module).__name__}, not a linear layer", "model")
    return module


def num_hidden_layers(model: nn.Module) -> int:
    config = text_config(model)
    return int(config.num_hidden_layers)


def find_decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder's block list: the shallowest ``ModuleList`` holding ``num_hidden_layers`` blocks."""
    expected = num_hidden_layers(model)
    candidates = [
        (name.count("."), name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == expected and _has_linears(module[0])
    ]
    if not candidates:
        raise ConfigError(
            f"Cannot find the decoder blocks of {type(model).__name__}: no list of {expected} blocks", "model"
        )
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def block_names(model: nn.Module) -> list[str]:
    """Each decoder block's full module name (``model.layers.3``): what a block's own linear names are
    prefixed with in the model and its checkpoint."""
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(block)] for block in find_decoder_blocks(model)]


def _has_linears(module: nn.Module) -> bool:
    return any(isinstance(m, LinearLike) for m in module.modules())


def quantizable_linears(block: nn.Module) -> dict[str, LinearLike]:
    """Every linear layer of a block by its name inside the block (weights to quantize), except the
    routing gates of a mixture of experts (quant_core.experts), which stay in full precision."""
    routing = {id(m) for m in routing_modules(block).values()}
    return {name: m for name, m in block.named_modules() if isinstance(m, LinearLike) and id(m) not in routing}


def weight_matrix(layer: LinearLike) -> Tensor:
    """The weight as ``[out, in]`` whatever the layer's storage (GPT-2's Conv1D stores ``[in, out]``)."""
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


def stored_layout(layer: LinearLike, matrix: Tensor) -> Tensor:
    """Convert an ``[out, in]`` matrix back to the layer's own storage layout."""
    return matrix.t() if isinstance(layer, Conv1D) else matrix


def move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: str) -> None:
    """Move every parameter and buffer that is not inside a decoder block to ``device``.

    The embeddings, rotary tables and final norm are small and needed to compute block-0 inputs; the
    blocks stay where they are and visit the compute device one at a time.
    """
    inside = {id(m) for m in blocks.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device)
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)
