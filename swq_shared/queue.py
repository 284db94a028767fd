"""The Celery application both sides use: the API to enqueue, the worker to consume.

Settings chosen for long GPU jobs: a task is acknowledged only after it finishes (``acks_late``),
each worker takes one job at a time in its main process (the solo pool), and the task forks a
process for the job that exits with it, so CUDA state never leaks from one job to the next (see
worker.job_process). A worker that dies holding a job is recovered from the database by the reaper,
not by the broker. The job id doubles as the task id.
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache

from celery import Celery

from swq_shared.settings import Settings, get_settings

RUN_JOB_TASK = "swquant.run_job"
# Longer than the longest job a worker may run, so Redis never re-delivers a job still in progress.
VISIBILITY_TIMEOUT_S = 3 * 24 * 3600


def make_celery(settings: Settings) -> Celery:
    app = Celery("swquant", broker=settings.broker_url)
    app.conf.update(
        task_acks_late=True,
        task_ignore_result=True,
        worker_pool="solo",
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue,
        task_routes={RUN_JOB_TASK: {"queue": settings.queue}},
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def enqueue_job(app: Celery, job_id: str, queue: str | None = None) -> None:
    """Send the job to ``queue`` (``gpu`` or ``cpu`` workers), or to the deployment's default queue."""
    app.send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id, queue=queue or app.conf.task_default_queue)


# Kombu's Redis transport keeps a queue as a list named after it; priority levels append this
# separator and the level.
_PRIORITY_SEPARATOR = "\x06\x16"


def _message_task_id(raw: bytes | str) -> str | None:
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    headers = message.get("headers") if isinstance(message, dict) else None
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return task_id if isinstance(task_id, str) else None


def waiting_task_ids(app: Celery, queues: set[str]) -> set[str]:
    """Ids of the tasks waiting in ``queues`` on the Redis broker.

    Used to find jobs the broker forgot (a Redis restart without persistence drops every message).
    Messages already delivered are left out on purpose: a worker holds at most the one it is running
    (prefetch 1 with late acks), which it claims at once, so a queued job whose message is only in
    the delivered-but-unacknowledged set is held by a worker that died before claiming it, and Redis
    would hand it back only after the visibility timeout (days). Raises kombu's OperationalError when
    Redis is unreachable.
    """
    with app.connection_for_read() as connection:
        client = connection.default_channel.client
        found: set[str | None] = set()
        for queue in queues:
            for key in client.scan_iter(match=f"{queue}*"):
                name = key.decode() if isinstance(key, bytes) else key
                if name.split(_PRIORITY_SEPARATOR, 1)[0] == queue:
                    found.update(_message_task_id(raw) for raw in client.lrange(name, 0, -1))
    found.discard(None)
    return {task_id for task_id in found if task_id is not None}


def worker_argv(queue: str, hostname: str | None = None) -> list[str]:
    """The command that runs one worker on ``queue``: one job at a time, each in a process of its own
    forked by the task (worker.job_process), not by a pool."""
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--loglevel",
        "INFO",
        "--queues",
        queue,
        "--pool",
        "solo",
    ]
    return argv + (["--hostname", hostname] if hostname else [])
