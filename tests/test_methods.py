"""Method registry and option rules (the numerical behaviour is in test_engine.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from quant_core.errors import ConfigError
from quant_core.job import JobSpec
from quant_core.job_settings import JobSettings, validated
from quant_core.losses import build_loss
from quant_core.methods import METHODS, build_method
from quant_core.methods.omniquant import BUDGET_STEPS
from quant_core.quantizer import QuantSpec


@pytest.mark.parametrize(("bits", "epochs"), [(2, 40), (3, 20), (4, 20), (8, 20)])
def test_omniquant_paper_schedule_is_20_epochs_40_at_2_bits_at_lr_1e_2(bits: int, epochs: int) -> None:
    method = build_method("omniquant", QuantSpec(bits=bits), build_loss("mse"), {"schedule": "paper"})
    data = SimpleNamespace(inputs=torch.zeros(16, 4, 8), windows=16, schemes={})
    assert method.steps(data) == epochs * 16
    assert method.learning_rate(method.steps(data)) == 1e-2 and method.options.batch_size == 1
    # a block whose allocation puts one linear at 2 bits trains as a 2-bit block
    mixed = SimpleNamespace(inputs=data.inputs, windows=16, schemes={"mlp.down_proj": QuantSpec(bits=2)})
    assert method.steps(mixed) == 40 * 16


def test_omniquant_budget_schedule_scales_the_learning_rate_with_the_steps() -> None:
    method = build_method("omniquant", QuantSpec(bits=3), build_loss("mse"))
    data = SimpleNamespace(inputs=torch.zeros(16, 4, 8), windows=16)
    assert method.steps(data) == BUDGET_STEPS
    assert method.learning_rate(64) == pytest.approx(4 * method.learning_rate(256))
    assert method.learning_rate(1) == method.learning_rate(64)  # short runs do not take huge steps
    assert build_method("omniquant", QuantSpec(), build_loss("mse"), {"lr": 0.3}).learning_rate(64) == 0.3


def test_explicit_epochs_or_steps_override_the_schedule() -> None:
    data = SimpleNamespace(inputs=torch.zeros(16, 4, 8), windows=16)
    options = {"epochs": 3, "batch_size": 4}
    assert build_method("omniquant", QuantSpec(bits=2), build_loss("mse"), options).steps(data) == 12
    assert build_method("omniquant", QuantSpec(bits=2), build_loss("mse"), {"steps": 7}).steps(data) == 7
    with pytest.raises(ConfigError, match="either epochs or steps"):
        build_method("omniquant", QuantSpec(), build_loss("mse"), {"steps": 7, "epochs": 1})


def test_unknown_method_lists_the_registered_ones() -> None:
    with pytest.raises(
        ConfigError,
        match=r"Unknown quantization method: gptq9\. "
        r"Valid methods: awq, discquant, gptq, normtweaking, omniquant, rtn, tesseraq",
    ):
        build_method("gptq9", QuantSpec(), build_loss("mse"))
    assert set(METHODS) == {"awq", "discquant", "gptq", "normtweaking", "omniquant", "rtn", "tesseraq"}


@pytest.mark.parametrize(
    ("method", "options", "field"),
    [
        ("omniquant", {"epochs": 2.5}, "epochs"),
        ("omniquant", {"lr": 0}, "lr"),
        ("omniquant", {"batch_size": 0}, "batch_size"),
        ("omniquant", {"momentum": 1}, "momentum"),
        ("omniquant", {"init_logit": float("nan")}, "init_logit"),
        ("gptq", {"damp": -0.1}, "damp"),
        ("gptq", {"block_size": 0}, "block_size"),
        ("gptq", {"act_order": "yes"}, "act_order"),
        ("awq", {"n_grid": 0}, "n_grid"),
        ("awq", {"max_shrink": 1.5}, "max_shrink"),
        ("awq", {"search_samples": None}, "search_samples"),
        ("normtweaking", {"base": "awq"}, "base"),
        ("normtweaking", {"depth_scale": -1}, "depth_scale"),
        ("tesseraq", {"rounds": 0}, "rounds"),
        ("tesseraq", {"init": "omniquant"}, "init"),
        ("tesseraq", {"scale_lr": True}, "scale_lr"),
        ("tesseraq", {"clip_search": 1}, "clip_search"),
        ("omniquant", {"schedule": "fast"}, "schedule"),
        ("omniquant", {"init": "awq"}, "init"),
        ("omniquant", {"steps": -1}, "steps"),
        ("rtn", {"clip_search": "yes"}, "clip_search"),
        ("rtn", {"clip_search": True, "incoherence": "hadamard"}, "clip_search"),
        ("gptq", {"clip_search": True, "static_groups": False}, "clip_search"),
        ("gptq", {"true_sequential": None}, "true_sequential"),
        ("gptq", {"match_float": True, "true_sequential": False}, "match_float"),
        ("gptq", {"clip_search": "no"}, "clip_search"),
        ("normtweaking", {"base_options": {"damp": -1}}, "base_options.damp"),
        ("normtweaking", {"base_options": {"epochs": 1}}, "base_options.epochs"),
        ("normtweaking", {"base_options": [1]}, "base_options"),
    ],
)
def test_bad_options_name_the_field(method: str, options: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_method(method, QuantSpec(), build_loss("mse"), options)
    assert info.value.field == field


def test_rtn_takes_only_incoherence_and_clip_search() -> None:
    with pytest.raises(ConfigError, match=r"Unknown method option: epochs\. Valid options: incoherence, clip_search$"):
        build_method("rtn", QuantSpec(), build_loss("mse"), {"epochs": 1})


def test_each_method_has_a_default_loss_for_jobs_that_name_none() -> None:
    assert JobSpec(model="m", method="tesseraq").loss == "l2"
    assert JobSpec(model="m", method="gptq").loss == "mse"
    assert JobSpec(model="m", method="tesseraq", loss="l2_sw").loss == "l2_sw"
    with pytest.raises(ConfigError) as info:
        JobSpec(model="m", method="nope")
    assert info.value.field == "method"
    assert validated(JobSettings, {"model": "m", "method": "tesseraq"}).loss == "l2"
    with pytest.raises(ConfigError, match="Unknown quantization method: nope") as info:
        validated(JobSettings, {"model": "m", "method": "nope"})
    assert info.value.field == "method"


def test_normtweak_learning_rate_grows_linearly_with_depth() -> None:
    method = build_method("normtweaking", QuantSpec(), build_loss("mse"), {"lr": 1e-4, "depth_scale": 4.0})
    assert method.learning_rate(0, 5) == pytest.approx(1e-4)
    assert method.learning_rate(2, 5) == pytest.approx(3e-4)
    assert method.learning_rate(4, 5) == pytest.approx(5e-4)
