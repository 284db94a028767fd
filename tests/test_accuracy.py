"""lm-eval accuracy in a job: real lm-evaluation-harness on a local multiple-choice task, checked
against the same log-likelihoods computed directly with the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from api.commands.cli import build_parser
from quant_core.accuracy import LmEvalSpec, task_scores
from quant_core.cli import main, settings_from_args
from quant_core.errors import ConfigError
from quant_core.job import JobSpec
from quant_core.job_settings import JobSettings, validated
from swq_shared.jobspec import JobRequest
from tests.lm_eval_task import QUESTIONS, write_task
from tests.tiny_models import build_model, build_tokenizer


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    return write_task(tmp_path / "tasks")


def direct_accuracy(model: torch.nn.Module, tokenizer, limit: int | None = None) -> float:
    """The choice with the highest summed log-likelihood of its tokens after the context, per question."""
    correct = 0
    questions = QUESTIONS[:limit] if limit else QUESTIONS
    for context, choices, answer in questions:
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        scores = []
        for choice in choices:
            whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([whole[:-1]])).logits[0].double().log_softmax(-1)
            positions = range(len(context_ids) - 1, len(whole) - 1)
            scores.append(sum(float(logits[p, whole[p + 1]]) for p in positions))
        correct += int(max(range(len(choices)), key=scores.__getitem__) == answer)
    return correct / len(questions)


def test_task_scores_match_a_direct_log_likelihood_computation(task_file: Path) -> None:
    model, tokenizer = build_model("llama", seed=3), build_tokenizer()
    model.eval()
    scores = task_scores(model, tokenizer, LmEvalSpec(tasks=(str(task_file),)), "cpu")
    assert scores["next_word"]["acc"] == pytest.approx(direct_accuracy(model, tokenizer))


def test_a_job_reports_accuracy_before_and_after_and_caches_the_float_scores(
    task_file: Path, tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWQUANT_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["quantize", "--model", str(tiny_llama_dir), "--method", "rtn", "--bits", "2", "--group-size", "32"]
    argv += ["--n-samples", "4", "--seq-len", "32", "--eval-max-windows", "2", "--lm-eval-task", str(task_file)]
    argv += ["--lm-eval-limit", "5", "--export", "fake_quant", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    acc = report["lm_eval"]["next_word"]["acc"]
    tokenizer = build_tokenizer()
    float_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").eval()
    assert acc["before"] == pytest.approx(direct_accuracy(float_model, tokenizer, 5))
    assert acc["after"] == pytest.approx(direct_accuracy(quantized, tokenizer, 5))
    assert len(list((tmp_path / "cache" / "lm_eval").glob("*.json"))) == 1
    assert "next_word" in (tmp_path / "out" / "model" / "README.md").read_text()


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"tasks": []}, "evaluation.lm_eval.tasks"),
        ({"tasks": "hellaswag"}, "evaluation.lm_eval.tasks"),
        ({"tasks": ["x"], "limit": 0}, "evaluation.lm_eval.limit"),
        ({"tasks": ["x"], "num_fewshot": -1}, "evaluation.lm_eval.num_fewshot"),
    ],
)
def test_bad_lm_eval_settings_name_the_field(options: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        validated(JobSettings, {"model": "m", "evaluation": {"lm_eval": options}})
    assert info.value.field == field


def test_a_task_file_that_does_not_exist_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="task file not found") as info:
        LmEvalSpec(tasks=(str(tmp_path / "missing.yaml"),)).resolved_tasks()
    assert info.value.field == "evaluation.lm_eval.tasks"


def test_the_request_carries_lm_eval_into_the_job_spec() -> None:
    request = JobRequest.model_validate(
        {"model": "m", "group_size": 32, "evaluation": {"lm_eval": {"tasks": ["arc_easy"], "limit": 50}}}
    )
    spec = JobSpec.from_settings(request).evaluation.lm_eval
    assert spec == LmEvalSpec(tasks=("arc_easy",), limit=50)
    with pytest.raises(ConfigError) as info:
        body = {"model": "m", "group_size": 32, "lazy_load": True}
        validated(JobRequest, {**body, "evaluation": {"lm_eval": {"tasks": ["arc_easy"]}}})
    assert info.value.field == "lazy_load"
    with pytest.raises(ConfigError) as info:
        validated(JobRequest, {"model": "m", "evaluation": {"lm_eval": {"tasks": ["  "]}}})
    assert info.value.field == "evaluation.lm_eval.tasks"


def test_submit_flags_carry_lm_eval_into_the_request() -> None:
    argv = ["submit", "--model", "m", "--group-size", "32", "--lm-eval-task", "arc_easy", "--lm-eval-limit", "5"]
    settings, _ = settings_from_args(build_parser().parse_args(argv))
    request = JobRequest.model_validate(settings.model_dump())
    assert request.evaluation.lm_eval is not None
    assert (request.evaluation.lm_eval.tasks, request.evaluation.lm_eval.limit) == (["arc_easy"], 5)
    assert request.evaluation.lm_eval.num_fewshot is None
