"""The blockwise engine on tiny models of several architectures, all on CPU."""

from __future__ import annotations

import math

import pytest
import torch

from quant_core.corpus import BUNDLED_TEXTS, calibration_windows, tokenize_file
from quant_core.engine import calibrate_blocks, capture_block_inputs, run_block
from quant_core.errors import CancelledError
from quant_core.losses import build_loss
from quant_core.methods import build_method
from quant_core.model_structure import find_decoder_blocks
from quant_core.perplexity import perplexity
from quant_core.progress import PhaseProgress
from quant_core.quantizer import QuantSpec
from tests.tiny_models import build_model

ARCHS = ["llama", "qwen2", "opt", "gpt2"]


@pytest.fixture(scope="module")
def windows(tokenizer) -> torch.Tensor:
    return calibration_windows(tokenize_file(tokenizer, BUNDLED_TEXTS["austen"]), 8, 32, seed=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_blocks_are_found(arch: str) -> None:
    model = build_model(arch, layers=3)
    blocks = find_decoder_blocks(model)
    assert len(blocks) == 3
    assert type(blocks[0]).__name__.endswith(("DecoderLayer", "Block"))


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_inputs_replay_the_models_own_forward(arch: str, windows: torch.Tensor) -> None:
    """Running the captured block-0 inputs through every block gives the model's last hidden state."""
    model = build_model(arch)
    with torch.no_grad():
        expected = model(input_ids=windows, output_hidden_states=True).hidden_states[-1]
        captured = capture_block_inputs(model, windows, "cpu")
        hidden = captured.hidden
        for block in find_decoder_blocks(model):
            hidden = run_block(block, hidden, captured.kwargs)
    # The last entry of hidden_states has the model's final norm applied.
    norm = {
        "llama": lambda: model.model.norm,
        "qwen2": lambda: model.model.norm,
        "opt": lambda: model.model.decoder.final_layer_norm,
        "gpt2": lambda: model.transformer.ln_f,
    }[arch]()
    assert torch.allclose(norm(hidden), expected, atol=1e-5)


def _calibrate(arch: str, windows: torch.Tensor, method: str, bits: int, loss: str = "mse", **options):
    model = build_model(arch)
    spec = QuantSpec(bits=bits, group_size=32)
    quant = build_method(method, spec, build_loss(loss, seed=0), options)
    records = calibrate_blocks(model, windows, quant, build_loss(loss, seed=0), seed=0)
    return model, records


def test_rtn_records_equal_losses_before_and_after(windows: torch.Tensor) -> None:
    _, records = _calibrate("llama", windows, "rtn", bits=3)
    assert [r.index for r in records] == [0, 1]
    for r in records:
        assert r.loss_before == pytest.approx(r.loss_after, rel=1e-6)
        assert r.seconds > 0 and r.peak_host_mb > 0 and r.num_blocks == 2


@pytest.mark.parametrize(("arch", "bits", "loss"), [("llama", 2, "mse"), ("llama", 3, "mse_sw"), ("opt", 3, "mse")])
def test_omniquant_beats_round_to_nearest(arch: str, bits: int, loss: str, windows: torch.Tensor) -> None:
    _, records = _calibrate(arch, windows, "omniquant", bits=bits, loss=loss, epochs=6, lr=1e-1, schedule="paper")
    for r in records:
        assert r.mse_after < 0.9 * r.mse_before, r
        assert r.loss_after < r.loss_before, r
        epoch_losses = r.method_stats["epoch_losses"]
        assert epoch_losses[-1] < epoch_losses[0]


@pytest.mark.parametrize(("init", "rtn_options"), [("full", {}), ("clip_search", {"clip_search": True})])
def test_omniquant_with_zero_steps_is_its_starting_point(init: str, rtn_options: dict, windows: torch.Tensor) -> None:
    """Factors start at the full range (plain RTN) or at the searched clipping (RTN with clip_search)."""
    rtn_model, _ = _calibrate("llama", windows, "rtn", bits=3, **rtn_options)
    omni_model, _ = _calibrate("llama", windows, "omniquant", bits=3, steps=0, init=init)
    for a, b in zip(rtn_model.state_dict().values(), omni_model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_calibration_is_deterministic_under_a_seed(windows: torch.Tensor) -> None:
    first, rec1 = _calibrate("llama", windows, "omniquant", bits=3, loss="mse_sw", epochs=2, batch_size=4)
    second, rec2 = _calibrate("llama", windows, "omniquant", bits=3, loss="mse_sw", epochs=2, batch_size=4)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [r.loss_after for r in rec1] == [r.loss_after for r in rec2]


def test_quantized_weights_lie_on_the_grid(windows: torch.Tensor) -> None:
    model, _ = _calibrate("llama", windows, "omniquant", bits=2, epochs=2, batch_size=4)
    for block in find_decoder_blocks(model):
        for layer in (block.self_attn.q_proj, block.mlp.down_proj):
            groups = layer.weight.reshape(layer.weight.shape[0], -1, 32)
            levels = torch.tensor([[g.unique().numel() for g in row] for row in groups])
            assert (levels <= 4).all()


def test_progress_is_reported_per_block_and_cancel_stops_between_blocks(windows: torch.Tensor) -> None:
    model = build_model("llama", layers=3)
    method = build_method("rtn", QuantSpec(bits=4), build_loss("mse"))
    seen: list[int] = []
    with pytest.raises(CancelledError, match="before block 2"):
        calibrate_blocks(
            model,
            windows,
            method,
            build_loss("mse"),
            on_block=lambda r: seen.append(r.index),
            should_cancel=lambda: len(seen) == 2,
        )
    assert seen == [0, 1]


def test_perplexity_matches_the_models_own_loss(tokenizer) -> None:
    """Independent reference: transformers' built-in causal LM loss, window by window."""
    model = build_model("llama")
    windows = calibration_windows(tokenize_file(tokenizer, BUNDLED_TEXTS["persuasion"]), 6, 32, seed=0)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert perplexity(model, windows, batch_size=4) == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_calibration_windows_are_seeded_slices_of_the_text() -> None:
    ids = torch.arange(1000)
    a, b = calibration_windows(ids, 5, 20, seed=3), calibration_windows(ids, 5, 20, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, calibration_windows(ids, 5, 20, seed=4))
    assert all(torch.equal(w, torch.arange(w[0], w[0] + 20)) for w in a)


def test_phase_progress_reports_the_time_left_from_the_pace_so_far_at_most_every_interval() -> None:
    now = [0.0]
    messages: list[str] = []
    progress = PhaseProgress("evaluating", 10, "windows", messages.append, interval_s=10.0, clock=lambda: now[0])
    now[0] = 4.0
    progress.advance(2)  # before the interval: silent
    now[0] = 12.0
    progress.advance(4)  # 3 s a window so far, 6 left
    now[0] = 15.0
    progress.advance(5)  # within the interval again
    now[0] = 40.0
    progress.advance(10)  # finished: nothing left to announce
    assert messages == ["evaluating: 4/10 windows, about 0:18 left"]
