"""Peer rows for the SWQuant benchmark: llm-compressor's GPTQ and round-to-nearest.

SWQuant's own GPTQ is compared against an independent, widely used implementation run on the
same model and exactly the same calibration token windows. This script runs llm-compressor's
``oneshot`` with ``GPTQModifier`` (``--scheme gptq``) or ``QuantizationModifier`` (``--scheme rtn``)
under a weight-only, asymmetric, integer, group-wise scheme on every ``Linear`` except ``lm_head``,
then writes a plain float32 safetensors checkpoint holding the dequantized (fake-quantized)
weights, without a ``quantization_config``, so the benchmark's evaluation loads it with plain
transformers. ``OUTDIR/peer.json`` records the tool versions, the settings, the calibration wall
time and the peak host memory.

llm-compressor pins a transformers range that SWQuant's environment does not admit, so the script
imports nothing from SWQuant and is meant to run from its own virtual environment::

    python bench/peer_llmcompressor.py --model DIR --windows WINDOWS.pt --bits 4 --group-size 64 \
        --scheme gptq --out OUTDIR

``WINDOWS.pt`` holds a ``torch.save``-d LongTensor ``[n, seq_len]`` of token ids; every window is
used once, unshuffled and unpadded. RTN is data-free and needs no windows.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from importlib.metadata import version
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, fake_quantize
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM, PreTrainedModel

GPTQ_BLOCK_SIZE = 128
GPTQ_DAMPENING = 0.01
WEIGHT_FILE_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin")
MODEL_FILES = ("config.json", "generation_config.json")


def build_modifier(scheme: str, bits: int, group_size: int) -> Modifier:
    """The llm-compressor modifier for ``scheme`` with a weight-only asymmetric int group scheme."""
    weights = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=False,
        strategy="group",
        group_size=group_size,
    )
    config_groups = {
        "group_0": QuantizationScheme(
            targets=["Linear"], weights=weights, input_activations=None, output_activations=None
        )
    }
    if scheme == "gptq":
        return GPTQModifier(
            config_groups=config_groups,
            ignore=["lm_head"],
            block_size=GPTQ_BLOCK_SIZE,
            dampening_frac=GPTQ_DAMPENING,
        )
    return QuantizationModifier(config_groups=config_groups, ignore=["lm_head"])


def load_model(model_dir: Path) -> PreTrainedModel:
    """The model in float32 on the CPU."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def windows_dataset(path: Path) -> Dataset:
    """The calibration windows as a pre-tokenized dataset, which llm-compressor uses as given."""
    windows = torch.load(path, weights_only=True)
    if windows.dtype != torch.long or windows.dim() != 2:
        raise SystemExit(f"{path}: expected a LongTensor [n, seq_len], got {windows.dtype} {tuple(windows.shape)}")
    return Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})


def calibrate(model: PreTrainedModel, modifier: Modifier, dataset: Dataset | None, model_dir: Path) -> float:
    """Run ``oneshot`` on ``model`` in place; returns its wall time in seconds."""
    data_args: dict[str, object] = {}
    if dataset is not None:
        data_args = {
            "dataset": dataset,
            "num_calibration_samples": len(dataset),
            "max_seq_length": len(dataset[0]["input_ids"]),
            "shuffle_calibration_samples": False,
            "batch_size": 1,
        }
    start = time.perf_counter()
    oneshot(model=model, processor=str(model_dir), recipe=modifier, **data_args)
    return time.perf_counter() - start


def dequantized_weights(model: PreTrainedModel) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Fake-quantized weight of every module llm-compressor quantized, keyed by state-dict name,
    and the weight quantization arguments it resolved for them (observer, actorder, ...)."""
    weights: dict[str, torch.Tensor] = {}
    resolved: list[QuantizationArgs] = []
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        with torch.no_grad():
            weights[f"{name}.weight"] = fake_quantize(
                module.weight, module.weight_scale, module.weight_zero_point, scheme.weights
            ).to(torch.float32)
        resolved.append(scheme.weights)
    if not weights:
        raise RuntimeError("llm-compressor quantized no module")
    if any(args != resolved[0] for args in resolved):
        raise RuntimeError("llm-compressor resolved different weight arguments across modules")
    return weights, resolved[0].model_dump(mode="json")


def save_fake_quant(model_dir: Path, weights: dict[str, torch.Tensor], out: Path) -> None:
    """Write a plain checkpoint: the original model with ``weights`` substituted, plus its tokenizer files."""
    plain = load_model(model_dir)
    state = plain.state_dict()
    unknown = sorted(set(weights) - set(state))
    if unknown:
        raise RuntimeError(f"quantized weights not in the original model: {unknown[:5]}")
    with torch.no_grad():
        for key, value in weights.items():
            state[key].copy_(value)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    for src in model_dir.iterdir():
        if src.is_file() and src.name not in MODEL_FILES and not src.name.endswith(WEIGHT_FILE_SUFFIXES):
            shutil.copy2(src, out / src.name)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="plain HF safetensors model directory")
    parser.add_argument("--windows", type=Path, help="torch.save-d LongTensor [n, seq_len] (required for gptq)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--scheme", choices=("gptq", "rtn"), required=True)
    parser.add_argument("--out", type=Path, required=True, help="output directory for the fake-quant checkpoint")
    args = parser.parse_args()
    if args.scheme == "gptq" and args.windows is None:
        parser.error("--windows is required for --scheme gptq")
    return args


def main() -> None:
    args = parse_args()
    dataset = windows_dataset(args.windows) if args.scheme == "gptq" else None
    model = load_model(args.model)
    seconds = calibrate(model, build_modifier(args.scheme, args.bits, args.group_size), dataset, args.model)
    weights, weight_args = dequantized_weights(model)
    del model
    save_fake_quant(args.model, weights, args.out)
    report = {
        "tool": "llmcompressor",
        "version": version("llmcompressor"),
        "compressed_tensors_version": version("compressed-tensors"),
        "scheme": args.scheme,
        "bits": args.bits,
        "group_size": args.group_size,
        "weight_args": weight_args,
        "gptq": {"block_size": GPTQ_BLOCK_SIZE, "dampening_frac": GPTQ_DAMPENING} if args.scheme == "gptq" else None,
        "n_windows": None if dataset is None else len(dataset),
        "seq_len": None if dataset is None else len(dataset[0]["input_ids"]),
        "quantized_modules": len(weights),
        "seconds": round(seconds, 3),
        "peak_host_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    (args.out / "peer.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
