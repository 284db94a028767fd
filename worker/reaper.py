"""The reaper: hands jobs whose worker died back to the queue, and re-sends jobs the broker forgot.

Why a lease in the database rather than the broker's redelivery alone: Redis re-delivers an
unacknowledged task only after its visibility timeout, which must exceed the longest job (days), and
forgets every message when it restarts without persistence. The database is the source of truth, so
recovery is driven from it. Each worker's main process runs a reaper thread (every
``reaper_interval_seconds``):

- a running job whose lease lapsed (no heartbeat for ``lease_seconds``) goes back to queued and is
  sent again, or ends failed once it has used ``max_attempts``;
- a queued job whose message is not waiting in the broker's queue (Redis restarted and forgot it,
  or a worker died holding it before claiming the job) and that nothing touched for
  ``resend_after_seconds`` is sent again.

Several reapers may run at once: every change is a conditional update, so each job is handled once.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery
from kombu.exceptions import OperationalError as BrokerDown

from swq_shared.db import session_scope
from swq_shared.jobs import claim_resend, requeue_lapsed
from swq_shared.queue import enqueue_job, waiting_task_ids
from swq_shared.retry import DATABASE_DOWN
from swq_shared.settings import Settings

log = logging.getLogger(__name__)
QUEUES = ("gpu", "cpu")


def reap_once(settings: Settings, app: Celery) -> None:
    """One pass; raises when the database or the broker is unreachable (the next pass tries again)."""
    url = settings.resolved_database_url
    with session_scope(url) as session:
        requeued = [(job.id, job.spec) for job in requeue_lapsed(session, settings.max_attempts)]
    for job_id, spec in requeued:
        log.warning("job %s: worker lost, sent to the queue again", job_id)
        enqueue_job(app, job_id, spec)
    waiting = waiting_task_ids(app, {settings.queue, *QUEUES})
    with session_scope(url) as session:
        resend = [(job.id, job.spec) for job in claim_resend(session, settings.resend_after_seconds, waiting)]
    for job_id, spec in resend:
        log.warning("job %s: queued but unknown to the broker, sent again", job_id)
        enqueue_job(app, job_id, spec)


def start_reaper(settings: Settings, app: Celery) -> threading.Event:
    """Run ``reap_once`` every ``reaper_interval_seconds`` in a daemon thread; set the event to stop it."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(settings.reaper_interval_seconds):
            try:
                reap_once(settings, app)
            except (*DATABASE_DOWN, BrokerDown) as exc:
                log.warning("reaper pass skipped: %s unavailable", type(exc).__name__)
            except Exception:  # the thread must outlive any single bad pass
                log.exception("reaper pass failed")

    threading.Thread(target=loop, name="swquant-reaper", daemon=True).start()
    return stop
