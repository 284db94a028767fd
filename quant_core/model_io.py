"""Loading decoder models safely and saving the fake-quantized result.

Only safetensors weights are read (a pickle checkpoint can run code when unpickled), and remote code
stays off unless the caller explicitly allows it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from quant_core.errors import ConfigError
from quant_core.experts import unfuse_experts
from quant_core.output_names import FAKE_QUANT_DIR


def load_model(
    source: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a local directory or a hub id (safetensors only), with a
    mixture of experts' fused experts split into linear layers (quant_core.experts)."""
    path = Path(source).expanduser()
    if path.is_dir() and not any(path.glob("*.safetensors")):
        raise ConfigError(f"model: {source} holds no .safetensors weights (pickled weights are refused)", "model")
    tokenizer = load_tokenizer(source, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model: cannot load '{source}': {exc}", "model") from exc
    unfuse_experts(model)
    return model, tokenizer


def declared_dtype(source: str, trust_remote_code: bool = False) -> torch.dtype | None:
    """The dtype the model's own config says its weights are in (None when it says none): loading
    in another dtype for calibration overwrites it on the loaded config."""
    try:
        declared = getattr(AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code), "dtype", None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model: cannot read the config of '{source}': {exc}", "model") from exc
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) else None


def load_tokenizer(source: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model: cannot load the tokenizer of '{source}': {exc}", "model") from exc


def save_fake_quant(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> Path:
    """Write a Hugging Face directory (safetensors, config, tokenizer) holding dequantized weights."""
    target = out_dir / FAKE_QUANT_DIR
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target
