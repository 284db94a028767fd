"""Method and loss options as pydantic models: each option one field with its type, range, default
and a line of description, which ``swquant methods`` and ``GET /v1/methods`` show.

The value kinds below are what a user's YAML or JSON may hold: true/false is never a number, NaN
and infinities never a setting, and counts have a ceiling (a typo or an attack, never a schedule).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)

from quant_core.errors import ConfigError, config_error

# Counts (epochs, steps, batch sizes, grid points) above this are refused up front rather than
# holding a worker for years or exhausting its memory.
MAX_COUNT = 1_000_000
MIN_BITS, MAX_BITS = 2, 8  # the grid widths a job may ask for
MAX_SAMPLES = 4096  # calibration windows a job may ask for (its blocks' or its tuning's)


def _finite(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def one_of(*choices: str) -> AfterValidator:
    """A string option that takes one of ``choices`` (kept as tuples where other code reads them)."""

    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of: {', '.join(choices)}")
        return value

    return AfterValidator(check)


Number = Annotated[float, BeforeValidator(_finite)]
PositiveNumber = Annotated[Number, Field(gt=0)]
NonNegativeNumber = Annotated[Number, Field(ge=0)]
Fraction = Annotated[Number, Field(ge=0, le=1)]
Count = Annotated[StrictInt, Field(ge=0, le=MAX_COUNT)]
PositiveCount = Annotated[StrictInt, Field(gt=0, le=MAX_COUNT)]


class Options(BaseModel):
    """Base of a method's or the losses' options; ``what`` names them in errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    what: ClassVar[str] = "option"

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> Self:
        """The options, or a ConfigError naming the unknown or bad one."""
        valid = list(cls.model_fields)
        for name in options:
            if name not in valid:
                listed = ", ".join(valid) if valid else "none"
                raise ConfigError(f"Unknown {cls.what}: {name}. Valid options: {listed}", name)
        try:
            return cls.model_validate(dict(options))
        except ValidationError as exc:
            raise config_error(exc) from exc

    @classmethod
    def described(cls) -> dict[str, dict[str, Any]]:
        """Each option's default and description, for the catalog."""
        listed = {}
        for name, info in cls.model_fields.items():
            default = info.get_default(call_default_factory=True)
            listed[name] = {
                "default": list(default) if isinstance(default, tuple) else default,
                "description": info.description or "",
            }
        return listed


def as_options(kind: type[Options], value: Any, field: str) -> Options:
    """``value`` as ``kind``'s options (its model, or a mapping validated here); a bad option named by its
    path under ``field``."""
    if isinstance(value, kind):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{field} must be a mapping of {kind.what}s to values", field)
    try:
        return kind.from_dict(value)
    except ConfigError as exc:
        raise ConfigError(str(exc), f"{field}.{exc.field}" if exc.field else field) from exc


def options_of(kind: type[Options]) -> WrapValidator:
    """Validate a field as ``kind``'s options, with :meth:`Options.from_dict`'s messages."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        return as_options(kind, value, str(info.field_name))

    return WrapValidator(validate)


def typed_by(name_field: str, types: Callable[[str], type[Options] | None]) -> WrapValidator:
    """Validate an options field as the options model that a sibling field's name selects.

    ``method_options`` are GPTQ's options when ``method`` is ``gptq``: declared as the union of every
    method's model (which OpenAPI and the form show), they are validated once, as the one model the
    name picks, where a request enters. A name that failed its own check leaves the options as given:
    its error is the one reported.
    """

    def validate(value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        kind = types(info.data[name_field]) if name_field in info.data else None
        return value if kind is None else as_options(kind, value, str(info.field_name))

    return WrapValidator(validate)
