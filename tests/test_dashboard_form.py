"""The submit form's values against the request model: lm-eval fields and the export default."""

from __future__ import annotations

from api.dashboard_views import form_defaults, form_values_of, request_from_form


def _form(**values: str) -> dict:
    return {**form_defaults(), "model": "m", "group_size": "32", **values}


def test_lm_eval_fields_become_the_request_and_come_back_as_typed() -> None:
    form = _form(**{"evaluation.lm_eval.tasks": "arc_easy, tasks/local.yaml", "evaluation.lm_eval.limit": "5"})
    request, errors = request_from_form(form)
    assert errors == {} and request is not None
    lm_eval = request.evaluation.lm_eval
    assert lm_eval is not None
    assert (lm_eval.tasks, lm_eval.limit, lm_eval.num_fewshot) == (["arc_easy", "tasks/local.yaml"], 5, None)
    again = form_values_of(request.model_dump(mode="json"))
    assert again["evaluation.lm_eval.tasks"] == "arc_easy, tasks/local.yaml"
    assert (again["evaluation.lm_eval.limit"], again["evaluation.lm_eval.num_fewshot"]) == ("5", "")


def test_no_lm_eval_fields_ask_for_none() -> None:
    request, errors = request_from_form(_form())
    assert errors == {} and request is not None and request.evaluation.lm_eval is None


def test_a_limit_without_tasks_is_an_error_on_the_tasks_field() -> None:
    request, errors = request_from_form(_form(**{"evaluation.lm_eval.num_fewshot": "2"}))
    assert request is None
    assert list(errors) == ["evaluation.lm_eval.tasks"] and "at least 1 item" in errors["evaluation.lm_eval.tasks"]


def test_a_negative_limit_is_an_error_on_its_own_field() -> None:
    request, errors = request_from_form(
        _form(**{"evaluation.lm_eval.tasks": "arc_easy", "evaluation.lm_eval.limit": "0"})
    )
    assert request is None and "greater than or equal to 1" in errors["evaluation.lm_eval.limit"]


def test_the_form_defaults_to_the_automatic_export_and_refuses_it_beside_another() -> None:
    assert form_defaults()["export_formats"] == ["auto"]
    request, errors = request_from_form({**_form(), "export_formats": ["auto", "fake_quant"]})
    assert request is None and "auto chooses the format itself" in errors["export_formats"]
