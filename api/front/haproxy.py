"""The front (HAProxy with ``api/front/haproxy.cfg``) before the API processes, started as a child process.

Past an API process's capacity, the excess must get a 503 at once while admitted requests keep
their latency. The API's own admission control refuses on the event loop that answers requests, so
a refusal waits behind them; HAProxy, which does nothing else, refuses in microseconds. The same
configuration file serves docker-compose (its ``front`` service), ``swquant serve --front`` and the
load bench; this module only fills in its environment and runs the binary.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CONFIG = Path(__file__).with_name("haproxy.cfg")
IN_FLIGHT_PER_PROCESS = 4  # keeps a process busy while it writes one answer and reads the next
# The queue is bounded by the time its requests would wait, not by a count: a poll costs an API
# process about 2.2 ms (bench/README.md, "`bench.service`"), so half a second of waiting holds
# about 200 requests a process. A count of a few slots refused every burst of more clients than that
# while the server idled; a bound in time refuses only what could not be answered in time. HAProxy's
# `timeout queue` (2 s) still turns away whatever waits longer when answers get slower than this.
SERVICE_TIME_S = 0.0025
MAX_WAIT_S = 0.5
# What the API processes behind the front are given: the front bounds what reaches their event loop,
# so a refusal for loop lag would only be a slower 503 than the front's (bench/README.md).
API_ENV_BEHIND_FRONT = {"SWQUANT_MAX_LOOP_LAG_MS": "0"}


class FrontUnavailable(RuntimeError):
    """HAProxy is not installed, or refuses the configuration its settings give."""


@dataclass(frozen=True)
class FrontSettings:
    """Where the front listens, where the API is, and how many requests it lets through and waits with."""

    bind: str  # "host:port"
    upstream: str  # "host:port" or a unix socket's absolute path
    in_flight: int
    queue: int
    api_processes: int = 1  # behind the one upstream address

    @classmethod
    def for_processes(
        cls, bind: str, upstream: str, api_processes: int, max_wait_s: float = MAX_WAIT_S
    ) -> FrontSettings:
        """``api_processes`` behind ``upstream``, none of whose admitted requests waits much over ``max_wait_s``."""
        return cls(
            bind, upstream, IN_FLIGHT_PER_PROCESS * api_processes, queue_for(api_processes, max_wait_s), api_processes
        )

    def env(self) -> dict[str, str]:
        return {
            "SWQUANT_FRONT_BIND": self.bind,
            "SWQUANT_FRONT_UPSTREAM": self.upstream,
            "SWQUANT_FRONT_IN_FLIGHT": str(self.in_flight),
            "SWQUANT_FRONT_QUEUE": str(self.queue),
            "SWQUANT_FRONT_API_PROCESSES": str(self.api_processes),
        }


def queue_for(api_processes: int, max_wait_s: float) -> int:
    """How many requests may wait so that the last is answered within ``max_wait_s``."""
    return max(1, math.floor(max_wait_s * api_processes / SERVICE_TIME_S))


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise FrontUnavailable("the front needs HAProxy: install it (apt-get install haproxy, brew install haproxy)")
    return found


def start_front(settings: FrontSettings, **popen: object) -> subprocess.Popen:
    """HAProxy in the foreground (``-db``) as a child; its configuration is checked first, so a bad one fails here."""
    argv = [haproxy_binary(), "-db", "-f", str(CONFIG)]
    env = {**os.environ, **settings.env()}
    check = subprocess.run([*argv, "-c"], env=env, capture_output=True, text=True)
    if check.returncode != 0:
        alerts = [line for line in (check.stdout + check.stderr).splitlines() if "ALERT" in line]
        raise FrontUnavailable(f"HAProxy refused its settings {settings.env()}: " + " / ".join(alerts))
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, **popen)  # type: ignore[call-overload]
