"""What a job can ask for: every registered method and loss with its options and their defaults.

Read from the registries and the option dataclasses themselves, so the list a user sees
(``swquant methods``, ``GET /v1/methods``) is always the list the code accepts.
"""

from __future__ import annotations

import sys
from dataclasses import MISSING, fields
from typing import Any

from quant_core.losses import LOSSES, LossOptions
from quant_core.methods import METHODS


def _defaults(options_type: type) -> dict[str, Any]:
    defaults = {}
    for f in fields(options_type):
        value = f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default
        defaults[f.name] = list(value) if isinstance(value, tuple) else value
    return defaults


def _summary(cls: type) -> str:
    """The first line of the method's module docstring (where its paper and idea are stated)."""
    doc = sys.modules[cls.__module__].__doc__ or cls.__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def catalog() -> dict[str, Any]:
    """Methods (summary, default loss, options with defaults) and losses (names, shared options)."""
    methods = {
        name: {
            "summary": _summary(cls),
            "default_loss": cls.default_loss,
            "whole_model": cls.whole_model,
            "options": _defaults(cls.options_type),
        }
        for name, cls in METHODS.items()
    }
    return {"methods": methods, "losses": {"names": list(LOSSES), "options": _defaults(LossOptions)}}


def format_catalog(entries: dict[str, Any]) -> str:
    """The catalog as text for a terminal."""
    lines = ["Methods (--method NAME; options with --method-opt NAME=VALUE):"]
    for name, method in entries["methods"].items():
        lines.append(f"  {name}  [default loss: {method['default_loss']}]  {method['summary']}")
        options = "  ".join(f"{k}={v}" for k, v in method["options"].items()) or "(no options)"
        lines.append(f"      {options}")
    lines.append("Losses (--loss NAME; options with --loss-opt NAME=VALUE, each loss reads those it uses):")
    lines.append("  " + ", ".join(entries["losses"]["names"]))
    lines.append("      " + "  ".join(f"{k}={v}" for k, v in entries["losses"]["options"].items()))
    return "\n".join(lines)
