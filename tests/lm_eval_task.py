"""A four-way multiple-choice lm-eval task written on the spot: YAML plus JSONL, no network."""

from __future__ import annotations

import json
from pathlib import Path

QUESTIONS = [
    ("She walked into the", ["room", "of", "was", "and"], 0),
    ("It is a truth universally", ["acknowledged", "the", "room", "she"], 0),
    ("He could not help", ["feeling", "the", "of", "a"], 0),
    ("They were married in the", ["spring", "was", "and", "she"], 0),
    ("Anne had been", ["walking", "the", "of", "and"], 0),
    ("The letter was", ["written", "room", "of", "she"], 0),
]


def write_task(folder: Path) -> Path:
    """The task ``next_word`` in ``folder``; returns the path of its YAML file."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "next_word.jsonl"
    data.write_text("\n".join(json.dumps({"context": c, "choices": ch, "answer": a}) for c, ch, a in QUESTIONS))
    task = folder / "next_word.yaml"
    task.write_text(
        "task: next_word\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {data}}}}}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\n"
    )
    return task
