"""Where an API process's CPU time goes, from py-spy's sampled stacks, in the categories a request passes through.

``py-spy record --format raw`` writes one line per distinct stack, ``frame;frame;... count``, root
first. A sample is charged in two tiers:

1. to a *context* anywhere on its stack, if any (first match in ``CONTEXTS``): everything done while
   looking up a key, asking Redis for a token, writing an access log line, or checking a connection
   out, beginning or committing a transaction, whatever the innermost frame;
2. otherwise to the *innermost* frame that belongs to a category in ``LAYERS``: every request's
   stack runs through the middlewares and the router, so the outer frames say little; the innermost
   one says what the CPU was doing (an ORM query from inside a response model counts as a query).

Samples of waiting threads (an idle thread-pool worker in ``Condition.wait``, the event loop in its
selector) are dropped: py-spy records them when it samples without pausing the process, and they
are not CPU time.

    python -m bench.profile_shares STACKS.txt     # a table of shares
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

CONTEXTS: list[tuple[str, tuple[str, ...]]] = [
    ("key lookup", ("swq_shared/auth.py",)),
    ("rate limit (Redis round trip)", ("api/front/rate_limit.py",)),
    ("access logging", ("uvicorn/logging.py", "logging/__init__.py", "log_redaction.py")),
    (
        "connection checkout and transaction (BEGIN, COMMIT)",
        ("pool/", "session_scope", "_connection_for_bind", "Connection.begin", "Connection.commit"),
    ),
]
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("queries (SQL, driver, ORM loading)", ("sqlalchemy", "psycopg", "sqlite3", "swq_shared/jobs.py")),
    (
        "serialization (pydantic, JSON, ETag)",
        ("pydantic", "api/routes/schemas.py", "api/routes/conditional.py", "json/"),
    ),
    ("metrics middleware", ("api/routes/metrics.py", "prometheus_client")),
    ("admission control", ("api/front/admission.py",)),
    ("thread-pool hand-off", ("anyio", "concurrent/futures", "threading.py", "queue.py")),
    ("routing and dependencies", ("fastapi/", "starlette/", "api/routes/deps.py", "api/routes/jobs.py")),
    ("HTTP parsing and the event loop", ("uvicorn/", "h11", "httptools", "asyncio/")),
]
OTHER = "other"
# Leaf frames of a thread that waits rather than computes.
IDLE_LEAVES = ("Condition.wait (threading.py", "Runner.run (asyncio/runners.py", "select (selectors.py")


def category(stack: str) -> str:
    for name, needles in CONTEXTS:
        if any(needle in stack for needle in needles):
            return name
    for frame in reversed(stack.split(";")):
        for name, needles in LAYERS:
            if any(needle in frame for needle in needles):
                return name
    return OTHER


def shares(raw: str) -> dict[str, float]:
    """Share of CPU samples per category, largest first."""
    samples: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit() and not stack.rsplit(";", 1)[-1].startswith(IDLE_LEAVES):
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
