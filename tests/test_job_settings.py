"""One declaration of a job's settings (quant_core.job_settings) behind the CLI, REST, LightCompress and form.

``evaluation.batch_size`` is the setting followed end to end: declared once in EvaluationSettings,
it is a flag, a REST field, llmc's ``eval.bs`` and a form box without any other change.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api.commands.cli import build_parser as service_parser
from api.dashboard.job_form import BY_NAME, request_from
from quant_core.cli import build_parser, job_flags, main, settings_from_args
from quant_core.errors import ConfigError
from quant_core.job_settings import JobSettings, leaf_settings
from swq_shared.jobspec import JobRequest, request_from_lightcompress


def _settings(*argv: str) -> JobSettings:
    return settings_from_args(build_parser().parse_args(["quantize", *argv]))[0]


def test_the_command_lines_defaults_are_the_models() -> None:
    assert _settings("--model", "m") == JobSettings(model="m")
    submit = service_parser().parse_args(["submit", "--model", "m"])
    assert settings_from_args(submit)[0] == JobSettings(model="m")


def test_every_flag_is_declared_once_and_shown_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    names = [setting.flag.name for setting in job_flags() if setting.flag]
    assert len(names) == len(set(names))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in names)
    assert (
        "--eval-batch-size EVAL_BATCH_SIZE evaluation windows per forward pass (memory against speed) (default: 4)"
        in (help_text)
    )
    flagless = [s.path for s in leaf_settings() if s.flag is None]
    assert flagless == ["evaluation.lm_eval.baseline"]  # on by default; REST and the form can turn it off


def test_a_new_setting_flows_from_flag_rest_lightcompress_and_form_into_the_job(tmp_path: Path) -> None:
    from_flag = _settings("--model", "m", "--group-size", "32", "--eval-batch-size", "2")
    assert from_flag.evaluation.batch_size == 2 and from_flag.to_job_spec().eval.batch_size == 2

    schema = JobRequest.model_json_schema()
    batch = schema["$defs"]["EvaluationSettings"]["properties"]["batch_size"]
    assert (batch["default"], batch["minimum"]) == (4, 1)
    from_rest = JobRequest.model_validate({"model": "m", "evaluation": {"batch_size": 8}})
    assert from_rest.to_job_spec().eval.batch_size == 8

    llmc = "model: {path: m}\neval: {path: persuasion, bs: 16}\nquant: {method: RTN, weight: {bit: 4}}\n"
    assert request_from_lightcompress(llmc).to_job_spec().eval.batch_size == 16

    assert BY_NAME["evaluation.batch_size"].kind == "int" and 'min="1"' in BY_NAME["evaluation.batch_size"].attrs
    from_form, errors = request_from({"model": "m", "evaluation.batch_size": "3", "export_formats": ["auto"]})
    assert errors == {} and from_form is not None and from_form.evaluation.batch_size == 3


def test_flags_override_the_config_and_join_its_options(tmp_path: Path) -> None:
    config = tmp_path / "c.yml"
    config.write_text(
        "model: {path: m}\ncalib: {n_samples: 4, seq_len: 32}\n"
        "quant: {method: OmniQuant, weight: {bit: 3, group_size: 32}, special: {epochs: 2, lwc_lr: 0.01}}\n"
    )
    settings = _settings(
        "--config", str(config), "--n-samples", "8", "--method-opt", "epochs=5", "--finetune", "epochs=2"
    )
    assert (settings.calibration.n_samples, settings.calibration.seq_len, settings.bits) == (8, 32, 3)
    assert settings.method_options["epochs"] == 5 and settings.method_options["lr"] == 0.01
    assert settings.to_job_spec().build_finetune().epochs == 2


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--seq-len", "4"], "calibration.seq_len"),
        (["--eval-batch-size", "0"], "evaluation.batch_size"),
        (["--lm-eval-limit", "5"], "evaluation.lm_eval.tasks"),  # a limit needs tasks
        (["--method", "gptq", "--method-opt", "bogus=1"], "method_options.bogus"),
        (["--export", "auto", "fake_quant"], "export_formats"),
        (["--finetune", "epochs=-1"], "finetune.epochs"),
        (["--finetune", "steps=3"], "finetune.steps"),
        (["--method", "discquant", "--finetune", "epochs=1"], "finetune.epochs"),  # already end to end
    ],
)
def test_a_bad_setting_is_refused_naming_its_field(argv: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        _settings("--model", "m", "--group-size", "32", *argv).to_job_spec()
    assert info.value.field == field


def test_the_command_line_reports_a_bad_setting_by_its_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", "--model", "m", "--out", "x", "--bits", "9"]) == 2
    assert "bits: Input should be less than or equal to 8" in capsys.readouterr().err


def test_the_settings_travel_as_json_and_back() -> None:
    settings = _settings("--model", "m", "--lm-eval-task", "arc_easy", "--eval", "persuasion", "--eval", "brown")
    again = JobSettings.model_validate(json.loads(settings.model_dump_json()))
    assert again == settings and again.evaluation.texts == ["persuasion", "brown"]
