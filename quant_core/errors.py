"""Errors a user can act on.

Every configuration error names the field it concerns, so the CLI can print it and the service can
turn it into an HTTP 422 whose message points at the offending field.
"""


class ConfigError(ValueError):
    """A job setting is invalid; ``field`` is its dotted path (e.g. ``loss.sw_block_size``)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class CancelledError(RuntimeError):
    """The caller asked the engine to stop; raised between blocks, never mid-block."""
