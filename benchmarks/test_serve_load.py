"""Scoring over HTTP against offline, same windows, same engine flags, one run.

The embedded model (`trained-llama`) on the bundled text, context 1024, stride 256:
offline (`fastpath ppl`'s batches of 16 windows) against one `fastpath serve` server with
1, 8 and 16 windows in flight (`fastpath ppl --server`'s pool), and against 16 independent
clients. Every server answer is checked bitwise against offline. Figures in
`benchmark.extra_info`: seconds and tokens per second, latency percentiles per request.
Compare rows of one run only (the server and offline share the machine's cores).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from fastpath import zoo
from fastpath.data import bundled_text
from fastpath.engine import scoring
from fastpath.engine.runners import device_name
from fastpath.metrics.perplexity import make_windows, window_requests
from fastpath.server import client
from fastpath.server.client import ScoringClient, ServerPool
from tests.helpers import running

MODEL = "trained-llama"
CONTEXT, STRIDE, WINDOWS = 1024, 256, 48
KV_BYTES = 256 << 20
FLAGS = ["--dtype", "float32", "--kv-cache-memory-bytes", str(KV_BYTES)]


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(zoo.get_model(MODEL))


@pytest.fixture(scope="module")
def requests(model_path):
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(model_path).encode(bundled_text())
    windows = make_windows(len(tokens), CONTEXT, STRIDE)[1 : 1 + WINDOWS]  # steady windows
    return window_requests(tokens, windows)


@pytest.fixture(scope="module")
def offline(model_path, requests):
    """The offline engine and its answers (after a warm-up pass)."""
    with scoring.engine(model_path, dtype="float32", kv_cache_memory_bytes=KV_BYTES) as llm:
        answers = scoring.score(llm, requests, "fast")
        yield llm, answers


@pytest.fixture(scope="module")
def server(model_path, requests, tmp_path_factory):
    with running(model_path, FLAGS, tmp_path_factory.mktemp("bench") / "serve.log") as srv:
        ServerPool([srv.url]).score_sync(requests[:4])  # warm-up: kernels for these shapes
        yield srv


def _info(path: str, requests, seconds: float, **extra) -> dict:
    tokens = sum(len(r.target_token_ids) for r in requests)
    return {"model": MODEL, "path": path, "context_length": CONTEXT, "stride": STRIDE,
            "tensor_parallel_size": 1, "device": device_name(), "windows": len(requests),
            "scored_tokens": tokens, "seconds_per_window": seconds / len(requests),
            "tokens_per_second": tokens / seconds, **extra}


def _latency(latencies) -> dict:
    """Per-request latency percentiles as flat figures (latency_p50_s, ...)."""
    return {f"latency_{q}_s": v for q, v in client.percentiles(latencies).items()}


def _check(answers, expected) -> None:
    """Each answer (an array, or a server's `Scores`) equals the offline one, bit for bit."""
    for i, (got, want) in enumerate(zip(answers, expected, strict=True)):
        got = getattr(got, "targets", got)
        assert np.array_equal(got.view(np.int32), want.view(np.int32)), f"window {i} differs"


def test_offline(benchmark, offline, requests):
    llm, expected = offline
    seconds: list[float] = []

    def run():
        started = time.perf_counter()
        out = []
        for first in range(0, len(requests), 16):
            out.extend(scoring.score(llm, requests[first : first + 16], "fast"))
        seconds.append(time.perf_counter() - started)
        return out

    _check(benchmark.pedantic(run, rounds=2, iterations=1), expected)
    benchmark.extra_info.update(_info("fast-offline", requests, float(np.median(seconds))))


@pytest.mark.parametrize("in_flight", [1, 8, 16])
def test_server_pool(benchmark, offline, server, requests, in_flight):
    expected = offline[1]
    pool = ServerPool([server.url], max_in_flight=in_flight)
    seconds: list[float] = []
    latencies: list[float] = []

    def run():
        started = time.perf_counter()
        out = pool.score_sync(requests)
        seconds.append(time.perf_counter() - started)
        latencies.extend(pool.stats.latencies)
        return out

    _check(benchmark.pedantic(run, rounds=2, iterations=1), expected)
    benchmark.extra_info.update(_info(f"fast-server-inflight{in_flight}", requests,
                                      float(np.median(seconds)), in_flight=in_flight,
                                      **_latency(latencies)))


def test_server_many_clients(benchmark, offline, server, requests):
    """16 independent clients, each sending its share of the windows one at a time."""
    expected = offline[1]
    clients = 16
    seconds: list[float] = []
    latencies: list[float] = []

    async def all_clients():
        answers: list = [None] * len(requests)

        async def one(indices):
            async with ScoringClient(server.url) as c:
                for i in indices:
                    started = time.perf_counter()
                    answers[i] = await c.score(requests[i])
                    latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(one(range(k, len(requests), clients)) for k in range(clients)))
        return answers

    def run():
        started = time.perf_counter()
        out = asyncio.run(all_clients())
        seconds.append(time.perf_counter() - started)
        return out

    _check(benchmark.pedantic(run, rounds=2, iterations=1), expected)
    benchmark.extra_info.update(_info("fast-server-16clients", requests,
                                      float(np.median(seconds)), clients=clients,
                                      **_latency(latencies)))
