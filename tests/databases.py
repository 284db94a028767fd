"""Real databases for tests: a fresh PostgreSQL database per test session, or SQLite in a temp folder."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

PG_ADMIN_DSN = os.environ.get("SWQUANT_TEST_PG_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres")


def _pg_params() -> dict[str, str]:
    return dict(item.split("=", 1) for item in PG_ADMIN_DSN.split())


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """Create an empty database, yield its SQLAlchemy URL, and drop it afterwards."""
    name = f"swq_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    params = _pg_params()
    try:
        yield f"postgresql+psycopg://{params['user']}@{params['host']}:{params['port']}/{name}"
    finally:
        # FORCE closes the connections pooled engines still hold.
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
