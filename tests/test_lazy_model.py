"""Streaming blocks from safetensors: same result as the in-memory engine, at a fraction of the memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
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


@pytest.mark.parametrize("loss", ["kd", "kd_sw"])
def test_streamed_tuning_equals_the_in_memory_tuning(loss: str, sharded_llama_dir: Path, tmp_path: Path) -> None:
    """GPTQ then end-to-end tuning, streamed block by block (forward without a graph, then each block
    recomputed with one in reverse order) against the whole model in memory: the same epoch losses
    (rel 1e-4), perplexities (rel 1e-4) and packed tensors (scales to 1e-5 of their size, codes equal:
    the tuning moves step sizes, never codes)."""
    common = ["quantize", "--model", str(sharded_llama_dir), "--method", "gptq", *SMALL, "--symmetric"]
    common += ["--export", "pack_quantized", "--export-dtype", "float32", "--finetune", "epochs=2"]
    common += ["--finetune", f"loss={loss}", "--finetune", "precision=float32", "--finetune", "batch_size=2"]
    assert main([*common, "--out", str(tmp_path / "eager")]) == 0
    assert main([*common, "--lazy-load", "--out", str(tmp_path / "lazy")]) == 0
    eager, lazy = (json.loads((tmp_path / run / "report.json").read_text()) for run in ("eager", "lazy"))
    tuned = lazy["method_stats"]["finetune"]
    assert tuned["streamed"] and tuned["steps"] == eager["method_stats"]["finetune"]["steps"] == 4
    assert tuned["epoch_losses"] == pytest.approx(eager["method_stats"]["finetune"]["epoch_losses"], rel=1e-4)
    assert tuned["grid_linears"] == eager["method_stats"]["finetune"]["grid_linears"]
    for text, ppl in eager["perplexity"].items():
        assert lazy["perplexity"][text]["after"] == pytest.approx(ppl["after"], rel=1e-4)
    reference, written = (_packed_tensors(tmp_path / run / "packed") for run in ("eager", "lazy"))
    assert reference.keys() == written.keys()
    for name, value in reference.items():
        if name.endswith("weight_packed"):
            assert torch.equal(value, written[name]), name
        else:
            assert torch.allclose(value, written[name], rtol=1e-5, atol=1e-7), name
    assert not (tmp_path / "lazy" / ".blocks").exists() and not (tmp_path / "lazy" / ".activations").exists()


def _write_large_llama(path: Path, tokenizer, layers: int) -> int:
    """A Llama of ``layers`` layers (32: about 770 MiB in float32) written shard by shard, never whole in memory."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=layers,
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


LIMITED_SCRIPT = """
import resource, sys
import torch
import quant_core.pipeline  # torch, transformers and compressed-tensors are mapped before the limit
from quant_core.cli import main

torch.ones(64, 64) @ torch.ones(64, 64)  # and the thread pool's stacks
mapped = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
limit = mapped + int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.exit(main(sys.argv[2:]))
"""
BUDGET_MB = 300  # address space a run may map beyond the libraries'


def _limited(argv: list[str]) -> subprocess.Popen:
    """``swquant`` in a process whose address space (RLIMIT_AS) is what the libraries mapped plus BUDGET_MB."""
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}  # glibc reserves 64 MiB of address space per arena
    return subprocess.Popen(
        [sys.executable, "-c", LIMITED_SCRIPT, str(BUDGET_MB), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _packed_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118 (safe_open is no mapping)
    return tensors


def test_a_model_larger_than_its_address_space_limit_is_packed_and_resumed_after_a_kill(
    tmp_path: Path, tokenizer
) -> None:
    """A 32-layer Llama of about 770 MiB, under an address-space limit (RLIMIT_AS) of BUDGET_MB (300 MiB)
    beyond what the libraries map: loaded whole it fails; streamed with a checkpoint it is killed
    (SIGKILL) after some blocks, resumed, and writes the packed checkpoint the unlimited in-memory run
    writes, tensor for tensor, with the same perplexities (the streamed run scores the packed weights)."""
    model_dir = tmp_path / "large"
    model_dir.mkdir()
    size_mb = _write_large_llama(model_dir, tokenizer, layers=32) / 2**20
    assert size_mb > 2.5 * BUDGET_MB
    job = ["quantize", "--model", str(model_dir), "--method", "gptq", "--bits", "4", "--group-size", "64"]
    job += ["--symmetric", "--n-samples", "2", "--seq-len", "32", "--eval-max-windows", "1"]
    job += ["--export", "pack_quantized", "--export-dtype", "float32"]
    assert main([*job, "--out", str(tmp_path / "eager")]) == 0

    whole = _limited([*job, "--out", str(tmp_path / "whole")])
    output = whole.communicate(timeout=600)[0]
    assert whole.returncode != 0 and "Cannot allocate memory" in output, output[-2000:]

    streamed = [*job, "--lazy-load", "--checkpoint", str(tmp_path / "progress"), "--out", str(tmp_path / "lazy")]
    first = _limited(streamed)
    deadline = time.monotonic() + 1200
    while not (tmp_path / "progress" / "block_00010.safetensors").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-2000:]
        time.sleep(0.2)
    first.kill()
    first.communicate()
    assert not (tmp_path / "lazy" / "report.json").exists()
    second = _limited(streamed)
    output = second.communicate(timeout=600)[0]
    assert second.returncode == 0, output[-3000:]

    eager, lazy = (json.loads((tmp_path / run / "report.json").read_text()) for run in ("eager", "lazy"))
    assert len(lazy["blocks"]) == 32
    for text, ppl in eager["perplexity"].items():
        assert lazy["perplexity"][text]["before"] == pytest.approx(ppl["before"], rel=1e-5)
        assert lazy["perplexity"][text]["after"] == pytest.approx(ppl["after"], rel=1e-5)
    reference, written = (_packed_tensors(tmp_path / run / "packed") for run in ("eager", "lazy"))
    assert reference.keys() == written.keys()
    for name, value in reference.items():
        assert torch.equal(value, written[name]), name
    configs = [json.loads((tmp_path / run / "packed" / "config.json").read_text()) for run in ("eager", "lazy")]
    assert configs[0]["quantization_config"] == configs[1]["quantization_config"]
    peaks = lazy["peak_memory_by_stage"]["host_mb"]
    print(f"model {size_mb:.0f} MiB under a {BUDGET_MB} MiB address-space budget; resident peaks {peaks}")
