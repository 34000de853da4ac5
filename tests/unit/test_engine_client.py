"""A vLLM client that stopped reading its engine's outputs fails the call loudly, never hangs;
and `ServerPool`, the client of many servers, answers each request exactly once.

No engine: `scoring.checked_call` is driven with a stand-in client whose output reader
(`output_queue_thread`) is dead, or dies while a call waits. No server: the pool is driven
against stand-in servers (or httpx's MockTransport) that answer, fail, time out or refuse.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import queue
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from fastpath.engine import scoring
from fastpath.engine.scoring import ScoreRequest
from fastpath.server.client import (
    RequestRefused,
    ScoringError,
    ServerPool,
    ServerUnavailable,
)

DECODE_ERROR = TypeError("VLLM_ALLOW_INSECURE_SERIALIZATION must be set to use custom "
                         "utility result types")


def stand_in(reader: threading.Thread, queued=()) -> SimpleNamespace:
    outputs = queue.Queue()
    for item in queued:
        outputs.put(item)
    client = SimpleNamespace(output_queue_thread=reader, outputs_queue=outputs)
    return SimpleNamespace(llm_engine=SimpleNamespace(engine_core=client))


def finished_thread() -> threading.Thread:
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    return thread


def test_a_dead_reader_fails_the_call_before_it_is_sent():
    sent = []
    llm = stand_in(finished_thread(), [DECODE_ERROR])
    with pytest.raises(scoring.EngineClientStopped,
                       match="TypeError: VLLM_ALLOW_INSECURE_SERIALIZATION"):
        scoring.checked_call(llm, lambda **kw: sent.append(kw), tags=["scheduling"])
    assert sent == []


def test_a_reader_that_dies_while_the_call_waits_fails_it(monkeypatch):
    monkeypatch.setattr(scoring, "CLIENT_POLL_SECONDS", 0.05)
    stop = threading.Event()
    reader = threading.Thread(target=stop.wait)
    reader.start()
    llm = stand_in(reader)
    never = threading.Event()  # the reply that never comes
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with pytest.raises(scoring.EngineClientStopped, match="no error recorded"):
        scoring.checked_call(llm, never.wait)
    assert time.monotonic() - started < 30


def test_a_live_reader_returns_the_result_and_the_error():
    stop = threading.Event()
    reader = threading.Thread(target=stop.wait)
    reader.start()
    try:
        llm = stand_in(reader)
        assert scoring.checked_call(llm, lambda x, y=0: x + y, 2, y=3) == 5
        with pytest.raises(ValueError, match="refused"):
            scoring.checked_call(llm, lambda: (_ for _ in ()).throw(ValueError("refused")))
    finally:
        stop.set()


def test_an_in_process_client_is_called_directly():
    llm = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=SimpleNamespace()))
    assert scoring.checked_call(llm, threading.current_thread) is threading.current_thread()


@pytest.mark.parametrize("attribute", ["output_queue_thread", "outputs_queue"])
def test_the_installed_vllm_client_has_what_the_guard_reads(attribute):
    """The guard reads these defensively (absent, it calls straight through): the installed
    vLLM's multiprocess client must still define them, or the guard would quietly vanish."""
    import importlib.util
    from pathlib import Path

    from fastpath.source_text import decode, has_attribute

    origin = importlib.util.find_spec("vllm.v1.engine.core_client").origin
    assert has_attribute(decode(Path(origin).read_bytes()), "SyncMPClient", attribute)


# --- ServerPool: each request answered exactly once, over servers that fail -----------------


class StandInServer:
    """A server's ScoringClient, stood in: answers request i with ("scores", i) after `delay`
    seconds, or raises what `fail(i, call number)` returns; /health answers `healthy`."""

    def __init__(self, url: str, *, fail: Callable[[int, int], Exception | None] | None = None,
                 healthy: bool = True, delay: float = 0.001) -> None:
        self.url = url
        self.fail = fail or (lambda index, call: None)
        self.healthy = healthy
        self.delay = delay
        self.sent: list[int] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.health_checks = 0
        self.closed = False

    async def score(self, request: ScoreRequest) -> tuple[str, int]:
        index = request.prompt_token_ids[0]
        self.sent.append(index)
        call = len(self.sent)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            error = self.fail(index, call)
            if error is not None:
                raise error
            return ("scores", index)
        finally:
            self.in_flight -= 1

    async def health(self) -> bool:
        self.health_checks += 1
        return self.healthy

    async def aclose(self) -> None:
        self.closed = True


def unavailable(url: str) -> ServerUnavailable:
    return ServerUnavailable(f"{url}/inference/v1/generate: ConnectError: connection refused")


def pool_of(*servers: StandInServer, **options) -> ServerPool:
    """A pool over the stand-ins (probing every millisecond, so a run gives up in time)."""
    pool = ServerPool([s.url for s in servers], **{"probe_interval": 0.001, **options})
    pool.clients = lambda: list(servers)
    return pool


def requests_for(n: int) -> list[ScoreRequest]:
    """n requests, request i's prompt starting with token i (how the stand-ins tell them)."""
    return [ScoreRequest([i, 0], [0]) for i in range(n)]


def answers(n: int) -> list[tuple[str, int]]:
    return [("scores", i) for i in range(n)]


def scored(pool: ServerPool, requests: list[ScoreRequest], progress=None, on_answer=None):
    """`pool.score`, failed after a minute: a broken retry rule may leave the run hanging."""
    return asyncio.run(asyncio.wait_for(pool.score(requests, progress, on_answer), 60))


def test_pool_answers_each_request_once_in_request_order_within_the_in_flight_limit():
    a, b = StandInServer("http://a", delay=0.002), StandInServer("http://b", delay=0.003)
    pool = pool_of(a, b, max_in_flight=3)
    progress, answered = [], []
    results = scored(pool, requests_for(40), progress.append,
                     lambda index, url: answered.append((index, url)))
    assert results == answers(40)
    assert progress == [1] * 40
    assert sorted(i for i, _ in answered) == list(range(40))
    assert all(i in {"http://a": a, "http://b": b}[url].sent for i, url in answered)
    assert sorted(a.sent + b.sent) == list(range(40))  # each sent once: nothing failed
    assert a.most_in_flight == b.most_in_flight == 3  # the limit, and reached
    stats = pool.stats
    assert stats.answered_by == {"http://a": len(a.sent), "http://b": len(b.sent)}
    assert min(stats.answered_by.values()) > 0
    assert (stats.retries, stats.dead_servers, len(stats.latencies)) == (0, [], 40)
    assert stats.answered_once and a.closed and b.closed


def test_pool_with_no_requests_answers_nothing():
    a = StandInServer("http://a")
    pool = pool_of(a)
    assert pool.score_sync([]) == []
    assert (a.sent, a.health_checks, a.closed) == ([], 0, True)
    assert pool.stats.answered_by == {"http://a": 0} and pool.stats.answered_once


def test_requests_of_a_failing_server_move_to_another_and_it_is_given_up():
    down = StandInServer("http://down", fail=lambda i, n: unavailable("http://down"),
                         healthy=False)
    up = StandInServer("http://up", delay=0.01)
    pool = pool_of(down, up, max_in_flight=2, max_failures=2)
    assert scored(pool, requests_for(20)) == answers(20)
    # Both of down's workers sent one request before it failed; then it paused, failed
    # max_failures probes of /health, and was given up without being sent anything more.
    assert len(down.sent) == 2 and down.health_checks == 2
    stats = pool.stats
    assert stats.dead_servers == ["http://down"]
    assert stats.answered_by == {"http://down": 0, "http://up": 20}
    assert stats.retries == 2 and stats.answered_once and len(stats.latencies) == 20


def test_a_server_that_answers_health_again_is_used_again():
    flaky = StandInServer("http://flaky", fail=lambda i, n: (
        ServerUnavailable("http://flaky: ReadTimeout: timed out") if n == 1 else None))
    pool = pool_of(flaky, max_in_flight=2, max_failures=3)
    assert scored(pool, requests_for(6)) == answers(6)
    assert flaky.health_checks == 1 and sorted(flaky.sent) == sorted([*range(6), flaky.sent[0]])
    stats = pool.stats
    assert (stats.answered_by, stats.retries, stats.dead_servers) == ({"http://flaky": 6}, 1, [])
    assert stats.answered_once


def test_a_request_taken_by_a_server_that_failed_meanwhile_is_left_to_the_others():
    # One request: a's first worker sends it and fails; a's second worker, waiting for the
    # queue, is handed it back, sees a failed and puts it back for b (not sent to a again).
    a = StandInServer("http://a", fail=lambda i, n: unavailable("http://a"), healthy=False)
    b = StandInServer("http://b")
    pool = pool_of(a, b, max_in_flight=2)
    assert scored(pool, requests_for(1)) == answers(1)
    assert (a.sent, b.sent, pool.stats.retries) == ([0], [0], 1)
    assert pool.stats.answered_by == {"http://a": 0, "http://b": 1}


def test_a_request_that_fails_on_every_try_stops_the_run():
    # max_failures=1 and one server: a request may be tried twice (1 * 1 + 1).
    last = ServerUnavailable("http://a: HTTP 503: request 0 again")
    a = StandInServer("http://a", fail=lambda i, n: last if i == 0 else None)
    pool = pool_of(a, max_in_flight=1, max_failures=1)
    with pytest.raises(ScoringError) as raised:
        scored(pool, requests_for(3))
    assert str(raised.value) == f"request 0 failed 2 times; last: {last}"
    assert a.sent == [0, 1, 2, 0] and a.closed
    assert (pool.stats.answered_by, pool.stats.retries) == ({"http://a": 2}, 2)


def test_every_server_given_up_fails_the_run_naming_what_is_missing():
    a = StandInServer("http://a", fail=lambda i, n: unavailable("http://a"), healthy=False)
    b = StandInServer("http://b", fail=lambda i, n: unavailable("http://b"), healthy=False)
    pool = pool_of(a, b, max_in_flight=1, max_failures=1)
    with pytest.raises(ServerUnavailable) as raised:
        scored(pool, requests_for(3))
    assert str(raised.value) == ("every server failed with 3 of 3 requests unanswered "
                                 f"(http://a: {unavailable('http://a')}; "
                                 f"http://b: {unavailable('http://b')})")
    assert (a.sent, b.sent, a.health_checks, b.health_checks) == ([0], [1], 1, 1)
    stats = pool.stats
    assert stats.dead_servers == ["http://a", "http://b"] and stats.retries == 2
    assert not stats.answered_once and a.closed and b.closed


@pytest.mark.parametrize("error", [RequestRefused("http://a", 400, "prompt too long"),
                                   ScoringError("http://a: NaN logprobs at rows [0]")])
def test_a_refusal_or_an_unusable_answer_stops_the_run_untried_elsewhere(error):
    a = StandInServer("http://a", fail=lambda i, n: error if i == 1 else None)
    b = StandInServer("http://b", fail=lambda i, n: error if i == 1 else None)
    pool = pool_of(a, b, max_in_flight=1)
    with pytest.raises(type(error)) as raised:
        scored(pool, requests_for(8))
    assert raised.value is error
    assert (a.sent + b.sent).count(1) == 1 and pool.stats.retries == 0
    assert a.closed and b.closed


def test_an_error_in_the_progress_callback_stops_the_run():
    a = StandInServer("http://a")

    def progress(n: int) -> None:
        raise KeyError("the bar is gone")

    pool = pool_of(a, max_in_flight=1)
    with pytest.raises(KeyError, match="the bar is gone"):
        scored(pool, requests_for(3), progress)
    assert a.closed and pool.stats.answered_by == {"http://a": 1}


def test_a_timed_out_request_is_answered_by_another_server_over_http(monkeypatch):
    """Through ScoringClient and httpx: a read timeout is retried elsewhere, and the server
    whose /health does not answer is given up."""

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "hung":
            if request.url.path == "/health":
                raise httpx.ConnectError("connection refused", request=request)
            raise httpx.ReadTimeout("timed out", request=request)
        index = json.loads(request.content)["token_ids"][0]
        buffer = io.BytesIO()
        np.save(buffer, np.array([[-float(index)]], dtype=np.float32))
        return httpx.Response(200, json={
            "prompt_token_id_logprobs": base64.b64encode(buffer.getvalue()).decode()})

    real = httpx.AsyncClient
    monkeypatch.setattr(httpx, "AsyncClient", lambda **options: real(
        transport=httpx.MockTransport(handler), **options))
    pool = ServerPool(["http://hung", "http://fine"], max_in_flight=2, max_failures=1,
                      probe_interval=0.001)
    results = scored(pool, requests_for(10))
    assert [s.targets.tolist() for s in results] == [[-float(i)] for i in range(10)]
    stats = pool.stats
    assert stats.answered_by == {"http://hung": 0, "http://fine": 10}
    assert stats.retries >= 1 and stats.answered_once
    assert stats.dead_servers in ([], ["http://hung"])  # given up, or the run ended first
