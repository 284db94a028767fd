"""Resume from any block: a run stopped after block k and restarted ends bit-for-bit as one that never stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quant_core.checkpoint import BlockCheckpoint
from quant_core.corpus import BUNDLED_TEXTS, calibration_windows, tokenize_file
from quant_core.engine import calibrate_blocks
from quant_core.errors import CancelledError, ConfigError
from quant_core.losses import build_loss
from quant_core.methods import build_method
from quant_core.methods.base import GRID_BUFFERS, KEPT_BUFFERS, ROTATED_GRID_BUFFERS
from quant_core.model_structure import find_decoder_blocks, quantizable_linears
from quant_core.quantizer import QuantSpec
from tests.tiny_models import build_model

LAYERS = 4
VOLATILE = ("seconds", "peak_host_mb", "peak_device_mb")


@pytest.fixture(scope="module")
def windows(tokenizer) -> torch.Tensor:
    return calibration_windows(tokenize_file(tokenizer, BUNDLED_TEXTS["austen"]), 6, 32, seed=0)


def _run(windows: torch.Tensor, method: str, options: dict, checkpoint: BlockCheckpoint | None = None, stop_after=None):
    model = build_model("llama", layers=LAYERS)
    quant = build_method(method, QuantSpec(bits=2, group_size=32), build_loss("mse_sw", seed=3), options)
    done: list[int] = []
    records = calibrate_blocks(
        model,
        windows,
        quant,
        build_loss("mse_sw", seed=3),
        seed=3,
        on_block=lambda r: done.append(r.index),
        should_cancel=(lambda: len(done) == stop_after) if stop_after is not None else None,
        checkpoint=checkpoint,
    )
    return model, records


def _comparable(records) -> list[dict]:
    return [{k: v for k, v in r.to_dict().items() if k not in VOLATILE} for r in records]


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("omniquant", {"epochs": 2, "batch_size": 2}),
        ("tesseraq", {"rounds": 2, "steps_per_round": 3}),
        ("gptq", {"incoherence": "hadamard"}),  # keeps a rotated grid instead
    ],
)
@pytest.mark.parametrize("stop_after", [1, 3])
def test_resumed_run_equals_an_uninterrupted_one(
    method: str, options: dict, stop_after: int, windows, tmp_path: Path
) -> None:
    reference, reference_records = _run(windows, method, options)
    checkpoint = BlockCheckpoint(tmp_path / "ckpt", "job-a")
    with pytest.raises(CancelledError):
        _run(windows, method, options, checkpoint, stop_after=stop_after)
    resumed, resumed_records = _run(windows, method, options, checkpoint)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert _comparable(resumed_records) == _comparable(reference_records)
    layers = zip(*(quantizable_linears(find_decoder_blocks(m)).values() for m in (reference, resumed)), strict=True)
    for ours, theirs in layers:  # the grids the export and end-to-end tuning need survive the restart too
        kept = [name for name in KEPT_BUFFERS if hasattr(ours, name)]
        assert kept in (list(GRID_BUFFERS), list(ROTATED_GRID_BUFFERS))
        assert all(torch.equal(getattr(ours, name), getattr(theirs, name)) for name in kept)


def test_a_finished_checkpoint_restores_every_block_without_recalibrating(windows, tmp_path: Path) -> None:
    checkpoint = BlockCheckpoint(tmp_path / "ckpt", "job-a")
    reference, _ = _run(windows, "rtn", {}, checkpoint)
    calibrated: list[int] = []
    model = build_model("llama", layers=LAYERS)
    method = build_method("rtn", QuantSpec(bits=2, group_size=32), build_loss("mse"))
    records = calibrate_blocks(
        model, windows, method, build_loss("mse"), on_block=lambda r: calibrated.append(r.index), checkpoint=checkpoint
    )
    assert calibrated == [] and len(records) == LAYERS
    for a, b in zip(reference.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_of_another_job_is_refused(windows, tmp_path: Path) -> None:
    with pytest.raises(CancelledError):
        _run(windows, "rtn", {}, BlockCheckpoint(tmp_path / "ckpt", "job-a"), stop_after=1)
    with pytest.raises(ConfigError, match="belongs to another job") as info:
        _run(windows, "rtn", {}, BlockCheckpoint(tmp_path / "ckpt", "job-b"))
    assert info.value.field == "checkpoint"
