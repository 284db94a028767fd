"""The one Celery task: a thin shell around ``execute_job``, which runs without Celery too."""

from __future__ import annotations

import os
import socket
from typing import Any

from celery import Task
from celery.signals import worker_ready

from swq_shared.queue import RUN_JOB_TASK
from swq_shared.settings import get_settings
from worker.celery_app import app
from worker.reaper import start_reaper
from worker.runner import execute_job


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self: Task, job_id: str) -> str:
    worker_name = f"{socket.gethostname()}:{self.request.hostname or 'worker'}:{os.getpid()}"
    return execute_job(job_id, get_settings(), worker_name)


@worker_ready.connect
def _start_reaper(**_: Any) -> None:
    """Every worker's main process also watches for jobs whose worker died (see worker.reaper)."""
    start_reaper(get_settings(), app)
