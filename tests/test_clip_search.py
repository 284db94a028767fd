"""The clipping search against a brute-force loop over tokens, rows, groups and ratios, and its uses.

The reference computes each group's partial output ``x_g · w_g`` token by token in float64 and keeps
the ratio with the smallest mean squared difference; the search must pick the same ratio everywhere
(random data in float64 leaves no ties) and report the same error to 1e-9 relative.
"""

from __future__ import annotations

import pytest
import torch

from quant_core.clip_search import clip_ratios, group_gram_blocks, search_clipping
from quant_core.engine import calibrate_blocks
from quant_core.losses import build_loss
from quant_core.methods import build_method
from quant_core.methods.clipping import GRAM_BATCH
from quant_core.methods.layer_inputs import input_grams, layer_input
from quant_core.methods.tesseraq import TesseraQ
from quant_core.model_structure import find_decoder_blocks, quantizable_linears
from quant_core.quantizer import QuantSpec, fake_quantize
from tests.test_method_calibration import _block_data
from tests.tiny_models import build_model


def brute_force_clipping(
    weight: torch.Tensor, x: torch.Tensor, spec: QuantSpec, ratios: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row, group and ratio, the mean over tokens of the squared partial-output error."""
    size = spec.group_size or weight.shape[1]
    groups = -(-weight.shape[1] // size)
    best_ratio = torch.ones(weight.shape[0], groups, dtype=torch.float64)
    best_error = torch.full((weight.shape[0], groups), float("inf"), dtype=torch.float64)
    for ratio in ratios:
        factor = torch.tensor(ratio, dtype=torch.float64)
        quantized = fake_quantize(weight, spec, factor, factor)
        for row in range(weight.shape[0]):
            for group in range(groups):
                cols = slice(group * size, min((group + 1) * size, weight.shape[1]))
                errors = [float((token[cols] * (weight[row, cols] - quantized[row, cols])).sum()) ** 2 for token in x]
                error = sum(errors) / len(errors)
                if error < best_error[row, group]:
                    best_error[row, group], best_ratio[row, group] = error, ratio
    return best_ratio, best_error


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(3, False, 8), QuantSpec(2, True, 8), QuantSpec(4, False, None), QuantSpec(3, False, 12)],
    ids=["w3-g8-asym", "w2-g8-sym", "w4-per-channel", "w3-ragged-g12"],
)
def test_search_matches_a_brute_force_loop_over_tokens(spec: QuantSpec) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 40, generator=generator, dtype=torch.float64)
    weight[:, 3] *= 6  # an outlier column makes clipping worth it for some groups and not others
    x = torch.randn(50, 40, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 3, 40, dtype=torch.float64)
    ratios = clip_ratios()
    expected_ratio, expected_error = brute_force_clipping(weight, x, spec, ratios)
    ratio, error = search_clipping(weight, x.T @ x / x.shape[0], spec, ratios)
    assert torch.allclose(ratio.squeeze(-1).double(), expected_ratio, rtol=0, atol=1e-7)  # float32 ratios
    assert torch.allclose(error.double(), expected_error, rtol=1e-5, atol=0)  # float32 search, float64 reference
    assert (expected_ratio < 1).any() and (expected_ratio == 1).any()


def test_the_search_never_leaves_more_output_error_than_round_to_nearest() -> None:
    generator = torch.Generator().manual_seed(1)
    weight, x = torch.randn(16, 64, generator=generator), torch.randn(200, 64, generator=generator)
    spec = QuantSpec(3, False, 16)
    gram = x.T @ x
    ratio, _ = search_clipping(weight, gram, spec)
    clipped = fake_quantize(weight, spec, ratio, ratio)
    plain = fake_quantize(weight, spec)
    assert ((x @ (weight - clipped).T) ** 2).sum() <= ((x @ (weight - plain).T) ** 2).sum()


def test_gram_blocks_are_the_diagonal_blocks_zero_padded() -> None:
    gram = torch.arange(25.0).reshape(5, 5)
    blocks = group_gram_blocks(gram, 2)
    assert blocks.shape == (3, 2, 2)
    assert torch.equal(blocks[0], gram[:2, :2]) and torch.equal(blocks[1], gram[2:4, 2:4])
    assert torch.equal(blocks[2], torch.tensor([[24.0, 0.0], [0.0, 0.0]]))


def test_input_grams_equal_products_of_each_linears_own_inputs() -> None:
    model = build_model("llama")
    windows = torch.randint(3, 300, (5, 16), generator=torch.Generator().manual_seed(0))
    block, data = _block_data(model, windows)
    grams = input_grams(block, data, data.inputs, GRAM_BATCH)
    assert set(grams) == set(quantizable_linears(block))
    for name, gram in grams.items():
        x = layer_input(block, data, data.inputs, name).reshape(-1, gram.shape[0]).double()
        assert torch.allclose(gram.double(), x.T @ x, rtol=1e-5, atol=1e-5)


def test_rtn_with_clip_search_improves_the_block_output_over_plain_rtn() -> None:
    windows = torch.randint(3, 300, (6, 32), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=3, group_size=32)
    errors = []
    for options in ({}, {"clip_search": True}):
        method = build_method("rtn", spec, build_loss("mse"), options)
        records = calibrate_blocks(build_model("llama"), windows, method, build_loss("mse"), seed=0)
        errors.append(sum(r.mse_after for r in records))
    assert errors[1] < errors[0]


@pytest.mark.parametrize("clip_search", [False, True])
def test_gptq_initialised_tesseraq_starts_exactly_at_gptqs_weights(clip_search: bool) -> None:
    """No training (zero steps): hardening every variable at its start must give back GPTQ's weights."""
    windows = torch.randint(3, 300, (6, 32), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=3, group_size=32)
    gptq_model, tesseraq_model = build_model("llama"), build_model("llama")
    gptq = build_method("gptq", spec, build_loss("l2"), {"clip_search": clip_search})
    gptq_records = calibrate_blocks(gptq_model, windows, gptq, build_loss("l2"), seed=0)
    options = {"init": "gptq", "steps_per_round": 0, "rounds": 3, "clip_search": clip_search}
    tesseraq = build_method("tesseraq", spec, build_loss("l2"), options)
    assert isinstance(tesseraq, TesseraQ)
    records = calibrate_blocks(tesseraq_model, windows, tesseraq, build_loss("l2"), seed=0)
    for block_a, block_b in zip(find_decoder_blocks(gptq_model), find_decoder_blocks(tesseraq_model), strict=True):
        for a, b in zip(quantizable_linears(block_a).values(), quantizable_linears(block_b).values(), strict=True):
            assert torch.allclose(a.weight, b.weight, rtol=0, atol=1e-6)
    for a, b in zip(gptq_records, records, strict=True):
        assert b.loss_after == pytest.approx(a.loss_after, rel=1e-5)


def test_gptq_initialised_tesseraq_trains_below_gptq() -> None:
    windows = torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=2, group_size=32)
    gptq = build_method("gptq", spec, build_loss("l2"))
    gptq_records = calibrate_blocks(build_model("llama"), windows, gptq, build_loss("mse"), seed=0)
    options = {"init": "gptq", "rounds": 3, "steps_per_round": 10, "batch_size": 2, "lr": 1e-2}
    tesseraq = build_method("tesseraq", spec, build_loss("l2"), options)
    records = calibrate_blocks(build_model("llama"), windows, tesseraq, build_loss("mse"), seed=0)
    assert sum(r.mse_after for r in records) < sum(r.mse_after for r in gptq_records)


@pytest.mark.parametrize(
    ("name", "options"), [("omniquant", {"steps": 4}), ("tesseraq", {"rounds": 2, "steps_per_round": 2})]
)
def test_hybrid_losses_report_each_terms_share_of_the_gradient(name: str, options: dict) -> None:
    windows = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    method = build_method(name, QuantSpec(bits=3, group_size=32), build_loss("l2_sw", seed=0), options)
    records = calibrate_blocks(build_model("llama"), windows, method, build_loss("mse"), seed=0)
    for record in records:
        shares = record.method_stats["gradient_share"]
        assert set(shares) == {"first", "last"}
        for share in shares.values():
            assert set(share) == {"base", "sw"} and sum(share.values()) == pytest.approx(1.0)
            assert share["sw"] > 0.01  # width-normalised: SW is no rounding error next to l2
