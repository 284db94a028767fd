"""What a job can ask for: every registered method and loss with its options and their defaults.

Read from the declarations the requests are checked against (quant_core.method_options,
quant_core.loss_options, quant_core.finetune_options), which the method and loss registries are built
on, so the list a user sees (``swquant methods``, ``GET /v1/methods``) is the list the code accepts; the
API serves it without loading torch.
"""

from __future__ import annotations

from typing import Any

from quant_core.finetune_options import FinetuneOptions
from quant_core.loss_options import LOSS_NAMES, LossOptions
from quant_core.method_options import METHOD_OPTIONS


def catalog() -> dict[str, Any]:
    """Methods (summary, default loss, options with default and description), losses (names, shared
    options) and the end-to-end tuning stage's options."""
    methods = {
        name: {
            "summary": options.summary,
            "default_loss": options.default_loss,
            "whole_model": options.whole_model,
            "options": options.described(),
        }
        for name, options in METHOD_OPTIONS.items()
    }
    return {
        "methods": methods,
        "losses": {"names": list(LOSS_NAMES), "options": LossOptions.described()},
        "finetune": {"options": FinetuneOptions.described()},
    }


def _option_lines(options: dict[str, dict[str, Any]]) -> list[str]:
    if not options:
        return ["      (no options)"]
    return [f"      {name}={option['default']}  {option['description']}" for name, option in options.items()]


def format_catalog(entries: dict[str, Any]) -> str:
    """The catalog as text for a terminal: each method, then each of its options on a line."""
    lines = ["Methods (--method NAME; options with --method-opt NAME=VALUE):"]
    for name, method in entries["methods"].items():
        lines.append(f"  {name}  [default loss: {method['default_loss']}]  {method['summary']}")
        lines += _option_lines(method["options"])
    lines.append("Losses (--loss NAME; options with --loss-opt NAME=VALUE, each loss reads those it uses):")
    lines.append("  " + ", ".join(entries["losses"]["names"]))
    lines += _option_lines(entries["losses"]["options"])
    lines.append("End-to-end tuning after calibration (--finetune NAME=VALUE):")
    lines += _option_lines(entries["finetune"]["options"])
    return "\n".join(lines)
