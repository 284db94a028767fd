"""Celery workers that run quantization jobs from the queue and record everything in the database."""
