"""The one Celery task: a thin shell around ``execute_job``, which runs without Celery too."""

from __future__ import annotations

import socket

from celery import Task

from swq_shared.queue import RUN_JOB_TASK
from swq_shared.settings import get_settings
from worker.celery_app import app
from worker.runner import execute_job


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self: Task, job_id: str) -> str:
    worker_name = f"{socket.gethostname()}:{self.request.hostname or 'worker'}"
    return execute_job(job_id, get_settings(), worker_name)
