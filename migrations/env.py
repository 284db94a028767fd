"""Alembic environment: the database URL comes from the service settings (or ``-x url=...``)."""

from __future__ import annotations

from alembic import context

from swq_shared.db import get_engine
from swq_shared.models import Base
from swq_shared.settings import get_settings

url = context.get_x_argument(as_dictionary=True).get("url") or context.config.attributes.get("url")
url = url or get_settings().resolved_database_url

if context.is_offline_mode():
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    with get_engine(url).connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
