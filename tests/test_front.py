"""The front (HAProxy with api/front/haproxy.cfg) before ``swquant serve``: refusal without waiting, probes kept apart.

The API process is stopped (SIGSTOP) so that nothing it could answer is in play: requests the front
lets through then hang, and one past its slots can only be answered by the front itself. Not timed:
a refusal that waited for the API would never come while it is stopped.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import httpx
import pytest

from api.front.admission import BUSY_BODY
from api.front.haproxy import (
    IN_FLIGHT_PER_PROCESS,
    FrontSettings,
    FrontUnavailable,
    haproxy_binary,
    queue_for,
    start_front,
)
from tests.service_stack import Stack, embedded_stack

# A front whose queue holds 10 ms of answers (4 requests), so that a stopped API fills it in a few requests.
SHORT_WAIT_S = 0.01
IN_FLIGHT, QUEUE = IN_FLIGHT_PER_PROCESS, queue_for(1, SHORT_WAIT_S)


@pytest.fixture(scope="module")
def fronted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    haproxy_binary()  # fails with how to install HAProxy when it is missing
    # The queued requests must outwait the test: no 503 for a long wait in the queue.
    env = {"SWQUANT_FRONT_QUEUE_TIMEOUT": "120s", "SWQUANT_FRONT_MAX_WAIT_S": str(SHORT_WAIT_S)}
    with embedded_stack(tmp_path_factory.mktemp("front"), "--front", "--no-worker", env_extra=env) as stack:
        yield stack


@pytest.fixture(scope="module")
def default_front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """``swquant serve --front`` as a user starts it."""
    haproxy_binary()
    with embedded_stack(tmp_path_factory.mktemp("front-default"), "--front", "--no-worker") as stack:
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


def test_many_clients_at_a_quarter_of_capacity_are_all_answered(default_front: Stack) -> None:
    """32 clients polling together (each round's requests leave at once) at about 100 requests a
    second in all, a quarter of what one API process answers: every request is answered, none refused.
    A front that admitted a count of 8 refused most of each burst."""
    listing = f"{default_front.url}/v1/methods"
    assert _get(listing).status_code == 200
    clients, rounds, pause_s = 32, 8, 0.3

    together = threading.Barrier(clients)

    def client(_: int) -> list[int]:
        codes = []
        with httpx.Client(timeout=30) as http:
            for _ in range(rounds):
                together.wait()  # every client's request of a round leaves at once: a burst of 32
                codes.append(http.get(listing).status_code)
                time.sleep(pause_s)
        return codes

    with ThreadPoolExecutor(max_workers=clients) as pool:
        codes = [code for result in pool.map(client, range(clients)) for code in result]
    assert len(codes) == clients * rounds
    assert codes.count(200) == len(codes), {code: codes.count(code) for code in set(codes)}


def test_the_queue_holds_what_the_processes_answer_in_the_wait_it_allows() -> None:
    one, four = FrontSettings.for_processes(":8000", "api:8000", 1), FrontSettings.for_processes(":8000", "api:8000", 4)
    assert (one.in_flight, one.queue) == (4, 200) and (four.in_flight, four.queue) == (16, 800)
    assert queue_for(1, SHORT_WAIT_S) == 4 and queue_for(2, 0.0001) == 1
