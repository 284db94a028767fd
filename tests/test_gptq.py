"""GPTQ against a naive reference: explicit inverse Hessian, one column at a time, no Cholesky, no batching."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from quant_core.clip_search import search_clipping
from quant_core.engine import block_forward, calibrate_blocks, capture_block_inputs
from quant_core.losses import build_loss
from quant_core.methods import build_method
from quant_core.methods.base import BlockData
from quant_core.methods.gptq import float_target_weight, gptq_quantize, stage_inputs_of
from quant_core.methods.layer_inputs import gathered_linear_inputs, layer_input
from quant_core.model_structure import find_decoder_blocks, quantizable_linears
from quant_core.quantizer import QuantSpec, fake_quantize, group_columns, scale_and_zero
from tests.tiny_models import build_model

WINDOWS = torch.randint(3, 300, (5, 32), generator=torch.Generator().manual_seed(0))


def naive_gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, damp: float, order: torch.Tensor):
    """Optimal-brain-quantizer updates with the inverse Hessian downdated after every column.

    Group scales are fixed when a group's first column is reached, from the weights as corrected so far.
    """
    w = weight.clone().double()
    h = hessian.clone().double()
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    h_inv = torch.linalg.inv(h)
    g = spec.group_size or w.shape[1]
    params: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    remaining = list(order.tolist())
    q = torch.zeros_like(w)
    for col in order.tolist():
        group = col // g
        if group not in params:
            cols = w[:, group * g : (group + 1) * g]
            scale, zero = scale_and_zero(group_columns(cols, None), QuantSpec(spec.bits, spec.symmetric, None))
            params[group] = (scale[:, 0, 0], zero[:, 0, 0])
        scale, zero = params[group]
        q[:, col] = ((torch.round(w[:, col] / scale) + zero).clamp(spec.qmin, spec.qmax) - zero) * scale
        err = (w[:, col] - q[:, col]) / h_inv[col, col]
        remaining.remove(col)
        for other in remaining:
            w[:, other] -= err * h_inv[col, other]
        h_inv = h_inv - torch.outer(h_inv[:, col], h_inv[col, :]) / h_inv[col, col]
    return q


def _problem(seed: int = 0, out: int = 12, width: int = 40, tokens: int = 300):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=gen, dtype=torch.float64) / width**0.5  # correlated inputs
    x = (
        torch.randn(tokens, width, generator=gen, dtype=torch.float64)
        @ mixing
        * torch.linspace(0.2, 3.0, width).double()
    )
    x[:, 5] = 0.0  # a dead input column
    weight = torch.randn(out, width, generator=gen, dtype=torch.float64)
    return weight, 2 * x.T @ x / tokens


def _output_error(weight: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor) -> float:
    diff = weight - q
    return float(torch.trace(diff @ hessian @ diff.T))


@pytest.mark.parametrize("group_size", [None, 8, 16, 12])
def test_matches_the_naive_reference_in_natural_order(group_size: int | None) -> None:
    """Asymmetric only: the symmetric grid puts the largest weight exactly on a rounding tie, where
    round-off of either implementation decides the side; symmetric is checked by its output error below."""
    weight, hessian = _problem()
    spec = QuantSpec(bits=3, group_size=group_size)
    weight[:, 5] = 0.0  # what GPTQ does to a dead column, done up front for the reference
    hessian[5, 5] = 1.0
    ours = gptq_quantize(weight, hessian, spec, block_size=16, damp=0.01).weight
    reference = naive_gptq(weight, hessian, spec, 0.01, torch.arange(weight.shape[1]))
    assert torch.allclose(ours, reference, atol=1e-9)


def test_act_order_matches_the_naive_reference_in_that_order() -> None:
    weight, hessian = _problem(seed=1)
    weight[:, 5] = 0.0
    hessian[5, 5] = 1.0
    spec = QuantSpec(bits=2, group_size=8)
    ours = gptq_quantize(weight, hessian, spec, block_size=7, damp=0.01, act_order=True).weight
    order = torch.argsort(hessian.diagonal(), descending=True)
    assert torch.allclose(ours, naive_gptq(weight, hessian, spec, 0.01, order), atol=1e-9)


def test_lazy_batch_size_does_not_change_the_result() -> None:
    weight, hessian = _problem(seed=2)
    spec = QuantSpec(bits=3, group_size=8)
    results = [gptq_quantize(weight, hessian, spec, block_size=b).weight for b in (1, 5, 128)]
    assert torch.allclose(results[0], results[1], atol=1e-10) and torch.allclose(results[0], results[2], atol=1e-10)


@pytest.mark.parametrize("options", [{}, {"act_order": True}, {"act_order": True, "static_groups": True}])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_output_error_is_below_round_to_nearest_and_weights_are_on_the_grid(
    options: dict, bits: int, symmetric: bool
) -> None:
    weight, hessian = _problem(seed=3, out=32, width=64, tokens=500)
    spec = QuantSpec(bits=bits, symmetric=symmetric, group_size=16)
    q = gptq_quantize(weight, hessian, spec, **options).weight
    rtn = fake_quantize(weight, spec)
    assert _output_error(weight, q, hessian) < 0.85 * _output_error(weight, rtn, hessian)
    levels = torch.tensor([[g.unique().numel() for g in row] for row in group_columns(q, 16)])
    assert (levels <= 2**bits).all()


def test_static_groups_use_the_original_weights_scales() -> None:
    """With static groups every group keeps the round-to-nearest grid of the untouched weights."""
    weight, hessian = _problem(seed=4)
    weight[:, 5] = 0.0
    spec = QuantSpec(bits=3, group_size=8)
    result = gptq_quantize(weight, hessian, spec, act_order=True, static_groups=True)
    q = result.weight
    scale, zero = scale_and_zero(group_columns(weight, 8), spec)
    assert torch.equal(result.scale, scale.squeeze(-1)) and torch.equal(result.zero, zero.squeeze(-1))
    codes = torch.round(group_columns(q, 8) / scale) + zero
    assert torch.allclose((codes - zero) * scale, group_columns(q, 8), atol=1e-9)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax


def test_singular_hessian_gets_more_damping_instead_of_failing() -> None:
    weight = torch.randn(4, 8, dtype=torch.float64)
    hessian = torch.ones(8, 8, dtype=torch.float64)  # rank one
    result = gptq_quantize(weight, hessian, QuantSpec(bits=4), damp=1e-12)
    assert torch.isfinite(result.weight).all() and result.error >= 0


def _calibrated_llama(windows: torch.Tensor, options: dict[str, object]) -> tuple[Any, list[Any]]:
    """A tiny Llama calibrated with W3 g32 GPTQ under ``options``, and its block records."""
    model = build_model("llama")
    method = build_method("gptq", QuantSpec(bits=3, group_size=32), build_loss("mse"), options)
    return model, calibrate_blocks(model, windows, method, build_loss("mse"), seed=0)


def test_one_pass_hessians_match_true_sequential_on_the_first_stage_and_beat_rtn() -> None:
    """Without true-sequential, q/k/v see the same inputs (nothing before them is quantized) and so the
    same weights; later stages differ, and the block output still beats round-to-nearest."""
    windows = torch.randint(3, 300, (6, 32), generator=torch.Generator().manual_seed(0))
    models, records = [], []
    for sequential in (True, False):
        model, record = _calibrated_llama(windows, {"true_sequential": sequential})
        records.append(record)
        models.append(find_decoder_blocks(model)[0])
    assert torch.allclose(models[0].self_attn.q_proj.weight, models[1].self_attn.q_proj.weight, atol=1e-6)
    assert not torch.equal(models[0].mlp.down_proj.weight, models[1].mlp.down_proj.weight)
    assert all(r.mse_after < r.mse_before for r in records[1])


def _shifted_inputs(seed: int = 0, width: int = 24, windows: int = 5, seq: int = 7):
    """Full-precision inputs of a stage and the quantized model's inputs: the same plus a correlated error."""
    gen = torch.Generator().manual_seed(seed)
    float_inputs = torch.randn(windows, seq, width, generator=gen) * torch.linspace(0.3, 2.0, width)
    error = 0.3 * float_inputs @ torch.randn(width, width, generator=gen) / width**0.5
    return float_inputs, float_inputs + error + 0.05 * torch.randn(windows, seq, width, generator=gen)


def test_stage_statistics_match_a_per_token_loop() -> None:
    """Hessian ``2 X^T X / n`` and shift ``2 (X_fp - X)^T X / n`` over ragged batches, against sums of
    per-token outer products in float64 (tolerance 1e-5 relative: float32 accumulation)."""
    float_inputs, inputs = _shifted_inputs()
    stats = stage_inputs_of(inputs.split(2), float_inputs)
    x, x_fp = inputs.reshape(-1, inputs.shape[-1]).double(), float_inputs.reshape(-1, inputs.shape[-1]).double()
    hessian = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    shift = torch.zeros_like(hessian)
    for token in range(x.shape[0]):
        hessian += torch.outer(x[token], x[token])
        shift += torch.outer(x_fp[token] - x[token], x[token])
    assert stats.shift is not None
    torch.testing.assert_close(stats.hessian.double(), hessian * 2 / x.shape[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.shift.double(), shift * 2 / x.shape[0], rtol=1e-5, atol=1e-5)
    assert stage_inputs_of(inputs.split(3)).shift is None


def test_the_float_target_weight_is_the_damped_least_squares_fit() -> None:
    """``W + W S (H + l I)^-1`` against ``lstsq`` on the stacked system
    ``[X; sqrt(l') I] Q^T = [X_fp W^T; sqrt(l') W^T]`` (float64; tolerance 1e-5 relative, as the
    statistics accumulate in float32)."""
    float_inputs, inputs = _shifted_inputs(1)
    weight = torch.randn(9, inputs.shape[-1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x, x_fp = inputs.reshape(-1, inputs.shape[-1]).double(), float_inputs.reshape(-1, inputs.shape[-1]).double()
    damp = 0.05
    ours = float_target_weight(weight, stage_inputs_of([inputs], float_inputs), damp)
    scale = (2 / x.shape[0]) ** 0.5  # the objective in the Hessian's units
    ridge = (damp * (2 * x.T @ x / x.shape[0]).diagonal().mean()) ** 0.5
    system = torch.cat([scale * x, ridge * torch.eye(x.shape[1], dtype=torch.float64)])
    target = torch.cat([scale * x_fp @ weight.T, ridge * weight.T])
    reference = torch.linalg.lstsq(system, target).solution.T
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_matching_float_lowers_the_error_against_the_float_layers_output() -> None:
    """With inputs shifted by earlier layers' error, GPTQ on the float-target weight leaves a smaller
    ``|X Q^T - X_fp W^T|`` than GPTQ on the float weight (same grid, same Hessian), by at least 20%."""
    float_inputs, inputs = _shifted_inputs(3, width=32, windows=8, seq=16)
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    stats = stage_inputs_of([inputs], float_inputs)
    spec = QuantSpec(bits=3, group_size=16)
    x, x_fp = inputs.reshape(-1, 32), float_inputs.reshape(-1, 32)
    errors = []
    for start in (weight, float_target_weight(weight, stats, 0.01)):
        q = gptq_quantize(start, stats.hessian, spec, act_order=True, static_groups=True).weight
        errors.append(float((x @ q.T - x_fp @ weight.T).square().sum()))
    assert errors[1] < 0.8 * errors[0]


def test_gathered_linear_inputs_are_what_each_linear_receives_with_one_copy_per_shared_input() -> None:
    """Against capturing each linear's input alone (``layer_input``), batch by batch: exact equality."""
    model = build_model("llama")
    block = find_decoder_blocks(model)[0]
    captured = capture_block_inputs(model, WINDOWS, "cpu")
    data = BlockData(0, 2, captured.hidden, None, block_forward(block, captured.kwargs), torch.Generator())
    with torch.no_grad(), gathered_linear_inputs(block) as gathered:
        for batch in captured.hidden.split(2):
            data.forward(batch, None)
    assert gathered.keys() == quantizable_linears(block).keys()
    for name, parts in gathered.items():
        expected = [layer_input(block, data, batch, name) for batch in captured.hidden.split(2)]
        assert len(parts) == len(expected)
        assert all(torch.equal(p, e) for p, e in zip(parts, expected, strict=True)), name
    assert all(a is b for a, b in zip(gathered["self_attn.q_proj"], gathered["self_attn.v_proj"], strict=True))
    assert all(a is b for a, b in zip(gathered["mlp.gate_proj"], gathered["mlp.up_proj"], strict=True))


def test_match_float_changes_only_the_stages_whose_inputs_the_earlier_error_shifted() -> None:
    """In block 0, q/k/v read the model's own embeddings, identical in both chains, so their weights
    equal plain GPTQ's (tolerance 1e-6); every later stage and block sees shifted inputs and moves.
    The calibrated chain still beats round-to-nearest on every block."""
    blocks, records = [], []
    for match_float in (False, True):
        model, record = _calibrated_llama(WINDOWS, {"match_float": match_float})
        records.append(record)
        blocks.append(find_decoder_blocks(model))
    plain, matched = blocks
    assert torch.allclose(plain[0].self_attn.q_proj.weight, matched[0].self_attn.q_proj.weight, atol=1e-6)
    assert not torch.allclose(plain[0].mlp.down_proj.weight, matched[0].mlp.down_proj.weight, atol=1e-3)
    assert not torch.allclose(plain[1].self_attn.q_proj.weight, matched[1].self_attn.q_proj.weight, atol=1e-3)
    assert all(r.mse_after < r.mse_before for r in records[1])


class _OneLinear(torch.nn.Module):
    """A block of one linear layer, so a stage's Hessian is the block input's own."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


@pytest.mark.parametrize("correlated", [False, True])
def test_each_stage_keeps_the_grid_clipped_or_not_whose_walk_leaves_the_smaller_error(correlated: bool) -> None:
    """With the searched clipping on, the weights GPTQ writes are those of whichever walk (from the
    searched clipping's grid, or from the full range) leaves the smaller GPTQ objective, each computed
    here by ``gptq_quantize`` from a Hessian summed token by token. Independent input channels: the
    clipping wins; channels mixed from 8 latent factors, where the walk compensates most of the
    rounding error and the search's per-group judgement (round-to-nearest) misleads: the full range."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 64, generator=generator) * 0.05
    inputs = torch.randn(6, 16, 8 if correlated else 64, generator=generator)
    if correlated:
        inputs = inputs @ torch.randn(8, 64, generator=generator) + 0.01 * torch.randn(6, 16, 64, generator=generator)
    block = _OneLinear(weight)
    spec = QuantSpec(3, False, 16)
    data = BlockData(0, 1, inputs, None, block_forward(block, {}), torch.Generator())
    stats = build_method("gptq", spec, build_loss("mse")).calibrate(block, data)
    tokens = inputs.reshape(-1, 64).double()
    hessian = (sum(torch.outer(x, x) for x in tokens) * (2.0 / tokens.shape[0])).float()
    walks = [
        gptq_quantize(weight, hessian, spec, act_order=True, static_groups=True, clip=clip)
        for clip in (None, search_clipping(weight, hessian, spec)[0])
    ]
    best = min(walks, key=lambda walked: walked.error)
    assert (best is walks[1]) is not correlated
    assert stats["clipped"] == {"proj": not correlated}
    assert stats["error"]["proj"] == pytest.approx(best.error, rel=1e-4)
    assert torch.allclose(block.proj.weight, best.weight, atol=1e-6)
