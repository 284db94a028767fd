"""A job asking for N ranks waits where only a worker with N devices looks (swq_shared.queue), on a real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from celery import Celery

from swq_shared.queue import enqueue_job, make_celery, served_queues, waiting_task_ids, worker_argv
from swq_shared.settings import Settings

BROKER_URL = "redis://127.0.0.1:6379/9"


@pytest.fixture
def app() -> Iterator[tuple[Celery, str]]:
    queue = f"routing-{uuid.uuid4().hex[:8]}"
    app = make_celery(Settings(broker_url=BROKER_URL, queue=queue))
    yield app, queue
    with app.connection_for_write() as connection:
        client = connection.default_channel.client
        for key in client.scan_iter(match=f"{queue}*"):
            client.delete(key)


def test_a_job_asking_for_ranks_waits_in_the_queue_of_workers_that_have_them(app: tuple[Celery, str]) -> None:
    celery, queue = app
    enqueue_job(celery, "one", {})
    enqueue_job(celery, "two", {"world_size": 2})
    enqueue_job(celery, "four", {"world_size": 4, "queue": None})
    with celery.connection_for_read() as connection:
        client = connection.default_channel.client
        held = {name: client.llen(name) for name in (queue, f"{queue}.ranks2", f"{queue}.ranks4")}
    assert held == {queue: 1, f"{queue}.ranks2": 1, f"{queue}.ranks4": 1}
    assert waiting_task_ids(celery, {queue}) == {"one", "two", "four"}  # the reaper sees every variant
    two_devices = served_queues(queue, 2)
    assert two_devices == [queue, f"{queue}.ranks2"]  # the four-rank job is not for it
    argv = worker_argv(queue, "w@%h", ranks=2)
    assert argv[argv.index("--queues") + 1] == f"{queue},{queue}.ranks2"
