"""Method registry and option rules (the numerical behaviour is in test_engine.py)."""

from __future__ import annotations

import pytest

from quant_core.errors import ConfigError
from quant_core.losses import build_loss
from quant_core.methods import METHODS, build_method
from quant_core.quantizer import QuantSpec


@pytest.mark.parametrize(("bits", "epochs"), [(2, 40), (3, 20), (4, 20), (8, 20)])
def test_omniquant_defaults_to_the_papers_schedule(bits: int, epochs: int) -> None:
    method = build_method("omniquant", QuantSpec(bits=bits), build_loss("mse"))
    assert method.epochs == epochs
    assert method.options.lr == 1e-2 and method.options.batch_size == 1


def test_explicit_epochs_override_the_schedule() -> None:
    assert build_method("omniquant", QuantSpec(bits=2), build_loss("mse"), {"epochs": 3}).epochs == 3


def test_unknown_method_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"Unknown quantization method: gptq9\. Valid methods: omniquant, rtn"):
        build_method("gptq9", QuantSpec(), build_loss("mse"))
    assert {"rtn", "omniquant"} <= set(METHODS)


@pytest.mark.parametrize(
    ("options", "field"),
    [({"epochs": 2.5}, "epochs"), ({"lr": 0}, "lr"), ({"batch_size": 0}, "batch_size"), ({"momentum": 1}, "momentum")],
)
def test_bad_omniquant_options_name_the_field(options: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_method("omniquant", QuantSpec(), build_loss("mse"), options)
    assert info.value.field == field


def test_rtn_takes_no_options() -> None:
    with pytest.raises(ConfigError, match=r"Unknown method option: epochs\. Valid options: none"):
        build_method("rtn", QuantSpec(), build_loss("mse"), {"epochs": 1})
