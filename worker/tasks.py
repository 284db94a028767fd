"""The one Celery task: a thin shell around the job's own process (worker.job_process), whose
``execute_job`` runs without Celery too."""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.signals import worker_ready

from swq_shared.queue import RUN_JOB_TASK
from swq_shared.settings import get_settings
from worker.celery_app import app
from worker.job_process import run_job_process
from worker.reaper import start_reaper


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self: Task, job_id: str) -> str:
    return run_job_process(job_id, self.request.hostname or "worker", get_settings())


@worker_ready.connect
def _start_reaper(**_: Any) -> None:
    """Every worker's main process also watches for jobs whose worker died (see worker.reaper)."""
    start_reaper(get_settings(), app)
