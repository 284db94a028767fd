"""Keeping a job's lease alive while it runs, and noticing when it is gone.

A thread renews the lease every ``heartbeat_seconds``. The lease is lost when the database refuses a
renewal (the job was re-queued or finished by someone else) or when no renewal has succeeded for a
whole lease period (the reaper may already have handed the job to another worker). From then on the
attempt stops at its next check and writes nothing more: its writes are fenced by the lease token
in any case.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

from swq_shared.db import session_scope
from swq_shared.jobs import LeaseLostError, renew_lease
from swq_shared.retry import DATABASE_DOWN
from swq_shared.settings import Settings

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Context manager renewing ``lease_token`` on ``job_id`` in the background."""

    def __init__(self, settings: Settings, job_id: str, lease_token: str) -> None:
        self.settings, self.job_id, self.token = settings, job_id, lease_token
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._finishing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def _run(self) -> None:
        last_renewed = time.monotonic()
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                with session_scope(self.settings.resolved_database_url) as session:
                    renew_lease(session, self.job_id, self.token, self.settings.lease_seconds)
                last_renewed = time.monotonic()
            except LeaseLostError:
                if not self._finishing.is_set():  # else: the outcome just recorded released it
                    log.error("job %s: lease taken over or job finished elsewhere; stopping this attempt", self.job_id)
                self._lost.set()
                return
            except DATABASE_DOWN as exc:
                log.warning("job %s: lease renewal failed (%s)", self.job_id, type(exc).__name__)
                if time.monotonic() - last_renewed > self.settings.lease_seconds:
                    log.error("job %s: lease not renewed for a whole lease period; stopping", self.job_id)
                    self._lost.set()
                    return

    def finishing(self) -> None:
        """The attempt is about to record its outcome, which releases the lease: renewals may fail now."""
        self._finishing.set()

    def check(self) -> None:
        """Raise LeaseLostError once the lease is gone: the attempt must stop here."""
        if self._lost.is_set():
            raise LeaseLostError(f"job {self.job_id}: lease lost")

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
