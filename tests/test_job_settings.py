"""One declaration of a job's settings (quant_core.job_settings) behind the CLI, REST, LightCompress and form.

``evaluation.batch_size`` is the setting followed end to end: declared once in EvaluationSettings,
it is a flag, a REST field, llmc's ``eval.bs`` and a form box without any other change.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from api.commands.cli import build_parser as service_parser
from api.dashboard.job_form import BY_NAME, request_from
from quant_core.cli import build_parser, job_flags, main, settings_from_args
from quant_core.errors import ConfigError
from quant_core.job import JobSpec
from quant_core.job_settings import JobSettings, leaf_settings, validated
from quant_core.loss_options import LOSS_NAMES
from quant_core.losses import LOSSES
from quant_core.method_options import METHOD_OPTIONS, GptqOptions, OmniQuantOptions
from quant_core.methods import METHODS
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
    assert from_flag.evaluation.batch_size == 2 and JobSpec.from_settings(from_flag).evaluation.batch_size == 2

    schema = JobRequest.model_json_schema()
    batch = schema["$defs"]["EvaluationSettings"]["properties"]["batch_size"]
    assert (batch["default"], batch["minimum"]) == (4, 1)
    from_rest = JobRequest.model_validate({"model": "m", "evaluation": {"batch_size": 8}})
    assert JobSpec.from_settings(from_rest).evaluation.batch_size == 8

    llmc = "model: {path: m}\neval: {path: persuasion, bs: 16}\nquant: {method: RTN, weight: {bit: 4}}\n"
    assert JobSpec.from_settings(request_from_lightcompress(llmc)).evaluation.batch_size == 16

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
    assert isinstance(settings.method_options, OmniQuantOptions)
    assert settings.method_options.epochs == 5 and settings.method_options.lr == 0.01
    assert JobSpec.from_settings(settings).finetune.epochs == 2


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
        JobSpec.from_settings(_settings("--model", "m", "--group-size", "32", *argv))
    assert info.value.field == field


def test_the_command_line_reports_a_bad_setting_by_its_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", "--model", "m", "--out", "x", "--bits", "9"]) == 2
    assert "bits: Input should be less than or equal to 8" in capsys.readouterr().err


def test_the_settings_travel_as_json_and_back() -> None:
    settings = _settings("--model", "m", "--lm-eval-task", "arc_easy", "--eval", "persuasion", "--eval", "brown")
    again = JobSettings.model_validate(json.loads(settings.model_dump_json()))
    assert again == settings and again.evaluation.texts == ["persuasion", "brown"]


def test_the_api_loads_no_numerical_code() -> None:
    """The API checks a request in full without torch or transformers: its own process, since this one has them."""
    code = "import sys, api.app; print([m for m in ('torch', 'transformers') if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_method_options_are_the_methods_own_model_validated_once_and_carried_to_the_job() -> None:
    request = JobRequest.model_validate({"model": "m", "method": "gptq", "method_options": {"damp": 0.05}})
    assert type(request.method_options) is GptqOptions and request.method_options.damp == 0.05
    spec = JobSpec.from_settings(request)
    assert spec.method_options is request.method_options and spec.finetune is request.finetune
    assert spec.build_method().options is request.method_options
    assert request.model_dump(mode="json", exclude_unset=True)["method_options"] == {"damp": 0.05}
    # a GPTQ option under another method is refused by that method's model, naming it
    with pytest.raises(ConfigError, match="Unknown method option: damp") as info:
        validated(JobSettings, {"model": "m", "method": "rtn", "method_options": {"damp": 0.05}})
    assert info.value.field == "method_options.damp"


def test_the_schema_describes_each_methods_options() -> None:
    schema = JobRequest.model_json_schema()
    union = {ref["$ref"].rsplit("/", 1)[-1] for ref in schema["properties"]["method_options"]["anyOf"]}
    assert union == {options.__name__ for options in METHOD_OPTIONS.values()}
    assert schema["$defs"]["GptqOptions"]["properties"]["damp"]["default"] == 0.01
    assert schema["properties"]["finetune"]["$ref"].endswith("/FinetuneOptions")


def test_every_declared_method_is_a_registered_class_reading_its_facts_from_its_options() -> None:
    assert set(METHODS) == set(METHOD_OPTIONS)
    for name, method in METHODS.items():
        declared = METHOD_OPTIONS[name]
        assert method.options_type is declared and method.name == name
        assert (method.default_loss, method.whole_model) == (declared.default_loss, declared.whole_model)
    assert tuple(LOSSES) == LOSS_NAMES
