"""The compare view's arithmetic: the share of a baseline's gap to float that another run recovers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from api.dashboard.views import JobRow, accuracy_table, gap_recovered, ppl_table


def _row(ppl: dict, accuracy: dict | None = None) -> JobRow:
    return JobRow(
        id="0123456789abcdef",
        status="succeeded",
        model="m",
        method="omniquant",
        loss="mse",
        bits=3,
        group_size=64,
        labels={},
        created_at=datetime.now(UTC),
        duration_s=1.0,
        blocks_done=2,
        num_blocks=2,
        ppl=ppl,
        accuracy=accuracy or {},
    )


@pytest.mark.parametrize(
    ("reference", "value", "float_value", "expected"),
    [
        (60.0, 55.0, 38.0, 100 * 5 / 22),  # perplexity: lower is better
        (0.50, 0.55, 0.60, 50.0),  # accuracy: higher is better
        (60.0, 62.0, 38.0, -100 * 2 / 22),  # worse than the baseline
        (60.0, 55.0, 60.0, None),  # no gap to recover
        (None, 55.0, 38.0, None),
    ],
)
def test_gap_recovered_is_the_papers_metric(reference, value, float_value, expected) -> None:
    result = gap_recovered(reference, value, float_value)
    assert result == (pytest.approx(expected) if expected is not None else None)


def test_tables_measure_every_run_against_the_first() -> None:
    baseline = _row({"persuasion": (38.0, 60.0)}, {"arc acc": (0.6, 0.5)})
    hybrid = _row({"persuasion": (38.0, 55.0)}, {"arc acc": (0.6, 0.55)})
    (ppl,) = ppl_table([baseline, hybrid])
    assert ppl["recovered"] == [None, pytest.approx(100 * 5 / 22)]
    (acc,) = accuracy_table([baseline, hybrid])
    assert acc["text"] == "arc acc" and acc["recovered"] == [None, pytest.approx(50.0)]


def test_lm_eval_metrics_pair_up_per_task_and_metric() -> None:
    from api.dashboard.views import _accuracy

    metrics = {"lm_eval.before.arc_easy.acc": 0.6, "lm_eval.after.arc_easy.acc": 0.5, "perplexity.after.x": 9.0}
    assert _accuracy(metrics) == {"arc_easy acc": (0.6, 0.5)}
