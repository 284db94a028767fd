"""Checkpoints stored in half precision: the rounding is checked against a naive loop, and a job's
checkpoint is never larger than the half-precision model and scores what the report says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from quant_core.cli import main
from quant_core.corpus import BUNDLED_TEXTS
from quant_core.errors import ConfigError
from quant_core.export_dtype import holds_grid, resolve_export_dtype, round_to_export_dtype
from quant_core.job import CalibrationSpec, JobSpec
from quant_core.job_settings import JobSettings, validated
from quant_core.layer_schemes import LayerSchemes
from quant_core.methods.base import layer_grid, write_quantized
from quant_core.model_structure import find_decoder_blocks, quantizable_linears, weight_matrix
from quant_core.pipeline import run_job
from quant_core.quantizer import QuantSpec, fake_quantize, grid_params
from tests.test_cli import SMALL
from tests.tiny_models import build_model


def _attach_grids(model: torch.nn.Module, spec: QuantSpec) -> None:
    for block in find_decoder_blocks(model):
        quantized = {}
        for name, layer in quantizable_linears(block).items():
            matrix = weight_matrix(layer)
            quantized[name] = (fake_quantize(matrix, spec), *grid_params(matrix, spec))
        write_quantized(block, quantized)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rounding_keeps_every_code_and_rebuilds_weights_from_the_stored_scale(dtype, symmetric) -> None:
    spec = QuantSpec(4, symmetric, 32)
    model = build_model("llama")
    _attach_grids(model, spec)
    before = {
        name: (weight_matrix(module).clone(), *(t.clone() for t in grid))
        for name, module in model.named_modules()
        if (grid := layer_grid(module)) is not None
    }

    round_to_export_dtype(model, dtype, LayerSchemes(spec))

    for name, (old_weight, old_scale, zero) in before.items():
        module = model.get_submodule(name)
        new_weight, new_scale = weight_matrix(module), module.quant_scale
        assert new_weight.dtype == torch.float32  # the model still computes as before
        for row in range(old_weight.shape[0]):  # the naive loop: one weight at a time
            for col in range(old_weight.shape[1]):
                group = col // spec.group_size
                code = round(old_weight[row, col].item() / old_scale[row, group].item()) + zero[row, group].item()
                stored = torch.tensor(old_scale[row, group].item()).to(dtype).float()
                assert new_scale[row, group] == stored
                expected = torch.tensor((code - zero[row, group].item()) * stored.item()).to(dtype).float()
                assert new_weight[row, col] == expected
    for parameter in model.parameters():  # every value survives a cast to the checkpoint's dtype
        assert torch.equal(parameter, parameter.to(dtype).float())


def test_auto_is_float16_for_a_float16_model_and_bfloat16_otherwise() -> None:
    w4 = QuantSpec(bits=4)
    assert resolve_export_dtype("auto", torch.float16, w4) == torch.float16
    assert resolve_export_dtype("auto", torch.float32, w4) == torch.bfloat16
    assert resolve_export_dtype("auto", None, w4) == torch.bfloat16
    assert resolve_export_dtype("float32", torch.bfloat16, w4) == torch.float32


def _stored_dtypes(directory: Path) -> set[str]:
    dtypes = set()
    for shard in directory.glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            dtypes |= {str(handle.get_slice(key).get_dtype()) for key in handle.keys()}  # noqa: SIM118 (a safe_open handle is no dict)
    return dtypes


def _weight_bytes(directory: Path) -> int:
    return sum(shard.stat().st_size for shard in directory.glob("*.safetensors"))


@pytest.mark.parametrize(("export_dtype", "stored"), [("auto", "BF16"), ("float32", "F32")])
def test_a_jobs_fake_quant_checkpoint_is_half_precision_unless_asked_and_scores_as_reported(
    export_dtype: str, stored: str, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """The tiny model is saved in float32; auto writes it back in bfloat16, half its size."""
    argv = ["quantize", "--model", str(tiny_llama_dir), "--method", "gptq", "--out", str(tmp_path), *SMALL]
    assert main([*argv, "--export", "fake_quant", "--export-dtype", export_dtype]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    directory = tmp_path / report["exports"]["fake_quant"]["path"]
    assert report["exports"]["fake_quant"]["dtype"] == stored.replace("BF16", "bfloat16").replace("F32", "float32")
    assert _stored_dtypes(directory) == {stored}
    source = _weight_bytes(tiny_llama_dir)
    assert _weight_bytes(directory) <= (source / 2 if stored == "BF16" else source) * 1.01  # header bytes

    from quant_core.corpus import BUNDLED_TEXTS
    from quant_core.eval_windows import evaluation_windows
    from quant_core.model_io import load_tokenizer
    from quant_core.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    text = evaluation_windows(load_tokenizer(str(directory)), BUNDLED_TEXTS["persuasion"], 32, 3)
    ours = perplexity(model, text.ids, scored=text.scored)
    assert ours == pytest.approx(report["perplexity"]["persuasion"]["after"], rel=1e-5)


def test_a_bfloat16_model_is_never_written_back_larger(tmp_path: Path, tokenizer) -> None:
    source = tmp_path / "bf16"
    build_model("llama").to(torch.bfloat16).save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = tmp_path / "out"
    argv = ["quantize", "--model", str(source), "--method", "rtn", "--out", str(out), *SMALL, "--export", "fake_quant"]
    assert main(argv) == 0
    directory = out / json.loads((out / "report.json").read_text())["exports"]["fake_quant"]["path"]
    assert _stored_dtypes(directory) == {"BF16"}
    assert _weight_bytes(directory) <= _weight_bytes(source) * 1.01


def test_a_streamed_job_cannot_change_the_dtype_it_calibrated_in() -> None:
    with pytest.raises(ConfigError) as caught:
        body = {"model": "m", "method": "rtn", "lazy_load": True, "dtype": "bfloat16", "export_dtype": "float32"}
        validated(JobSettings, body)
    assert caught.value.field == "export_dtype"
    with pytest.raises(ConfigError) as caught:
        validated(JobSettings, {"model": "m", "method": "rtn", "export_dtype": "float64"})
    assert caught.value.field == "export_dtype"


def _naive_codes_survive(dtype: torch.dtype, spec: QuantSpec) -> bool:
    """Every offset of the grid times a few hundred scales, stored in ``dtype``, read back to its code."""
    scales = torch.logspace(-4, -1, 301).to(dtype).float()  # step sizes as a checkpoint of ``dtype`` keeps them
    offsets = (
        torch.arange(-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1)) if spec.symmetric else torch.arange(2**spec.bits)
    )
    weights = (offsets[:, None] * scales[None, :]).to(dtype).float()
    return bool(torch.equal(torch.round(weights / scales), offsets[:, None].float().expand_as(weights)))


@pytest.mark.parametrize("bits", [2, 3, 4, 7, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_holds_grid_is_exactly_where_stored_weights_give_their_codes_back(
    bits: int, symmetric: bool, dtype: torch.dtype
) -> None:
    spec = QuantSpec(bits=bits, symmetric=symmetric, group_size=32)
    assert holds_grid(dtype, spec) == _naive_codes_survive(dtype, spec)


def test_an_asymmetric_8_bit_grid_is_never_stored_in_bfloat16() -> None:
    w8 = QuantSpec(bits=8, symmetric=False, group_size=32)
    assert not holds_grid(torch.bfloat16, w8) and holds_grid(torch.bfloat16, QuantSpec(8, True, 32))
    assert resolve_export_dtype("auto", torch.bfloat16, w8) == torch.float16
    for field in ("dtype", "export_dtype"):
        with pytest.raises(ConfigError, match="cannot hold the W8") as err:
            validated(JobSettings, {"model": "m", "bits": 8, "symmetric": False, "group_size": 32, field: "bfloat16"})
        assert err.value.field == field


def test_calibrating_on_the_evaluation_text_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """By name when the spec is made (before a job is queued), and by file when the job loads its texts."""
    with pytest.raises(ConfigError, match="also the evaluation text 'persuasion'") as err:
        validated(JobSettings, {"model": str(tiny_llama_dir), "calibration": {"text": "persuasion"}})
    assert err.value.field == "calibration.text"
    same_file = str(BUNDLED_TEXTS["persuasion"])
    spec = JobSpec(model=str(tiny_llama_dir), calibration=CalibrationSpec(text=same_file, n_samples=2, seq_len=16))
    with pytest.raises(ConfigError, match="also the evaluation text 'persuasion'") as err:
        run_job(spec, tmp_path)
    assert err.value.field == "calibration.text" and not (tmp_path / "report.json").exists()
