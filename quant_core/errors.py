"""Errors a user can act on.

Every configuration error names the field it concerns, so the CLI can print it and the service can
turn it into an HTTP 422 whose message points at the offending field.
"""

import itertools

from pydantic import ValidationError
from pydantic_core import ErrorDetails


class ConfigError(ValueError):
    """A job setting is invalid; ``field`` is its dotted path (e.g. ``loss.sw_block_size``)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def config_error(exc: ValidationError) -> ConfigError:
    """Pydantic's first complaint about settings or options as a ConfigError.

    The field is the setting, or a key of a mapping (``hybrid_weights.sw``), never a list index; a
    ConfigError raised by a check across fields (``model_post_init``) comes out as it was raised.
    """
    error = exc.errors(include_url=False)[0]
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
        return cause
    where = ".".join(str(part) for part in error["loc"])
    named = ".".join(str(part) for part in itertools.takewhile(lambda part: isinstance(part, str), error["loc"]))
    return ConfigError(f"{where}: {str(error['msg']).removeprefix('Value error, ')}", named or None)


def placed(error: ErrorDetails) -> tuple[tuple[str | int, ...], str]:
    """Where one of pydantic's errors belongs and what it says: a ConfigError raised by a check across
    fields (a model validator, whose own location is the whole model) names its field itself."""
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
        return (tuple(cause.field.split(".")) if cause.field else ()), str(cause)
    return tuple(error["loc"]), str(error["msg"])


class CancelledError(RuntimeError):
    """The caller asked the engine to stop; raised between blocks, never mid-block."""
