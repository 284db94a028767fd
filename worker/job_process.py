"""Each job in a process of its own, forked by the task and watched by it until the job ends.

Why not Celery's prefork pool with ``--max-tasks-per-child 1``: when the pool replaced the child that
had just exited, a task received in that moment could stay assigned to no process for good. The
worker logged it as received and never ran it, while holding the one message its prefetch allows,
so the reaper's re-sends queued behind it and the job never ran. The worker now runs its task in
its main process (``--pool solo``) and the task forks the job's process itself: still a fresh
process per job (CUDA state and memory leave with it), and no pool to refill.

The watching parent also stops an attempt that no longer owns its job: a forced cancel (the API
marks the job cancelled), or a lease the reaper gave to another worker after this one was cut off
from the database. It reads the job's row every ``job_watch_seconds`` and stops the child at once
(SIGTERM, then SIGKILL), unless the child has already recorded its outcome and is only cleaning up.
A broadcast revoke could not do this: a solo worker reads control messages only between tasks.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
from multiprocessing.synchronize import Event

from sqlalchemy import select

from quant_core.launch import die_with_parent
from swq_shared.db import read_scope
from swq_shared.models import Job, JobStatus
from swq_shared.retry import DATABASE_DOWN
from swq_shared.settings import Settings, get_settings
from worker.runner import execute_job

log = logging.getLogger(__name__)
# How long a child stopped with SIGTERM gets before SIGKILL (it has no handler; this covers a
# process stuck in the kernel, e.g. in a device driver call).
KILL_AFTER_TERM_S = 5.0


def worker_name(hostname: str, pid: int) -> str:
    """How a job records the process running it: host, Celery worker name and the job process's pid."""
    return f"{socket.gethostname()}:{hostname}:{pid}"


def _job_main(job_id: str, hostname: str, recorded: Event) -> None:
    # The fork inherits the Celery worker's handlers: SIGTERM must end this process, not start a
    # worker shutdown in it, and Ctrl-C in a terminal is the worker's to act on.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    outcome = execute_job(job_id, get_settings(), worker_name(hostname, os.getpid()), on_recorded=recorded.set)
    log.info("job %s: attempt ended %s", job_id, outcome)


def _runs_under(settings: Settings, job_id: str, name: str) -> bool | None:
    """Whether the job runs under ``name`` now; None when the database cannot be read, which leaves
    the attempt alone (the lease keeper in the child decides then)."""
    try:
        with read_scope(settings.resolved_database_url) as session:
            row = session.execute(select(Job.status, Job.worker).where(Job.id == job_id)).one_or_none()
    except DATABASE_DOWN as exc:
        log.warning("job %s: could not read its state (%s)", job_id, type(exc).__name__)
        return None
    return row is not None and row.status == JobStatus.running.value and row.worker == name


def _stop(child: multiprocessing.process.BaseProcess) -> None:
    child.terminate()
    child.join(KILL_AFTER_TERM_S)
    if child.exitcode is None:
        child.kill()
        child.join()


def run_job_process(job_id: str, hostname: str, settings: Settings) -> str:
    """Fork the job's process, watch it until it exits, and describe how it ended."""
    context = multiprocessing.get_context("fork")
    recorded = context.Event()
    child = context.Process(target=_job_main, args=(job_id, hostname, recorded), name=f"swquant-job-{job_id}")
    child.start()
    assert child.pid is not None
    name, seen_running = worker_name(hostname, child.pid), False
    while True:
        child.join(settings.job_watch_seconds)
        if child.exitcode is not None:
            break
        running = _runs_under(settings, job_id, name)
        seen_running = seen_running or running is True
        if seen_running and running is False and not recorded.is_set():
            log.warning("job %s: cancelled with force or taken over; stopping its process %d", job_id, child.pid)
            _stop(child)
            break
    code = child.exitcode
    assert code is not None
    return f"job process exited with {code}" if code >= 0 else f"job process killed by signal {-code}"
