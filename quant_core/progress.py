"""Progress of a long phase (evaluation windows, blocks) as messages with an estimate of the time left.

A user watching a job sees a line per block while it calibrates, but the evaluations before and
after can each run for minutes; without a line they look hung. Messages go through the caller's
stage callback (the CLI prints them, the worker stores them as job events) at most every
``interval_s`` seconds, so a fast phase does not flood the event log.
"""

from __future__ import annotations

import time
from collections.abc import Callable

REPORT_INTERVAL_S = 10.0


def minutes_seconds(seconds: float) -> str:
    """``m:ss`` for a duration in seconds."""
    whole = max(0, round(seconds))
    return f"{whole // 60}:{whole % 60:02d}"


class PhaseProgress:
    """Reports ``label: done/total unit, about m:ss left``, the estimate from the mean pace so far."""

    def __init__(
        self,
        label: str,
        total: int,
        unit: str,
        report: Callable[[str], None],
        interval_s: float = REPORT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.unit, self.report = label, total, unit, report
        self.interval_s, self.clock = interval_s, clock
        self.started = self.last = clock()

    def advance(self, done: int) -> None:
        """``done`` of ``total`` finished; reports when the interval has passed and work remains."""
        now = self.clock()
        if done <= 0 or done >= self.total or now - self.last < self.interval_s:
            return
        self.last = now
        left = (now - self.started) / done * (self.total - done)
        self.report(f"{self.label}: {done}/{self.total} {self.unit}, about {minutes_seconds(left)} left")
