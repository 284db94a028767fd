"""The front (HAProxy with api/haproxy.cfg) before ``swquant serve``: refusal without waiting, probes kept apart.

The API process is stopped (SIGSTOP) so that nothing it could answer is in play: requests the front
lets through then hang, and one past its slots can only be answered by the front itself. Not timed:
a refusal that waited for the API would never come while it is stopped.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import httpx
import pytest

from api.admission import BUSY_BODY
from api.front import SLOTS_PER_PROCESS, FrontSettings, FrontUnavailable, haproxy_binary, start_front
from tests.service_stack import Stack, embedded_stack

IN_FLIGHT = QUEUE = SLOTS_PER_PROCESS  # what `swquant serve --front` gives its one API process


@pytest.fixture(scope="module")
def fronted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    haproxy_binary()  # fails with how to install HAProxy when it is missing
    # The queued requests must outwait the test: no 503 for a long wait in the queue.
    wait = {"SWQUANT_FRONT_QUEUE_TIMEOUT": "120s"}
    with embedded_stack(tmp_path_factory.mktemp("front"), "--front", "--no-worker", env_extra=wait) as stack:
        yield stack


def _get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=60)


def test_past_its_slots_the_front_refuses_at_once_while_the_admitted_wait_and_probes_pass(fronted: Stack) -> None:
    assert fronted.api_pid is not None
    listing = f"{fronted.url}/v1/methods"
    assert _get(listing).status_code == 200
    os.kill(fronted.api_pid, signal.SIGSTOP)
    with ThreadPoolExecutor(max_workers=IN_FLIGHT + QUEUE + 4) as pool:
        admitted: list[Future[httpx.Response]] = []
        refused: httpx.Response | None = None
        probe: Future[httpx.Response] | None = None
        try:
            # One at a time, so the order is known: each is let through (and hangs) until the slots
            # and the queue are full; the next is answered by the front alone.
            while refused is None and len(admitted) <= IN_FLIGHT + QUEUE:
                sent = pool.submit(_get, listing)
                try:
                    response = sent.result(timeout=1.5)
                except FutureTimeout:
                    admitted.append(sent)
                    continue
                refused = response
            probe = pool.submit(_get, f"{fronted.url}/healthz")
            with pytest.raises(FutureTimeout):  # waits for the API like the admitted: not refused
                probe.result(timeout=1.5)
        finally:
            os.kill(fronted.api_pid, signal.SIGCONT)
        assert refused is not None, "every request was let through to a stopped API"
        assert len(admitted) == IN_FLIGHT + QUEUE
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json() == json.loads(BUSY_BODY)  # the API's own refusal, word for word
        assert [f.result().status_code for f in admitted] == [200] * len(admitted)
        assert probe is not None and probe.result().status_code == 200
    assert _get(listing).status_code == 200


def test_a_bad_front_setting_is_refused_before_anything_starts(tmp_path: Path) -> None:
    haproxy_binary()
    bad = FrontSettings(bind="127.0.0.1:not-a-port", upstream="127.0.0.1:1", in_flight=1, queue=1)
    with pytest.raises(FrontUnavailable, match=r"'bind' : invalid character .* 'not-a-port'"):
        start_front(bad)
