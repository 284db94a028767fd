"""The submit form, laid out from the settings model, against the request model it builds."""

from __future__ import annotations

from api.dashboard.job_form import FIELDS, defaults, request_from, sections, values_of
from quant_core.job_settings import leaf_settings
from swq_shared.jobspec import JobRequest


def _form(**values: str) -> dict:
    return {**defaults(), "model": "m", "group_size": "32", **values}


def test_lm_eval_fields_become_the_request_and_come_back_as_typed() -> None:
    form = _form(**{"evaluation.lm_eval.tasks": "arc_easy, tasks/local.yaml", "evaluation.lm_eval.limit": "5"})
    request, errors = request_from(form)
    assert errors == {} and request is not None
    lm_eval = request.evaluation.lm_eval
    assert lm_eval is not None
    assert (lm_eval.tasks, lm_eval.limit, lm_eval.num_fewshot) == (["arc_easy", "tasks/local.yaml"], 5, None)
    again = values_of(request.model_dump(mode="json"))
    assert again["evaluation.lm_eval.tasks"] == "arc_easy, tasks/local.yaml"
    assert (again["evaluation.lm_eval.limit"], again["evaluation.lm_eval.num_fewshot"]) == ("5", "")


def test_no_lm_eval_fields_ask_for_none() -> None:
    request, errors = request_from(_form())
    assert errors == {} and request is not None and request.evaluation.lm_eval is None


def test_a_limit_without_tasks_is_an_error_on_the_tasks_field() -> None:
    request, errors = request_from(_form(**{"evaluation.lm_eval.num_fewshot": "2"}))
    assert request is None
    assert list(errors) == ["evaluation.lm_eval.tasks"] and errors["evaluation.lm_eval.tasks"] == "Field required"


def test_a_negative_limit_is_an_error_on_its_own_field() -> None:
    request, errors = request_from(_form(**{"evaluation.lm_eval.tasks": "arc_easy", "evaluation.lm_eval.limit": "0"}))
    assert request is None and "greater than or equal to 1" in errors["evaluation.lm_eval.limit"]


def test_the_form_defaults_to_the_automatic_export_and_refuses_it_beside_another() -> None:
    assert defaults()["export_formats"] == ["auto"]
    request, errors = request_from({**_form(), "export_formats": ["auto", "fake_quant"]})
    assert request is None and "auto chooses the format itself" in errors["export_formats"]


def test_every_setting_is_a_form_field_under_one_heading() -> None:
    assert [f.name for f in FIELDS] == [s.path for s in leaf_settings(JobRequest)]
    placed = [f.name for _, fields in sections() for f in fields]
    assert sorted(placed) == sorted(f.name for f in FIELDS)
    kinds = {f.name: f.kind for f in FIELDS}
    assert kinds["group_size"] == "optional_int" and kinds["bits"] == "int" and kinds["metadata"] == "json"
    assert kinds["export_formats"] == "checkboxes" and kinds["evaluation.texts"] == "list"
    assert kinds["method"] == kinds["loss"] == kinds["queue"] == kinds["dtype"] == "select"


def test_an_empty_group_size_means_per_channel_and_an_empty_seed_its_default() -> None:
    request, errors = request_from(_form(group_size="", seed=""))
    assert errors == {} and request is not None
    assert request.group_size is None and request.seed == 0


def test_a_stored_spec_from_before_a_setting_existed_shows_its_default() -> None:
    stored = JobRequest(model="m").model_dump(mode="json")
    del stored["evaluation"]["batch_size"]
    assert values_of(stored)["evaluation.batch_size"] == "4"
    assert values_of(stored)["evaluation.lm_eval.baseline"] is True
    assert values_of({**stored, "group_size": None})["group_size"] == ""  # per channel, not the default


def test_the_size_budget_is_sent_only_when_its_bits_or_size_are_given() -> None:
    """The budget's boxes with defaults (widths, group sizes, windows) show them without sending the section."""
    assert defaults()["budget.widths"] == "2, 3, 4, 8"
    request, errors = request_from(_form(method="gptq"))
    assert errors == {} and request is not None and request.budget is None
    budget = {"budget.bits_per_weight": "3.5", "budget.widths": "3, 4", "budget.group_sizes": "64"}
    request, errors = request_from(_form(method="gptq", **budget))
    assert errors == {} and request is not None and request.budget is not None
    assert (request.budget.bits_per_weight, request.budget.widths, request.budget.group_sizes) == (3.5, [3, 4], [64])
    assert values_of(request.model_dump(mode="json"))["budget.widths"] == "3, 4"
    request, errors = request_from(_form(method="gptq", **{"budget.size_mb": "80", "budget.bits_per_weight": "3"}))
    assert request is None and "exactly one" in errors["budget.bits_per_weight"]
