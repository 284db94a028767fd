"""The worker's Celery entry point: ``celery -A worker.celery_app worker --queues gpu``."""

from swq_shared.queue import get_celery

app = get_celery()
app.conf.include = ["worker.tasks"]
