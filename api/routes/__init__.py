"""The REST API's routes under ``/v1`` and the probes: what each endpoint does, and the checks and errors they share."""
