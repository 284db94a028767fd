"""Norm tweaking: quantize the weights, then retrain only the block's normalization weights.

Li et al., "Norm Tweaking: High-performance Low-bit Quantization of Large Language Models"
(AAAI 2024). After the linears are quantized (GPTQ by default, or round-to-nearest) they are frozen
and the norms' scale (and bias) vectors, a few hundred numbers per block, are trained so the block's
output matches full precision under the chosen loss. Deeper blocks inherit more error from the
quantized blocks before them, so the learning rate grows linearly with depth:
``lr * (1 + depth_scale * index / (num_blocks - 1))``.

This is how a training loss, the SW loss included, reaches GPTQ, which has no loss of its own.
Norms are found by type name (``LayerNorm``, ``LlamaRMSNorm``, ``Qwen2RMSNorm``...).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quant_core.errors import ConfigError
from quant_core.method_options import NormTweakOptions
from quant_core.methods.base import (
    BlockData,
    QuantMethod,
    build_method,
    register_method,
    write_weights,
)
from quant_core.methods.training import epochs_to_steps, train_parameters


def norm_parameters(block: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of the block's normalization modules, by full name."""
    return {
        f"{module_name}.{param_name}" if module_name else param_name: param
        for module_name, module in block.named_modules()
        if "Norm" in type(module).__name__
        for param_name, param in module.named_parameters(recurse=False)
    }


@register_method
class NormTweak(QuantMethod):
    options_type = NormTweakOptions
    needs_targets = True
    options: NormTweakOptions

    def learning_rate(self, index: int, num_blocks: int) -> float:
        depth = index / (num_blocks - 1) if num_blocks > 1 else 0.0
        return self.options.lr * (1 + self.options.depth_scale * depth)

    def base_method(self) -> QuantMethod:
        """The method whose weights the norms adapt to, configured by ``base_options``."""
        return build_method(self.options.base, self.spec, self.loss, self.options.base_options)

    def check(self, blocks: nn.ModuleList) -> None:
        """The base method's checks, the refusal pointing into ``base_options``."""
        try:
            self.base_method().check(blocks)
        except ConfigError as exc:
            field = (exc.field or "").replace("method_options.", "method_options.base_options.", 1)
            raise ConfigError(str(exc), field or None) from exc

    def calibrate(self, block: nn.Module, data: BlockData) -> dict[str, Any]:
        stats = self.base_method().calibrate(block, data)
        norms = norm_parameters(block)
        if not norms:
            return {"base": stats, "norms": 0}
        lr = self.learning_rate(data.index, data.num_blocks)
        start = {name: p.detach().float().clone().requires_grad_(True) for name, p in norms.items()}
        log = train_parameters(
            self.loss,
            block,
            data,
            lambda: {name: value.to(norms[name].dtype) for name, value in start.items()},
            torch.optim.Adam(start.values(), lr=lr),
            epochs_to_steps(self.options.epochs, data, self.options.batch_size),
            self.options.batch_size,
            "NormTweaking",
        )
        write_weights(block, {name: value.detach() for name, value in start.items()})
        result = {"base": stats, "lr": lr, "epoch_losses": log.epoch_losses}
        if log.gradient_share:
            result["gradient_share"] = log.gradient_share
        return result
