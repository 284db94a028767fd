"""What a job can ask for: every registered method and loss with its options and their defaults.

Read from the registries and the option models themselves (quant_core.options), so the list a user sees
(``swquant methods``, ``GET /v1/methods``) is always the list the code accepts.
"""

from __future__ import annotations

import sys
from typing import Any

from quant_core.finetune import FinetuneOptions
from quant_core.losses import LOSSES, LossOptions
from quant_core.methods import METHODS


def _summary(cls: type) -> str:
    """The first line of the method's module docstring (where its paper and idea are stated)."""
    doc = sys.modules[cls.__module__].__doc__ or cls.__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def catalog() -> dict[str, Any]:
    """Methods (summary, default loss, options with default and description), losses (names, shared
    options) and the end-to-end tuning stage's options."""
    methods = {
        name: {
            "summary": _summary(cls),
            "default_loss": cls.default_loss,
            "whole_model": cls.whole_model,
            "options": cls.options_type.described(),
        }
        for name, cls in METHODS.items()
    }
    return {
        "methods": methods,
        "losses": {"names": list(LOSSES), "options": LossOptions.described()},
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
