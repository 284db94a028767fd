"""GPTQ against a naive reference: explicit inverse Hessian, one column at a time, no Cholesky, no batching."""

from __future__ import annotations

import pytest
import torch

from quant_core.engine import calibrate_blocks
from quant_core.losses import build_loss
from quant_core.methods import build_method
from quant_core.methods.gptq import gptq_quantize
from quant_core.model_structure import find_decoder_blocks
from quant_core.quantizer import QuantSpec, fake_quantize, group_columns, scale_and_zero
from tests.tiny_models import build_model


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


def test_one_pass_hessians_match_true_sequential_on_the_first_stage_and_beat_rtn() -> None:
    """Without true-sequential, q/k/v see the same inputs (nothing before them is quantized) and so the
    same weights; later stages differ, and the block output still beats round-to-nearest."""
    windows = torch.randint(3, 300, (6, 32), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=3, group_size=32)
    models, records = [], []
    for sequential in (True, False):
        model = build_model("llama")
        method = build_method("gptq", spec, build_loss("mse"), {"true_sequential": sequential})
        records.append(calibrate_blocks(model, windows, method, build_loss("mse"), seed=0))
        models.append(find_decoder_blocks(model)[0])
    assert torch.allclose(models[0].self_attn.q_proj.weight, models[1].self_attn.q_proj.weight, atol=1e-6)
    assert not torch.equal(models[0].mlp.down_proj.weight, models[1].mlp.down_proj.weight)
    assert all(r.mse_after < r.mse_before for r in records[1])
