"""Engine and sessions for SQLite (embedded) and PostgreSQL (production) from one URL."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

_ENGINES: list[Engine] = []
CONNECT_TIMEOUT_S = 5


def _drop_inherited_connections() -> None:
    """In a forked child (a job's process, see worker.job_process), never reuse the parent's pooled connections.

    Two processes writing on one PostgreSQL socket corrupt each other's protocol state; SQLAlchemy's
    remedy is to give the child fresh pools without closing the parent's connections.
    """
    for engine in _ENGINES:
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_drop_inherited_connections)


@lru_cache
def get_engine(url: str) -> Engine:
    """One pooled engine per URL and process.

    SQLite is shared by the API and worker processes, so it runs in WAL mode (readers never block the
    writer) with a busy timeout instead of failing at once on a lock; foreign keys are switched on.
    """
    if url.startswith("sqlite"):
        database = url.split("///", 1)[-1]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        _ENGINES.append(engine)
        return engine
    # A bounded connect: the API reads on its event loop (api/routes/jobs.py), and an unreachable
    # server must cost a request a few seconds and a 503, not the operating system's TCP timeout.
    engine = create_engine(
        url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args={"connect_timeout": CONNECT_TIMEOUT_S}
    )
    _ENGINES.append(engine)
    return engine


@lru_cache
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


def _refuse_writes(session: Session, _context: object, _instances: object) -> None:
    raise RuntimeError("a read-only session was asked to write; use session_scope")


@lru_cache
def get_read_sessionmaker(url: str) -> sessionmaker[Session]:
    """Sessions whose statements each run on their own (autocommit), sharing the engine's pool.

    A status poll is one SELECT; inside a transaction it would also cost a BEGIN and a COMMIT round
    trip on PostgreSQL (on the pool's checkout and return), which profiling put at about a sixth of
    the API's CPU time per poll. A single statement sees one consistent snapshot without them.
    """
    factory = sessionmaker(get_engine(url).execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)
    event.listen(factory, "before_flush", _refuse_writes)
    return factory


@contextmanager
def read_scope(url: str) -> Iterator[Session]:
    """A session for reads only: no transaction to begin or commit; any write raises."""
    session = get_read_sessionmaker(url)()
    try:
        yield session
    finally:
        session.close()


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A transaction: committed when the block ends, rolled back on error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
