"""Checkpoints run in vLLM, where vLLM is installed (its own environment: SWQUANT_VLLM_PYTHON).

vLLM computes in bfloat16 on CPUs, where the report scores in float32: a next-token log-probability
may differ by a few hundredths of a nat (bfloat16 keeps 8 bits of each activation), so per-token
NLLs are compared on average and in the bulk, and the perplexity within AGREEMENT (2%).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from quant_core.cli import main
from quant_core.corpus import BUNDLED_TEXTS
from quant_core.eval_windows import WindowedText, evaluation_windows
from quant_core.runtimes import AGREEMENT, RuntimeUnavailable, runtime_interpreter, token_nll
from tests.tiny_models import build_model

SETTINGS = ["--n-samples", "4", "--seq-len", "64", "--eval-max-windows", "4", "--method", "gptq", "--bits", "4"]


@pytest.fixture(scope="module")
def vllm_llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A 2-layer Llama with 64-wide heads and widths that vLLM's CPU kernels take."""
    runtime_or_skip()
    path = tmp_path_factory.mktemp("vllm-llama")
    build_model("llama_wide").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def runtime_or_skip() -> None:
    try:
        runtime_interpreter("vllm")
    except RuntimeUnavailable as exc:
        pytest.skip(str(exc))


def _windows(tokenizer) -> WindowedText:
    return evaluation_windows(tokenizer, BUNDLED_TEXTS["persuasion"], 64, 4)


def _assert_vllm_follows_our_nll(checkpoint: Path, text: WindowedText) -> torch.Tensor:
    """vLLM's per-token NLLs of ``checkpoint`` against transformers' float32 ones (our fake-quant model's:
    the packed checkpoint loads to exactly those weights), on the positions the report scores; returns vLLM's."""
    windows = text.ids
    try:
        theirs, label = token_nll("vllm", checkpoint, windows)  # a crash (RuntimeFailed) fails the test
    except RuntimeUnavailable as exc:
        pytest.skip(str(exc))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(windows).logits[:, :-1].double()
    ours = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="none").view_as(theirs)
    difference = (theirs - ours)[text.scored].abs()
    assert label.startswith("vllm ")
    assert difference.mean() < 0.02 and difference.quantile(0.99) < 0.1, difference.max()
    return theirs[text.scored]


def test_vllm_runs_the_half_precision_fake_quant_checkpoint_with_our_log_probabilities(
    vllm_llama_dir: Path, tmp_path: Path, tokenizer
) -> None:
    argv = ["quantize", "--model", str(vllm_llama_dir), *SETTINGS, "--export", "fake_quant", "--out", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    theirs = _assert_vllm_follows_our_nll(tmp_path / report["exports"]["fake_quant"]["path"], _windows(tokenizer))
    perplexity = theirs.mean().exp().item()
    assert perplexity == pytest.approx(report["perplexity"]["persuasion"]["after"], rel=AGREEMENT)


@pytest.mark.parametrize(
    "grid",
    [["--group-size", "64"], ["--symmetric", "--group-size", "128"], ["--group-size", "64", "--rotation", "hadamard"]],
    ids=["w4-g64-asym", "w4-g128-sym", "w4-g64-asym-rotated"],
)
def test_vllm_serves_the_packed_checkpoint_with_the_reports_perplexity_and_our_log_probabilities(
    grid: list[str], vllm_llama_dir: Path, tmp_path: Path, tokenizer
) -> None:
    argv = ["quantize", "--model", str(vllm_llama_dir), *SETTINGS, *grid, "--targets", "vllm", "--out", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["exports"]) == ["pack_quantized"]
    score = report["runtimes"]["vllm"]
    if not score["ran"] and "AVX-512" in score["reason"]:
        pytest.skip(score["reason"])
    assert score["ran"] and score["agrees"], score
    _assert_vllm_follows_our_nll(tmp_path / "packed", _windows(tokenizer))


def test_vllm_serves_a_size_budgets_checkpoint_of_several_group_sizes(
    vllm_llama_dir: Path, tmp_path: Path, tokenizer
) -> None:
    """vLLM's CPU build takes 4-bit weights only, so a budget for it mixes group sizes (symmetric, so that
    transformers loads the same checkpoint for the per-token comparison)."""
    groups = [arg for size in ("32", "64", "128") for arg in ("--budget-group-sizes", size)]
    budget = ["--symmetric", "--budget-bits", "4.3", "--budget-widths", "4", *groups]
    argv = ["quantize", "--model", str(vllm_llama_dir), *SETTINGS, *budget, "--targets", "vllm", "--out", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert len({unit["group_size"] for unit in report["allocation"]["units"]}) > 1, report["allocation"]
    assert report["allocation"]["bits_per_weight"] <= 4.3
    assert (
        len(json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]["config_groups"]) > 1
    )
    score = report["runtimes"]["vllm"]
    if not score["ran"] and "AVX-512" in score["reason"]:
        pytest.skip(score["reason"])
    assert score["ran"] and score["agrees"], score
    _assert_vllm_follows_our_nll(tmp_path / "packed", _windows(tokenizer))
