"""Rotations folded into the weights before calibration, so that every runtime runs the result unchanged.

Ashkboos et al., "QuaRot" (NeurIPS 2024), Sec. 4, and Liu et al., "SpinQuant" (ICLR 2025), Sec. 3
(their R1 and R2): a decoder whose norms carry no weight computes the same function when its residual
stream is multiplied by any orthogonal ``R``, provided every weight that writes the stream is
multiplied by ``R`` on the left and every weight that reads it by ``R^T`` on the right; RMSNorm
commutes with ``R`` because it preserves the vector's norm. Likewise the values of each attention
head can be rotated by an orthogonal ``R2`` of the head's width if ``o_proj`` undoes it on its input.
With ``R`` and ``R2`` randomized Hadamard transforms (:mod:`quant_core.incoherence`), outlier
channels are spread over all channels, so the weights of every reader and writer are more incoherent
and their grids lose less, as with QuIP's per-layer rotations, but nothing is left to apply at run
time: the checkpoint is a plain model of the same architecture, which packs, converts to GGUF and
loads anywhere.

What is done, in float64, to a Llama-style decoder (``model.embed_tokens``, blocks with
``input_layernorm``/``post_attention_layernorm`` ahead of ``self_attn.{q,k,v,o}_proj`` and
``mlp.{gate,up,down}_proj``, ``model.norm``, ``lm_head``):

1. each norm's weight ``g`` is folded into the linears that read its output (``W <- W diag(g)``)
   and set to ones;
2. a tied head is untied (the embedding and the head now differ: ``E R^T`` against ``W_head R^T``
   after the final norm's fold), so the checkpoint holds one more embedding-sized matrix;
3. ``E <- E R^T``; readers ``W <- W R^T``; writers ``W <- R W`` and their biases ``b <- R b``;
4. ``v_proj``'s rows of each key-value head ``<- R2`` times them (and its bias), ``o_proj``'s columns
   of each head ``<- R2^T`` on the right.

The attention's online parts (RoPE between ``q_proj`` and ``k_proj``, SiLU before ``down_proj``) stop
the rotation there; QuaRot's online Hadamard before ``down_proj`` needs a runtime that applies it.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from quant_core.errors import ConfigError
from quant_core.incoherence import RandomizedHadamard, has_hadamard
from quant_core.model_structure import find_decoder_blocks, text_config

# Families whose RMSNorm computes ``weight * x / rms(x)`` (Gemma's ``(1 + weight)`` and its norms
# after each sublayer do not commute with a rotation of the stream) and whose blocks are exactly
# pre-norm attention then pre-norm MLP. Qwen3's per-head q/k norms sit after the rotated inputs.
_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_READERS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")
_HEAD_NORMS = ("self_attn.q_norm", "self_attn.k_norm")


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def rotation_blockers(model: nn.Module) -> list[str]:
    """Why ``model``'s rotation cannot be absorbed into its weights; empty when it can."""
    config = text_config(model)
    if config.model_type not in _FAMILIES:
        return [f"model type {config.model_type!r} (absorbed rotations support {', '.join(_FAMILIES)})"]
    blockers = [
        f"width {n} ({what}) has no Hadamard matrix here"
        for what, n in (("hidden_size", config.hidden_size), ("head_dim", _head_dim(config)))
        if not has_hadamard(n)
    ]
    for block in find_decoder_blocks(model):
        norms = {name for name, m in block.named_modules() if "norm" in type(m).__name__.lower()}
        extra = norms - set(_READERS) - set(_HEAD_NORMS)
        if extra:
            blockers.append(f"norms {', '.join(sorted(extra))} inside a block")
            break
    return blockers


def check_rotation(model: nn.Module, field: str = "rotation") -> None:
    """Refuse before any work, naming ``field``, a model whose rotation cannot be absorbed."""
    blockers = rotation_blockers(model)
    if blockers:
        raise ConfigError(f"rotation: hadamard cannot be absorbed into this model: {'; '.join(blockers)}", field)


def _rewrite(param: Tensor, value: Tensor) -> None:
    param.data = value.to(param.dtype)


def _linear(module: nn.Module, name: str) -> nn.Linear:
    layer = module.get_submodule(name)
    if not isinstance(layer, nn.Linear):
        raise ConfigError(f"rotation: {name} is a {type(layer).__name__}, not a linear layer", "rotation")
    return layer


def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    """``W <- W diag(g)`` for every reader, then ``g <- 1``: the same function with a weightless norm."""
    gain = norm.get_parameter("weight")
    for reader in readers:
        _rewrite(reader.weight, reader.weight.data.double() * gain.data.double())
    gain.data.fill_(1.0)


def _untie_head(model: Any) -> nn.Linear:
    """The output head as a matrix of its own (a copy of the embedding when the two were tied)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embedding.weight or head.weight.data_ptr() == embedding.weight.data_ptr():
        head.weight = nn.Parameter(embedding.weight.data.clone(), requires_grad=embedding.weight.requires_grad)
    for config in {id(c): c for c in (model.config, text_config(model))}.values():
        config.tie_word_embeddings = False
    return cast(nn.Linear, head)


def absorb_rotation(model: nn.Module, seed: int) -> None:
    """Rotate ``model``'s residual stream and its heads' values, seeded by ``seed``, in place (see module doc)."""
    check_rotation(model)
    config = text_config(model)
    generator = torch.Generator().manual_seed(seed)
    stream = RandomizedHadamard(config.hidden_size, generator, "rotation")
    values = RandomizedHadamard(_head_dim(config), generator, "rotation")
    head = _untie_head(model)
    embedding = cast(Any, model).get_input_embeddings().get_parameter("weight")
    final_norm = cast(Any, model).get_decoder().norm

    def read(layer: nn.Linear) -> None:
        _rewrite(layer.weight, stream.apply(layer.weight.data.double(), dim=-1))

    def write(layer: nn.Linear) -> None:
        _rewrite(layer.weight, stream.apply(layer.weight.data.double(), dim=0))
        if layer.bias is not None:
            _rewrite(layer.bias, stream.apply(layer.bias.data.double(), dim=0))

    _fold_norm(final_norm, [head])
    read(head)
    _rewrite(embedding, stream.apply(embedding.data.double(), dim=-1))
    for block in find_decoder_blocks(model):
        for norm_name, reader_names in _READERS.items():
            readers = [_linear(block, name) for name in reader_names]
            _fold_norm(block.get_submodule(norm_name), readers)
            for reader in readers:
                read(reader)
        for name in _WRITERS:
            write(_linear(block, name))
        _rotate_values(_linear(block, "self_attn.v_proj"), _linear(block, "self_attn.o_proj"), values)


def _rotate_values(v_proj: nn.Linear, o_proj: nn.Linear, values: RandomizedHadamard) -> None:
    """Each head's values by ``R2`` in ``v_proj`` and undone on ``o_proj``'s input (the same ``R2`` for
    all heads, so a query head sharing a key-value head sees the rotation its ``o_proj`` columns undo)."""
    width = values.n
    v_weight = v_proj.weight.data.double()
    _rewrite(v_proj.weight, values.apply(v_weight.reshape(-1, width, v_weight.shape[-1]), dim=1).reshape_as(v_weight))
    if v_proj.bias is not None:
        _rewrite(v_proj.bias, values.apply(v_proj.bias.data.double().reshape(-1, width)).reshape(-1))
    o_weight = o_proj.weight.data.double()
    _rewrite(o_proj.weight, values.apply(o_weight.reshape(o_weight.shape[0], -1, width)).reshape_as(o_weight))
