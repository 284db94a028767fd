"""DiscQuant against independent references (a naive loop over the grid, the KL written out per token,
round-to-nearest) and its contract: x stays in [0, 1], the linear term alone drives x to the greedy
corners, the final weights lie exactly on the grid, runs are reproducible, memory is refused up front.

Tolerances: grid bounds and interpolation agree with the naive loop to 1e-6 of the step (float32
division); the KL agrees with the float64 loop to 1e-5 relative; on-grid checks allow 1e-4 of a step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from quant_core.cli import main
from quant_core.errors import ConfigError
from quant_core.incoherence import LinearRotation
from quant_core.job import CalibrationSpec, EvaluationSpec, JobSpec
from quant_core.job_settings import JobSettings, validated
from quant_core.losses import ModelOutputs, build_loss
from quant_core.methods import build_method
from quant_core.methods.base import layer_grid
from quant_core.methods.discquant import (
    DiscQuant,
    estimate_memory,
    grid_neighbours,
    unwrap_linears,
    wrap_linears,
)
from quant_core.methods.training import cosine_with_warmup
from quant_core.model_structure import find_decoder_blocks, quantizable_linears
from quant_core.pipeline import JobHooks, run_job
from quant_core.quantizer import QuantSpec, fake_quantize, grid_params, group_columns
from tests.tiny_models import build_model

SPEC = QuantSpec(bits=3, group_size=32)
SMALL = ["--n-samples", "4", "--seq-len", "32", "--eval-max-windows", "2", "--bits", "3", "--group-size", "32"]


def _windows(count: int = 4, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 320, (count, seq), generator=torch.Generator().manual_seed(seed))


def _method(options: dict | None = None, loss: str = "kd", spec: QuantSpec = SPEC) -> DiscQuant:
    method = build_method("discquant", spec, build_loss(loss, seed=0), options or {})
    assert isinstance(method, DiscQuant)
    return method


def _train(method: DiscQuant, model: torch.nn.Module, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    wrapped = wrap_linears(model, method.spec, method.options.init, generator, method.rotates)
    wrappers = [w for _, _, w in wrapped]
    stats = method.train(wrappers, model, _windows(), "cpu", generator, None, None)
    xs = [w.x.detach().clone() for w in wrappers]
    fractions = [w.fraction.clone() for w in wrappers]
    unwrap_linears(wrapped)
    return xs, fractions, stats


# --- the grid's round-down and round-up ---------------------------------------------------------


@pytest.mark.parametrize("spec", [QuantSpec(3, False, 8), QuantSpec(2, True, 8), QuantSpec(4, False, None), SPEC])
def test_grid_neighbours_match_a_naive_loop_over_the_grid_values(spec: QuantSpec) -> None:
    """Reference: list every grid value of the weight's group and pick the nearest below and above."""
    weight = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    grid = grid_neighbours(weight, spec)
    scale, zero = grid_params(weight, spec)
    g = spec.group_size or weight.shape[1]
    down, up = grid.weight(grid.low), grid.weight(grid.high)
    for i in range(weight.shape[0]):
        for j in range(weight.shape[1]):
            s, z = scale[i, j // g].item(), zero[i, j // g].item()
            values = sorted((code - z) * s for code in range(spec.qmin, spec.qmax + 1))
            w = weight[i, j].item()
            below = max([v for v in values if v <= w + 1e-6 * s], default=values[0])
            above = min([v for v in values if v > below + 1e-6 * s], default=values[-1])
            assert down[i, j].item() == pytest.approx(below, abs=1e-6 * s)
            if grid.high[i, j] > grid.low[i, j]:
                assert up[i, j].item() == pytest.approx(above, abs=1e-6 * s)
                y = grid.fraction[i, j].item()
                assert 0 <= y < 1 and below + y * (above - below) == pytest.approx(w, abs=1e-5 * s)


def test_rounding_y_to_the_nearer_corner_is_round_to_nearest_ties_included() -> None:
    """Weights on a finer grid (as SmolLM2's, dequantized from Q4_1) put many exactly on a tie."""
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    ties = torch.round(weight * 64) / 64
    for w in (weight, ties):
        grid = grid_neighbours(w, SPEC)
        assert torch.equal(grid.weight(grid.rounded(grid.fraction)), fake_quantize(w, SPEC))
    grid = grid_neighbours(ties, SPEC)
    corners = torch.randint(0, 2, ties.shape, generator=torch.Generator().manual_seed(3)).float()
    assert torch.equal(grid.rounded(corners), grid.low + corners * (grid.high - grid.low))


# --- the objective ---------------------------------------------------------------------------------


def test_kd_is_the_token_averaged_kl_of_next_token_distributions() -> None:
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 5, 11, generator=generator), torch.randn(2, 5, 11, generator=generator)
    total = 0.0
    for b in range(2):
        for t in range(5):
            p = torch.softmax(teacher[b, t].double(), -1)
            q = torch.softmax(student[b, t].double(), -1)
            total += sum(p[v].item() * math.log(p[v].item() / q[v].item()) for v in range(11))
    assert build_loss("kd")(student, teacher).item() == pytest.approx(total / 10, rel=1e-5)


def test_kd_sw_adds_weighted_sw_on_final_hidden_states_to_kd_on_logits() -> None:
    generator = torch.Generator().manual_seed(4)
    logits = [torch.randn(1, 8, 20, generator=generator) for _ in range(2)]
    hidden = [torch.randn(1, 8, 6, generator=generator) for _ in range(2)]
    loss = build_loss("kd_sw", seed=5, hybrid_weights={"sw": 0.3})
    value = loss.model_objective(ModelOutputs(logits[0], hidden[0]), ModelOutputs(logits[1], hidden[1]))
    expected = build_loss("kd")(logits[0], logits[1]) + 0.3 * build_loss("sw", seed=5)(hidden[0], hidden[1])
    assert loss.needs_hidden_states and not build_loss("kd").needs_hidden_states
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_zero() -> None:
    factors = [cosine_with_warmup(step, 2, 10) for step in range(10)]
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert factors == pytest.approx(expected)


# --- training ------------------------------------------------------------------------------------


def test_x_stays_in_the_unit_interval_and_most_reach_a_corner() -> None:
    model = build_model("llama")
    xs, _, stats = _train(_method({"lr": 0.5, "rho": 1e4, "n_samples": 8, "grad_accum": 1}), model)
    assert all(bool(((x >= 0) & (x <= 1)).all()) for x in xs)
    assert stats["steps"] == 8 and len(stats["loss_curve"]) == 8
    assert 0 < stats["fraction_at_corners"] <= stats["fraction_near_corners"] <= 1


def test_the_linear_term_alone_drives_x_to_the_greedy_corners() -> None:
    """rho = 0 removes the distillation gradient: x must end at round(y), i.e. round-to-nearest."""
    model = build_model("llama")
    xs, fractions, stats = _train(_method({"rho": 0.0, "n_samples": 30, "grad_accum": 1, "warmup": 0}), model)
    assert stats["fraction_at_corners"] == 1.0
    for x, y in zip(xs, fractions, strict=True):
        decided = (y - 0.5).abs() > 0.02  # x moves by ~lr per step; a y within 2% of 1/2 may not have arrived
        assert torch.equal(x[decided], torch.round(y[decided]))


def test_training_from_the_float_weights_leaves_y_unchanged() -> None:
    """``x`` starts as a copy of ``y``: AdamW steps and clamping move ``x`` only, never the target corners."""
    model = build_model("llama")
    generator = torch.Generator().manual_seed(0)
    wrapped = wrap_linears(model, SPEC, "orig", generator, False)
    wrappers = [w for _, _, w in wrapped]
    before = [w.fraction.clone() for w in wrappers]
    assert all(w.x.data_ptr() != w.fraction.data_ptr() for w in wrappers)
    _method({"init": "orig", "rho": 1e4, "n_samples": 6, "grad_accum": 1, "lr": 0.2}).train(
        wrappers, model, _windows(), "cpu", generator, None, None
    )
    assert all(torch.equal(w.fraction, y) for w, y in zip(wrappers, before, strict=True))
    assert any(not torch.equal(w.x.detach(), y) for w, y in zip(wrappers, before, strict=True))
    unwrap_linears(wrapped)


def test_clamp_bounds_the_distillation_gradient_entry_wise() -> None:
    """With a vanishing clamp, any rho leaves only the linear term: the same trajectory as rho = 0."""
    options = {"n_samples": 6, "grad_accum": 1, "init": "rand"}
    clamped, _, _ = _train(_method({**options, "rho": 1e6, "clamp": 1e-12}), build_model("llama"))
    plain, _, _ = _train(_method({**options, "rho": 0.0}), build_model("llama"))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(clamped, plain, strict=True))
    free, _, _ = _train(_method({**options, "rho": 1e6, "clamp": 1e6}), build_model("llama"))
    assert any(not torch.allclose(a, b, atol=1e-3) for a, b in zip(free, plain, strict=True))


def test_gradient_checkpointing_and_accumulation_do_not_change_the_result() -> None:
    base = {"n_samples": 4, "rho": 1e4}
    plain, _, _ = _train(_method({**base, "grad_accum": 2}), build_model("llama"))
    checkpointed, _, _ = _train(_method({**base, "grad_accum": 2, "grad_checkpoint": True}), build_model("llama"))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain, checkpointed, strict=True))


def test_the_distillation_gradient_moves_x_below_round_to_nearest_in_kd() -> None:
    """Before the final rounding, the interpolated model distils better than round-to-nearest on its window."""
    model, reference, teacher_model = build_model("llama"), build_model("llama"), build_model("llama")
    windows = _windows(1, 32)
    options = {"init": "orig", "rho": 1e4, "clamp": 10.0, "n_samples": 12, "grad_accum": 1, "lr": 0.05, "warmup": 0}
    method = _method(options)
    generator = torch.Generator().manual_seed(0)
    wrapped = wrap_linears(model, SPEC, "orig", generator, False)
    method.train([w for _, _, w in wrapped], model, windows, "cpu", generator, None, None)
    kd = build_loss("kd")
    with torch.no_grad():
        teacher = teacher_model(input_ids=windows).logits
        interpolated = kd(model(input_ids=windows).logits, teacher)
        for block in find_decoder_blocks(reference):
            for layer in quantizable_linears(block).values():
                layer.weight.copy_(fake_quantize(layer.weight, SPEC))
        assert interpolated < 0.5 * kd(reference(input_ids=windows).logits, teacher)
    unwrap_linears(wrapped)


# --- the result ----------------------------------------------------------------------------------


def _assert_on_the_float_weights_grid(model: torch.nn.Module, original: torch.nn.Module, spec: QuantSpec) -> None:
    pairs = zip(find_decoder_blocks(model), find_decoder_blocks(original), strict=True)
    for block, block0 in pairs:
        for (name, layer), layer0 in zip(
            quantizable_linears(block).items(), quantizable_linears(block0).values(), strict=True
        ):
            scale, zero = grid_params(layer0.weight, spec)
            assert torch.equal(layer_grid(layer)[0], scale) and torch.equal(layer_grid(layer)[1], zero), name
            codes = group_columns(layer.weight.detach(), spec.group_size) / scale.unsqueeze(-1) + zero.unsqueeze(-1)
            assert (codes - codes.round()).abs().max() < 1e-4, name
            assert codes.round().min() >= spec.qmin and codes.round().max() <= spec.qmax


def test_final_weights_lie_exactly_on_the_grid_of_the_float_weights() -> None:
    model = build_model("llama")
    stats = _method({"n_samples": 4, "rho": 1e4}).quantize_model(model, _windows())
    _assert_on_the_float_weights_grid(model, build_model("llama"), SPEC)
    assert stats["fraction_near_corners"] < 1  # some x were still fractional and were rounded here
    assert 0 < stats["fraction_rounded_away_from_nearest"] < 0.5


def test_greedy_early_save_is_round_to_nearest() -> None:
    model = build_model("llama")
    stats = _method({"early_save": "greedy"}).quantize_model(model, _windows())
    assert stats["steps"] == 0 and stats["fraction_rounded_away_from_nearest"] == 0
    for block, block0 in zip(find_decoder_blocks(model), find_decoder_blocks(build_model("llama")), strict=True):
        for layer, layer0 in zip(
            quantizable_linears(block).values(), quantizable_linears(block0).values(), strict=True
        ):
            assert torch.equal(layer.weight, fake_quantize(layer0.weight, SPEC))


def test_greedy_with_incoherence_is_rotated_round_to_nearest() -> None:
    """Reference: the same draws (U, V per linear in model order), U^T rtn(U W V^T) V with dense matrices."""
    model = build_model("llama")
    _method({"early_save": "greedy", "init": "orig", "incoherence": "hadamard"}).quantize_model(
        model, _windows(), seed=9
    )
    generator = torch.Generator().manual_seed(9)
    for block, block0 in zip(find_decoder_blocks(model), find_decoder_blocks(build_model("llama")), strict=True):
        for layer, layer0 in zip(
            quantizable_linears(block).values(), quantizable_linears(block0).values(), strict=True
        ):
            rotation = LinearRotation.draw(*layer0.weight.shape, generator)
            u, v = rotation.out_rotation.matrix().float(), rotation.in_rotation.matrix().float()
            expected = u.T @ fake_quantize(u @ layer0.weight.detach() @ v.T, SPEC) @ v
            assert torch.allclose(layer.weight, expected, atol=1e-5)
            assert layer_grid(layer) is None


def test_runs_are_reproducible_under_a_seed() -> None:
    options = {"n_samples": 4, "rho": 1e4, "incoherence": "hadamard"}
    weights = []
    for seed in (1, 1, 2):
        model = build_model("llama")
        _method(options).quantize_model(model, _windows(), seed=seed)
        weights.append(model.model.layers[0].self_attn.q_proj.weight.detach().clone())
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


# --- memory ----------------------------------------------------------------------------------------


def test_memory_estimate_counts_weights_rounding_state_and_activations() -> None:
    model = build_model("llama")
    numel = sum(m.weight.numel() for b in find_decoder_blocks(model) for m in quantizable_linears(b).values())
    plain = estimate_memory(model, 2, 32, False, numel)
    checkpointed = estimate_memory(model, 2, 32, True, numel)
    assert plain.teacher_weights == sum(p.numel() * 4 for p in model.parameters())
    assert plain.rounding_state == 16 * numel and plain.grid == 12 * numel and plain.student_weights == 4 * numel
    assert checkpointed.activations < plain.activations
    assert estimate_memory(model, 2, 32, False, numel, rotate=True).student_weights == 12 * numel
    assert (
        plain.total
        == sum(
            plain.to_dict()[k] for k in ("teacher_weights", "grid", "rounding_state", "student_weights", "activations")
        )
        * 2**30
    )


def test_a_job_that_does_not_fit_is_refused_before_any_work(tiny_llama_dir: Path, tmp_path: Path) -> None:
    stages: list[str] = []
    spec = JobSpec(
        model=str(tiny_llama_dir),
        quant=SPEC,
        method="discquant",
        method_options={"memory_budget_gib": 1e-4},
        calibration=CalibrationSpec(n_samples=4, seq_len=32),
        evaluation=EvaluationSpec(max_windows=2),
    )

    with pytest.raises(ConfigError, match=r"needs about .* GiB .* but 0\.0001 GiB is available") as info:
        run_job(spec, tmp_path, JobHooks(on_stage=stages.append))
    assert info.value.field == "method_options.memory_budget_gib"
    assert not any("evaluating" in s for s in stages) and not (tmp_path / "report.json").exists()


def test_memory_refusal_is_a_clear_cli_error(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    argv = ["quantize", "--model", str(tiny_llama_dir), "--method", "discquant", "--out", str(tmp_path), *SMALL]
    assert main([*argv, "--method-opt", "memory_budget_gib=0.0001"]) == 2
    err = capsys.readouterr().err
    assert "swquant: error: method_options.memory_budget_gib:" in err and "grad_checkpoint" in err


# --- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"lr": 0}, "method_options.lr"),
        ({"clamp": -1}, "method_options.clamp"),
        ({"rho": -2}, "method_options.rho"),
        ({"n_samples": 0}, "method_options.n_samples"),
        ({"grad_accum": 1.5}, "method_options.grad_accum"),
        ({"warmup": -1}, "method_options.warmup"),
        ({"init": "zeros"}, "method_options.init"),
        ({"early_save": "y"}, "method_options.early_save"),
        ({"grad_checkpoint": "yes"}, "method_options.grad_checkpoint"),
        ({"memory_budget_gib": 0}, "method_options.memory_budget_gib"),
        ({"rho_factor": 10}, "method_options.rho_factor"),
    ],
)
def test_bad_options_name_the_option(options: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        validated(JobSettings, {"model": "m", "method": "discquant", "method_options": options})
    assert info.value.field == field


def test_discquant_defaults_to_the_kd_loss_and_refuses_lazy_loading() -> None:
    assert JobSpec(model="m", method="discquant").loss == "kd"
    with pytest.raises(ConfigError) as info:
        validated(JobSettings, {"model": "m", "method": "discquant", "lazy_load": True})
    assert info.value.field == "lazy_load"


# --- end to end --------------------------------------------------------------------------------------


def test_discquant_runs_through_swquant_quantize_with_the_common_report(tiny_llama_dir: Path, tmp_path: Path) -> None:
    argv = ["quantize", "--model", str(tiny_llama_dir), "--method", "discquant", "--out", str(tmp_path), *SMALL]
    argv += ["--method-opt", "n_samples=4", "--method-opt", "grad_accum=2", "--export", "fake_quant", "pack_quantized"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["spec"]["method"] == "discquant" and report["spec"]["loss"] == "kd"
    assert report["blocks"] == []
    stats = report["method_stats"]
    assert stats["steps"] == 2 and stats["memory_estimate_gib"]["total"] > 0
    assert 0 <= stats["fraction_near_corners"] <= 1 and stats["loss_final"] >= 0
    ppl = report["perplexity"]["persuasion"]
    assert ppl["before"] > 1 and ppl["after"] > 1 and report["seconds"]["calibration"] > 0
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        exports = {name: tmp_path / export["path"] for name, export in report["exports"].items()}
        fake = AutoModelForCausalLM.from_pretrained(exports["fake_quant"])(ids).logits
        packed = AutoModelForCausalLM.from_pretrained(exports["pack_quantized"])(ids).logits
    assert torch.allclose(packed, fake, atol=1e-5 * fake.abs().max().item())


def test_discquant_with_quip_and_kd_sw_runs_through_swquant_quantize(tiny_llama_dir: Path, tmp_path: Path) -> None:
    argv = ["quantize", "--model", str(tiny_llama_dir), "--method", "discquant", "--out", str(tmp_path), *SMALL]
    argv += ["--loss", "kd_sw", "--method-opt", "incoherence=hadamard", "--method-opt", "n_samples=2"]
    argv += ["--loss-opt", "hybrid_weights={sw: 0.5}"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["spec"]["loss"] == "kd_sw" and report["spec"]["method_options"]["incoherence"] == "hadamard"
    assert report["method_stats"]["steps"] == 1 and "pack_quantized" not in report["exports"]
