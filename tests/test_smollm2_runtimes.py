"""A real model's checkpoints in the runtimes that serve them: SmolLM2-135M (from the package registry,
bench/assets.py) at W4, asymmetric g64, symmetric g32 and rotated, scored by vLLM (packed) and llama.cpp
(GGUF) on the report's own windows within AGREEMENT (2%) of the report.

Round-to-nearest keeps the job short; what is checked is the checkpoint, not the method. A runtime that is
not installed, or vLLM's packed kernel on a processor without AVX-512, skips with the reason; a runtime
that breaks on the checkpoint fails. On a processor with AMX tiles both runtimes take other CPU kernels:
vLLM 0.32's int4 kernel scores these checkpoints 2.2% to 3.4% above the report (its AVX-512 kernel agrees
within 0.1%), and llama-cpp-python 0.3.36 built for that processor (``-march=native``) died loading
them (a general protection fault in libggml-cpu). bench/install_runtimes.sh now builds llama.cpp for
AVX2 whatever the processor, which has not met an AMX processor since. On such a processor vLLM must
still run, and the job must report each runtime's outcome (``agrees: false`` or the failure) instead
of failing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bench.assets import prepare_smollm2
from quant_core.cli import main
from quant_core.runtimes import AGREEMENT, RuntimeUnavailable, runtime_interpreter

SETTINGS = ["--method", "rtn", "--bits", "4", "--n-samples", "4", "--seq-len", "256", "--eval-max-windows", "4"]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return prepare_smollm2()


@pytest.mark.parametrize(
    "grid",
    [["--group-size", "64"], ["--symmetric", "--group-size", "32"], ["--group-size", "64", "--rotation", "hadamard"]],
    ids=["w4-g64-asym", "w4-g32-sym", "w4-g64-asym-rotated"],
)
def test_smollm2_runs_in_vllm_and_llama_cpp_with_the_reports_perplexity(
    grid: list[str], smollm2: Path, tmp_path: Path
) -> None:
    served = [runtime for runtime in ("vllm", "llama.cpp") if _installed(runtime)]
    if not served:
        pytest.skip("neither vLLM nor llama.cpp is installed here (bench/install_runtimes.sh)")
    argv = ["quantize", "--model", str(smollm2), *SETTINGS, *grid, "--targets", *served, "--out", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    reported = report["perplexity"]["persuasion"]["after"]
    scores = report["runtimes"]
    if "vllm" in scores and not scores["vllm"]["ran"] and "AVX-512" in scores["vllm"]["reason"]:
        served.remove("vllm")  # this processor cannot run vLLM's int4 kernel: llama.cpp still must
    elif torch.cpu._is_amx_tile_supported():  # other kernels, not the ones the agreement holds for
        assert set(served) <= set(scores) and scores.get("vllm", {"ran": True})["ran"], scores
        served = []
    for runtime in served:
        score = scores[runtime]
        assert score["ran"] and score["agrees"], (runtime, score)
        assert abs(score["perplexity"]["persuasion"] / reported - 1) <= AGREEMENT
    if "--rotation" in grid:  # the absorbed rotation unties SmolLM2's head: both matrices are in the checkpoint
        config = json.loads((tmp_path / "packed" / "config.json").read_text())
        with safe_open(tmp_path / "packed" / "model.safetensors", "pt") as tensors:
            names = set(tensors.keys())
        assert not config["tie_word_embeddings"] and {"lm_head.weight", "model.embed_tokens.weight"} <= names


def _installed(runtime: str) -> bool:
    try:
        runtime_interpreter(runtime)
    except RuntimeUnavailable:
        return False
    return True
