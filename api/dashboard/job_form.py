"""The dashboard's submit form, laid out from the job's settings model (quant_core.job_settings).

Each leaf of ``JobRequest`` is one form field; its kind comes from its type (a mapping is a JSON
box, a list of a Literal a row of checkboxes, an optional integer a box that may stay empty), its
label and help from its title and description, its choices from its Literal or its registry. A
setting added to the model appears in the form, and its value reaches the request, with no change
here; ``SECTIONS`` only says under which heading it goes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

import annotated_types
from pydantic import ValidationError
from pydantic_core import PydanticUndefined
from starlette.datastructures import FormData

from quant_core.errors import placed
from quant_core.job_settings import Setting, leaf_settings, set_path
from swq_shared.jobspec import JobRequest

Kind = Literal["text", "select", "int", "optional_int", "json", "checkbox", "checkboxes", "list"]
# Headings, in order: the settings whose path starts with one of the prefixes; "Run" takes the rest.
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Model", ("model",)),
    ("Weight quantization", ("bits", "group_size", "symmetric")),
    ("Size budget (instead of one width)", ("budget.",)),
    ("Calibration method and loss", ("method", "loss")),
    ("Calibration data", ("calibration.",)),
    ("Evaluation", ("evaluation.",)),
    ("Run", ()),
)


@dataclass(frozen=True)
class FormField:
    """One input of the form: ``name`` is the setting's dotted path (also the request's error ``loc``)."""

    name: str
    label: str
    help: str
    kind: Kind
    choices: tuple[str, ...]
    blank: str  # a select's empty option, for a setting that may be left unset
    attrs: str  # HTML attributes from the field's constraints (min, max, required)
    setting: Setting


def _kind(setting: Setting) -> tuple[Kind, tuple[str, ...]]:
    annotation = setting.info.annotation
    optional = type(None) in get_args(annotation)
    inner = next((a for a in get_args(annotation) if a is not type(None)), annotation) if optional else annotation
    if setting.choices is not None:
        return "select", tuple(setting.choices.names())
    if get_origin(inner) is Literal:
        return "select", tuple(get_args(inner))
    if get_origin(inner) is dict or (setting.flag is not None and setting.flag.kind == "key_value"):
        return "json", ()
    if get_origin(inner) is list:
        item = get_args(inner)[0]
        return ("checkboxes", tuple(get_args(item))) if get_origin(item) is Literal else ("list", ())
    if inner is bool:
        return "checkbox", ()
    if inner is int:
        return ("optional_int" if optional else "int"), ()
    return "text", ()


def _attrs(setting: Setting, kind: Kind) -> str:
    found = []
    for constraint in setting.info.metadata:
        if isinstance(constraint, annotated_types.Ge) and kind in ("int", "optional_int"):
            found.append(f'min="{constraint.ge}"')
        elif isinstance(constraint, annotated_types.Le) and kind in ("int", "optional_int"):
            found.append(f'max="{constraint.le}"')
    if setting.info.is_required() and not setting.in_optional_section:
        found.append("required")
    return " ".join(found)


def _blank(setting: Setting, kind: Kind) -> str:
    """A select's empty choice when the setting may be unset: the description's "unset: ..." words."""
    if kind != "select" or setting.default is not None:
        return ""
    _, _, meaning = (setting.info.description or "").partition("unset: ")
    return meaning.split(" (")[0] or "unset"


def _field(setting: Setting) -> FormField:
    kind, choices = _kind(setting)
    name = setting.path
    label = setting.info.title or name.rsplit(".", 1)[-1].replace("_", " ").capitalize()
    if kind == "json":
        label += " (JSON)"
    help_text = setting.info.description or ""
    if kind == "list":
        help_text = f"comma-separated: {help_text}"
    return FormField(name, label, help_text, kind, choices, _blank(setting, kind), _attrs(setting, kind), setting)


FIELDS: tuple[FormField, ...] = tuple(_field(s) for s in leaf_settings(JobRequest))
BY_NAME = {f.name: f for f in FIELDS}


def sections() -> list[tuple[str, list[FormField]]]:
    """The fields under their headings, each field under the first heading whose prefix it has."""
    placed: dict[str, list[FormField]] = {title: [] for title, _ in SECTIONS}
    for form_field in FIELDS:
        title = next(
            (t for t, prefixes in SECTIONS if any(form_field.name.startswith(p) for p in prefixes)), SECTIONS[-1][0]
        )
        placed[title].append(form_field)
    return [(title, fields) for title, fields in placed.items() if fields]


_MISSING = object()


def _path_value(body: Mapping[str, Any], path: str, missing: Any = None) -> Any:
    value: Any = body
    for part in path.split("."):
        value = value.get(part, missing) if isinstance(value, Mapping) else missing
    return value


def _shown(form_field: FormField, value: Any) -> Any:
    """A setting's value as the form shows it."""
    if form_field.kind == "checkbox":
        return bool(value)
    if form_field.kind == "checkboxes":
        return [str(v) for v in value or []]
    if value is None:
        return ""
    if form_field.kind == "json":
        return json.dumps(value) if value else ""
    if form_field.kind == "list":
        return ", ".join(str(item) for item in value)
    return str(value)


def values_of(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A stored job spec as form values; a setting the spec predates shows its default."""
    values = {}
    for form_field in FIELDS:
        value, parent = _path_value(spec, form_field.name, _MISSING), form_field.name.rpartition(".")[0]
        if value is _MISSING or (value is None and parent and _path_value(spec, parent) is None):
            default = form_field.setting.default  # an lm-eval section left out shows its defaults too
            value = None if default is PydanticUndefined else default
        values[form_field.name] = _shown(form_field, value)
    return values


def defaults() -> dict[str, Any]:
    """The form's initial values: the request model's own defaults, so the form and the API agree (the loss
    left unset: the method chosen gives its own)."""
    return {**values_of(JobRequest(model="-").model_dump(mode="json")), "model": "", "loss": ""}


def values_from(form: FormData) -> dict[str, Any]:
    """What the user sent, to parse and to show again beside errors."""
    values: dict[str, Any] = {}
    for form_field in FIELDS:
        if form_field.kind == "checkbox":
            values[form_field.name] = form.get(form_field.name) is not None
        elif form_field.kind == "checkboxes":
            values[form_field.name] = [str(v) for v in form.getlist(form_field.name)]
        else:
            values[form_field.name] = str(form.get(form_field.name, "") or "").strip()
    return values


def _parsed(form_field: FormField, raw: Any) -> tuple[Any, bool]:
    """(value, whether to send it); an empty box sends nothing, so the setting keeps its default,
    except an optional number whose default is set (group size): empty means unset there."""
    if form_field.kind == "checkbox":
        return bool(raw), True
    if form_field.kind == "checkboxes":
        return list(raw or []), True
    if raw == "":
        return None, form_field.kind == "optional_int" and form_field.setting.default is not None
    if form_field.kind == "json":
        return json.loads(raw), True
    if form_field.kind == "list":
        items = [item.strip() for item in raw.split(",") if item.strip()]
        return items, bool(items)
    if form_field.name == "group_size" and raw in ("0", "-1"):
        return None, True
    return raw, True


def request_from(values: Mapping[str, Any]) -> tuple[JobRequest | None, dict[str, str]]:
    """A JobRequest from the form's values, or the errors keyed by form field ("" for the whole form).

    Numbers go to pydantic as typed, so its own messages and ``loc`` apply. A section that may be
    left out (lm-eval, the size budget) is sent only when one of its boxes without a default (its tasks,
    its bits per weight) is filled in: the boxes that show a default would otherwise send it always.
    """
    body: dict[str, Any] = {}
    errors: dict[str, str] = {}
    sections_given: set[str] = set()
    for form_field in FIELDS:
        try:
            value, send = _parsed(form_field, values.get(form_field.name, ""))
        except json.JSONDecodeError as exc:
            errors[form_field.name] = f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            continue
        if send and form_field.kind == "json" and not isinstance(value, dict):
            errors[form_field.name] = 'must be a JSON object, e.g. {"key": "value"}'
            continue
        if send:
            set_path(body, form_field.name, value)
            if form_field.setting.in_optional_section and form_field.setting.default in (None, PydanticUndefined):
                sections_given.add(form_field.name.rsplit(".", 1)[0])
    for form_field in FIELDS:
        section = form_field.name.rsplit(".", 1)[0]
        if form_field.setting.in_optional_section and section not in sections_given:
            parent, _, name = section.rpartition(".")
            container = _path_value(body, parent) if parent else body
            if isinstance(container, dict):
                container.pop(name, None)
    if errors:
        return None, errors
    try:
        request = JobRequest.model_validate(body)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            loc, message = placed(error)
            errors.setdefault(field_for(loc), message)
        return None, errors
    return request, {}


def field_for(loc: Any) -> str:
    """The form field an error path belongs to (``loss_options.sw_block_size`` -> ``loss_options``)."""
    parts = [str(p) for p in loc if p != "body"]
    for size in range(len(parts), 0, -1):
        name = ".".join(parts[:size])
        if name in BY_NAME:
            return name
    return ""
