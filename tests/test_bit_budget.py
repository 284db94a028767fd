"""A size budget through the whole job: the allocation stays within it, every linear is calibrated,
tuned and packed at its own scheme, the checkpoint's config groups say which, and a resumed run takes
the stored allocation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from quant_core.bit_budget import MEGABYTE_BITS, BudgetSpec
from quant_core.checkpoint import ALLOCATION_FILE, saved_files
from quant_core.errors import ConfigError
from quant_core.export import unpacked_weight
from quant_core.job import CalibrationSpec, EvaluationSpec, JobSpec
from quant_core.job_settings import JobSettings, validated
from quant_core.pipeline import run_job
from quant_core.quantizer import QuantSpec

BUDGET = BudgetSpec(bits_per_weight=3.2, widths=(2, 3, 4), group_sizes=(16, 32), samples=3)


def _spec(model_dir: Path, budget: BudgetSpec = BUDGET, **extra: object) -> JobSpec:
    base: dict[str, object] = {
        "model": str(model_dir),
        "quant": QuantSpec(bits=4, symmetric=True, group_size=32),
        "method": "gptq",
        "calibration": CalibrationSpec(n_samples=4, seq_len=32),
        "evaluation": EvaluationSpec(max_windows=2),
        "budget": budget,
        "export_formats": ("fake_quant", "pack_quantized"),
    }
    return JobSpec(**{**base, **extra})  # type: ignore[arg-type]


def _schemes_by_layer(config: dict) -> dict[str, QuantSpec]:
    """Each packed layer's scheme as the checkpoint's config groups declare it (a runtime's reading)."""
    found: dict[str, QuantSpec] = {}
    for group in config["quantization_config"]["config_groups"].values():
        weights = group["weights"]
        spec = QuantSpec(bits=weights["num_bits"], symmetric=weights["symmetric"], group_size=weights["group_size"])
        for target in group["targets"]:
            assert target not in found, f"{target} is in two config groups"
            found[target] = spec
    return found


@pytest.fixture(scope="module")
def budgeted(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("budgeted")
    spec = _spec(tiny_llama_dir, finetune={"epochs": 1, "lr": 1e-2})
    return run_job(spec, out, checkpoint_dir=out / "checkpoint").to_dict(), out


def test_the_allocation_spends_at_most_the_budget_on_mixed_schemes(budgeted: tuple[dict, Path]) -> None:
    report, _ = budgeted
    allocation = report["allocation"]
    assert allocation["stored_bits"] <= allocation["budget_bits"] == math.floor(3.2 * allocation["linear_weights"])
    assert allocation["bits_per_weight"] <= 3.2
    assert len({unit["scheme"] for unit in allocation["units"]}) > 1  # 3.2 bits lies between uniform widths
    # 2 blocks of q/k/v, o, gate/up and down; each unit's measured cost at every candidate it was offered
    assert [unit["block"] for unit in allocation["units"]] == [0] * 4 + [1] * 4
    for unit in allocation["units"]:
        assert unit["cost"] == unit["costs"][unit["scheme"]] and len(unit["costs"]) == 6
    assert report["method_stats"]["finetune"]["steps"] > 0


def test_every_linear_is_packed_at_its_allocated_scheme_with_exact_storage(budgeted: tuple[dict, Path]) -> None:
    """The packed tensors hold exactly the bits the allocation counted (codes, 16-bit scales; the grids
    are symmetric), each layer unpacked at its config group's scheme gives the fake-quantized weight,
    and transformers loads the checkpoint to the same model."""
    report, out = budgeted
    config = json.loads((out / "packed" / "config.json").read_text())
    declared = _schemes_by_layer(config)
    allocated = {
        f"model.layers.{unit['block']}.{name}": QuantSpec(
            bits=unit["bits"], symmetric=unit["symmetric"], group_size=unit["group_size"]
        )
        for unit in report["allocation"]["units"]
        for name in unit["linears"]
    }
    assert declared == allocated
    packed, fake = load_file(out / "packed" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    stored_bits = 0
    for name, spec in allocated.items():
        tensors = {key.removeprefix(f"{name}."): value for key, value in packed.items() if key.startswith(f"{name}.")}
        assert "weight_zero_point" not in tensors
        stored_bits += sum(
            tensors[key].numel() * tensors[key].element_size() * 8 for key in ("weight_packed", "weight_scale")
        )
        reference = fake[f"{name}.weight"]
        assert torch.equal(unpacked_weight(tensors, spec, reference.dtype), reference), name
    assert stored_bits == report["allocation"]["stored_bits"]
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(out / "packed", dtype=torch.float32)(ids).logits
        ours = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)(ids).logits
    # transformers computes (code - zero) * scale in float32, the fake-quantized checkpoint rounded it to
    # bfloat16: the logits differ by that rounding only
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-2)


def test_a_resumed_run_takes_the_stored_allocation(budgeted: tuple[dict, Path], tiny_llama_dir: Path) -> None:
    """The stored blocks were calibrated at the stored allocation: a rerun must not measure again (on other
    hardware its choice could differ), and the allocation travels with the blocks to object storage."""
    report, out = budgeted
    checkpoint = out / "checkpoint"
    assert checkpoint / ALLOCATION_FILE in saved_files(checkpoint, 1)
    stored = json.loads((checkpoint / ALLOCATION_FILE).read_text())
    stored["allocation"]["seconds"] = 12345.0  # a mark only a stored allocation carries
    (checkpoint / ALLOCATION_FILE).write_text(json.dumps(stored))
    rerun = run_job(_spec(tiny_llama_dir, finetune={"epochs": 1, "lr": 1e-2}), out / "rerun", checkpoint_dir=checkpoint)
    resumed = rerun.to_dict()["allocation"]
    assert resumed["seconds"] == 12345.0
    assert resumed["units"] == report["allocation"]["units"]


def test_a_size_in_megabytes_bounds_the_whole_checkpoint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    linear_weights = sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear)
    )
    float_bits = (sum(p.numel() for p in model.parameters()) - linear_weights) * 16  # bfloat16 export
    size_mb = (float_bits + 3 * linear_weights) / MEGABYTE_BITS
    budget = BudgetSpec(size_mb=size_mb, widths=(2, 3, 4), group_sizes=(32,), samples=2)
    allocation = run_job(_spec(tiny_llama_dir, budget, method="rtn"), tmp_path).to_dict()["allocation"]
    assert allocation["budget_bits"] == math.floor(size_mb * MEGABYTE_BITS) - float_bits
    assert float_bits + allocation["stored_bits"] <= size_mb * MEGABYTE_BITS
    with pytest.raises(ConfigError) as caught:
        run_job(
            _spec(tiny_llama_dir, BudgetSpec(size_mb=float_bits / MEGABYTE_BITS / 2), method="rtn"), tmp_path / "small"
        )
    assert caught.value.field == "budget.size_mb"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"budget": {"widths": [2, 4]}}, "budget.bits_per_weight"),
        ({"budget": {"bits_per_weight": 3, "size_mb": 10}}, "budget.bits_per_weight"),
        ({"budget": {"bits_per_weight": 3, "widths": [9]}}, "budget.widths"),
        ({"budget": {"bits_per_weight": 3, "group_sizes": [0]}}, "budget.group_sizes"),
        ({"budget": {"bits_per_weight": 3}, "method": "discquant"}, "method"),
        ({"budget": {"bits_per_weight": 3}, "lazy_load": True}, "lazy_load"),
        ({"budget": {"bits_per_weight": 3}, "world_size": 2, "calibration": {"n_samples": 4}}, "world_size"),
        ({"budget": {"bits_per_weight": 3}, "targets": ["transformers"]}, "symmetric"),
        ({"budget": {"bits_per_weight": 3}, "export_dtype": "bfloat16"}, "export_dtype"),
    ],
)
def test_budget_settings_that_cannot_run_are_refused_naming_the_setting(extra: dict, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validated(JobSettings, {"model": "m", "method": "gptq", **extra})
    assert caught.value.field == field, str(caught.value)


def test_a_budget_for_vllm_must_offer_only_4_bit_widths(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = _spec(tiny_llama_dir, BudgetSpec(bits_per_weight=4.2, widths=(3, 4)), targets=("vllm",))
    with pytest.raises(ConfigError, match="3-bit weights: vLLM's CPU build") as caught:
        run_job(spec, tmp_path)
    assert caught.value.field == "targets"
