"""Packed export in compressed-tensors' ``pack-quantized`` format, which vLLM and transformers load.

Layout written for each quantized ``nn.Linear`` (``PackedQuantizationCompressor``, compressed-tensors
0.20; vLLM's ``CompressedTensorsWNA16`` reads the same tensors):

- ``weight_packed``, int32 ``[out, ceil(in * b / 32)]``: each code ``q`` in ``[-2^(b-1), 2^(b-1) - 1]``
  is stored as ``q + 2^(b-1)`` and packed densely, 32 codes into ``b`` words, a code crossing a word
  boundary when ``b`` does not divide 32. Dense packing of 3/5/6/7 bits dates from compressed-tensors
  0.17 (before, those widths were padded to ``32 // b`` codes a word); 2, 4 and 8 bits never changed.
- ``weight_scale``, ``[out, groups]`` in the dtype of the model's other weights (the job's export
  dtype, half precision by default: quant_core.export_dtype rounded the scales to it before the model
  was scored). transformers' ``dequantize`` load computes ``(q - zero) * scale`` in float32 and rounds
  once to the model dtype, which is how the fake-quantized weight was made.
- ``weight_zero_point`` (asymmetric grids only): the signed integer zero points packed the same way
  but along the output dimension, int32 ``[ceil(out * b / 32), groups]``.
- ``weight_shape``, int64 ``[out, in]``.

Loaders dequantize as ``(q - zero) * scale``: the grid of :mod:`quant_core.quantizer`, so a weight
that lies on its grid is exported without loss. Every other tensor is written unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    QuantizationStrategy,
)
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D
from transformers.utils import CONFIG_NAME

from quant_core.errors import ConfigError
from quant_core.experts import checkpoint_module_names, expert_lists, routing_modules
from quant_core.layer_schemes import LayerSchemes
from quant_core.methods.base import layer_grid
from quant_core.quantizer import QuantSpec, dequantize, grid_codes, group_columns, num_groups

# vLLM serves weight-only pack-quantized checkpoints through CompressedTensorsWNA16 on its Marlin kernel
# (vllm/model_executor/layers/quantization/compressed_tensors/schemes/compressed_tensors_wNa16.py and
# vllm/model_executor/layers/quantization/utils/marlin_utils.py: query_marlin_supported_quant_types,
# MARLIN_SUPPORTED_GROUP_SIZES).
_MARLIN_BITS = (4, 8)
_MARLIN_ZERO_POINT_BITS = (4,)
_MARLIN_GROUP_SIZES = (None, 32, 64, 128)


def export_pack_quantized(
    model: PreTrainedModel,
    qparams: Mapping[str, tuple[Tensor, Tensor]],
    schemes: LayerSchemes,
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Write ``model`` as a ``pack-quantized`` checkpoint; the layers named in ``qparams`` are packed,
    each at its scheme in ``schemes``.

    ``qparams`` maps a linear's full module name to the ``(scale, zero)`` of its grid, each
    ``[out, groups]``; that layer must already hold its fake-quantized weight. Each layer's codes are
    recomputed and checked before anything is written: a weight that its grid does not reproduce to
    the round-off of its dtype raises ``ValueError`` naming the layer. GPT-2's ``Conv1D`` layers are
    refused (compressed-tensors packs only ``nn.Linear`` weights, so transformers could not load them),
    and so is a group size that leaves a ragged last group (compressed-tensors' group strategy needs
    the input width to be a multiple of the group size).

    The quantization config also sets transformers' ``dequantize`` load option for a checkpoint of one
    scheme: with compressed-tensors 0.20 its default path expects unpacked asymmetric zero points and
    refuses these checkpoints, while ``dequantize`` unpacks every layer through the same compressor.
    A checkpoint of several schemes leaves it off: transformers 5.x's ``dequantize`` load takes one
    scheme for every dense layer, its default path builds each layer's own (symmetric grids only, so a
    job targeting transformers with a size budget is refused asymmetric). vLLM ignores the option.
    """
    layers = _packed_linears(model, qparams, schemes)
    state = model.state_dict()
    for name, layer in layers.items():
        del state[f"{name}.weight"]
        state.update(packed_layer(name, layer.weight, qparams[name], schemes.of(name)))

    out = Path(out_dir)
    model.save_pretrained(out, state_dict=state)
    write_quantization_config(model, set(layers), schemes, out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def packed_layer(name: str, weight: Tensor, grid: tuple[Tensor, Tensor], spec: QuantSpec) -> dict[str, Tensor]:
    """The tensors that stand for linear ``name``'s fake-quantized ``weight`` in the checkpoint, by full name."""
    packed = _packed_layer(name, weight, *grid, spec, _scheme(spec))
    return {f"{name}.{key}": value for key, value in packed.items()}


def write_quantization_config(model: PreTrainedModel, packed: set[str], schemes: LayerSchemes, out: Path) -> None:
    """Add the ``pack-quantized`` quantization config to the ``config.json`` in ``out``: the layers named
    in ``packed`` are packed, every other linear and router is listed as ignored (by the checkpoint's
    names, which a runtime matches). Layers of one scheme are one config group targeting every
    ``Linear``; layers of several (a size budget's allocation) make one group per scheme, each
    targeting its layers by name, the way vLLM builds a scheme per layer."""
    dense = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in packed]
    # a runtime matches the checkpoint's names, and builds a router as a linear layer of its own
    ignore = checkpoint_module_names(model, sorted({*dense, *routing_modules(model)}))
    grouped = schemes.grouped(sorted(packed))
    if len(grouped) <= 1:
        groups = {"group_0": _scheme(next(iter(grouped), schemes.default))}
    else:
        groups = {
            f"group_{index}": _scheme(spec, checkpoint_module_names(model, names))
            for index, (spec, names) in enumerate(grouped.items())
        }
    config = QuantizationConfig(
        config_groups=groups,
        format=CompressionFormat.pack_quantized.value,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )
    ModelCompressor(quantization_config=config).update_config(str(out))
    config_path = out / CONFIG_NAME
    written = json.loads(config_path.read_text(encoding="utf-8"))
    # transformers' ``dequantize`` load decompresses every dense layer with one config group's scheme
    written["quantization_config"]["dequantize"] = len(groups) == 1
    config_path.write_text(json.dumps(written, indent=2, sort_keys=True), encoding="utf-8")


def unpacked_weight(tensors: Mapping[str, Tensor], spec: QuantSpec, dtype: torch.dtype) -> Tensor:
    """A packed layer's weight (``weight_packed``, ``weight_scale``, ``weight_shape`` and any
    ``weight_zero_point``, by those names) as ``(code - zero) * scale`` in float32, rounded once to
    ``dtype``: what a loader reads back from the checkpoint."""
    compressed = {key: value for key, value in tensors.items() if key.startswith("weight_")}
    compressed["weight_scale"] = compressed["weight_scale"].float()
    return PackedQuantizationCompressor.decompress(compressed, _scheme(spec))["weight"].to(dtype)


def write_packed(
    model: PreTrainedModel, schemes: LayerSchemes, out_dir: Path, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[Path, dict[str, Any]]:
    """Pack every layer that holds a grid from calibration; return the folder and what the report
    says of the export besides."""
    qparams = {name: grid for name, module in model.named_modules() if (grid := layer_grid(module)) is not None}
    path = export_pack_quantized(model, qparams, schemes, out_dir, tokenizer)
    return path, packed_details(model, [schemes.of(name) for name in qparams], path)


def packed_details(model: nn.Module, specs: Iterable[QuantSpec], path: Path) -> dict[str, Any]:
    """What the report says of a packed export in ``path`` besides its folder; ``specs``: its layers'
    schemes."""
    unique = {id(p): p for p in model.parameters()}.values()
    blockers = [blocker for spec in dict.fromkeys(specs) for blocker in vllm_serving_blockers(spec)]
    return {
        "format": CompressionFormat.pack_quantized.value,
        "compressed_tensors": version("compressed-tensors"),
        "bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")),
        "fp16_bytes": sum(p.numel() * 2 for p in unique),
        "vllm_blockers": list(dict.fromkeys(blockers)),
    }


def check_packable(model: nn.Module, names: list[str], schemes: LayerSchemes) -> None:
    """Refuse up front, before any calibration, a model whose linears ``names`` cannot be packed.

    A mixture of experts needs symmetric grids: vLLM's compressed-tensors MoE kernels assert it, and
    transformers' loader (5.x) rebuilds fused experts from packed ones without their zero points.
    """
    if expert_lists(model) and not schemes.default.symmetric:
        raise ConfigError(
            "a mixture of experts is packed only with symmetric grids (vLLM's MoE kernels and transformers' "
            "expert loader take no zero points): set symmetric: true",
            "symmetric",
        )
    _packed_linears(model, names, schemes)


def vllm_serving_blockers(spec: QuantSpec) -> list[str]:
    """Why vLLM cannot serve an export of this grid on an NVIDIA GPU; empty when it can.

    The export still loads in transformers either way. Rules read from vLLM's sources (main, 2026):
    static weight-only channel/group schemes in ``pack-quantized`` format go to the WNA16 scheme, whose
    built-in CUDA kernel is Marlin: 4- and 8-bit weights (``uint4b8``/``uint8b128``), zero points with
    4-bit weights only (``uint4``; zero points came with vLLM PR #14211), per-channel or 32/64/128
    groups. Builds with the optional ``humming`` kernel package (vLLM PR #34556) also serve symmetric
    2-8-bit weights; kernels behind other optional packages (conch) are not counted. Layer shapes
    matter too: older releases need ``in_features % 128 == 0`` and ``out_features % 64 == 0`` per
    tensor-parallel shard, where newer ones pad.
    """
    blockers = []
    if spec.bits not in _MARLIN_BITS:
        blockers.append(
            f"{spec.bits}-bit weights: vLLM's Marlin kernel takes 4- or 8-bit weights only "
            "(newer vLLM with the optional humming kernel also serves symmetric 2-8-bit weights)"
        )
    elif not spec.symmetric and spec.bits not in _MARLIN_ZERO_POINT_BITS:
        blockers.append(f"asymmetric {spec.bits}-bit weights: vLLM's Marlin kernel takes zero points with 4-bit only")
    if spec.group_size not in _MARLIN_GROUP_SIZES:
        blockers.append(
            f"group size {spec.group_size}: vLLM's Marlin kernel takes per-channel or groups of 32, 64 or 128"
        )
    return blockers


def _packed_linears(model: nn.Module, names: Iterable[str], schemes: LayerSchemes) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers named, refusing layers the format cannot hold."""
    modules = dict(model.named_modules())
    layers: dict[str, nn.Linear] = {}
    for name in names:
        module = modules.get(name)
        if isinstance(module, Conv1D):
            raise ConfigError(
                f"{name} is a GPT-2 Conv1D layer: compressed-tensors packs only nn.Linear weights, so GPT-2 "
                "models cannot be exported packed (their fake-quantized checkpoint is unaffected)",
                "model",
            )
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name}: the model has no nn.Linear of that name")
        in_features, spec = module.weight.shape[1], schemes.of(name)
        if spec.group_size is not None and in_features % spec.group_size:
            raise ConfigError(
                f"group_size {spec.group_size} leaves a ragged last group in {name} (in_features {in_features}): "
                "compressed-tensors needs every input width to be a multiple of the group size",
                "group_size",
            )
        layers[name] = module
    return layers


def _scheme(spec: QuantSpec, targets: list[str] | None = None) -> QuantizationScheme:
    """The config group of ``spec``: for ``targets`` (module names), else every ``Linear``."""
    strategy = QuantizationStrategy.CHANNEL if spec.group_size is None else QuantizationStrategy.GROUP
    weights = QuantizationArgs(
        num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy=strategy, group_size=spec.group_size
    )
    return QuantizationScheme(
        targets=targets or ["Linear"], weights=weights, format=CompressionFormat.pack_quantized.value
    )


def _packed_layer(
    name: str, weight: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec, scheme: QuantizationScheme
) -> dict[str, Tensor]:
    """One layer's packed tensors, after checking that its grid reproduces its weight."""
    weight = weight.detach().cpu()
    stored_scale = scale.detach().cpu().to(weight.dtype)  # what a loader multiplies by
    scale, zero = stored_scale.float(), zero.detach().cpu().float()
    check_on_grid(name, weight, scale, zero, spec)
    packed = PackedQuantizationCompressor.compress(
        {"weight": weight.float(), "weight_scale": scale, "weight_zero_point": zero.to(torch.int8)}, scheme
    )
    return {**packed, "weight_scale": stored_scale}


def check_on_grid(name: str, weight: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> None:
    """Raise unless ``(code - zero) * scale`` gives back ``weight`` to its dtype's round-off.

    The tolerance is one unit of the weight dtype's relative precision of the grid value, so fp32
    weights must match to fp32 round-off; an off-grid weight misses by a sizeable part of a step.
    """
    out_features, in_features = weight.shape
    expected = (out_features, num_groups(in_features, spec.group_size))
    if tuple(scale.shape) != expected or tuple(zero.shape) != expected:
        raise ValueError(
            f"{name}: scale and zero must be shaped {list(expected)}, got {list(scale.shape)} and {list(zero.shape)}"
        )
    if not torch.equal(zero, zero.round()) or zero.min() < spec.qmin or zero.max() > spec.qmax:
        raise ValueError(f"{name}: zero points must be integers in [{spec.qmin}, {spec.qmax}]")
    if spec.symmetric and zero.any():
        raise ValueError(f"{name}: a symmetric grid has all zero points 0")
    grouped = group_columns(weight.float(), spec.group_size)
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    codes = grid_codes(grouped, scale, zero, spec)
    error = (dequantize(codes, scale, zero) - grouped).abs()
    tolerance = torch.finfo(weight.dtype).eps * ((codes - zero).abs() + 1) * scale
    if not bool((error <= tolerance).all()):
        raise ValueError(
            f"{name}: the weight is not on the {spec.label} grid of its scale and zero point "
            f"(off by up to {(error / scale).max().item():.3g} steps); export needs each layer's "
            "fake-quantized weight with the scale and zero point that produced it"
        )
