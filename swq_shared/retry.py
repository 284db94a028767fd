"""Retrying calls to services that come back: a database restart, a storage endpoint's hiccup."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError

log = logging.getLogger(__name__)
T = TypeVar("T")

# A dropped or refused database connection: worth retrying, unlike a constraint or data error.
DATABASE_DOWN = (OperationalError, InterfaceError)


def retry_call(
    call: Callable[[], T],
    errors: tuple[type[BaseException], ...],
    attempts: int,
    backoff_s: float,
    what: str,
    max_backoff_s: float = 30.0,
) -> T:
    """``call()``, retried on ``errors`` up to ``attempts`` times with doubling back-off.

    The last error propagates, so the caller decides what a service that stayed down means (a job
    failed with a clear message, or a lease left to lapse). Only the error's type is logged: database
    and storage errors can carry connection URLs.
    """
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except errors as exc:
            if attempt == attempts:
                raise
            delay = min(backoff_s * 2 ** (attempt - 1), max_backoff_s)
            log.warning(
                "%s failed (%s), attempt %d of %d; retrying in %.1fs",
                what,
                type(exc).__name__,
                attempt,
                attempts,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")
