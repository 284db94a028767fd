"""The REST API (FastAPI): submit, follow, cancel and download quantization jobs."""
