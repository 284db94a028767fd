"""Runtime targets in a job's report: scored where the runtime is, explained where it is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quant_core.cli import main
from quant_core.runtimes import RuntimeFailed, RuntimeUnavailable, token_nll
from tests.test_cli import SMALL


def test_transformers_target_scores_the_packed_checkpoint_as_the_report_does(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    argv = ["quantize", "--model", str(tiny_llama_dir), "--method", "rtn", "--out", str(tmp_path), *SMALL]
    assert main([*argv, "--targets", "transformers"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    score = report["runtimes"]["transformers"]
    assert score["ran"] and score["agrees"] and score["checkpoint"] == "packed"
    assert score["perplexity"]["persuasion"] == pytest.approx(report["perplexity"]["persuasion"]["after"], rel=1e-5)
    card = (tmp_path / "packed" / "README.md").read_text()
    assert "| transformers (transformers " in card


def test_a_runtime_that_is_not_installed_is_reported_not_failed(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWQUANT_LLAMACPP_PYTHON", str(tmp_path / "no-such-python"))
    argv = ["quantize", "--model", str(tiny_llama_dir), "--method", "rtn", "--out", str(tmp_path), *SMALL]
    assert main([*argv, "--bits", "4", "--targets", "llama.cpp"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    score = report["runtimes"]["llama.cpp"]
    assert not score["ran"] and "SWQUANT_LLAMACPP_PYTHON" in score["reason"]
    assert (tmp_path / "gguf" / "model.gguf").is_file()
    assert "not run: SWQUANT_LLAMACPP_PYTHON" in (tmp_path / "gguf" / "README.md").read_text()


def test_a_runtime_that_breaks_is_a_failure_with_its_cause_not_an_absence(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runtime that is there but crashes is reported with its own error, and raises RuntimeFailed
    (which tests do not skip on), not RuntimeUnavailable."""
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\necho 'loading...'\necho 'ValueError: no kernel for this tensor' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("SWQUANT_LLAMACPP_PYTHON", str(broken))
    with pytest.raises(RuntimeFailed, match="no kernel for this tensor") as err:
        token_nll("llama.cpp", tmp_path, torch.zeros(1, 4, dtype=torch.long))
    assert not isinstance(err.value, RuntimeUnavailable)
    argv = ["quantize", "--model", str(tiny_llama_dir), "--method", "rtn", "--out", str(tmp_path / "job"), *SMALL]
    assert main([*argv, "--bits", "4", "--targets", "llama.cpp"]) == 0
    score = json.loads((tmp_path / "job" / "report.json").read_text())["runtimes"]["llama.cpp"]
    assert (
        not score["ran"]
        and score["reason"] == "llama.cpp failed on this checkpoint: ValueError: no kernel for this tensor"
    )


def test_a_runtime_killed_by_a_signal_is_reported_with_that_signal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A native fault prints nothing: the reason names the signal rather than ending in an empty string."""
    faulting = tmp_path / "faulting-python"
    faulting.write_text("#!/bin/sh\nkill -SEGV $$\n")
    faulting.chmod(0o755)
    monkeypatch.setenv("SWQUANT_LLAMACPP_PYTHON", str(faulting))
    with pytest.raises(RuntimeFailed, match=r"^llama\.cpp failed on this checkpoint: killed by SIGSEGV$"):
        token_nll("llama.cpp", tmp_path, torch.zeros(1, 4, dtype=torch.long))
