"""Peers, timed side by side in one run: same model, same text, same window length.

- `hf-transformers`: the loop of Hugging Face's guide "Perplexity of fixed-length
  models" in transformers (`fastpath.testing.peers.hf_guide_nll`), stride = window length, with
  the worker's thread budget on CPU (like the floor);
- `lm-eval-vllm`: lm-evaluation-harness's rolling log-likelihood through this vLLM
  engine: disjoint windows with one token of context, `prompt_logprobs=1` dicts
  (`fastpath.testing.peers.lm_eval_score`);
- `fastpath-ppl`: what `fastpath ppl` runs (`perplexity.score_stream`, fast path), stride =
  context, so consecutive windows share one token (the same one token of context as lm-eval).
The text is the first `--peer-windows` x (context - 1) tokens of the bundled text, so each
peer runs that many forward passes of at most `context` tokens. Each peer gets one untimed
pass first. Figures (tokens/s on the tokens each peer scores, seconds for the whole text,
PPL) go into extra_info; `fastpath report` writes peers.csv and peers.png with the ratios.
`fastpath-ppl`'s own row also carries `speedup_vs_PEER`: the other peers are timed inside
that test too (same text, same rounds), so the ratio never depends on which tests ran.

    pytest benchmarks/test_peers.py --benchmark-save=NAME   # 2 cores: up to about 6 minutes
    (3 for the peers' own tests, as much again for fastpath-ppl timing the other two)
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import vllm

from benchmarks.conftest import stream_tokens
from benchmarks.test_scoring import CONTEXT, fit_context, floor_threads
from fastpath.engine.runners import device_name
from fastpath.engine.scorer import EngineScorer
from fastpath.metrics import perplexity
from fastpath.testing.peers import PeerResult, hf_guide_nll, lm_eval_score

PEERS = ("hf-transformers", "lm-eval-vllm", "fastpath-ppl")
ROUNDS = 2  # timed rounds per peer, after one untimed pass


@pytest.fixture(scope="module")
def hf_model(bench_engine):
    """The engine's checkpoint in transformers, in the engine's dtype, on its device."""
    from transformers import AutoModelForCausalLM

    config = bench_engine.llm_engine.model_config
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=config.dtype)
    return model.to(device).eval()


def peer_text(llm, windows: int) -> tuple[list[int], int]:
    """The token stream every peer scores, and the window length (context)."""
    context = fit_context(llm, CONTEXT)
    tokens = stream_tokens(llm.llm_engine.model_config.model)
    length = windows * (context - 1)
    if len(tokens) < length:
        raise RuntimeError(f"bundled text too short for {windows} windows of {context}")
    return tokens[:length], context


def prefix_token(llm) -> int:
    """lm-eval's prefix token for the first window: BOS where the tokenizer has one, else EOS."""
    tokenizer = llm.get_tokenizer()
    bos = tokenizer.bos_token_id
    return bos if bos is not None else tokenizer.eos_token_id


def peer_run(request, llm, peer: str, tokens: list[int], context: int):
    """One pass of `peer` over `tokens`, and the torch thread count it runs with."""
    tp = llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size
    if peer == "hf-transformers":
        model = request.getfixturevalue("hf_model")

        def run() -> PeerResult:
            return hf_guide_nll(model, tokens, max_length=context, stride=context)

        return run, (None if torch.cuda.is_available() else floor_threads(tp))
    if peer == "lm-eval-vllm":
        prefix = prefix_token(llm)

        def run() -> PeerResult:
            return lm_eval_score(llm, tokens, prefix, max_length=context)

        return run, None

    def run() -> PeerResult:
        result = perplexity.score_stream(EngineScorer(llm), tokens, context, context)
        return PeerResult(nll_sum=result.nll_sum, scored_tokens=result.num_tokens,
                          windows=result.num_windows)

    return run, None


def timed_peer(run, threads: int | None, timer) -> PeerResult:
    """One untimed pass of `run`, then `timer(run)` (the timed rounds), on `threads` threads."""
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        result = run()  # untimed: kernels for these shapes, the model paged in
        timer(run)
    finally:
        torch.set_num_threads(saved)
    return result


def tokens_per_second(request, llm, peer: str, tokens: list[int], context: int) -> float:
    """Tokens/s of `peer` over `tokens`, timed as `test_peer` times it (median of ROUNDS)."""
    seconds: list[float] = []

    def timer(run) -> None:
        for _ in range(ROUNDS):
            started = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - started)

    result = timed_peer(*peer_run(request, llm, peer, tokens, context), timer)
    return result.scored_tokens / float(np.median(seconds))


@pytest.mark.bench_models("8B")
@pytest.mark.parametrize("peer", PEERS)
def test_peer(benchmark, bench_engine, request, peer):
    """Seconds and tokens/s for one peer over the shared text."""
    llm = bench_engine
    tokens, context = peer_text(llm, request.config.getoption("--peer-windows"))
    tp = llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size
    run, threads = peer_run(request, llm, peer, tokens, context)
    result = timed_peer(run, threads, lambda run: benchmark.pedantic(
        run, rounds=ROUNDS, warmup_rounds=0, iterations=1))
    seconds = benchmark.stats.stats.median
    rate = result.scored_tokens / seconds
    info = {
        "table": "peers", "peer": peer, "model": llm.fastpath_name,
        "model_shape": llm.fastpath_shape, "context_length": context,
        "stream_tokens": len(tokens), "windows": result.windows,
        "scored_tokens": result.scored_tokens, "seconds": seconds, "tokens_per_second": rate,
        "perplexity": result.perplexity, "tensor_parallel_size": tp, "device": device_name(),
        "vllm_version": vllm.__version__,
        "threads": threads,
    }
    if peer == "fastpath-ppl":  # the others timed here, in this test: ratios of one run
        for other in PEERS[:-1]:
            info[f"speedup_vs_{other}"] = rate / tokens_per_second(request, llm, other, tokens,
                                                                   context)
    benchmark.extra_info.update(info)
    assert result.scored_tokens > 0 and 1.0 < result.perplexity < float("inf")
