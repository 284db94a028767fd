"""One job over several ranks (quant_core.distributed, quant_core.launch): the same result as one process.

Ranks are real processes in a real Gloo process group over local TCP. Summing a Hessian or an NLL
over ranks changes the order of floating-point additions, so results agree to a tolerance, not bit
for bit: block losses to a relative 1e-4, perplexity to 1e-5, quantized weights to a relative 1e-5 of
their scale (a weight a rounding away from a grid boundary could take the other code; none does here)
and, after end-to-end tuning, whose step sizes differ in their last bits, to one bfloat16 step of the
stored weight. Tuning's epoch losses agree to 1e-4.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quant_core.distributed import Ranks
from quant_core.errors import CancelledError, ConfigError
from quant_core.job import CalibrationSpec, EvaluationSpec, JobSpec
from quant_core.job_settings import JobSettings, validated
from quant_core.launch import TIMEOUT_VARIABLE, run_ranked, torchrun_ranks
from quant_core.pipeline import JobHooks
from quant_core.quantizer import QuantSpec
from tests.s3_server import free_ports

CALIBRATION_WINDOWS = 7  # 3 ranks hold 3, 2 and 2: uneven shares on purpose


def _spec(
    model: Path,
    method: str,
    options: dict,
    world_size: int,
    rotation: str = "none",
    finetune: dict | None = None,
    loss: str | None = None,
) -> JobSpec:
    return JobSpec(
        model=str(model),
        loss=loss,
        quant=QuantSpec(bits=3, group_size=32),
        method=method,
        method_options=options,
        calibration=CalibrationSpec(n_samples=CALIBRATION_WINDOWS, seq_len=64),
        evaluation=EvaluationSpec(max_windows=5, seq_len=64),
        rotation=rotation,
        finetune=finetune or {},
        world_size=world_size,
        export_formats=("fake_quant",),
    )


def _close(a: float, b: float, rel: float) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


# Three windows a step over seven windows: steps of 3, 3 and 1, so the last step leaves ranks idle.
TUNING = {"epochs": 2, "batch_size": 3, "precision": "float32"}
CASES = {
    "rtn": ("rtn", {}, "none", None, None),
    "rtn clipped": ("rtn", {"clip_search": True}, "none", None, None),
    "gptq": ("gptq", {}, "none", None, None),
    "gptq quip": ("gptq", {"incoherence": "hadamard"}, "none", None, None),
    "gptq rotated": ("gptq", {}, "hadamard", None, None),
    "gptq llm-compressor order": ("gptq", {"true_sequential": False, "act_order": False}, "none", None, None),
    "gptq quip kd_sw tuning": ("gptq", {"incoherence": "hadamard"}, "none", {**TUNING, "loss": "kd_sw"}, None),
    "rtn kd tuning": ("rtn", {}, "none", {**TUNING, "loss": "kd"}, None),
    "omniquant mse_sw": ("omniquant", {"epochs": 2, "batch_size": 3}, "none", None, "mse_sw"),
    "tesseraq": ("tesseraq", {"rounds": 2, "steps_per_round": 3, "batch_size": 2}, "none", None, None),
    "normtweaking over gptq": ("normtweaking", {"epochs": 1, "batch_size": 2}, "none", None, None),
    # 2 of the 7 windows sampled: on 3 ranks one at least holds none of them
    "awq mse_sw": ("awq", {"search_samples": 2, "n_grid": 5}, "none", None, "mse_sw"),
    "tesseraq from awq": (
        "tesseraq",
        {"init": "awq", "rounds": 2, "steps_per_round": 3, "batch_size": 2},
        "none",
        None,
        None,
    ),
    # 7 windows, 3 forwards a step: steps of 3, 3 and 1 forwards, shared out 2/1, 1/1/1, and 1 with ranks idle
    "discquant kd": ("discquant", {"grad_accum": 3, "lr": 0.05}, "none", None, "kd"),
    "discquant kd_sw": ("discquant", {"grad_accum": 3, "lr": 0.05}, "none", None, "kd_sw"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_and_three_ranks_give_what_one_process_gives(case: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    method, options, rotation, finetune, loss = CASES[case]
    reports, weights = {}, {}
    for world_size in (1, 2, 3):
        out = tmp_path / f"ranks{world_size}"
        reports[world_size] = run_ranked(
            _spec(tiny_llama_dir, method, options, world_size, rotation, finetune, loss), out
        )
        weights[world_size] = load_file(str(out / "model" / "model.safetensors"))
    one = reports[1]
    for world_size in (2, 3):
        many = reports[world_size]
        assert many.parallel["world_size"] == world_size
        assert many.parallel["backend"] == "gloo"
        assert sum(many.parallel["calibration_windows_by_rank"]) == CALIBRATION_WINDOWS
        for name, pair in one.perplexity.items():
            assert _close(many.perplexity[name].before, pair.before, 1e-5), (name, world_size)
            assert _close(many.perplexity[name].after, pair.after, 1e-5), (name, world_size)
        for a, b in zip(one.blocks, many.blocks, strict=True):
            assert _close(b.loss_before, a.loss_before, 1e-4)
            assert _close(b.loss_after, a.loss_after, 1e-4)
            assert _close(b.mse_after, a.mse_after, 1e-4)
            assert len(b.peak_host_mb_by_rank) == world_size
        for key, tensor in weights[1].items():
            other, tensor = weights[world_size][key].float(), tensor.float()
            if finetune:  # tuned step sizes differ in their last bits; stored in bfloat16, a value may round
                assert torch.allclose(other, tensor, rtol=2**-7, atol=1e-6), (key, world_size)  # one bf16 step
            else:
                scale = tensor.abs().max().clamp_min(1e-12)
                assert ((other - tensor).abs().max() / scale) < 1e-5, (key, world_size)
        if method == "discquant":
            assert many.method_stats["steps"] == one.method_stats["steps"] == 3
            for a_loss, b_loss in zip(one.method_stats["loss_curve"], many.method_stats["loss_curve"], strict=True):
                assert _close(b_loss, a_loss, 1e-4)
        if finetune:
            tuned, tuned_here = one.method_stats["finetune"], many.method_stats["finetune"]
            assert tuned_here["steps"] == tuned["steps"] == 6
            for a_loss, b_loss in zip(tuned["epoch_losses"], tuned_here["epoch_losses"], strict=True):
                assert _close(b_loss, a_loss, 1e-4)
    assert one.parallel["world_size"] == 1 and all(b.peak_host_mb_by_rank == [] for b in one.blocks)


def test_fewer_windows_than_ranks_is_refused_naming_the_setting(tiny_llama_dir: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        body = {"model": str(tiny_llama_dir), "method": "gptq", "world_size": 3}
        validated(JobSettings, {**body, "calibration": {"n_samples": 2}})
    assert refused.value.field == "calibration.n_samples"


def test_a_world_size_from_torchrun_is_checked_as_the_setting_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun, not the settings, gives the world size there: the same refusal, before joining any group."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError) as refused:
        torchrun_ranks(JobSpec(model="m", method="gptq", calibration=CalibrationSpec(n_samples=2)))
    assert refused.value.field == "calibration.n_samples"


def test_shares_cover_every_window_once_with_the_first_ranks_taking_the_remainder() -> None:
    for count in range(12):
        for world_size in range(1, 6):
            bounds = Ranks(0, world_size).bounds(count)
            sizes = [end - start for start, end in bounds]
            assert bounds[0][0] == 0 and bounds[-1][1] == count
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
            rows = torch.arange(count)
            shares = [Ranks(rank, world_size).share(rows) for rank in range(world_size)]
            assert torch.equal(torch.cat(shares), rows)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, whether in one file or in shards."""
    return {key: value for shard in sorted(folder.glob("*.safetensors")) for key, value in load_file(shard).items()}


def test_a_streamed_job_over_ranks_stops_resumes_and_gives_the_one_process_result(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """lazy_load on 2 ranks, stopped after block 0, resumed on 3 ranks: the checkpoint and perplexity of
    one streaming process (tests/test_lazy_model.py holds that equal to the in-memory job)."""
    checkpoint = tmp_path / "checkpoint"
    done: list[int] = []
    hooks = JobHooks(on_block=lambda record: done.append(record.index), should_cancel=lambda: len(done) == 1)
    with pytest.raises(CancelledError):
        run_ranked(
            replace(_spec(tiny_llama_dir, "gptq", {}, 2), lazy_load=True), tmp_path / "stopped", hooks, checkpoint
        )
    resumed = run_ranked(
        replace(_spec(tiny_llama_dir, "gptq", {}, 3), lazy_load=True), tmp_path / "resumed", None, checkpoint
    )
    whole = run_ranked(replace(_spec(tiny_llama_dir, "gptq", {}, 1), lazy_load=True), tmp_path / "whole")
    for name, pair in whole.perplexity.items():
        assert _close(resumed.perplexity[name].before, pair.before, 1e-5), name
        assert _close(resumed.perplexity[name].after, pair.after, 1e-5), name
    ours, reference = _tensors(tmp_path / "resumed" / "model"), _tensors(tmp_path / "whole" / "model")
    assert ours.keys() == reference.keys()
    for key, tensor in reference.items():
        scale = tensor.float().abs().max().clamp_min(1e-12)
        assert ((ours[key].float() - tensor.float()).abs().max() / scale) < 1e-5, key
    assert not (tmp_path / "resumed" / ".ranks").exists()  # the other ranks' copies are gone


@pytest.mark.parametrize(("first", "then"), [(2, 3), (3, 1), (1, 2)])
def test_a_stopped_job_resumes_from_its_last_block_at_another_world_size(
    first: int, then: int, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "checkpoint"
    done: list[int] = []
    hooks = JobHooks(on_block=lambda record: done.append(record.index), should_cancel=lambda: len(done) == 1)
    with pytest.raises(CancelledError):
        run_ranked(_spec(tiny_llama_dir, "gptq", {}, first), tmp_path / "stopped", hooks, checkpoint)
    assert done == [0]
    resumed_blocks: list[int] = []
    resumed = run_ranked(
        _spec(tiny_llama_dir, "gptq", {}, then),
        tmp_path / "resumed",
        JobHooks(on_block=lambda record: resumed_blocks.append(record.index)),
        checkpoint,
    )
    assert resumed_blocks == [1]  # block 0 came from the checkpoint
    whole = run_ranked(_spec(tiny_llama_dir, "gptq", {}, 1), tmp_path / "whole")
    for name, pair in whole.perplexity.items():
        assert _close(resumed.perplexity[name].after, pair.after, 1e-5)
    for a, b in zip(whole.blocks, resumed.blocks, strict=True):
        assert _close(b.loss_after, a.loss_after, 1e-4)


def _kill_the_other_rank(_record: object) -> None:
    """The leader's block hook: SIGKILL the spawned rank (a child of this process) mid-job."""
    import psutil

    for child in psutil.Process().children():
        if "spawn_main" in " ".join(child.cmdline()):
            os.kill(child.pid, signal.SIGKILL)


def test_a_killed_rank_ends_the_attempt_within_the_collective_timeout_and_the_job_resumes(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TIMEOUT_VARIABLE, "30")
    checkpoint = tmp_path / "checkpoint"
    killing = JobHooks(on_block=_kill_the_other_rank)
    started = time.monotonic()
    with pytest.raises(Exception) as failed:  # Gloo's own error: a closed connection or a timeout
        run_ranked(_spec(tiny_llama_dir, "gptq", {}, 2), tmp_path / "out", killing, checkpoint)
    assert time.monotonic() - started < 30 + 90  # the timeout, plus the start and the cleanup
    assert not isinstance(failed.value, (ConfigError, CancelledError))
    assert not (tmp_path / "out" / "report.json").exists()
    # the next attempt resumes after the block the killed one finished, and ends as one process does
    resumed_blocks: list[int] = []
    resumed = run_ranked(
        _spec(tiny_llama_dir, "gptq", {}, 2),
        tmp_path / "out",
        JobHooks(on_block=lambda record: resumed_blocks.append(record.index)),
        checkpoint,
    )
    assert resumed_blocks == [1]
    whole = run_ranked(_spec(tiny_llama_dir, "gptq", {}, 1), tmp_path / "whole")
    for name, pair in whole.perplexity.items():
        assert _close(resumed.perplexity[name].after, pair.after, 1e-5)


def test_two_machines_meet_through_torchruns_rendezvous(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Two "machines": two torchrun launchers, each with its own environment and working folder, one
    process each, meeting at the rendezvous endpoint the first publishes (c10d, as across hosts)."""
    (port,) = free_ports(1)
    flags = ["--model", str(tiny_llama_dir), "--method", "gptq", "--bits", "3", "--group-size", "32"]
    flags += ["--n-samples", str(CALIBRATION_WINDOWS), "--seq-len", "64", "--eval-max-windows", "5"]
    flags += ["--export", "fake_quant"]
    machines = []
    for node in (0, 1):
        home = tmp_path / f"machine{node}"
        home.mkdir()
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
        launch += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "job"]
        launch += ["--node-rank", str(node), "-m", "quant_core.cli", "quantize", *flags, "--out", str(home / "out")]
        env = {**os.environ, "HOME": str(home), "TMPDIR": str(home)}
        log = (home / "log").open("w")
        machines.append(subprocess.Popen(launch, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [machine.wait(timeout=600) for machine in machines]
    assert codes == [0, 0], [(tmp_path / f"machine{n}" / "log").read_text()[-3000:] for n in (0, 1)]
    written = [(tmp_path / f"machine{n}" / "out" / "report.json").exists() for n in (0, 1)]
    assert sum(written) == 1  # the leader's machine writes, wherever torchrun put rank 0
    leader = tmp_path / f"machine{written.index(True)}" / "out"
    report = json.loads((leader / "report.json").read_text())
    one = run_ranked(_spec(tiny_llama_dir, "gptq", {}, 1), tmp_path / "one")
    assert report["parallel"]["world_size"] == 2
    for name, pair in one.perplexity.items():
        assert _close(report["perplexity"][name]["after"], pair.after, 1e-5)
    for record, block in zip(one.blocks, report["blocks"], strict=True):
        assert _close(block["loss_after"], record.loss_after, 1e-4)
