"""Reading a LightCompress (llmc) YAML config into our job settings (quant_core.job_settings), so
existing configs run as is.

Mapped: ``model.path``, ``calib.path/n_samples/seq_len/seed``, ``eval.path/seq_len/bs``,
``quant.method``, ``quant.weight.bit/symmetric/granularity/group_size``, ``quant.special.loss_method``,
``quant.special.loss_kwargs`` and each method's own special keys (OmniQuant's ``epochs``, ``lwc_lr``,
``wd``, ``batch_size``; GPTQ's ``blocksize``, ``percdamp``, ``actorder``, ``static_groups``).
Switches that only matter to llmc's own runtime are accepted and ignored; anything that would
silently change the algorithm (``let: True``, ``lwc: False``, ``aug_loss: True``,
``true_sequential: False``) is refused with the field named.

An llmc OmniQuant config means llmc's schedule: its epochs at a constant learning rate from the full
range, so it runs with our ``schedule: paper``; ``search_clip_init: True`` starts from the searched
clipping instead (``init: clip_search``), as llmc does. An llmc GPTQ config runs without our
clipping search, as llmc's GPTQ does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from quant_core.errors import ConfigError
from quant_core.job_settings import set_path

# Per method: llmc special key -> our option; keys ignored; keys that must hold one value.
_SPECIAL_TO_OPTION = {
    "omniquant": {"epochs": "epochs", "lwc_lr": "lr", "wd": "weight_decay", "batch_size": "batch_size"},
    "gptq": {"blocksize": "block_size", "percdamp": "damp", "actorder": "act_order", "static_groups": "static_groups"},
}
# Keys whose llmc value becomes one of our option values.
_SPECIAL_TO_CHOICE = {"omniquant": {"search_clip_init": ("init", {True: "clip_search", False: "full"})}}
_IGNORED_SPECIAL = {
    "omniquant": {"let_lr", "use_shift", "alpha", "deactive_amp"},
    "gptq": {"chunk_num", "owq"},
}
_REQUIRED_SPECIAL = {"omniquant": {"lwc": True, "let": False, "aug_loss": False}, "gptq": {"true_sequential": True}}
_IMPLIED_OPTIONS: dict[str, dict[str, Any]] = {
    "omniquant": {"schedule": "paper", "init": "full"},
    "gptq": {"clip_search": False},
}


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a mapping", name)
    return value


def read_lightcompress(path: Path) -> tuple[dict[str, Any], str | None]:
    """The job settings (a partial :class:`~quant_core.job_settings.JobSettings` body) found in an
    llmc YAML file, and its ``save.save_path``; absent keys are left out."""
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"config: cannot read {path}: {exc}", "config") from exc
    return parse_lightcompress(config)


def parse_lightcompress(config: Any) -> tuple[dict[str, Any], str | None]:
    """The job settings body and the save path of a parsed llmc document."""
    if not isinstance(config, dict):
        raise ConfigError("config: the YAML file must hold a mapping", "config")
    model, calib, evaluation = _section(config, "model"), _section(config, "calib"), _section(config, "eval")
    quant = _section(config, "quant")
    weight, special = _section(quant, "weight"), _section(quant, "special")
    body: dict[str, Any] = {}
    for path, value in (
        ("model", model.get("path")),
        ("calibration.text", calib.get("path")),
        ("calibration.n_samples", calib.get("n_samples")),
        ("calibration.seq_len", calib.get("seq_len")),
        ("seed", calib.get("seed")),
        ("evaluation.texts", [evaluation["path"]] if evaluation.get("path") is not None else None),
        ("evaluation.seq_len", evaluation.get("seq_len")),
        ("evaluation.batch_size", evaluation.get("bs")),
        ("method", str(quant["method"]).lower() if "method" in quant else None),
        ("bits", weight.get("bit")),
        ("symmetric", weight.get("symmetric")),
        ("loss", special.get("loss_method")),
    ):
        if value is not None:
            set_path(body, path, value)
    if weight.get("granularity") == "per_channel":
        body["group_size"] = None
    elif "group_size" in weight:
        body["group_size"] = weight["group_size"]
    body["loss_options"] = dict(special.get("loss_kwargs") or {})
    body["method_options"] = _method_options(special, body.get("method", ""))
    return body, _section(config, "save").get("save_path")


def _method_options(special: dict[str, Any], method: str) -> dict[str, Any]:
    options: dict[str, Any] = {**_IMPLIED_OPTIONS.get(method, {})}
    to_option, required = _SPECIAL_TO_OPTION.get(method, {}), _REQUIRED_SPECIAL.get(method, {})
    to_choice = _SPECIAL_TO_CHOICE.get(method, {})
    for key, value in special.items():
        if key in ("loss_method", "loss_kwargs") or key in _IGNORED_SPECIAL.get(method, ()):
            continue
        if key in to_choice:
            option, choices = to_choice[key]
            if not isinstance(value, bool):
                raise ConfigError(f"quant.special.{key} must be True or False", f"quant.special.{key}")
            options[option] = choices[value]
            continue
        if key in required:
            if value != required[key]:
                raise ConfigError(
                    f"quant.special.{key}: only {key}: {required[key]} is supported", f"quant.special.{key}"
                )
            continue
        if key not in to_option:
            raise ConfigError(f"quant.special.{key} is not a recognised {method} setting", f"quant.special.{key}")
        options[to_option[key]] = value
    return options
