"""The SW variants (max-sliced, learned projections, multi-scale, site SW) against independent references.

References: a brute-force search over directions for max-sliced, POT's sliced distance given the same
directions for every scale of multi-scale, NumPy loops for the distribution statistics, and the
residual identity of a Llama block (output = input + attention + MLP) for the recorded sites.
"""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from quant_core.corpus import BUNDLED_TEXTS, calibration_windows, tokenize_file
from quant_core.engine import calibrate_blocks, capture_block_inputs, run_block
from quant_core.errors import ConfigError
from quant_core.losses import LOSSES, build_loss, random_directions
from quant_core.methods import build_method
from quant_core.methods.layer_inputs import recorded_outputs
from quant_core.model_structure import find_decoder_blocks
from quant_core.output_stats import STATS_DIRECTIONS, distribution_errors
from quant_core.quantizer import QuantSpec
from quant_core.sliced import LearnedProjectionLoss, MaxSlicedLoss, per_direction_distances
from tests.tiny_models import build_model

VARIANT_LOSSES = ("max_sw", "learned_sw", "ms_sw", "mse_max_sw", "l2_learned_sw", "mse_ms_sw", "mse_site_sw")


def _clouds(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two clouds that differ mostly along a few axes, so a best direction exists."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(d)
    scale[0], scale[1] = 3.0, 0.5
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) * scale + 0.2


def test_max_sliced_in_two_dimensions_matches_a_brute_force_search_over_angles() -> None:
    x, y = _clouds(200, 2)
    angles = torch.linspace(0, math.pi, 3601)
    grid = torch.stack([angles.cos(), angles.sin()])  # [2, 3601], every direction up to sign
    brute = per_direction_distances(x, y, grid).max().item()
    ours = MaxSlicedLoss(1, None, 1, seed=0, ascent_steps=60, step_size=0.3)(x, y).item()
    assert ours == pytest.approx(brute, rel=1e-3)


def test_max_sliced_in_eight_dimensions_beats_many_random_directions() -> None:
    x, y = _clouds(256, 8)
    many = random_directions(8, 20000, torch.Generator().manual_seed(5))
    best_random = per_direction_distances(x, y, many).max().item()
    ours = MaxSlicedLoss(1, None, 1, seed=0, ascent_steps=60, step_size=0.3)(x, y).item()
    assert ours >= best_random * 0.999


def test_max_sliced_over_k_directions_exceeds_plain_sw_and_trains_the_output_only() -> None:
    x, y = _clouds(128, 16)
    x.requires_grad_(True)
    plain = build_loss("sw", sw_num_projections=8, seed=0)(x, y)
    best = build_loss("max_sw", sw_num_projections=8, seed=0)(x, y)
    assert best.item() > plain.item()
    best.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_learned_projections_stay_unit_norm_and_climb_to_the_max_sliced_distance() -> None:
    x, y = _clouds(256, 8)
    loss = LearnedProjectionLoss(1, None, 1, seed=0, step_size=0.2)
    first = loss(x, y).item()
    for _ in range(60):
        last = loss(x, y).item()
    assert torch.allclose(loss._directions[x.device].norm(dim=0), torch.ones(1), atol=1e-6)
    best = MaxSlicedLoss(1, None, 1, seed=0, ascent_steps=60, step_size=0.3)(x, y).item()
    assert first < 0.5 * best and 0.98 * best < last <= best + 1e-6


def test_several_learned_projections_climb_far_above_random_directions() -> None:
    x, y = _clouds(256, 8)
    loss = LearnedProjectionLoss(4, None, 1, seed=0, step_size=0.2)
    for _ in range(60):
        loss(x, y)
    learned = loss._directions[x.device]
    assert torch.allclose(learned.norm(dim=0), torch.ones(4), atol=1e-6)
    random_mean = per_direction_distances(x, y, random_directions(8, 20000, torch.Generator().manual_seed(5))).mean()
    # each climbs to a local maximum (here three reach the widest axis, one the narrow one)
    assert (per_direction_distances(x, y, learned) > random_mean).all()
    assert per_direction_distances(x, y, learned).mean() > 3 * random_mean


def test_learned_projections_restart_from_the_seed_on_reseed() -> None:
    x, y = _clouds(64, 8)
    loss = LearnedProjectionLoss(4, None, 1, seed=3, step_size=0.2)
    fresh_first = loss(x, y).item()
    for _ in range(5):
        loss(x, y)
    loss.reseed(3)
    assert loss(x, y).item() == fresh_first


def test_multi_scale_equals_the_sum_of_pots_sliced_distances_at_each_scale() -> None:
    g = torch.Generator().manual_seed(0)
    out, tgt = torch.randn(2, 16, 6, generator=g), torch.randn(2, 16, 6, generator=g) * 1.5
    scales, k, seed = (1, 4, 8), 32, 11
    ours = build_loss("ms_sw", sw_scales=list(scales), sw_num_projections=k, seed=seed)(out, tgt).item()
    expected = 0.0
    for i, scale in enumerate(scales):
        dirs = random_directions(6 * scale, k, torch.Generator().manual_seed(seed + i))
        xs, ys = out.reshape(-1, 6 * scale).double().numpy(), tgt.reshape(-1, 6 * scale).double().numpy()
        expected += float(ot.sliced_wasserstein_distance(xs, ys, projections=dirs.double().numpy(), p=1))
    assert ours == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"sw_scales": []}, "sw_scales"),
        ({"sw_scales": [1, 1]}, "sw_scales"),
        ({"sw_scales": [0, 4]}, "sw_scales"),
        ({"sw_sites": "mlp"}, "sw_sites"),
        ({"sw_ascent_steps": -1}, "sw_ascent_steps"),
        ({"sw_step_size": 0}, "sw_step_size"),
    ],
)
def test_bad_variant_options_name_the_field(options: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_loss("mse_ms_sw", **options)
    assert info.value.field == field


@pytest.mark.parametrize("name", VARIANT_LOSSES)
def test_every_variant_is_registered_zero_on_equal_outputs_and_positive_otherwise(name: str) -> None:
    assert name in LOSSES
    g = torch.Generator().manual_seed(1)
    out = torch.randn(2, 16, 8, generator=g)
    loss = build_loss(name, seed=0)
    assert loss(out, out).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(out * 1.3 + 0.1, out).item() > 0


def test_distribution_errors_match_numpy_and_pot() -> None:
    g = torch.Generator().manual_seed(2)
    out, tgt = torch.randn(3, 20, 7, generator=g) * 1.2 + 0.1, torch.randn(3, 20, 7, generator=g)
    stats = distribution_errors(out, tgt, seed=4)
    o, t = out.reshape(-1, 7).double().numpy(), tgt.reshape(-1, 7).double().numpy()
    shift = math.sqrt(np.mean((o.mean(0) - t.mean(0)) ** 2)) / math.sqrt(np.mean(t.var(0, ddof=1)))
    log_ratio = np.mean(np.abs(np.log(o.var(0, ddof=1) / t.var(0, ddof=1))))
    dirs = random_directions(7, STATS_DIRECTIONS, torch.Generator().manual_seed(4)).double().numpy()
    sw = ot.sliced_wasserstein_distance(o, t, projections=dirs, p=1)
    assert stats["mean_shift"] == pytest.approx(shift, rel=1e-5)
    assert stats["log_var_ratio"] == pytest.approx(log_ratio, rel=1e-5)
    assert stats["sw"] == pytest.approx(float(sw), rel=1e-5)
    assert distribution_errors(tgt, tgt, seed=4) == pytest.approx({"mean_shift": 0, "log_var_ratio": 0, "sw": 0})


@pytest.fixture(scope="module")
def windows(tokenizer) -> torch.Tensor:
    return calibration_windows(tokenize_file(tokenizer, BUNDLED_TEXTS["austen"]), 4, 32, seed=0)


def test_recorded_sites_are_what_attention_and_mlp_add_to_the_residual_stream(windows: torch.Tensor) -> None:
    model = build_model("llama")
    captured = capture_block_inputs(model, windows, "cpu")
    block = find_decoder_blocks(model)[0]
    with torch.no_grad(), recorded_outputs(block, ("self_attn", "mlp")) as sites:
        output = run_block(block, captured.hidden, captured.kwargs)
    (attention,), (mlp,) = sites["self_attn"], sites["mlp"]
    torch.testing.assert_close(output, captured.hidden + attention + mlp, rtol=1e-5, atol=1e-5)


def test_site_sw_trains_on_attention_and_mlp_outputs_and_reports_their_gradient_share(windows: torch.Tensor) -> None:
    model = build_model("llama")
    spec = QuantSpec(bits=3, group_size=32)
    method = build_method("omniquant", spec, build_loss("mse_site_sw", seed=0), {"steps": 4})
    records = calibrate_blocks(model, windows, method, build_loss("mse"), seed=0)
    share = records[0].method_stats["gradient_share"]["first"]
    assert set(share) == {"base", "sw", "sw_self_attn", "sw_mlp"}
    assert sum(share.values()) == pytest.approx(1.0) and share["sw_mlp"] > 0
    assert records[0].distribution_after and records[0].distribution_before


def test_a_site_the_block_lacks_is_a_config_error_naming_sw_sites(windows: torch.Tensor) -> None:
    model = build_model("llama")
    loss = build_loss("mse_site_sw", sw_sites=["feed_forward"], seed=0)
    method = build_method("omniquant", QuantSpec(bits=3, group_size=32), loss, {"steps": 2})
    with pytest.raises(ConfigError) as info:
        calibrate_blocks(model, windows, method, build_loss("mse"), seed=0)
    assert info.value.field == "sw_sites"
