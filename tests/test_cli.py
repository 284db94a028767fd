"""The ``swquant quantize`` command end to end on a tiny saved model, and its configuration errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from quant_core.cli import main
from quant_core.errors import ConfigError
from quant_core.finetune_options import FinetuneOptions
from quant_core.job import CalibrationSpec, JobSpec
from quant_core.job_settings import JobSettings, validated
from quant_core.lightcompress_config import read_lightcompress
from quant_core.losses import LOSSES, LossOptions
from quant_core.methods import METHODS
from quant_core.model_io import load_model
from quant_core.options import Options

SMALL = ["--n-samples", "4", "--seq-len", "32", "--eval-max-windows", "3", "--bits", "3", "--group-size", "32"]


@pytest.fixture(scope="module")
def quantized(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("omni")
    argv = [
        "quantize",
        "--model",
        str(tiny_llama_dir),
        "--method",
        "omniquant",
        "--loss",
        "mse_sw",
        "--loss-opt",
        "sw_num_projections=8",
        "--method-opt",
        "epochs=1",
        "--out",
        str(out),
        *SMALL,
    ]
    assert main(argv) == 0
    return out


def test_report_holds_settings_blocks_perplexity_and_versions(quantized: Path) -> None:
    report = json.loads((quantized / "report.json").read_text())
    assert report["spec"]["method"] == "omniquant" and report["spec"]["loss"] == "mse_sw"
    assert report["spec"]["loss_options"] == {"sw_num_projections": 8}
    assert report["seed"] == 0 and report["calibration_tokens"] == 4 * 32
    assert [b["index"] for b in report["blocks"]] == [0, 1]
    assert all(b["loss_before"] > 0 and b["seconds"] > 0 for b in report["blocks"])
    ppl = report["perplexity"]["persuasion"]
    assert ppl["before"] > 1 and ppl["after"] > 1
    assert {"torch", "transformers", "swquant", "python"} <= set(report["versions"])
    assert report["peak_host_mb"] > 0


def test_saved_model_loads_with_transformers_and_reproduces_the_reported_perplexity(quantized: Path) -> None:
    """The default export is the packed checkpoint here (a 64-wide model, group 32, no rotation)."""
    from quant_core.corpus import BUNDLED_TEXTS
    from quant_core.eval_windows import evaluation_windows
    from quant_core.perplexity import perplexity

    report = json.loads((quantized / "report.json").read_text())
    assert list(report["exports"]) == ["pack_quantized"]
    directory = quantized / report["exports"]["pack_quantized"]["path"]
    assert directory.name == "packed" and (directory / "README.md").exists()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    config = json.loads((directory / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 3
    _, tokenizer = load_model(str(directory))
    text = evaluation_windows(tokenizer, BUNDLED_TEXTS["persuasion"], 32, 3)
    ours = perplexity(model, text.ids, scored=text.scored)
    assert ours == pytest.approx(report["perplexity"]["persuasion"]["after"], rel=1e-5)


@pytest.mark.parametrize(
    ("method", "options", "loss"),
    [
        ("gptq", ["act_order=true"], "mse"),
        ("awq", ["n_grid=4"], "mse"),
        ("tesseraq", ["rounds=2", "steps_per_round=2"], "l2_sw"),
        ("normtweaking", ["lr=1e-3"], "mse_sw"),
        ("normtweaking", ["lr=1e-3", "base_options={incoherence: hadamard}"], "mse_sw"),
        ("omniquant", ["steps=4"], "mse_sw"),
        ("rtn", ["clip_search=true"], "mse"),
    ],
)
def test_every_method_runs_through_the_same_command_and_report(
    method: str, options: list[str], loss: str, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    argv = ["quantize", "--model", str(tiny_llama_dir), "--method", method, "--out", str(tmp_path), *SMALL]
    for option in options:
        argv += ["--method-opt", option]
    assert main([*argv, "--loss", loss]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["spec"]["method"] == method and report["spec"]["loss"] == loss
    assert len(report["blocks"]) == 2 and all(b["method_stats"] for b in report["blocks"])
    if method != "awq":  # on 4 x 32 tokens AWQ's module-level search need not carry to the block output
        assert sum(b["mse_after"] for b in report["blocks"]) < sum(b["mse_before"] for b in report["blocks"])
    assert report["perplexity"]["persuasion"]["after"] > 0


@pytest.mark.parametrize(
    ("method", "dtype"),  # normtweaking and awq change norm weights too: those travel unpacked
    [("gptq", "float32"), ("gptq", "bfloat16"), ("normtweaking", "float32"), ("awq", "float32")],
)
def test_packed_export_loads_with_plain_transformers_and_matches_the_fake_quant_logits(
    method: str, dtype: str, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    argv = ["quantize", "--model", str(tiny_llama_dir), "--method", method, "--out", str(tmp_path), *SMALL]
    assert main([*argv, "--dtype", dtype, "--export", "fake_quant", "pack_quantized"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["spec"]["dtype"] == dtype
    packed = report["exports"]["pack_quantized"]
    assert packed["compressed_tensors"] == "0.20.0" and packed["bytes"] < packed["fp16_bytes"]
    assert any("3-bit" in reason for reason in packed["vllm_blockers"])
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        fake = AutoModelForCausalLM.from_pretrained(tmp_path / report["exports"]["fake_quant"]["path"])(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / packed["path"])(ids).logits
    assert torch.allclose(loaded, fake, atol=1e-5 * fake.abs().max().item())


def test_an_unpackable_group_size_is_refused_before_calibration(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    argv = ["quantize", "--model", str(tiny_llama_dir), "--method", "rtn", "--out", str(tmp_path), *SMALL]
    assert main([*argv, "--group-size", "48", "--export", "pack_quantized"]) == 2
    assert "ragged last group" in capsys.readouterr().err and not (tmp_path / "report.json").exists()


def test_tesseraq_jobs_default_to_the_l2_loss(tiny_llama_dir: Path, tmp_path: Path) -> None:
    argv = ["quantize", "--model", str(tiny_llama_dir), "--method", "tesseraq", "--out", str(tmp_path), *SMALL]
    assert main([*argv, "--method-opt", "rounds=1", "--method-opt", "steps_per_round=1"]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["spec"]["loss"] == "l2"


def test_lightcompress_yaml_config_runs(tiny_llama_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "omni.yml"
    config.write_text(f"""
model: {{type: Llama, path: {tiny_llama_dir}, torch_dtype: auto}}
calib: {{name: custom, path: austen, n_samples: 4, bs: -1, seq_len: 32, seed: 7}}
eval: {{path: persuasion, seq_len: 32}}
quant:
  method: RTN
  weight: {{bit: 4, symmetric: True, granularity: per_group, group_size: 32}}
save: {{save_fake: True, save_path: {tmp_path / "out"}}}
""")
    assert main(["quantize", "--config", str(config), "--eval-max-windows", "2"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["spec"]["quant"] == {"bits": 4, "symmetric": True, "group_size": 32}
    assert report["spec"]["method"] == "rtn" and report["seed"] == 7


def test_lightcompress_omniquant_special_section_maps_to_options(tmp_path: Path) -> None:
    config = tmp_path / "c.yml"
    config.write_text("""
quant:
  method: OmniQuant
  weight: {bit: 2, symmetric: False, granularity: per_channel}
  special: {aug_loss: False, lwc: True, let: False, lwc_lr: 0.005, epochs: 40, wd: 0,
            loss_method: l2_sw, loss_kwargs: {sw_num_projections: 32, sw_block_size: 64}}
""")
    settings, save_path = read_lightcompress(config)
    assert settings["method"] == "omniquant" and settings["group_size"] is None and settings["bits"] == 2
    assert save_path is None
    assert settings["method_options"] == {
        "lr": 0.005,
        "epochs": 40,
        "weight_decay": 0,
        "schedule": "paper",
        "init": "full",
    }
    assert settings["loss"] == "l2_sw"
    assert settings["loss_options"] == {"sw_num_projections": 32, "sw_block_size": 64}


@pytest.mark.parametrize(("value", "init"), [("True", "clip_search"), ("False", "full")])
def test_lightcompress_search_clip_init_chooses_omniquants_start(tmp_path: Path, value: str, init: str) -> None:
    config = tmp_path / "c.yml"
    config.write_text(f"quant:\n  method: OmniQuant\n  special: {{search_clip_init: {value}, epochs: 2}}\n")
    assert read_lightcompress(config)[0]["method_options"]["init"] == init


def test_lightcompress_aug_loss_is_refused_rather_than_ignored(tmp_path: Path) -> None:
    config = tmp_path / "c.yml"
    config.write_text("quant:\n  method: OmniQuant\n  special: {aug_loss: True, epochs: 2}\n")
    with pytest.raises(ConfigError, match="aug_loss: False is supported") as info:
        read_lightcompress(config)
    assert info.value.field == "quant.special.aug_loss"


def test_lightcompress_gptq_special_section_maps_to_options(tmp_path: Path) -> None:
    config = tmp_path / "gptq.yml"
    config.write_text(
        "quant:\n  method: GPTQ\n  weight: {bit: 3, symmetric: False, granularity: per_group, group_size: 64}\n"
        "  special: {actorder: True, static_groups: True, percdamp: 0.02, blocksize: 64, true_sequential: True}\n"
    )
    settings, _ = read_lightcompress(config)
    assert settings["method"] == "gptq"
    assert settings["method_options"] == {
        "act_order": True,
        "static_groups": True,
        "damp": 0.02,
        "block_size": 64,
        "clip_search": False,
    }


def test_lightcompress_let_is_refused_rather_than_ignored(tmp_path: Path) -> None:
    config = tmp_path / "c.yml"
    config.write_text("quant: {method: OmniQuant, special: {let: True}}\n")
    with pytest.raises(ConfigError) as info:
        read_lightcompress(config)
    assert info.value.field == "quant.special.let"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "awq2"}, "method"),
        ({"loss": "huber"}, "loss"),
        ({"loss_options": {"sw_p": 5}}, "loss_options.sw_p"),
        ({"loss_options": {"sw_block_size": 48}}, "loss_options.sw_block_size"),
        ({"loss": "mse_ms_sw", "loss_options": {"sw_scales": [1, 48]}}, "loss_options.sw_scales"),
        ({"method_options": {"epochs": -1}}, "method_options.epochs"),
        ({"method_options": {"lr_typo": 1}}, "method_options.lr_typo"),
        ({"calibration": {"n_samples": 0}}, "calibration.n_samples"),
    ],
)
def test_bad_job_settings_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        validated(JobSettings, {"model": "m", **kwargs})
    assert info.value.field == field


def test_a_spec_built_in_code_checks_its_device_and_options() -> None:
    with pytest.raises(ConfigError) as info:
        JobSpec(model="m", device="tpu")
    assert info.value.field == "device"
    with pytest.raises(ConfigError) as info:
        JobSpec(model="m", method="rtn", method_options={"lr_typo": 1})
    assert info.value.field == "method_options.lr_typo"


def test_block_size_that_does_not_divide_seq_len_fails_up_front_with_the_contract_message() -> None:
    with pytest.raises(ConfigError, match=r"^seq_len must be divisible by sw_block_size$"):
        body = {"model": "m", "loss": "mse_sw", "loss_options": {"sw_block_size": 100}}
        validated(JobSettings, {**body, "calibration": {"seq_len": 512}})


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match=r"no \.safetensors"):
        load_model(str(tmp_path))


def test_cli_prints_a_clear_error_and_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "quant_core.cli", "quantize", "--model", str(tmp_path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "swquant: error: model:" in result.stderr and "Traceback" not in result.stderr


def test_time_left_is_the_remaining_blocks_at_the_mean_block_time() -> None:
    from api.commands.cli import time_left

    assert time_left([10.0, 20.0], 3) == "0:45"
    assert time_left([61.0], 2) == "2:02"
    assert time_left([], 5) == "?"


def test_every_export_carries_a_model_card_with_the_reports_settings_and_figures(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    argv = ["quantize", "--model", str(tiny_llama_dir), "--method", "rtn", "--out", str(tmp_path), *SMALL]
    assert main([*argv, "--export", "fake_quant", "pack_quantized"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for export_format, export in report["exports"].items():
        assert not Path(export["path"]).is_absolute()
        card = (tmp_path / export["path"] / "README.md").read_text()
        _, front, body = card.split("---\n", 2)
        meta = yaml.safe_load(front)
        assert meta["base_model"] == str(tiny_llama_dir) and meta["library_name"] == "transformers"
        assert meta["quantization"] == {
            "method": "rtn",
            "loss": "mse",
            "bits": report["spec"]["quant"]["bits"],
            "group_size": report["spec"]["quant"]["group_size"],
            "symmetric": report["spec"]["quant"]["symmetric"],
            "format": export_format,
        }
        ppl = report["perplexity"]["persuasion"]
        assert f"| persuasion | {ppl['before']:.2f} | {ppl['after']:.2f} |" in body
        assert f"seed {report['seed']}" in body and "from_pretrained" in body
        assert "| end-to-end tuning | none |" in body


def test_methods_lists_every_registered_method_and_loss_with_the_defaults_the_code_applies(capsys) -> None:
    assert main(["methods", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert set(listed["methods"]) == set(METHODS) and listed["losses"]["names"] == list(LOSSES)
    for name, method in listed["methods"].items():
        built = METHODS[name].options_type.from_dict({})
        defaults = {k: option["default"] for k, option in method["options"].items()}
        # nested options (NormTweaking's base_options) are listed as given: none set, the base's defaults
        applied = built.model_dump(mode="json", exclude={k for k, v in vars(built).items() if isinstance(v, Options)})
        assert defaults == {**applied, **{k: {} for k, v in vars(built).items() if isinstance(v, Options)}}
        assert all(option["description"] for option in method["options"].values()), name
    assert listed["methods"]["tesseraq"]["default_loss"] == "l2"
    assert listed["losses"]["options"]["sw_num_projections"]["default"] == LossOptions().sw_num_projections
    assert all(option["description"] for option in listed["losses"]["options"].values())
    tuning = listed["finetune"]["options"]
    assert {k: option["default"] for k, option in tuning.items()} == vars(FinetuneOptions())
    assert all(option["description"] for option in tuning.values())
    assert main(["methods"]) == 0 and "--method-opt NAME=VALUE" in capsys.readouterr().out


def test_run_job_returns_the_typed_report_that_report_json_holds(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from quant_core.job import EvaluationSpec
    from quant_core.pipeline import REPORT_NAME, run_job
    from quant_core.quantizer import QuantSpec

    spec = JobSpec(
        model=str(tiny_llama_dir),
        quant=QuantSpec(3, False, 32),
        method="rtn",
        calibration=CalibrationSpec(n_samples=2, seq_len=32),
        evaluation=EvaluationSpec(max_windows=2),
    )
    report = run_job(spec, tmp_path)
    assert json.loads((tmp_path / REPORT_NAME).read_text()) == json.loads(json.dumps(report.to_dict()))
    ppl = report.perplexity["persuasion"]
    assert ppl.before > 1 and ppl.after > 1 and ppl.after != ppl.before
    assert report.exports["pack_quantized"].path == "packed" and report.exports["pack_quantized"].vllm_blockers
    assert [record.index for record in report.blocks] == [0, 1]
    assert report.seconds.total >= report.seconds.calibration > 0
    stages = report.peak_memory_by_stage["host_mb"]
    assert list(stages) == ["load", "evaluate_full_precision", "blocks", "evaluate_quantized", "export"]
    assert report.peak_host_mb == max(stages.values()) > 0
