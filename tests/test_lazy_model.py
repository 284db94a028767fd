"""Streaming blocks from safetensors: same result as the in-memory engine, at a fraction of the memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from quant_core.cli import main
from tests.tiny_models import build_model

SMALL = ["--n-samples", "4", "--seq-len", "32", "--eval-max-windows", "3", "--bits", "3", "--group-size", "32"]


@pytest.fixture(scope="module")
def sharded_llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A 4-layer Llama saved in several shards, with an index, as large checkpoints are."""
    path = tmp_path_factory.mktemp("sharded-llama")
    build_model("llama", layers=4).save_pretrained(path, max_shard_size="100KB")
    tokenizer.save_pretrained(path)
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.mark.parametrize("method", ["gptq", "omniquant"])
def test_streamed_run_equals_the_in_memory_run(method: str, sharded_llama_dir: Path, tmp_path: Path) -> None:
    # Both runs write the fake-quantized directory (the streamed run can write nothing else) to compare.
    # Streamed blocks are written in the job's dtype, so the in-memory run keeps float32 too.
    common = ["quantize", "--model", str(sharded_llama_dir), "--method", method, "--export", "fake_quant", *SMALL]
    common += ["--export-dtype", "float32"]
    if method == "omniquant":
        common += ["--method-opt", "epochs=1"]
    assert main([*common, "--out", str(tmp_path / "eager")]) == 0
    assert main([*common, "--lazy-load", "--out", str(tmp_path / "lazy")]) == 0
    eager, lazy = (json.loads((tmp_path / run / "report.json").read_text()) for run in ("eager", "lazy"))
    for text, ppl in eager["perplexity"].items():
        assert lazy["perplexity"][text]["before"] == pytest.approx(ppl["before"], rel=1e-5)
        assert lazy["perplexity"][text]["after"] == pytest.approx(ppl["after"], rel=1e-5)
    assert [b["mse_after"] for b in lazy["blocks"]] == pytest.approx([b["mse_after"] for b in eager["blocks"]])
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "eager" / "model").state_dict()
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "lazy" / "model").state_dict()
    assert reference.keys() == streamed.keys()
    for name, value in reference.items():
        assert torch.equal(value, streamed[name]), name


def _write_large_llama(path: Path, tokenizer) -> int:
    """A 60-layer Llama (about 1.4 GiB in float32) written shard by shard, never whole in memory."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=60,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    shapes = {name: p.shape for name, p in skeleton.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        groups.setdefault(f"layer-{int(parts[2]):03d}" if parts[1] == "layers" else "base", []).append(name)
    total = 0
    values: dict[tuple[str, torch.Size], torch.Tensor] = {}  # every layer gets the same random tensors
    for shard, names in groups.items():
        tensors = {}
        for name in names:
            shape, role = shapes[name], name.split(".", 3)[-1] if ".layers." in name else name
            if (role, shape) not in values:
                values[role, shape] = (
                    torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
                )
            tensors[name] = values[role, shape]
            total += tensors[name].numel() * 4
        save_file(tensors, str(path / f"{shard}.safetensors"))
        weight_map.update(dict.fromkeys(names, f"{shard}.safetensors"))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return total


PEAK_SCRIPT = """
import json, resource, sys
from quant_core.cli import main
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # interpreter, torch, transformers
code = main(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"code": code, "baseline_mb": baseline, "peak_mb": peak}))
"""


def test_a_model_larger_than_the_peak_memory_is_quantized(tmp_path: Path, tokenizer) -> None:
    """What the run adds to the process's resident memory stays far below the checkpoint's size.

    The libraries alone take a few hundred MiB before any model is touched; that baseline is measured
    in the same process and reported, and the run's own peak above it is what is compared.
    """
    model_dir = tmp_path / "large"
    model_dir.mkdir()
    size_mb = _write_large_llama(model_dir, tokenizer) / 2**20
    argv = ["quantize", "--model", str(model_dir), "--method", "rtn", "--lazy-load", "--out", str(tmp_path / "out")]
    argv += ["--n-samples", "2", "--seq-len", "32", "--eval-max-windows", "1", "--bits", "4", "--group-size", "64"]
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, *argv], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    added = result["peak_mb"] - result["baseline_mb"]
    print(f"model {size_mb:.0f} MiB, peak resident {result['peak_mb']:.0f} MiB of which the run added {added:.0f}")
    assert result["code"] == 0 and len(report["blocks"]) == 60
    assert added < 0.25 * size_mb
    written = sum(f.stat().st_size for f in (tmp_path / "out" / "model").glob("*.safetensors")) / 2**20
    assert written == pytest.approx(size_mb, rel=0.01)
