"""Where an API process's CPU time goes, from py-spy's sampled stacks, in the categories a request passes through.

``py-spy record --format raw`` writes one line per distinct stack, ``frame;frame;... count``, root
first. Each sample is charged to the first category (in the order below) that any of its frames
belongs to, so a database query made while looking up a key counts as the key lookup, and a query
made by the route itself as the database. Samples of idle threads are not recorded (py-spy's
default), so the shares are of CPU time, not of wall time.

    python -m bench.profile_shares STACKS.txt     # a table of shares
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

# (category, substrings of a frame "function (file:line)" that put a sample in it), by priority.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("key lookup", ("swq_shared/auth.py", "caller_for_key")),
    ("rate limit (Redis round trip)", ("api/rate_limit.py",)),
    ("access logging", ("uvicorn/logging.py", "logging/__init__.py", "log_redaction.py")),
    ("metrics middleware", ("api/metrics.py", "prometheus_client")),
    ("admission control", ("api/admission.py",)),
    ("serialization (pydantic, JSON, ETag)", ("pydantic", "api/schemas.py", "api/conditional.py", "json/")),
    ("session and transaction (commit, pool)", ("session_scope", "orm/session.py", "pool/", "engine/base.py")),
    ("queries (SQL, driver, ORM loading)", ("sqlalchemy", "psycopg", "sqlite3", "swq_shared/jobs.py")),
    ("thread-pool hand-off", ("anyio", "concurrent/futures", "threading.py", "to_thread")),
    ("routing and dependencies", ("fastapi/", "starlette/")),
    ("HTTP parsing and the event loop", ("uvicorn/", "h11", "httptools", "asyncio/", "uvloop")),
]
OTHER = "other"


def category(stack: str) -> str:
    for name, needles in CATEGORIES:
        if any(needle in stack for needle in needles):
            return name
    return OTHER


def shares(raw: str) -> dict[str, float]:
    """Share of samples per category, largest first."""
    samples: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples[category(stack)] += int(count)
    total = sum(samples.values()) or 1
    return {name: n / total for name, n in samples.most_common()}


def table(by_category: dict[str, float]) -> str:
    rows = ["| where the CPU time goes | share |", "| --- | --- |"]
    rows += [f"| {name} | {100 * share:.1f}% |" for name, share in by_category.items()]
    return "\n".join(rows)


if __name__ == "__main__":
    result = shares(Path(sys.argv[1]).read_text())
    print(table(result))
    print(json.dumps(result))
