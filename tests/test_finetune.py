"""End-to-end tuning after blockwise calibration (quant_core.finetune): codes fixed, step sizes and norms trained."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from quant_core.engine import calibrate_blocks
from quant_core.errors import CancelledError, ConfigError
from quant_core.finetune import (
    GridScales,
    output_layer,
    recomputed_blocks,
    record_teacher,
    tune_end_to_end,
    tuning_dtype,
)
from quant_core.finetune_options import FinetuneOptions
from quant_core.job import CalibrationSpec, EvaluationSpec, JobSpec
from quant_core.job_settings import JobSettings, validated
from quant_core.layer_schemes import LayerSchemes
from quant_core.losses import build_loss
from quant_core.methods import build_method
from quant_core.methods.base import layer_grid, rotated_grid
from quant_core.model_structure import find_decoder_blocks, quantizable_linears, weight_matrix
from quant_core.pipeline import JobHooks, run_job
from quant_core.quantizer import QuantSpec, group_columns
from tests.tiny_models import VOCAB, build_model

SPEC = QuantSpec(3, False, 32)
GROUPS_32 = LayerSchemes(SPEC)  # the tuning reads only each linear's group size


def _windows(count: int = 4, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, seq), generator=torch.Generator().manual_seed(0))


def _codes(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each grid linear's integer codes, read back from its weight and grid."""
    codes = {}
    for index, block in enumerate(find_decoder_blocks(model)):
        for name, layer in quantizable_linears(block).items():
            grid = layer_grid(layer)
            assert grid is not None
            scale, zero = (t[..., None] for t in grid)
            codes[f"{index}.{name}"] = torch.round(group_columns(weight_matrix(layer).detach(), 32) / scale) + zero
    return codes


def _naive_kl(teacher: nn.Module, student: nn.Module, windows: torch.Tensor) -> float:
    """Mean over tokens of sum_v p log(p / q), in float64, one window at a time."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for window in windows:
            p = torch.softmax(teacher(window[None]).logits.double(), -1)
            q = torch.softmax(student(window[None]).logits.double(), -1)
            total += float((p * (p.log() - q.log())).sum())
            tokens += window.numel()
    return total / tokens


def _quantized(
    windows: torch.Tensor, method: str, options: dict | None = None
) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """The float model, a copy of it calibrated with ``method``, and the float model's recorded states."""
    reference = build_model("llama")
    model = copy.deepcopy(reference)
    teacher = record_teacher(model, windows, "cpu")
    calibrate_blocks(model, windows, build_method(method, SPEC, build_loss("mse"), options), build_loss("mse"))
    return reference, model, teacher


def test_recorded_states_give_back_the_full_precision_logits_through_the_output_layer() -> None:
    model, windows = build_model("llama"), _windows()
    hidden = record_teacher(model, windows, "cpu", batch_size=3)
    with torch.no_grad():
        expected = model(windows).logits
        torch.testing.assert_close(output_layer(model)(hidden), expected, rtol=0, atol=1e-5)


def test_a_model_whose_logits_are_not_its_output_layer_is_refused() -> None:
    model = build_model("llama")

    def scale_logits(module: nn.Module, args: object, output: object) -> object:
        output.logits = 0.5 * output.logits  # type: ignore[attr-defined]  # as Cohere's logit_scale
        return output

    model.register_forward_hook(scale_logits)
    with pytest.raises(ConfigError, match="output layer") as caught:
        record_teacher(model, _windows(), "cpu")
    assert caught.value.field == "finetune.epochs"


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_tuning_keeps_every_code_and_brings_the_model_closer_to_full_precision(precision: str) -> None:
    """In either compute type: codes and zero points fixed, weights exactly on the new grid (the grid
    is float32 whatever the matmuls ran in), and the KL to full precision down by more than 10%."""
    windows = _windows()
    reference, model, teacher = _quantized(windows, "rtn")
    codes_before = _codes(model)
    grids_before = {k: [t.clone() for t in layer_grid(m)] for k, m in model.named_modules() if layer_grid(m)}
    norms_before = {k: p.detach().clone() for k, p in model.named_parameters() if "norm" in k}
    kl_before = _naive_kl(reference, model, windows)

    options = FinetuneOptions(epochs=4, lr=1e-2, norm_lr=1e-2, batch_size=2, precision=precision)
    stats = tune_end_to_end(model, windows, teacher, options, GROUPS_32)

    assert stats["steps"] == 8 and len(stats["epoch_losses"]) == 4 and stats["grid_linears"] == 14
    assert stats["compute_dtype"] == precision
    codes_after = _codes(model)
    for name, codes in codes_before.items():
        assert torch.equal(codes_after[name], codes), name
    for name, (_, zero) in grids_before.items():
        new_scale, new_zero = layer_grid(model.get_submodule(name))
        assert torch.equal(new_zero, zero) and (new_scale > 0).all(), name
    assert any(not torch.equal(layer_grid(model.get_submodule(k))[0], v[0]) for k, v in grids_before.items())
    assert any(not torch.equal(p, norms_before[k]) for k, p in model.named_parameters() if "norm" in k)
    linears = [layer for block in find_decoder_blocks(model) for layer in quantizable_linears(block).values()]
    assert all(isinstance(layer.weight, nn.Parameter) for layer in linears)
    assert not any(p.requires_grad for p in model.parameters())
    # Each weight is exactly its fixed code times its new step size (float32 round-off).
    for layer in linears:
        scale, zero = (t[..., None] for t in layer_grid(layer))
        grouped = group_columns(weight_matrix(layer).detach(), 32)
        torch.testing.assert_close(grouped, (torch.round(grouped / scale + zero) - zero) * scale, rtol=1e-6, atol=0)
    assert _naive_kl(reference, model, windows) < 0.9 * kl_before


def test_rotated_layers_keep_their_rotated_codes_and_move_their_step_sizes() -> None:
    windows = _windows()
    reference, model, teacher = _quantized(windows, "gptq", {"incoherence": "hadamard"})
    linears = [layer for block in find_decoder_blocks(model) for layer in quantizable_linears(block).values()]
    assert all(layer_grid(layer) is None and rotated_grid(layer) is not None for layer in linears)

    def rotated_codes() -> list[torch.Tensor]:
        codes = []
        for layer in linears:
            scale, zero, rotation = rotated_grid(layer)
            rotated = group_columns(rotation.rotate(weight_matrix(layer).detach()), 32)
            codes.append(torch.round(rotated / scale[..., None]) + zero[..., None])
        return codes

    before, scales_before = rotated_codes(), [rotated_grid(layer)[0].clone() for layer in linears]
    kl_before = _naive_kl(reference, model, windows)
    tune_end_to_end(model, windows, teacher, FinetuneOptions(epochs=4, lr=1e-2, norm_lr=1e-2, batch_size=2), GROUPS_32)

    assert all(torch.equal(a, b) for a, b in zip(rotated_codes(), before, strict=True))
    assert any(not torch.equal(rotated_grid(layer)[0], s) for layer, s in zip(linears, scales_before, strict=True))
    for layer in linears:  # U^T [(codes - zero) * scale] V, computed with dense rotation matrices
        scale, _, rotation = rotated_grid(layer)
        u, v = rotation.out_rotation.matrix(torch.float32), rotation.in_rotation.matrix(torch.float32)
        offsets = torch.round(group_columns(u @ weight_matrix(layer).detach() @ v.T, 32) / scale[..., None])
        expected = u.T @ (offsets * scale[..., None]).reshape(offsets.shape[0], -1) @ v
        torch.testing.assert_close(weight_matrix(layer).detach(), expected, rtol=0, atol=1e-5)
    assert _naive_kl(reference, model, windows) < 0.9 * kl_before


def test_auto_precision_is_bfloat16_only_where_the_device_computes_it_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    options = FinetuneOptions()
    for avx512_bf16, amx, expected in (
        (True, False, torch.bfloat16),
        (False, True, torch.bfloat16),
        (False, False, torch.float32),
    ):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda value=avx512_bf16: value)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda value=amx: value)
        assert tuning_dtype(options, "cpu") is expected
    assert tuning_dtype(FinetuneOptions(precision="float32"), "cpu") is torch.float32


def test_zero_epochs_is_the_default_and_the_job_refuses_what_it_cannot_tune() -> None:
    assert not FinetuneOptions().enabled
    base = {"model": "unused", "calibration": {"n_samples": 2, "seq_len": 16}}
    cases = [
        ({"method": "discquant", "finetune": {"epochs": 1}}, "finetune.epochs", "whole model"),
        ({"method": "rtn", "finetune": {"epoch": 1}}, "finetune.epoch", "Unknown finetune option"),
        ({"method": "rtn", "finetune": {"epochs": -1}}, "finetune.epochs", "greater than or equal to 0"),
        ({"method": "rtn", "finetune": {"loss": "mse"}}, "finetune.loss", "kd"),
        ({"method": "rtn", "finetune": {"lr": True}}, "finetune.lr", "finite number"),
        ({"method": "rtn", "finetune": {"n_samples": 4097}}, "finetune.n_samples", "less than or equal to 4096"),
        ({"method": "rtn", "finetune": {"n_samples": 2.0}}, "finetune.n_samples", "valid integer"),
    ]
    for extra, field, words in cases:
        with pytest.raises(ConfigError, match=words) as caught:
            validated(JobSettings, {**base, **extra})
        assert caught.value.field == field, extra


def test_a_tuned_job_reports_the_stage_and_packs_the_tuned_scales(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = JobSpec(
        model=str(tiny_llama_dir),
        quant=SPEC,
        method="rtn",
        calibration=CalibrationSpec(n_samples=3, seq_len=32),
        evaluation=EvaluationSpec(max_windows=2),
        export_formats=("fake_quant", "pack_quantized"),
        finetune={"epochs": 2, "lr": 1e-2, "loss": "kd_sw"},
    )
    stages: list[str] = []
    report = run_job(spec, tmp_path, JobHooks(on_stage=stages.append))
    tuned = report.method_stats["finetune"]
    assert tuned["steps"] == 6 and tuned["loss"] == "kd_sw" and len(tuned["epoch_losses"]) == 2
    for shares in tuned["gradient_share"].values():  # how much of the gradient the SW term gives, first and last step
        assert set(shares) == {"base", "sw"} and 0 < shares["sw"] < 1 and sum(shares.values()) == pytest.approx(1)
    assert any(stage.startswith("end-to-end tuning: epoch 2/2") for stage in stages)
    card = (tmp_path / "packed" / "README.md").read_text()
    assert '| end-to-end tuning | `epochs: 2`, `lr: 0.01`, `loss: "kd_sw"` |' in card
    ids = _windows(1, 8)
    with torch.no_grad():
        fake = AutoModelForCausalLM.from_pretrained(tmp_path / "model")(ids).logits
        packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")(ids).logits
    torch.testing.assert_close(packed, fake, rtol=0, atol=1e-5 * fake.abs().max().item())


def test_tuning_on_more_windows_draws_them_after_the_blocks_own_and_leaves_the_blocks_as_they_were(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    base = {
        "model": str(tiny_llama_dir),
        "quant": SPEC,
        "method": "gptq",
        "calibration": CalibrationSpec(n_samples=2, seq_len=32),
        "evaluation": EvaluationSpec(max_windows=1),
        "export_formats": ("fake_quant",),
    }
    alone = run_job(JobSpec(**base), tmp_path / "alone", JobHooks())
    more = run_job(JobSpec(**base, finetune={"epochs": 1, "n_samples": 5}), tmp_path / "more", JobHooks())
    fewer = run_job(JobSpec(**base, finetune={"epochs": 2, "n_samples": 1}), tmp_path / "fewer", JobHooks())
    blocks = [(r.loss_before, r.loss_after, r.mse_before, r.mse_after) for r in alone.blocks]
    for tuned in (more, fewer):  # the blocks saw the same two windows whatever the tuning sees
        assert [(r.loss_before, r.loss_after, r.mse_before, r.mse_after) for r in tuned.blocks] == blocks
    assert more.method_stats["finetune"]["windows"] == 5 and more.method_stats["finetune"]["steps"] == 5
    assert more.calibration_tokens == 5 * 32 and alone.calibration_tokens == 2 * 32
    assert fewer.method_stats["finetune"]["windows"] == 1 and fewer.method_stats["finetune"]["steps"] == 2
    assert fewer.calibration_tokens == 2 * 32


def test_the_tunings_windows_begin_with_the_blocks_own() -> None:
    drawn = _windows(6)
    options = FinetuneOptions(epochs=1, n_samples=6)
    assert options.windows_to_draw(2) == 6 and FinetuneOptions(epochs=1).windows_to_draw(2) == 2
    assert FinetuneOptions(n_samples=6).windows_to_draw(2) == 2  # no tuning, no extra windows
    cases = [(options, drawn, drawn), (FinetuneOptions(epochs=1), drawn[:2], drawn[:2])]
    cases.append((FinetuneOptions(epochs=1, n_samples=1), drawn[:2], drawn[:1]))
    for chosen, given, tuning in cases:
        blocks_part, tuning_part = chosen.split(given, 2)
        assert torch.equal(blocks_part, drawn[:2]) and torch.equal(tuning_part, tuning)


def test_a_cancel_before_the_first_step_is_a_cancel_and_leaves_every_weight_in_place() -> None:
    windows = _windows()
    _, model, teacher = _quantized(windows, "rtn")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    options = FinetuneOptions(epochs=1, batch_size=2)
    with pytest.raises(CancelledError, match="step 0 of 2"):
        tune_end_to_end(model, windows, teacher, options, GROUPS_32, should_cancel=lambda: True)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    linears = [layer for block in find_decoder_blocks(model) for layer in quantizable_linears(block).values()]
    assert all(isinstance(layer.weight, nn.Parameter) and layer_grid(layer) is not None for layer in linears)


def test_a_grid_that_fails_half_way_gives_every_weight_back(monkeypatch: pytest.MonkeyPatch) -> None:
    windows = _windows()
    _, model, teacher = _quantized(windows, "rtn")
    made = []
    original = GridScales.of

    def fail_on_the_third(layer: nn.Module, group_size: int | None) -> GridScales | None:
        if len(made) == 2:
            raise RuntimeError("out of memory")
        made.append(layer)
        return original(layer, group_size)

    monkeypatch.setattr(GridScales, "of", staticmethod(fail_on_the_third))
    with pytest.raises(RuntimeError, match="out of memory"):
        tune_end_to_end(model, windows, teacher, FinetuneOptions(epochs=1, batch_size=2), GROUPS_32)
    assert all(isinstance(layer.weight, nn.Parameter) for layer in made)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_train_in_either_model_dtype(dtype: torch.dtype) -> None:
    """Adam's steps of ``norm_lr`` 1e-3 are each below half a bfloat16 step near 1.0 (2^-9 below it,
    2^-8 above): trained in place, a bfloat16 norm never moves. Through a float32 copy, the steps add up
    over 16 steps and about half the entries move (all in float32); the weights stay parameters of the model's dtype."""
    windows = _windows(count=16)
    _, model, teacher = _quantized(windows, "rtn")
    model = model.to(dtype)
    norms_before = {k: p.detach().clone() for k, p in model.named_parameters() if "norm" in k}
    options = FinetuneOptions(epochs=1, batch_size=1, norm_lr=1e-3, precision="float32")
    stats = tune_end_to_end(model, windows, teacher.to(dtype), options, GROUPS_32)
    assert stats["steps"] == 16
    after = dict(model.named_parameters())
    moved = sum(int((after[k] != v).sum()) for k, v in norms_before.items())
    total = sum(v.numel() for v in norms_before.values())
    assert moved >= 0.3 * total, f"{moved} of {total} norm entries moved"
    assert all(after[k].dtype == dtype and isinstance(after[k], nn.Parameter) for k in norms_before)


def test_recomputed_blocks_give_the_same_gradients_and_hold_no_block_weight_between_forwards() -> None:
    """Under activation checkpointing each grid linear makes its weight in its own forward: the loss and
    every step size's gradient equal those of the weights made up front (1e-6), and no layer keeps one."""
    windows = _windows()
    _, model, _ = _quantized(windows, "rtn")
    grids = [
        GridScales.of(layer, 32)
        for block in find_decoder_blocks(model)
        for layer in quantizable_linears(block).values()
    ]
    assert all(grid is not None for grid in grids)
    thetas = [grid.theta for grid in grids if grid is not None]
    for theta in thetas:
        theta.data.uniform_(-0.1, 0.1, generator=torch.Generator().manual_seed(1))
    model.eval().requires_grad_(False)

    def loss_and_gradients() -> tuple[torch.Tensor, list[torch.Tensor]]:
        loss = model(windows).logits.float().pow(2).mean()
        return loss.detach(), list(torch.autograd.grad(loss, thetas))

    for grid in grids:
        grid.attach()
    expected_loss, expected = loss_and_gradients()
    tuned: list[tuple[nn.Module, str, GridScales]] = [(model, "", grid) for grid in grids]
    with recomputed_blocks(model, tuned):
        loss, gradients = loss_and_gradients()
        assert all(grid.layer.weight.is_meta for grid in grids)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    for got, want in zip(gradients, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert all("forward" not in vars(block) for block in find_decoder_blocks(model))
