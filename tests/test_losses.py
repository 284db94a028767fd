"""The losses every method trains with, checked against independent references (POT, SciPy, naive loops)."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
from scipy.stats import wasserstein_distance

from quant_core.errors import ConfigError
from quant_core.losses import (
    LOSSES,
    ModelOutputs,
    build_loss,
    random_directions,
    sliced_wasserstein,
)

ATOL = 1e-5  # fp32 projections of O(1) data


def _clouds(n: int = 64, d: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), 0.5 * torch.randn(n, d, generator=g) + 0.3


def _directions(d: int, k: int, seed: int = 1) -> torch.Tensor:
    return random_directions(d, k, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [1, 16, 64])
def test_sliced_w1_equals_pot_given_the_same_directions(k: int) -> None:
    x, y = _clouds()
    dirs = _directions(x.shape[1], k)
    ours = sliced_wasserstein(x, y, dirs, p=1).item()
    pot = ot.sliced_wasserstein_distance(x.double().numpy(), y.double().numpy(), projections=dirs.double().numpy(), p=1)
    assert ours == pytest.approx(float(pot), abs=ATOL)


def test_squared_sliced_w2_equals_pot_squared() -> None:
    """POT returns (mean_k W2^2)^(1/2); ``sw_p=2`` is the squared variant, mean_k W2^2."""
    x, y = _clouds()
    dirs = _directions(x.shape[1], 32)
    ours = sliced_wasserstein(x, y, dirs, p=2).item()
    pot = ot.sliced_wasserstein_distance(x.double().numpy(), y.double().numpy(), projections=dirs.double().numpy(), p=2)
    assert ours == pytest.approx(float(pot) ** 2, rel=1e-5)


def test_each_direction_matches_scipy_1d_wasserstein() -> None:
    x, y = _clouds(n=50, d=7)
    dirs = _directions(7, 5)
    per_direction = [
        wasserstein_distance((x @ dirs[:, j]).numpy(), (y @ dirs[:, j]).numpy()) for j in range(dirs.shape[1])
    ]
    for j in range(dirs.shape[1]):
        single = sliced_wasserstein(x, y, dirs[:, j : j + 1]).item()
        assert single == pytest.approx(per_direction[j], abs=ATOL)
    assert sliced_wasserstein(x, y, dirs).item() == pytest.approx(np.mean(per_direction), abs=ATOL)


def test_gradients_pass_gradcheck_in_float64() -> None:
    x, y = _clouds(n=20, d=6)
    x = x.double().requires_grad_(True)
    y = y.double()
    dirs = _directions(6, 4).double()
    for p in (1, 2):
        assert torch.autograd.gradcheck(lambda a, p=p: sliced_wasserstein(a, y, dirs, p), (x,), eps=1e-6, atol=1e-5)


def test_directions_are_unit_and_reproducible() -> None:
    a = random_directions(30, 9, torch.Generator().manual_seed(5))
    b = random_directions(30, 9, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.allclose(a.norm(dim=0), torch.ones(9), atol=1e-6)


def _outputs(batch: int = 2, seq: int = 8, hidden: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, hidden, generator=g), torch.randn(batch, seq, hidden, generator=g) * 1.5


def test_sw_loss_token_level_flattens_batch_and_sequence() -> None:
    out, tgt = _outputs()
    loss = build_loss("sw", sw_num_projections=8, seed=3)
    dirs = random_directions(6, 8, torch.Generator().manual_seed(3))
    expected = sliced_wasserstein(out.reshape(-1, 6), tgt.reshape(-1, 6), dirs)
    assert loss(out, tgt).item() == pytest.approx(expected.item(), abs=1e-6)


def test_sw_loss_block_level_treats_b_consecutive_tokens_as_one_sample() -> None:
    out, tgt = _outputs(batch=2, seq=8, hidden=6)
    loss = build_loss("sliced_wasserstein", sw_num_projections=8, sw_block_size=4, seed=3)
    dirs = random_directions(24, 8, torch.Generator().manual_seed(3))
    # Naive reference: build each sample by concatenating 4 consecutive token vectors.
    samples = lambda t: torch.stack([torch.cat(list(t[b, s : s + 4])) for b in range(2) for s in range(0, 8, 4)])  # noqa: E731
    expected = sliced_wasserstein(samples(out), samples(tgt), dirs)
    assert loss(out, tgt).item() == pytest.approx(expected.item(), abs=1e-6)


def test_sw_loss_redraws_directions_each_call_and_reseed_replays_them() -> None:
    out, tgt = _outputs()
    loss = build_loss("sw", seed=11)
    first, second = loss(out, tgt).item(), loss(out, tgt).item()
    assert first != second
    loss.reseed(11)
    assert loss(out, tgt).item() == first


def test_sw_is_zero_for_a_permutation_of_tokens_but_mse_is_not() -> None:
    """SW compares distributions: shuffling tokens leaves it unchanged."""
    out, _ = _outputs(batch=1, seq=16)
    shuffled = out[:, torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    assert build_loss("sw")(out, shuffled).item() == pytest.approx(0.0, abs=1e-6)
    assert build_loss("mse")(out, shuffled).item() > 0.1


def test_hybrid_is_the_weighted_sum_of_its_terms() -> None:
    out, tgt = _outputs()
    weights = {"base": 0.7, "sw": 2.5}
    hybrid = build_loss("mse_sw", hybrid_weights=weights, seed=4)(out, tgt).item()
    mse = build_loss("mse")(out, tgt).item()
    sw = build_loss("sw", seed=4)(out, tgt).item()
    assert hybrid == pytest.approx(0.7 * mse + 2.5 * sw, rel=1e-6)


def test_hybrid_weights_default_to_base_1_and_sw_0_1() -> None:
    out, tgt = _outputs()
    hybrid = build_loss("mse_sw", hybrid_weights={"sw": 0.3}, seed=2)(out, tgt).item()
    mse = build_loss("mse")(out, tgt).item()
    sw = build_loss("sw", seed=2)(out, tgt).item()
    assert hybrid == pytest.approx(mse + 0.3 * sw, rel=1e-6)
    default = build_loss("mse_sw", seed=2)(out, tgt).item()
    assert default == pytest.approx(mse + 0.1 * sw, rel=1e-6)


def test_l2_sw_scales_its_sw_term_by_the_width_so_it_is_width_times_mse_sw() -> None:
    out, tgt = _outputs()
    width = out.shape[-1]
    l2 = build_loss("l2")(out, tgt).item()
    sw = build_loss("sw", seed=2)(out, tgt).item()
    l2_sw = build_loss("l2_sw", hybrid_weights={"sw": 0.3}, seed=2)(out, tgt).item()
    assert l2_sw == pytest.approx(l2 + 0.3 * width * sw, rel=1e-6)
    mse_sw = build_loss("mse_sw", hybrid_weights={"sw": 0.3}, seed=2)(out, tgt).item()
    assert l2_sw == pytest.approx(width * mse_sw, rel=1e-5)


def test_hybrid_terms_are_the_weighted_parts_of_the_loss() -> None:
    out, tgt = _outputs()
    terms = build_loss("mse_sw", hybrid_weights={"base": 2.0, "sw": 0.5}, seed=3).terms(out, tgt)
    assert terms["base"].item() == pytest.approx(2.0 * build_loss("mse")(out, tgt).item(), rel=1e-6)
    assert terms["sw"].item() == pytest.approx(0.5 * build_loss("sw", seed=3)(out, tgt).item(), rel=1e-6)
    assert list(build_loss("l2").terms(out, tgt)) == ["l2"]


def test_pointwise_losses_match_naive_loops() -> None:
    out, tgt = _outputs(batch=2, seq=5, hidden=4)
    tokens = [(out[b, s], tgt[b, s]) for b in range(2) for s in range(5)]
    diff2 = [((o - t) ** 2).tolist() for o, t in tokens]
    assert build_loss("mse")(out, tgt).item() == pytest.approx(np.mean(diff2), rel=1e-6)
    assert build_loss("mse", reduction="sum")(out, tgt).item() == pytest.approx(np.sum(diff2), rel=1e-6)
    assert build_loss("l2")(out, tgt).item() == pytest.approx(np.mean([sum(d) for d in diff2]), rel=1e-6)
    o, t = out.reshape(-1, 4).double().numpy(), tgt.reshape(-1, 4).double().numpy()
    dist = np.mean((o.mean(0) - t.mean(0)) ** 2) + np.mean((o.std(0, ddof=1) - t.std(0, ddof=1)) ** 2)
    assert build_loss("dist")(out, tgt).item() == pytest.approx(dist, rel=1e-5)
    kl_per_token = []
    for ov, tv in zip(o, t, strict=True):
        p, q = np.exp(tv) / np.exp(tv).sum(), np.exp(ov) / np.exp(ov).sum()
        kl_per_token.append(np.sum(p * np.log(p / q)))
    assert build_loss("kl")(out, tgt).item() == pytest.approx(np.mean(kl_per_token), rel=1e-5)


def test_half_precision_inputs_are_computed_in_fp32() -> None:
    out, tgt = _outputs()
    for name in ("mse", "sw", "mse_sw"):
        value = build_loss(name, seed=1)(out.bfloat16(), tgt.bfloat16())
        assert value.dtype == torch.float32


def test_every_loss_is_differentiable() -> None:
    out, tgt = _outputs(seq=8)
    for name in LOSSES:
        x = out.clone().requires_grad_(True)
        build_loss(name, sw_block_size=4, sw_scales=[1, 4])(x, tgt).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, name


def test_registry_holds_the_contracts_names() -> None:
    variants = {f"{base}_{term}" for base in ("mse", "l2") for term in ("max_sw", "learned_sw", "ms_sw", "site_sw")}
    contract = {"mse", "l2", "dist", "kl", "kd", "sliced_wasserstein", "sw", "mse_sw", "l2_sw", "kd_sw"}
    assert set(LOSSES) == contract | variants | {"max_sw", "learned_sw", "ms_sw"}


def test_unknown_loss_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"^Unknown loss method: huber\. Valid methods: mse, l2, dist, kl"):
        build_loss("huber")


def test_block_size_not_dividing_seq_len_is_refused_with_the_contract_message() -> None:
    out, tgt = _outputs(seq=10)
    with pytest.raises(ConfigError, match=r"^seq_len must be divisible by sw_block_size$"):
        build_loss("mse_sw", sw_block_size=4)(out, tgt)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"sw_num_projections": 0}, "sw_num_projections"),
        ({"sw_num_projections": 2.5}, "sw_num_projections"),
        ({"sw_block_size": -2}, "sw_block_size"),
        ({"sw_p": 3}, "sw_p"),
        ({"reduction": "none"}, "reduction"),
        ({"hybrid_weights": {"base": 1.0, "kl": 0.2}}, "hybrid_weights"),
        ({"hybrid_weights": {"sw": -1}}, "hybrid_weights.sw"),
        ({"hybrid_weights": {"sw": float("nan")}}, "hybrid_weights.sw"),
        ({"sw_projections": 8}, "sw_projections"),
    ],
)
def test_bad_options_are_refused_naming_the_field(options: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_loss("mse_sw", **options)
    assert info.value.field == field


def test_sliced_wasserstein_rejects_mismatched_shapes() -> None:
    x, y = _clouds()
    with pytest.raises(ValueError, match="equal shapes"):
        sliced_wasserstein(x, y[:10], _directions(12, 3))
    with pytest.raises(ValueError, match=r"directions must be \[D, K\]"):
        sliced_wasserstein(x, y, _directions(5, 3))


@pytest.mark.parametrize("name", ["kd", "kd_sw"])
def test_kd_over_chunked_logits_equals_kd_over_whole_logits_in_value_and_gradient(name: str, monkeypatch) -> None:
    """The tuning's logits made 7 positions at a time (24 tokens: uneven chunks), recomputed in the backward
    pass, against the same loss on whole logits: same value and same gradients, to float32 rounding."""
    from quant_core import loss_base

    monkeypatch.setattr(loss_base, "LOGIT_CHUNK", 7)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    teacher = torch.randn(2, 12, 16)
    results = []
    for chunked in (False, True):
        hidden = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        head.zero_grad()
        student = ModelOutputs(None, hidden, head) if chunked else ModelOutputs(head(hidden), hidden)
        target = ModelOutputs(None, teacher, head) if chunked else ModelOutputs(head(teacher).detach(), teacher)
        value = build_loss(name, seed=0).model_objective(student, target)
        value.backward()
        results.append((value.item(), hidden.grad.clone(), head.weight.grad.clone()))
    (whole, grad_whole, head_whole), (ours, grad_ours, head_ours) = results
    assert ours == pytest.approx(whole, rel=1e-6)
    assert torch.allclose(grad_ours, grad_whole, atol=1e-7) and torch.allclose(head_ours, head_whole, atol=1e-7)
