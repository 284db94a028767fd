"""What can go wrong with a request, in the service's own words; ``api/routes/errors.py`` maps each to HTTP once.

The request layer the REST API and the dashboard share raises these instead of ``HTTPException``,
so the dashboard can show the same problem on a page or beside a form field without parsing an
HTTP answer, and a new status code or message shape is decided in one place.
"""

from __future__ import annotations

from collections.abc import Sequence


class NotFoundInTenantError(LookupError):
    """A job or artifact that does not exist or belongs to another tenant: reported missing, never forbidden."""


class InvalidFieldError(ValueError):
    """One field of a request is wrong; ``loc`` names it as FastAPI does (``("body", "calibration", "text")``)."""

    def __init__(self, loc: Sequence[str], message: str) -> None:
        super().__init__(message)
        self.loc = tuple(loc)


class QueueUnavailableError(RuntimeError):
    """The job is stored but the broker did not take it; resubmitting with the same idempotency key is safe."""
