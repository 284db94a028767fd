"""The front (HAProxy with ``api/haproxy.cfg``) before the API processes, started as a child process.

Past an API process's capacity, the excess must get a 503 at once while admitted requests keep
their latency. The API's own admission control refuses on the event loop that answers requests, so
a refusal waits behind them; HAProxy, which does nothing else, refuses in microseconds. The same
configuration file serves docker-compose (its ``front`` service), ``swquant serve --front`` and the
load bench; this module only fills in its environment and runs the binary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CONFIG = Path(__file__).with_name("haproxy.cfg")
SLOTS_PER_PROCESS = 4  # in flight, and as many again waiting: the sizing explained in haproxy.cfg
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
    def for_processes(cls, bind: str, upstream: str, api_processes: int) -> FrontSettings:
        slots = SLOTS_PER_PROCESS * api_processes
        return cls(bind, upstream, in_flight=slots, queue=slots, api_processes=api_processes)

    def env(self) -> dict[str, str]:
        return {
            "SWQUANT_FRONT_BIND": self.bind,
            "SWQUANT_FRONT_UPSTREAM": self.upstream,
            "SWQUANT_FRONT_IN_FLIGHT": str(self.in_flight),
            "SWQUANT_FRONT_QUEUE": str(self.queue),
            "SWQUANT_FRONT_API_PROCESSES": str(self.api_processes),
        }


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
