"""The weight grid, checked against a naive per-group loop."""

from __future__ import annotations

import pytest
import torch

from quant_core.errors import ConfigError
from quant_core.quantizer import QuantSpec, fake_quantize, group_columns, round_ste, scale_and_zero


def naive_fake_quantize(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """One group at a time, straight from the grid's definition in quant_core.quantizer's docstring."""
    out = torch.empty_like(weight)
    in_features = weight.shape[1]
    g = spec.group_size or in_features
    qmin, qmax = -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
    for row in range(weight.shape[0]):
        for start in range(0, in_features, g):
            group = weight[row, start : start + g]
            low, high = min(group.min().item(), 0.0), max(group.max().item(), 0.0)
            if spec.symmetric:
                scale = max(max(-low, high) / ((qmax - qmin) / 2), 1e-8)
                zero = 0.0
            else:
                scale = max((high - low) / (qmax - qmin), 1e-8)
                zero = min(max(qmin - round(low / scale), qmin), qmax)
            for j, value in enumerate(group.tolist()):
                code = min(max(round(value / scale) + zero, qmin), qmax)
                out[row, start + j] = (code - zero) * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [None, 8, 16])
def test_fake_quantize_matches_the_naive_loop(bits: int, symmetric: bool, group_size: int | None) -> None:
    weight = torch.randn(6, 32, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    spec = QuantSpec(bits=bits, symmetric=symmetric, group_size=group_size)
    assert torch.allclose(fake_quantize(weight, spec), naive_fake_quantize(weight, spec), atol=1e-12)


def test_ragged_last_group_is_quantized_alone() -> None:
    """Width 40 with g=16: groups [0,16), [16,32) and a last group [32,40) with its own scale."""
    weight = torch.randn(4, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spec = QuantSpec(bits=3, group_size=16)
    full = fake_quantize(weight, spec)
    assert torch.allclose(full, naive_fake_quantize(weight, spec), atol=1e-12)
    tail_alone = fake_quantize(weight[:, 32:], QuantSpec(bits=3, group_size=None))
    assert torch.allclose(full[:, 32:], tail_alone, atol=1e-12)
    assert group_columns(weight, 16).shape == (4, 3, 16)


def test_each_group_uses_at_most_2_to_the_bits_levels() -> None:
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    for bits in (2, 3, 4):
        q = fake_quantize(weight, QuantSpec(bits=bits, group_size=16))
        for group in q.reshape(8, 4, 16).reshape(-1, 16):
            assert group.unique().numel() <= 2**bits


def test_rounding_error_is_at_most_half_a_step_inside_the_range() -> None:
    weight = torch.randn(5, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    spec = QuantSpec(bits=4, group_size=16)
    scale, _ = scale_and_zero(group_columns(weight, 16), spec)
    error = (fake_quantize(weight, spec) - weight).reshape(5, 3, 16).abs()
    assert (error <= scale / 2 + 1e-12).all()


def test_clip_factors_shrink_the_range() -> None:
    weight = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    spec = QuantSpec(bits=3, group_size=16)
    factor = torch.full((4, 2, 1), 0.5)
    clipped = fake_quantize(weight, spec, factor, factor)
    assert clipped.abs().max() < fake_quantize(weight, spec).abs().max()


def test_straight_through_rounding_passes_the_gradient_unchanged() -> None:
    x = torch.tensor([0.2, 1.7, -2.4], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, -2.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


def test_clip_factors_receive_gradient_through_fake_quantize() -> None:
    weight = torch.randn(4, 32, generator=torch.Generator().manual_seed(4))
    low = torch.ones(4, 2, 1, requires_grad=True)
    high = torch.ones(4, 2, 1, requires_grad=True)
    fake_quantize(weight, QuantSpec(bits=2, group_size=16), low, high, ste=True).pow(2).sum().backward()
    assert low.grad.abs().sum() > 0 and high.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"bits": 1}, "bits"), ({"bits": 9}, "bits"), ({"bits": True}, "bits"), ({"group_size": 0}, "group_size")],
)
def test_invalid_specs_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        QuantSpec(**kwargs)
    assert info.value.field == field
