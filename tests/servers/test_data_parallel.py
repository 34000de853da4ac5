"""vLLM's data parallelism behind one `fastpath serve` URL, on real servers on 127.0.0.1.

Two layouts of two engines, one at a time (the module fixture is parametrized):
- `one-node`: `fastpath serve M --data-parallel-size 2` (vLLM starts a DP coordinator, two
  engine cores and two API servers sharing the port);
- `two-nodes`: a head with `--data-parallel-size 2 --data-parallel-size-local 1` (engine
  rank 0, the API servers) and a `--headless` process holding engine rank 1
  (`--data-parallel-start-rank 1`), joined over `--data-parallel-address` and
  `--data-parallel-rpc-port` as two machines would be, here both on localhost.
Each is checked the same way: the per-token logprobs of `fastpath ppl --server` are the
offline engine's (same flags) bit for bit, and `/fastpath/exactness` reports both engines'
workers; windows sent with `fastpath.server.client` are answered bitwise as offline, and the
server's own Prometheus counters (`vllm:request_success_total{engine="0"|"1"}`) show both
engines answered some and, together, exactly the windows sent.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from fastpath import cli, zoo
from fastpath.data import bundled_text
from fastpath.engine import scoring
from fastpath.engine.scorer import EngineScorer
from fastpath.metrics import perplexity
from fastpath.server.client import ServerPool
from tests.helpers import (
    START_TIMEOUT,
    Server,
    assert_bitwise_equal,
    free_port,
    runner_engine,
)

pytestmark = [pytest.mark.engine, pytest.mark.correctness]

MODEL = "tiny-llama"
MAX_MODEL_LEN = 512
KV_BYTES = 128 << 20
# test_serve.py's engine flags on both sides; everything else is fastpath's defaults.
SERVE_FLAGS = ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
               "--kv-cache-memory-bytes", str(KV_BYTES)]
OFFLINE_KWARGS = dict(dtype="float32", max_model_len=MAX_MODEL_LEN, kv_cache_memory_bytes=KV_BYTES)
TEXT_CHARS = 20000
ENGINES = {"0", "1"}  # the `engine` label of vLLM's per-engine counters
SUCCESS = "vllm:request_success_total"  # finished requests, by engine and finish reason
# A DP server starts five processes that each import vLLM (a coordinator, two engine cores,
# two API servers), not two: on a shared 2-core machine that was seen to take over 10 min.
DP_START_TIMEOUT = 2 * START_TIMEOUT


def model_path() -> str:
    return str(zoo.get_model(MODEL))


@dataclass
class DataParallelServer:
    """One URL in front of two engines, and every process group behind it."""

    layout: str
    url: str
    processes: list[Server]


@contextlib.contextmanager
def one_node(logs: Path) -> Iterator[DataParallelServer]:
    """`fastpath serve M --data-parallel-size 2`: both engines under one launcher."""
    server = Server(model_path(), [*SERVE_FLAGS, "--data-parallel-size", "2"], logs / "dp.log")
    try:
        server.wait_ready(DP_START_TIMEOUT)
        yield DataParallelServer("one-node", server.url, [server])
    finally:
        server.stop()


@contextlib.contextmanager
def two_nodes(logs: Path) -> Iterator[DataParallelServer]:
    """A head (engine rank 0 and the API servers) and a `--headless` node (engine rank 1)
    meeting at the head's DP RPC port, as on two machines."""
    joined = ["--data-parallel-size", "2", "--data-parallel-size-local", "1",
              "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(free_port())]
    head = Server(model_path(), [*SERVE_FLAGS, *joined], logs / "head.log")
    node = Server(model_path(), [*SERVE_FLAGS, *joined, "--headless",
                                 "--data-parallel-start-rank", "1"], logs / "node.log")
    try:
        # the head answers only once the node's engine has joined
        head.wait_ready(DP_START_TIMEOUT, also=[node])
        yield DataParallelServer("two-nodes", head.url, [head, node])
    finally:
        head.stop()
        node.stop()


# Both layouts are `slow` (the nightly and `-m correctness` run them): five processes start
# per layout, and CI's 40 minutes go to the completions, fuzz and upstream-series subsets.
@pytest.fixture(scope="module", params=[pytest.param("one-node", marks=pytest.mark.slow),
                                        pytest.param("two-nodes", marks=pytest.mark.slow)])
def dp_server(request, tmp_path_factory) -> Iterator[DataParallelServer]:
    start = one_node if request.param == "one-node" else two_nodes
    with start(tmp_path_factory.mktemp(request.param)) as server:
        yield server


@pytest.fixture(scope="module")
def offline():
    with runner_engine(model_path(), "v1", **OFFLINE_KWARGS) as llm:
        yield llm


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(bundled_text()[:TEXT_CHARS])
    return path


@pytest.fixture(scope="module")
def tokens(offline, text_file) -> list[int]:
    return offline.get_tokenizer().encode(text_file.read_text())


def finished_by_engine(url: str) -> dict[str, float]:
    """`vllm:request_success_total` from the server's /metrics, summed over finish reasons,
    per `engine` label (the API servers share one multiprocess Prometheus registry)."""
    from prometheus_client.parser import text_string_to_metric_families

    reply = httpx.get(f"{url}/metrics", timeout=60)
    reply.raise_for_status()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            if sample.name == SUCCESS:
                engine = sample.labels["engine"]
                counts[engine] = counts.get(engine, 0.0) + sample.value
    return counts


def test_ppl_server_bitwise_equal_to_offline(dp_server, offline, tokens, text_file, tmp_path,
                                             monkeypatch):
    """`fastpath ppl --server` through both engines: the offline per-token logprobs bit for
    bit, and an exactness report covering every worker of both engines."""
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"))
    expected = perplexity.score_stream(EngineScorer(offline), tokens, 128, 32)
    saved, report = tmp_path / "a.npy", tmp_path / "a.json"
    code = cli.main(["ppl", "--server", dp_server.url, "--text-file", str(text_file),
                     "--context-length", "128", "--stride", "32", "--save-logprobs", str(saved),
                     "--json", str(report)])
    assert code == 0
    assert_bitwise_equal(np.load(saved), expected.logprobs, what=dp_server.layout)
    summary = json.loads(report.read_text())
    assert summary["windows"] == expected.num_windows
    assert summary["perplexity"] == expected.perplexity  # same bits, same fsum
    (served,) = summary["exactness"]
    offline_report = scoring.exactness(offline)
    assert served["schedule"] == "isolated"
    assert served["lm_head_rows"] == offline_report["lm_head_rows"]
    assert sorted(w["dp_rank"] for w in served["workers"]) == [0, 1], served["workers"]
    for worker in served["workers"]:  # one machine: the offline worker's kernels
        assert worker["kernels"] == offline_report["workers"][0]["kernels"], worker


def test_windows_spread_over_both_engines(dp_server, offline, tokens):
    """Windows sent through `fastpath.server.client` (8 in flight): every answer the offline bits;
    the server's counters say both engines answered some, and all of them together
    answered exactly the windows sent (none lost, none twice)."""
    windows = perplexity.make_windows(len(tokens), 96, 16)
    requests = perplexity.window_requests(tokens, windows)
    before = finished_by_engine(dp_server.url)
    pool = ServerPool([dp_server.url], max_in_flight=8)
    answers = pool.score_sync(requests)
    assert pool.stats.retries == 0 and pool.stats.answered_once  # each window sent once
    logprobs = perplexity.assemble(len(tokens), windows, [a.targets for a in answers])
    offline_run = perplexity.score_stream(EngineScorer(offline), tokens, 96, 16)
    assert_bitwise_equal(logprobs, offline_run.logprobs, what=dp_server.layout)
    # The API server counts a request after it has answered it: wait for the last ones.
    deadline = time.monotonic() + 60
    while True:
        after = finished_by_engine(dp_server.url)
        served = {e: after.get(e, 0.0) - before.get(e, 0.0) for e in after}
        if sum(served.values()) >= len(requests) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print(f"{dp_server.layout}: {len(requests)} windows, {SUCCESS} by engine {served}")
    assert set(served) == ENGINES, served
    assert all(served[e] > 0 for e in ENGINES), served
    assert sum(served.values()) == len(requests), served
