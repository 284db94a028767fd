"""GGUF export for llama.cpp, written from the quantized codes.

llama.cpp's legacy block types hold a uniform grid exactly when its groups are whole blocks of 32
along the input dimension: ``Q4_0`` / ``Q5_0`` / ``Q8_0`` are ``(q - 2^(b-1)) * d`` (a symmetric grid,
``d`` the scale), ``Q4_1`` / ``Q5_1`` are ``q * d + m`` (an asymmetric grid with ``m = -zero * scale``).
A group of 64 or 128 is written as 2 or 4 blocks with the same ``d`` and ``m``; a per-channel grid as
blocks that all repeat the row's scale. ``d`` and ``m`` are float16 in the file: a scale stored in
bfloat16 or float16 converts exactly, and ``m`` is rounded once (at most half a float16 step of
itself). The codes are recomputed from each layer's fake-quantized weight and grid and checked on the
grid, never re-quantized from float weights. Everything else (embeddings, norms, an untied head) is
stored as the model holds it (norms as float32, as llama.cpp expects of one-dimensional tensors).

The file covers the ``llama`` architecture of llama.cpp (Llama, Mistral and SmolLM-shaped models with
the default RoPE): :func:`gguf_blockers` says why a job cannot be written before it calibrates.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quant_core.export import check_on_grid
from quant_core.layer_schemes import LayerSchemes
from quant_core.method_options import UNPACKABLE_ROTATION
from quant_core.methods.base import layer_grid
from quant_core.model_structure import block_names, find_decoder_blocks, quantizable_linears
from quant_core.quantizer import QuantSpec, grid_codes, group_columns

GGUF_NAME = "model.gguf"
BLOCK = 32  # weights per llama.cpp block
_ARCHITECTURES = ("llama", "mistral")  # model_type values llama.cpp runs as its "llama" architecture
# (bits, symmetric) -> the block type that holds that grid exactly
_BLOCK_TYPES = {(4, True): "Q4_0", (4, False): "Q4_1", (5, True): "Q5_0", (5, False): "Q5_1", (8, True): "Q8_0"}
_LINEAR_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_NORM_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_blockers(config: Any, spec: QuantSpec, rotates: bool) -> list[str]:
    """Why this model and grid cannot be written as GGUF; empty when they can."""
    blockers = []
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHITECTURES:
        blockers.append(f"model type {model_type}: the GGUF export writes llama.cpp's llama architecture only")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        blockers.append("linear biases: llama.cpp's llama architecture has none")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        blockers.append(f"RoPE type {rope['rope_type']}: the GGUF export writes the default RoPE only")
    if (spec.bits, spec.symmetric) not in _BLOCK_TYPES:
        kinds = ", ".join(f"{b}-bit {'symmetric' if s else 'asymmetric'}" for b, s in _BLOCK_TYPES)
        blockers.append(f"{spec.label}: GGUF's block types hold exactly {kinds}")
    if spec.group_size is not None and spec.group_size % BLOCK:
        blockers.append(f"group_size {spec.group_size}: GGUF blocks hold groups that are multiples of {BLOCK}")
    widths = {getattr(config, "hidden_size", 0), getattr(config, "intermediate_size", 0)}
    if any(width % BLOCK for width in widths):
        blockers.append(f"input widths {sorted(widths)}: GGUF blocks need multiples of {BLOCK}")
    if rotates:
        blockers.append(UNPACKABLE_ROTATION)
    return blockers


def write_gguf(
    model: PreTrainedModel, schemes: LayerSchemes, tokenizer: PreTrainedTokenizerBase, out_dir: Path
) -> tuple[Path, dict[str, Any]]:
    """Write ``out_dir/model.gguf``, each linear in the block type of its scheme (GGUF types every tensor
    on its own, so a size budget's mixed widths are written as they are); return its path and what the
    report says of it: the file's type (the most common block type) and how many tensors each type holds."""
    import gguf

    linears = _block_linears(model)
    specs = schemes.grouped(linears)
    blockers = [b for spec in specs for b in gguf_blockers(model.config, spec, rotates=False)]
    if blockers:
        raise ValueError("; ".join(dict.fromkeys(blockers)))
    types = {name: _BLOCK_TYPES[(spec.bits, spec.symmetric)] for spec, names in specs.items() for name in names}
    counts = {kind: list(types.values()).count(kind) for kind in dict.fromkeys(types.values())}
    block_type = max(counts, key=lambda kind: counts[kind])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / GGUF_NAME
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_metadata(writer, model.config, block_type)
    pre = _write_tokenizer(writer, tokenizer)
    for name, tensor, raw_type in _tensors(model, schemes, types):
        writer.add_tensor(name, tensor, raw_dtype=getattr(gguf.GGMLQuantizationType, raw_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    details = {"format": "gguf", "block_type": block_type, "tokenizer_pre": pre, "gguf": version("gguf")}
    return path, details if len(counts) == 1 else {**details, "block_types": counts}


def _block_linears(model: nn.Module) -> list[str]:
    """The full module names of every decoder block's linears, in file order."""
    return [
        f"{prefix}.{name}"
        for prefix, block in zip(block_names(model), find_decoder_blocks(model), strict=True)
        for name in quantizable_linears(block)
    ]


def gguf_blocks(codes: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> np.ndarray:
    """``[out, in]`` integer codes on a grid of ``[out, groups]`` scales and zero points, as the bytes
    of llama.cpp blocks: ``[out, in / 32 * block bytes]``."""
    out_features, in_features = codes.shape
    per_block = in_features // scale.shape[1] // BLOCK  # blocks in one group
    d = scale.repeat_interleave(per_block, dim=1).unsqueeze(-1)  # [out, blocks, 1]
    # Codes run from -2^(b-1) to 2^(b-1) - 1; blocks below 8 bits store them unsigned, and Q8_0 as int8.
    offset = 0 if spec.bits == 8 else 2 ** (spec.bits - 1)
    q = codes.reshape(out_features, -1, BLOCK).to(torch.int32) + offset
    header = [d.to(torch.float16)]
    if not spec.symmetric:  # (code - zero) * d = q * d + m with m = -(zero + offset) * d
        header.append((-(zero.repeat_interleave(per_block, dim=1).unsqueeze(-1) + offset) * d).to(torch.float16))
    parts = [_bytes(h) for h in header]
    if spec.bits == 8:
        parts.append(q.to(torch.int8).view(torch.uint8))
    else:
        low = q & 0xF  # nibbles: element j in the low half of byte j, element j + 16 in the high half
        parts.append((low[..., :16] | (low[..., 16:] << 4)).to(torch.uint8))
        if spec.bits == 5:
            high = (q >> 4) & 1  # fifth bits, element j at bit j of a little-endian uint32
            bits = (high << torch.arange(BLOCK, dtype=torch.int32)).sum(-1, keepdim=True)
            parts.insert(len(header), _bytes(bits.to(torch.int32)))
    return torch.cat(parts, dim=-1).reshape(out_features, -1).numpy()


def _bytes(values: Tensor) -> Tensor:
    """``values`` ``[..., k]`` as their little-endian bytes ``[..., k * itemsize]``."""
    return values.contiguous().view(torch.uint8)


def _tensors(
    model: PreTrainedModel, schemes: LayerSchemes, types: dict[str, str]
) -> Iterator[tuple[str, np.ndarray, str]]:
    """Every tensor of the file: its GGUF name, its data and its GGML type's name (``types``: each block
    linear's, by full module name)."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    embedding = _weight(model.get_input_embeddings())
    yield ("token_embd.weight", *_dense(embedding))
    for index, (prefix, block) in enumerate(zip(block_names(model), find_decoder_blocks(model), strict=True)):
        for name, layer in quantizable_linears(block).items():
            full, spec = f"{prefix}.{name}", schemes.of(f"{prefix}.{name}")
            codes, scale, zero = _layer_codes(full, layer, spec)
            if name == "self_attn.q_proj":
                codes, scale, zero = (_rope_rows(t, heads) for t in (codes, scale, zero))
            elif name == "self_attn.k_proj":
                codes, scale, zero = (_rope_rows(t, kv_heads) for t in (codes, scale, zero))
            yield f"blk.{index}.{_LINEAR_NAMES[name]}.weight", gguf_blocks(codes, scale, zero, spec), types[full]
        for norm, gguf_name in _NORM_NAMES.items():
            yield f"blk.{index}.{gguf_name}.weight", _norm(_weight(block.get_submodule(norm))), "F32"
    yield "output_norm.weight", _norm(_weight(model.get_submodule("model.norm"))), "F32"
    head = model.get_output_embeddings()
    if head is not None and _weight(head) is not embedding:  # a tied head is the embedding itself
        yield ("output.weight", *_dense(_weight(head)))


def _weight(module: nn.Module) -> Tensor:
    weight = module.weight
    if not isinstance(weight, Tensor):
        raise ValueError(f"{type(module).__name__} holds no weight tensor")
    return weight


def _layer_codes(name: str, layer: nn.Module, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor]:
    """A linear's integer codes ``[out, in]`` and its grid as stored, after checking it lies on it."""
    grid = layer_grid(layer)
    if grid is None:
        raise ValueError(f"{name}: the layer holds no grid, so GGUF cannot hold it")
    weight = _weight(layer).detach().cpu()
    scale = grid[0].detach().cpu().to(weight.dtype).float()  # as the checkpoint stores it
    zero = grid[1].detach().cpu().float()
    check_on_grid(name, weight, scale, zero, spec)
    grouped = group_columns(weight.float(), spec.group_size)
    codes = grid_codes(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), spec).reshape(weight.shape)
    if spec.group_size is None:  # one scale a row: every block of the row repeats it
        scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
    return codes, scale, zero


def _rope_rows(rows: Tensor, heads: int) -> Tensor:
    """Reorder a q/k projection's output rows from Hugging Face's half-split RoPE layout (each head's
    first half of dimensions rotates with its second half) to llama.cpp's, where dimensions rotate in
    adjacent pairs."""
    per_head = rows.shape[0] // heads
    return rows.reshape(heads, 2, per_head // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _dense(weight: Tensor) -> tuple[np.ndarray, str]:
    """A float matrix in its own dtype (bfloat16 as its raw 16-bit words)."""
    weight = weight.detach().cpu().contiguous()
    if weight.dtype == torch.bfloat16:
        return weight.view(torch.uint8).numpy(), "BF16"
    if weight.dtype == torch.float16:
        return weight.numpy(), "F16"
    return weight.float().numpy(), "F32"


def _norm(weight: Tensor) -> np.ndarray:
    return weight.detach().cpu().float().numpy()


def _write_metadata(writer: Any, config: Any, block_type: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(getattr(config, "_name_or_path", "") or "model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{block_type}"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(writer: Any, tokenizer: PreTrainedTokenizerBase) -> str:
    """A byte-level BPE tokenizer as llama.cpp's ``gpt2`` model; returns the pre-tokenizer named.

    llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) by name: ``gpt-2`` for
    plain byte-level splitting, ``smollm`` for byte-level after single digits. Any other is written
    as ``default``, which tokenizes some text differently (token ids fed directly are unaffected).
    """
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer model {model.get('type')}: the GGUF export writes byte-level BPE only")
    vocab: dict[str, int] = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    special = {t["content"] for t in backend.get("added_tokens", []) if t.get("special")}
    added = {t["content"] for t in backend.get("added_tokens", [])}
    for text, index in vocab.items():
        tokens[index] = text
        types[index] = (
            gguf.TokenType.CONTROL
            if text in special
            else gguf.TokenType.USER_DEFINED
            if text in added
            else gguf.TokenType.NORMAL
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = _pre_tokenizer_name(backend.get("pre_tokenizer") or {})
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for role, setter in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id)):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            setter(token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))  # as Hugging Face tokenizes
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)
    return pre


def _pre_tokenizer_name(pre: dict[str, Any]) -> str:
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits")) for s in steps]
    if kinds == [("ByteLevel", None)]:
        return "gpt-2"
    if kinds == [("Digits", True), ("ByteLevel", None)]:
        return "smollm"
    return "default"
