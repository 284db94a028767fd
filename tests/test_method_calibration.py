"""GPTQ, AWQ, NormTweaking and TesseraQ on tiny models: better than round-to-nearest, on the grid, seeded.

Block output error after calibration is compared with round-to-nearest on the same block (the engine
measures both); the grid check counts distinct values per group, which no method may exceed.
"""

from __future__ import annotations

import pytest
import torch

from quant_core.corpus import BUNDLED_TEXTS, calibration_windows, tokenize_file
from quant_core.engine import calibrate_blocks, capture_block_inputs, run_block, run_block_batched
from quant_core.errors import ConfigError
from quant_core.losses import build_loss
from quant_core.methods import build_method
from quant_core.methods.awq import Awq, AwqOptions
from quant_core.methods.base import BlockData, layer_grid
from quant_core.methods.layer_inputs import input_groups
from quant_core.methods.normtweaking import norm_parameters
from quant_core.methods.tesseraq import LearnedRounding, hardened_fraction
from quant_core.model_structure import find_decoder_blocks, quantizable_linears, weight_matrix
from quant_core.quantizer import QuantSpec, dequantize, fake_quantize, group_columns
from tests.tiny_models import build_model

GROUP = 32
FAST_OPTIONS = {
    "gptq": {},
    "awq": {},
    "normtweaking": {"lr": 1e-2, "epochs": 2},
    "tesseraq": {"rounds": 3, "steps_per_round": 6, "batch_size": 2, "lr": 1e-2},
}


@pytest.fixture(scope="module")
def windows(tokenizer) -> torch.Tensor:
    return calibration_windows(tokenize_file(tokenizer, BUNDLED_TEXTS["austen"]), 8, 32, seed=0)


def _calibrate(arch: str, windows: torch.Tensor, method: str, bits: int, loss: str = "mse", **options):
    model = build_model(arch)
    spec = QuantSpec(bits=bits, group_size=GROUP)
    quant = build_method(method, spec, build_loss(loss, seed=0), {**FAST_OPTIONS[method], **options})
    records = calibrate_blocks(model, windows, quant, build_loss("mse"), seed=0)
    return model, records


def _block_data(model: torch.nn.Module, windows: torch.Tensor) -> tuple[torch.nn.Module, BlockData]:
    """Block 0 of ``model`` with its calibration data, as the engine would hand it to a method."""
    captured = capture_block_inputs(model, windows, "cpu")
    block = find_decoder_blocks(model)[0].requires_grad_(False)
    targets = run_block_batched(block, captured.hidden, captured.kwargs, 8)
    data = BlockData(
        index=0,
        num_blocks=2,
        inputs=captured.hidden,
        targets=targets,
        forward=lambda h, o: run_block(block, h, captured.kwargs, o),
        generator=torch.Generator().manual_seed(0),
    )
    return block, data


@pytest.mark.parametrize("method", list(FAST_OPTIONS))
@pytest.mark.parametrize(("arch", "bits", "loss"), [("llama", 2, "mse"), ("llama", 3, "mse_sw"), ("qwen2", 3, "mse")])
def test_block_output_is_closer_than_round_to_nearest(method: str, arch: str, bits: int, loss: str, windows) -> None:
    """AWQ only rescales and clips, and random tiny models lack the outlier channels it exploits: it must
    merely improve; the methods that change the rounding must improve by 5% at least."""
    _, records = _calibrate(arch, windows, method, bits, loss)
    for r in records:
        assert r.mse_after < (1.0 if method == "awq" else 0.95) * r.mse_before, r


@pytest.mark.parametrize("method", ["gptq", "normtweaking", "tesseraq"])
def test_opt_blocks_are_calibrated_too(method: str, windows) -> None:
    _, records = _calibrate("opt", windows, method, 3)
    assert sum(r.mse_after for r in records) < 0.95 * sum(r.mse_before for r in records)


@pytest.mark.parametrize("method", list(FAST_OPTIONS))
def test_weights_lie_on_the_grid(method: str, windows) -> None:
    model, _ = _calibrate("llama", windows, method, 2, "mse_sw")
    for block in find_decoder_blocks(model):
        for layer in quantizable_linears(block).values():
            levels = torch.tensor([[g.unique().numel() for g in row] for row in group_columns(layer.weight, GROUP)])
            assert (levels <= 4).all()


@pytest.mark.parametrize("method", [*FAST_OPTIONS, "rtn", "omniquant"])
def test_every_linear_keeps_the_grid_its_weights_lie_on(method: str, windows) -> None:
    """What the packed export relies on: ``round(w / scale) + zero`` gives codes that reproduce ``w``."""
    options = {"rtn": {}, "omniquant": {"epochs": 1}}.get(method, FAST_OPTIONS.get(method))
    model = build_model("llama")
    spec = QuantSpec(bits=3, group_size=GROUP)
    calibrate_blocks(model, windows, build_method(method, spec, build_loss("mse"), options), build_loss("mse"))
    for name, layer in quantizable_linears(find_decoder_blocks(model)).items():
        scale, zero = layer_grid(layer)
        grouped = group_columns(layer.weight.detach(), GROUP)
        codes = torch.round(grouped / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
        assert codes.min() >= spec.qmin and codes.max() <= spec.qmax, name
        assert torch.allclose(dequantize(codes, scale.unsqueeze(-1), zero.unsqueeze(-1)), grouped, atol=1e-6), name


# A size budget's allocation: each unit (linears that read one input) at its own width and group size.
MIXED = (
    {
        **dict.fromkeys(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), QuantSpec(2, False, 16)),
        "self_attn.o_proj": QuantSpec(8, False, 32),
        **dict.fromkeys(("mlp.gate_proj", "mlp.up_proj"), QuantSpec(4, True, 16)),
    },  # block 0's down_proj is left out: it takes the method's spec
    {
        **dict.fromkeys(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), QuantSpec(4, False, None)),
        "self_attn.o_proj": QuantSpec(3, False, 16),
        **dict.fromkeys(("mlp.gate_proj", "mlp.up_proj"), QuantSpec(2, False, 32)),
        "mlp.down_proj": QuantSpec(8, True, 16),
    },
)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("rtn", {}),
        ("rtn", {"clip_search": True}),
        ("gptq", {}),
        ("awq", {}),
        ("omniquant", {"epochs": 1}),
        ("tesseraq", FAST_OPTIONS["tesseraq"]),
        ("tesseraq", {**FAST_OPTIONS["tesseraq"], "init": "gptq"}),
        ("normtweaking", FAST_OPTIONS["normtweaking"]),
    ],
)
def test_each_linear_is_calibrated_on_the_grid_of_its_allocated_scheme(method: str, options: dict, windows) -> None:
    """Naive check per linear: the kept grid has one column per group of the linear's own group size, and
    ``round(w / scale) + zero`` lands within its own width's codes and gives ``w`` back."""
    model = build_model("llama")
    spec = QuantSpec(bits=3, group_size=GROUP)
    quant = build_method(method, spec, build_loss("mse"), options)
    calibrate_blocks(model, windows, quant, build_loss("mse"), schemes=MIXED)
    for index, block in enumerate(find_decoder_blocks(model)):
        for name, layer in quantizable_linears(block).items():
            own = MIXED[index].get(name, spec)
            scale, zero = layer_grid(layer)
            weight = layer.weight.detach()
            groups = 1 if own.group_size is None else -(-weight.shape[1] // own.group_size)
            assert scale.shape == (weight.shape[0], groups), (index, name)
            grouped = group_columns(weight, own.group_size)
            codes = torch.round(grouped / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
            low, high = -(2 ** (own.bits - 1)), 2 ** (own.bits - 1) - 1
            assert codes.min() >= low and codes.max() <= high, (index, name)
            restored = dequantize(codes, scale.unsqueeze(-1), zero.unsqueeze(-1))
            assert torch.allclose(restored, grouped, atol=1e-6), (index, name)
            if own.symmetric:
                assert torch.all(zero == 0), (index, name)


def test_linears_that_read_one_input_are_refused_different_schemes(windows) -> None:
    split = ({**MIXED[0], "self_attn.k_proj": QuantSpec(4, False, 16)}, MIXED[1])
    quant = build_method("gptq", QuantSpec(bits=3, group_size=GROUP), build_loss("mse"))
    with pytest.raises(ConfigError, match="must share a scheme"):
        calibrate_blocks(build_model("llama"), windows, quant, build_loss("mse"), schemes=split)


@pytest.mark.parametrize("method", [*FAST_OPTIONS, "rtn"])
def test_bfloat16_blocks_calibrate_with_float32_grids_and_losses(method: str, windows) -> None:
    """The block forward runs in bfloat16; methods still improve on RTN, and every weight is its grid's
    float32 value rounded once to bfloat16 (what the packed export checks)."""
    model = build_model("llama").to(torch.bfloat16)
    spec = QuantSpec(bits=3, group_size=GROUP)
    quant = build_method(method, spec, build_loss("mse_sw", seed=0), FAST_OPTIONS.get(method, {}))
    records = calibrate_blocks(model, windows, quant, build_loss("mse"), seed=0)
    if method != "rtn":
        assert sum(r.mse_after for r in records) < sum(r.mse_before for r in records)
    for layer in quantizable_linears(find_decoder_blocks(model)).values():
        scale, zero = layer_grid(layer)
        assert layer.weight.dtype == torch.bfloat16 and scale.dtype == torch.float32
        grouped = group_columns(layer.weight.float(), GROUP)
        codes = (torch.round(grouped / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(spec.qmin, spec.qmax)
        on_grid = dequantize(codes, scale.unsqueeze(-1), zero.unsqueeze(-1)).to(torch.bfloat16).float()
        assert torch.equal(on_grid, grouped)


@pytest.mark.parametrize("method", list(FAST_OPTIONS))
def test_calibration_is_deterministic_under_a_seed(method: str, windows) -> None:
    first, rec1 = _calibrate("llama", windows, method, 3, "mse_sw")
    second, rec2 = _calibrate("llama", windows, method, 3, "mse_sw")
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [r.loss_after for r in rec1] == [r.loss_after for r in rec2]


def test_normtweak_training_loss_decreases(windows) -> None:
    _, records = _calibrate("llama", windows, "normtweaking", 2, epochs=4)
    for r in records:
        assert r.method_stats["epoch_losses"][-1] < r.method_stats["epoch_losses"][0]


def test_tesseraq_ends_below_round_to_nearest_under_its_own_loss(windows) -> None:
    """Hardening adds error round by round, so TesseraQ's loss is judged against the round-to-nearest start."""
    model = build_model("llama")
    spec = QuantSpec(bits=2, group_size=GROUP)
    method = build_method("tesseraq", spec, build_loss("l2"), FAST_OPTIONS["tesseraq"])
    for r in calibrate_blocks(model, windows, method, build_loss("l2")):
        assert r.loss_after < 0.9 * r.loss_before, r


def test_shared_inputs_are_grouped_in_the_order_the_block_runs(windows) -> None:
    block, data = _block_data(build_model("llama"), windows)
    assert input_groups(block, data) == [
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ]


def test_awq_with_only_alpha_zero_and_no_clipping_is_round_to_nearest(windows) -> None:
    model = build_model("llama")
    spec = QuantSpec(bits=3, group_size=GROUP)
    blocks = find_decoder_blocks(model)
    expected = {n: fake_quantize(weight_matrix(m).detach(), spec) for n, m in quantizable_linears(blocks).items()}
    method = build_method("awq", spec, build_loss("mse"), {"n_grid": 1, "clip": False})
    calibrate_blocks(model, windows, method, build_loss("mse"))
    for name, layer in quantizable_linears(blocks).items():
        assert torch.equal(layer.weight, expected[name]), name


def test_awq_folding_keeps_the_float_block_output(windows) -> None:
    """Scales move between norms/producers and linears; before quantization the block computes the same."""
    block, data = _block_data(build_model("llama"), windows)
    before = data.forward(data.inputs, None)
    norm_before = block.input_layernorm.weight.clone()
    stats = Awq(QuantSpec(bits=2, group_size=GROUP), build_loss("mse"), AwqOptions()).prepare(block, data)
    after = data.forward(data.inputs, None)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-5)
    assert not torch.equal(block.input_layernorm.weight, norm_before)  # a non-zero exponent was chosen
    assert set(stats["alpha"]) == {  # grouped-query attention: v cannot absorb o's scales, so o has none
        "self_attn.q_proj+self_attn.k_proj+self_attn.v_proj",
        "mlp.gate_proj+mlp.up_proj",
        "mlp.down_proj",
    }
    assert "self_attn.q_proj" not in stats["clip_ratio"] and 0.5 <= stats["clip_ratio"]["mlp.down_proj"] <= 1.0


def test_awq_refuses_an_architecture_without_a_layout() -> None:
    """Refused by the method's up-front check, naming the layouts it has (every family in tests/test_families.py
    has one, so the block here is one of no family)."""
    blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))])
    method = build_method("awq", QuantSpec(bits=3), build_loss("mse"))
    with pytest.raises(
        ConfigError, match=r"AWQ has no scale layout for Sequential; supported: Gemma 2 and 3, "
    ) as info:
        method.check(blocks)
    assert info.value.field == "method"


def test_normtweak_changes_only_the_norms_of_the_gptq_result(windows) -> None:
    """In block 0 (later blocks see inputs that the tweaked norms changed, so their GPTQ differs)."""
    gptq, _ = _calibrate("llama", windows, "gptq", 3)
    tweaked, _ = _calibrate("llama", windows, "normtweaking", 3)
    block_gptq, block_tweaked = (find_decoder_blocks(m)[0].state_dict() for m in (gptq, tweaked))
    changed = {n for n, p in block_tweaked.items() if not torch.equal(p, block_gptq[n])}
    assert changed == set(norm_parameters(find_decoder_blocks(tweaked)[0]))


def test_learned_rounding_starts_at_the_float_weights() -> None:
    weight = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=3, group_size=16)
    rounding = LearnedRounding(weight, spec)
    unclamped = group_columns(weight, 16) / rounding.scale + rounding.zero
    inside = ((unclamped > spec.qmin) & (unclamped < spec.qmax)).reshape(6, -1)[:, :40]
    tolerance = 2e-4 * rounding.scale.max()
    assert ((rounding.weight() - weight).abs()[inside] <= tolerance).all()


def test_hardening_follows_the_schedule_and_keeps_the_most_decided() -> None:
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    rounding = LearnedRounding(weight, QuantSpec(bits=3, group_size=16))
    soft = rounding.offsets().detach().clone()
    rounding.harden(hardened_fraction(1, 4))
    assert hardened_fraction(4, 4) == 1.0 and hardened_fraction(1, 4) < hardened_fraction(2, 4)
    assert int(rounding.hard.sum()) == -(-rounding.hard.numel() * 7 // 16)  # ceil(7/16 of all)
    decided = (soft - 0.5).abs()
    assert decided[rounding.hard].min() >= decided[~rounding.hard].max()
    assert torch.equal(rounding.hard_value[rounding.hard], (soft[rounding.hard] >= 0.5).float())


def test_hardened_weights_round_back_to_their_codes_with_the_stored_scales() -> None:
    weight = torch.randn(8, 40, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(bits=2, group_size=16)
    rounding = LearnedRounding(weight, spec)
    with torch.no_grad():
        rounding.scale_logits.uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(3))
    rounding.harden(1.0)
    final = rounding.weight().detach()
    scale, zero = rounding.qparams()
    recovered = (torch.round(group_columns(final, 16) / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(
        spec.qmin, spec.qmax
    )
    assert torch.equal(recovered[:, :, :16].reshape(8, -1)[:, :40], rounding.codes().reshape(8, -1)[:, :40])


def test_tesseraq_from_awq_and_from_rtn_differ_and_both_beat_rtn(windows) -> None:
    from_awq, rec_awq = _calibrate("llama", windows, "tesseraq", 3, "l2", init="awq")
    from_rtn, rec_rtn = _calibrate("llama", windows, "tesseraq", 3, "l2", init="rtn")
    assert rec_awq[0].method_stats["init"]["alpha"] and "alpha" not in rec_rtn[0].method_stats["init"]
    for records in (rec_awq, rec_rtn):
        assert sum(r.mse_after for r in records) < sum(r.mse_before for r in records)
    first, second = (find_decoder_blocks(m)[0].mlp.down_proj.weight for m in (from_awq, from_rtn))
    assert not torch.equal(first, second)
