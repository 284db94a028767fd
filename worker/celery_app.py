"""The worker's Celery entry point: ``celery -A worker.celery_app worker --queues gpu``.

Secrets are masked in every log record of the worker and of the job processes it forks, from import on.
"""

from swq_shared.log_redaction import install_log_redaction
from swq_shared.queue import get_celery
from swq_shared.settings import get_settings

install_log_redaction(get_settings())
app = get_celery()
app.conf.include = ["worker.tasks"]
