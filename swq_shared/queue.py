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
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

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


RANKS_SUFFIX = ".ranks"


def ranked_queue(queue: str, world_size: int) -> str:
    """Where a job asking for ``world_size`` ranks waits: ``queue`` itself for one, else a queue that
    only workers with that many devices consume (:func:`served_queues`)."""
    return queue if world_size == 1 else f"{queue}{RANKS_SUFFIX}{world_size}"


def served_queues(queue: str, ranks: int) -> list[str]:
    """The queues a worker with ``ranks`` devices consumes: every job of ``queue`` that fits on it."""
    return [ranked_queue(queue, world_size) for world_size in range(1, ranks + 1)]


def enqueue_job(app: Celery, job_id: str, spec: Mapping[str, Any]) -> None:
    """Send the job to the queue its stored spec names (``gpu`` or ``cpu`` workers; unset: the
    deployment's default), in the variant for the ranks it asks for."""
    queue = ranked_queue(spec.get("queue") or app.conf.task_default_queue, int(spec.get("world_size") or 1))
    app.send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id, queue=queue)


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
    """Ids of the tasks waiting in ``queues`` (and their ranked variants, :func:`ranked_queue`) on the Redis broker.

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
                if name.split(_PRIORITY_SEPARATOR, 1)[0].split(RANKS_SUFFIX, 1)[0] == queue:
                    found.update(_message_task_id(raw) for raw in client.lrange(name, 0, -1))
    found.discard(None)
    return {task_id for task_id in found if task_id is not None}


def worker_argv(queue: str, hostname: str | None = None, ranks: int = 1) -> list[str]:
    """The command that runs one worker on ``queue``: one job at a time, each in a process of its own
    forked by the task (worker.job_process), not by a pool; with ``ranks`` devices it also takes the
    jobs that ask for up to that many."""
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
        ",".join(served_queues(queue, ranks)),
        "--pool",
        "solo",
    ]
    return argv + (["--hostname", hostname] if hostname else [])
