"""Scoring over HTTP against real `fastpath serve` processes on 127.0.0.1.

Two servers (started together, shared by the module) and one offline engine with the
same flags. Shown here: server == offline bitwise (per-token logprobs of `fastpath ppl`,
and arbitrary requests under concurrent load); one server == two servers; a server killed
mid-run loses no window and counts none twice; a client that disconnects and bad input
over HTTP leave the server serving the same bits; the prefix cache cannot be reached.
The test that kills a server kills one started for it alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from fastpath import cli, zoo
from fastpath.data import bundled_text
from fastpath.engine import scoring
from fastpath.engine.scorer import EngineScorer
from fastpath.engine.scoring import ScoreRequest
from fastpath.metrics import basefile, conventions, kld, perplexity
from fastpath.server import client
from fastpath.server.client import ScoringClient, ServerPool, score_body
from tests.helpers import (
    VLLM_INFO_LINE,
    Server,
    assert_bitwise_equal,
    ci_or_slow,
    runner_engine,
    running,
)

pytestmark = [pytest.mark.engine, pytest.mark.correctness]

MODEL = "tiny-llama"
MAX_MODEL_LEN = 512
MAX_REQUEST_BYTES = 4 << 20
KV_BYTES = 128 << 20
# The same engine flags on both sides; everything else is fastpath's defaults.
SERVE_FLAGS = ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
               "--kv-cache-memory-bytes", str(KV_BYTES)]
OFFLINE_KWARGS = dict(dtype="float32", max_model_len=MAX_MODEL_LEN, kv_cache_memory_bytes=KV_BYTES)
TEXT_CHARS = 20000
LOAD_REQUESTS = 200
LOAD_CLIENTS = 16


def model_path() -> str:
    return str(zoo.get_model(MODEL))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers started at once: `a` quiet (the default), `b` with -v."""
    logs = tmp_path_factory.mktemp("serve")
    flags = [*SERVE_FLAGS, "--max-request-bytes", str(MAX_REQUEST_BYTES)]
    a = Server(model_path(), flags, logs / "a.log")
    b = Server(model_path(), [*flags, "-v"], logs / "b.log")
    try:
        a.wait_ready()
        b.wait_ready()
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def offline():
    with runner_engine(model_path(), "v1", **OFFLINE_KWARGS) as llm:
        yield llm


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(bundled_text()[:TEXT_CHARS])
    return path


@pytest.fixture(scope="module")
def tokens(offline, text_file):
    return offline.get_tokenizer().encode(text_file.read_text())


def vocab(llm) -> int:
    return llm.llm_engine.model_config.get_vocab_size()


def post(url: str, body=None, raw: bytes | None = None, timeout: float = 120) -> httpx.Response:
    if raw is None:
        return httpx.post(f"{url}{client.SCORE_ROUTE}", json=body, timeout=timeout)
    return httpx.post(f"{url}{client.SCORE_ROUTE}", content=raw, timeout=timeout,
                      headers={"content-type": "application/json"})


def score_one(url: str, request: ScoreRequest) -> np.ndarray:
    async def go():
        async with ScoringClient(url) as c:
            return (await c.score(request)).targets
    return asyncio.run(go())


def test_quiet_by_default_and_verbose_reaches_engine_processes(servers):
    a, b = servers
    # the line comes from serve's own /health poll, which may trail the fixture's
    deadline = time.monotonic() + 60
    while "ready at " + a.url not in a.log_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "ready at " + a.url in a.log_text()
    assert not VLLM_INFO_LINE.findall(a.log_text()), VLLM_INFO_LINE.findall(a.log_text())[:3]
    info_lines = [line for line in b.log_text().splitlines() if " INFO " in line]
    assert "(EngineCore pid=" in "".join(info_lines)


def test_server_tokenizer_is_the_offline_tokenizer(servers, tokens, text_file):
    assert client.ServerTokenizer(servers[0].url).encode(text_file.read_text()) == tokens


def test_ppl_server_bitwise_equal_to_offline(servers, offline, tokens, text_file, tmp_path,
                                             monkeypatch):
    """`fastpath ppl --server` (the CLI) against the offline path on the same engine flags;
    its JSON says what the server's bits rest on, as the offline engine reports it."""
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"))
    expected = perplexity.score_stream(EngineScorer(offline), tokens, 128, 32)
    for extra in ([], ["--tokenizer", model_path()]):
        saved, report = tmp_path / "a.npy", tmp_path / "a.json"
        code = cli.main(["ppl", "--server", servers[0].url, "--text-file", str(text_file),
                         "--context-length", "128", "--stride", "32", "--save-logprobs",
                         str(saved), "--json", str(report), *extra])
        assert code == 0
        assert_bitwise_equal(np.load(saved), expected.logprobs, what=f"--server {extra}")
        summary = json.loads(report.read_text())
        assert summary["windows"] == expected.num_windows
        assert summary["scored_tokens"] == len(tokens) - 1
        assert summary["perplexity"] == expected.perplexity  # same bits, same fsum
        (served,) = summary["exactness"]
        offline_report = scoring.exactness(offline)
        assert served["url"] == servers[0].url and served["schedule"] == "isolated"
        assert served["lm_head_rows"] == offline_report["lm_head_rows"]
        assert served["workers"][0]["kernels"] == offline_report["workers"][0]["kernels"]


# CI keeps lm-eval's (no special tokens, a prefix token: the least like fastpath's own);
# the nightly and `-m correctness` run all three.
@pytest.mark.parametrize("convention, stride", ci_or_slow(
    [("hf", "32"), ("lm-eval", None), ("llama.cpp", None)], ["lm-eval"], ids=lambda p: p[0]))
def test_ppl_server_every_convention_bitwise_equal_to_offline(servers, offline, text_file,
                                                            tmp_path, convention, stride):
    """`fastpath ppl --server --convention P` lays out P's windows from the server's tokenizer
    (its /tokenize and /fastpath/tokenizer) and scores them there: the offline engine's
    layout and bits, and the same (weighted) perplexity."""
    text = text_file.read_text()
    layout = conventions.build(convention, offline.get_tokenizer(), text, 128,
                             None if stride is None else int(stride))
    expected = perplexity.score_layout(EngineScorer(offline), layout)
    saved, report = tmp_path / "p.npy", tmp_path / "p.json"
    code = cli.main(["ppl", "--server", servers[0].url, "--text-file", str(text_file),
                     "--convention", convention, "--context-length", "128",
                     *(["--stride", stride] if stride else []),
                     "--save-logprobs", str(saved), "--json", str(report)])
    assert code == 0
    summary = json.loads(report.read_text())
    assert (summary["convention"], summary["windows"]) == (convention, len(layout.windows))
    assert summary["stream_tokens"] == len(layout.tokens)
    assert_bitwise_equal(np.load(saved), expected.logprobs, what=f"--convention {convention}")
    assert summary["perplexity"] == expected.perplexity


def test_kld_on_servers_bitwise_equal_to_offline(servers, offline, text_file, tmp_path):
    """`fastpath kld --server A --base-server B`, then `--server A --base-cache FILE` (the
    base file of an offline base pass): per-token values and statistics equal the offline
    passes' bit for bit (both servers serve the offline engine's model and flags)."""
    text = text_file.read_text()
    layout = conventions.build("fastpath", offline.get_tokenizer(), text, 128, 64)
    engine = EngineScorer(offline)
    target, top_lp, top_ids, _ = kld.base_pass(engine, layout, 8)
    base = basefile.from_layout(layout, target, top_lp, top_ids, vocab(offline),
                                basefile.tokenizer_fingerprint(offline.get_tokenizer()))
    expected = kld.compare(layout, base, kld.model_pass(engine, layout, base))
    base_file = tmp_path / "base.npz"
    base.save(base_file)
    window_flags = ["--text-file", str(text_file), "--context-length", "128", "--stride", "64",
                    "--top-k", "8"]
    for name, base_flags in (("base server", ["--base-server", servers[1].url]),
                             ("base file", ["--base-cache", str(base_file)])):
        per_token, report = tmp_path / f"{name}.npz", tmp_path / f"{name}.json"
        code = cli.main(["kld", "--server", servers[0].url, *base_flags, *window_flags,
                         "--save-per-token", str(per_token), "--json", str(report)])
        assert code == 0, name
        got = np.load(per_token)
        for key, want in expected.per_token().items():  # float32, float64 and bool arrays
            assert got[key].dtype == want.dtype and got[key].tobytes() == want.tobytes(), \
                f"{name}: {key} differs"
        summary = json.loads(report.read_text())
        for key, value in expected.summary().items():
            assert summary[key] == value or (value != value and summary[key] != summary[key]), \
                f"{name}: {key} {summary[key]} != {value}"


def window_stream(tokens, context_length, stride):
    windows = perplexity.make_windows(len(tokens), context_length, stride)
    return windows, perplexity.window_requests(tokens, windows)


def test_one_and_two_servers_same_bits(servers, offline, tokens):
    windows, requests = window_stream(tokens, 96, 16)
    one = ServerPool([servers[0].url])
    two = ServerPool([s.url for s in servers], max_in_flight=4)
    by_one = perplexity.assemble(len(tokens), windows,
                                 [a.targets for a in one.score_sync(requests)])
    by_two = perplexity.assemble(len(tokens), windows,
                                 [a.targets for a in two.score_sync(requests)])
    assert_bitwise_equal(by_two, by_one, what="two servers vs one")
    offline_run = perplexity.score_stream(EngineScorer(offline), tokens, 96, 16)
    assert_bitwise_equal(by_one, offline_run.logprobs,
                         what="one server vs offline")
    assert all(n > 0 for n in two.stats.answered_by.values()), two.stats.answered_by
    assert two.stats.answered_once and not two.stats.dead_servers


def load_requests(vocab_size: int, count: int, seed: int = 11) -> list[ScoreRequest]:
    """Arbitrary requests: any length up to the model's limit, any start, any target ids."""
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(count):
        length = int(rng.integers(2, MAX_MODEL_LEN))
        start = int(rng.integers(0, length - 1))
        prompt = rng.integers(0, vocab_size, length).tolist()
        targets = rng.integers(0, vocab_size, length - 1 - start).tolist()
        requests.append(ScoreRequest(prompt, targets, start))
    return requests


async def concurrent_clients(url: str, requests, clients: int):
    """`clients` independent clients, each sending its share one request at a time."""
    answers: list = [None] * len(requests)
    latencies: list[float] = []

    async def one_client(indices):
        async with ScoringClient(url) as c:
            for i in indices:
                started = time.perf_counter()
                answers[i] = (await c.score(requests[i])).targets
                latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(one_client(range(k, len(requests), clients)) for k in range(clients)))
    return answers, latencies


def test_exactness_route_answers_get_only(servers):
    reply = httpx.post(f"{servers[0].url}{client.EXACTNESS_ROUTE}", timeout=60)
    assert reply.status_code == 405 and "takes GET" in reply.json()["error"]["message"]


def test_load_every_answer_correct(servers, offline):
    """200 requests from 16 concurrent clients, each the offline engine's bits: both sides
    run fastpath's isolated schedule, so whatever shares the server's steps and whenever a
    request arrives, it is computed as offline."""
    requests = load_requests(vocab(offline), LOAD_REQUESTS)
    expected = scoring.score(offline, requests, "fast")
    started = time.perf_counter()
    answers, latencies = asyncio.run(concurrent_clients(servers[0].url, requests, LOAD_CLIENTS))
    seconds = time.perf_counter() - started
    for i, (got, want) in enumerate(zip(answers, expected, strict=True)):
        assert_bitwise_equal(got, want, what=f"load request {i}")
    rows = sum(len(r.target_token_ids) for r in requests)
    print(f"{LOAD_REQUESTS} requests from {LOAD_CLIENTS} clients: {rows / seconds:.0f} scored "
          f"rows/s, latency {client.percentiles(latencies)}")


SOAK_REQUESTS, SOAK_CLIENTS = 5000, 64


@pytest.mark.load
@pytest.mark.skipif(os.environ.get("FASTPATH_LOAD") != "1"
                    and os.environ.get("HYPOTHESIS_PROFILE") != "nightly",
                    reason="long soak: set FASTPATH_LOAD=1 or HYPOTHESIS_PROFILE=nightly")
def test_soak_every_answer_correct(servers, offline):
    """The load test at 25x the requests and 4x the clients (nightly)."""
    requests = load_requests(vocab(offline), SOAK_REQUESTS, seed=12)
    expected = scoring.score(offline, requests, "fast")
    answers, latencies = asyncio.run(concurrent_clients(servers[0].url, requests, SOAK_CLIENTS))
    for i, (got, want) in enumerate(zip(answers, expected, strict=True)):
        assert_bitwise_equal(got, want, what=f"soak request {i}")
    print(f"soak: {SOAK_REQUESTS} requests, latency {client.percentiles(latencies)}")


@pytest.fixture(scope="module")
def good(servers, tokens):
    """A good request and the server's answer before any bad input."""
    request = ScoreRequest(tokens[:300], tokens[1:300])
    return request, score_one(servers[0].url, request)


def _good_params(prompt, rows, **extra):
    return {"token_ids": prompt, "sampling_params": {
        "max_tokens": 1, "prompt_logprob_token_ids": rows, **extra}}


def _bad_inputs():
    """(name, body or raw bytes, expected status, fragment of the error message)."""
    ids = list(range(10, 40))
    rows = [[t] for t in ids[1:]]
    raw = lambda body: json.dumps(body).encode()  # noqa: E731
    return [
        ("wrong row count", _good_params(ids, rows[:-1]), 400,
         "prompt_logprob_token_ids has 28 rows"),
        ("out-of-vocabulary target", _good_params(ids, rows[:-1] + [[10**6]]), 400,
         "prompt_logprob_token_ids contain out-of-vocab"),
        ("negative target", _good_params(ids, rows[:-1] + [[-5]]), 400,
         "prompt_logprob_token_ids contain out-of-vocab"),
        ("negative prompt id", _good_params([-3, *ids[1:]], rows), 400,
         "token_ids must not contain negative values"),
        ("out-of-vocabulary prompt id", _good_params([99999, *ids[1:]], rows), 400,
         "Token id 99999 is out of vocabulary"),
        ("string target", _good_params(ids, [[str(t)] for t in ids[1:]]), 400,
         "prompt_logprob_token_ids.0.0"),
        ("string prompt id", _good_params(["a", *ids[1:]], rows), 400,
         "unable to parse string as an integer"),
        ("float target", _good_params(ids, [[t + 0.5] for t in ids[1:]]), 400,
         "prompt_logprob_token_ids.0.0"),
        ("float prompt id", _good_params([1.5, *ids[1:]], rows), 400,
         "got a number with a fractional part"),
        ("NaN target", raw(_good_params(ids, rows[:-1] + [[float("nan")]])), 400,
         "prompt_logprob_token_ids.28.0"),
        ("1-D targets", _good_params(ids, ids[1:]), 400, "Input should be a valid list"),
        ("negative start", _good_params(ids, rows, prompt_logprob_start=-1), 400,
         "prompt_logprob_start must be non-negative"),
        ("prompt longer than max_model_len", _good_params([5] * 600, [[5]] * 599), 400,
         "max_model_len"),
        ("empty prompt", _good_params([], []), 400, "token_ids"),
        ("malformed JSON", b'{"token_ids": [1, 2,', 400, "JSON decode error"),
        ("body far too large", b'{"token_ids": [' + b"1234567, " * (MAX_REQUEST_BYTES // 9 + 1)
         + b"1]}", 413, f"exceeds the limit of {MAX_REQUEST_BYTES} bytes"),
    ]


@pytest.mark.parametrize("name, body, status, fragment", _bad_inputs(),
                         ids=[case[0] for case in _bad_inputs()])
def test_bad_input_over_http(servers, good, name, body, status, fragment):
    url = servers[0].url
    reply = post(url, raw=body) if isinstance(body, bytes) else post(url, body)
    assert reply.status_code == status, (name, reply.status_code, reply.text[:500])
    assert fragment in reply.json()["error"]["message"], reply.text[:1000]
    request, before = good
    assert_bitwise_equal(score_one(url, request), before, what=f"good request after {name}")


def test_body_too_large_without_content_length(servers, good):
    """A chunked upload has no Content-Length: refused once the limit is passed."""
    def chunks():
        for _ in range(MAX_REQUEST_BYTES // 100_000 + 2):
            yield b"1234567, " * 11_112
    reply = httpx.post(f"{servers[0].url}{client.SCORE_ROUTE}", content=chunks(), timeout=120,
                       headers={"content-type": "application/json"})
    assert reply.status_code == 413 and "--max-request-bytes" in reply.text
    request, before = good
    assert_bitwise_equal(score_one(servers[0].url, request), before, what="after chunked 413")


def _raw_post(port: int, body: bytes, declared: int | None = None) -> socket.socket:
    """An HTTP request on a bare socket, left open for the caller to drop."""
    raw = socket.create_connection(("127.0.0.1", port))
    raw.sendall(b"POST /inference/v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: "
                b"application/json\r\nContent-Length: %d\r\n\r\n" % (declared or len(body))
                + body)
    return raw


def test_client_disconnect_leaves_server_serving(servers, good, offline):
    url, port = servers[0].url, servers[0].port
    _raw_post(port, b'{"token_ids": [1, 2,', declared=100_000).close()  # gone mid-upload
    prompt = list(range(1, MAX_MODEL_LEN - 1))
    long_request = ScoreRequest(prompt, prompt[1:])
    body = json.dumps(score_body(long_request)).encode()
    for raw in [_raw_post(port, body) for _ in range(8)]:  # gone before the answers
        raw.close()
    time.sleep(1.0)
    assert servers[0].alive()
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    request, before = good
    assert_bitwise_equal(score_one(url, request), before, what="after disconnects")
    assert_bitwise_equal(score_one(url, long_request),
                         scoring.score(offline, [long_request], "fast")[0], what="long request")


def test_prefix_cache_cannot_be_reached_over_http(servers, offline):
    """A warm prefix cache and skip_reading_prefix_cache=False: the cold bits, as README
    promises (the scheduler patch turns prefix-cache reads off for every fixed-id request,
    whatever the request says; upstream only fills the flag when it is None)."""
    url = servers[0].url
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, vocab(offline), 450).tolist()
    for start in (0, 300):
        request = ScoreRequest(prompt, prompt[start + 1:], start)
        cold = scoring.score(offline, [request], "fast")[0]
        warm_up = post(url, {"token_ids": prompt, "sampling_params": {"max_tokens": 1}})
        assert warm_up.status_code == 200, warm_up.text[:500]
        body = score_body(request)
        body["sampling_params"]["skip_reading_prefix_cache"] = False
        reply = post(url, body)
        assert reply.status_code == 200, reply.text[:500]
        encoded = reply.json()["prompt_token_id_logprobs"]
        assert encoded, f"start {start}: no scores (the request failed): {reply.text[:500]}"
        warm = client.decode_scores(encoded)  # NaN would be a mismatch too: bits compared
        assert warm.shape == (len(request.target_token_ids), 1), warm.shape
        assert_bitwise_equal(warm[:, 0], cold, what=f"warm prefix cache, start {start}")


@pytest.fixture
def hung_server():
    """A TCP server that accepts connections and never answers: a hung host."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()


def test_windows_of_a_hung_server_time_out_and_move(servers, offline, tokens, hung_server):
    """Every request to the hung server times out; the windows go to the live one."""
    windows, requests = window_stream(tokens[:2000], 64, 16)
    pool = ServerPool([hung_server, servers[0].url], max_in_flight=4, timeout=2.0,
                      probe_interval=0.2)
    logprobs = perplexity.assemble(2000, windows, [a.targets for a in pool.score_sync(requests)])
    # the hung server's first 4 windows timed out and were answered by the live one
    assert pool.stats.answered_by == {hung_server: 0, servers[0].url: len(requests)}
    assert pool.stats.answered_once and pool.stats.retries >= 4
    assert pool.stats.dead_servers in ([], [hung_server])  # given up, or the run ended first
    offline_run = perplexity.score_stream(EngineScorer(offline), tokens[:2000], 64, 16)
    assert_bitwise_equal(logprobs, offline_run.logprobs,
                         what="after timeouts on a hung server")


@pytest.fixture
def doomed_server(tmp_path):
    """A server of its own for the test that kills one: the module's servers stay up for
    every other test, whatever order they run in."""
    with running(model_path(), SERVE_FLAGS, tmp_path / "doomed.log") as server:
        yield server


def test_one_of_two_servers_killed_mid_run(servers, offline, tokens, doomed_server):
    """Kills server b once a quarter of the windows are answered."""
    a, b = servers[0], doomed_server
    windows, requests = window_stream(tokens, 64, 8)
    expected = perplexity.score_stream(EngineScorer(offline), tokens, 64, 8).logprobs
    answered = {a.url: 0, b.url: 0}

    def on_answer(index: int, url: str) -> None:
        answered[url] += 1
        if b.alive() and sum(answered.values()) >= len(requests) // 4 and answered[b.url]:
            b.kill()

    pool = ServerPool([a.url, b.url], max_in_flight=4, probe_interval=0.5)
    per_window = asyncio.run(pool.score(requests, on_answer=on_answer))
    assert not b.alive(), "the run ended before the server was killed"
    # Given up after its failed probes, or the run ended first (a quiet machine answers the
    # rest on `a` before the probes run out): either way nothing was lost or doubled.
    assert pool.stats.dead_servers in ([], [b.url])
    assert pool.stats.answered_once
    assert sum(pool.stats.answered_by.values()) == len(requests)
    assert pool.stats.answered_by[b.url] < len(requests) // 2
    logprobs = perplexity.assemble(len(tokens), windows,  # each token once
                                  [a.targets for a in per_window])
    assert_bitwise_equal(logprobs, expected, what="after one of two servers was killed")
    print(f"{len(requests)} windows, answered {pool.stats.answered_by}, "
          f"{pool.stats.retries} retried")
