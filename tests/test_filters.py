"""Label and status filters: one rule for the REST API and the dashboard."""

from __future__ import annotations

import pytest

from api.dashboard.views import parse_label_filter, parse_status_filter
from swq_shared.jobs import LabelFilterError, parse_label_filters


@pytest.mark.parametrize(
    ("items", "labels"),
    [
        ([], {}),
        (["team=nlp"], {"team": "nlp"}),
        (["team=nlp", "run=3"], {"team": "nlp", "run": "3"}),
        (["k="], {"k": ""}),
    ],
)
def test_key_value_items_become_labels(items: list[str], labels: dict[str, str]) -> None:
    assert parse_label_filters(items) == labels


@pytest.mark.parametrize("item", ["team", "=nlp", "team=n\x00lp", "\x00=x"])
def test_an_item_without_a_key_or_with_a_nul_is_refused_by_name(item: str) -> None:
    with pytest.raises(LabelFilterError, match="is not KEY=VALUE"):
        parse_label_filters([item])


def test_the_dashboard_applies_the_same_rule_to_its_text_field() -> None:
    assert parse_label_filter("team=nlp, run=3") == ({"team": "nlp", "run": "3"}, None)
    labels, error = parse_label_filter("team=n\x00lp")  # accepted before; REST refused it
    assert labels == {} and error is not None and "KEY=VALUE" in error


def test_an_unknown_status_is_an_error_on_the_dashboard_as_on_rest() -> None:
    assert parse_status_filter("") is None and parse_status_filter("running") is None
    error = parse_status_filter("sleeping")
    assert error is not None and "'sleeping' is not a job status" in error and "succeeded" in error
