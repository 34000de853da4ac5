"""`fastpath kld` costs: the base pass (targets + top-K) and the model pass against fast `ppl`.

On each benchmark model (the Llama-3 8B shape twin is the one the target is stated for:
base pass at K=32 at most 2x a fast `fastpath ppl` window, context 2048, stride 512), the
same steady-state windows are scored in interleaved rounds: fast path, base pass, model
pass (the engine's own model against its own top-K). Ratios of medians from one run go
into `extra_info`, with the base file's size per scored token.
"""

from __future__ import annotations

import statistics
import time

import pytest

from benchmarks.conftest import steady_windows, stream_tokens
from benchmarks.test_scoring import CONTEXT, STRIDE, _common_info, fit_context
from fastpath.engine import scoring
from fastpath.engine.scorer import EngineScorer
from fastpath.metrics import basefile, conventions, kld, perplexity
from fastpath.metrics.windows import Window

TOP_K = 32
ROUNDS = 3


def _steady_layout(tokens, context: int, stride: int, count: int) -> conventions.Layout:
    """The measured windows over the tokens they touch (stream rebased to their start)."""
    windows = steady_windows(tokens, context, stride, count)
    first = windows[0].begin
    return conventions.Layout(
        "fastpath", tuple(tokens[first : windows[-1].end]),
        tuple(Window(w.begin - first, w.end - first, w.score_from - first) for w in windows),
        context, stride)


@pytest.mark.parametrize("top_k", [TOP_K])
def test_kld_passes(benchmark, bench_engine, request, tmp_path, top_k):
    """Seconds per window of the base pass (K=32) and the model pass, against fast."""
    llm = bench_engine
    count = request.config.getoption("--bench-windows")
    context = fit_context(llm, CONTEXT)
    stride = min(STRIDE, context)
    layout = _steady_layout(stream_tokens(llm.llm_engine.model_config.model), context, stride,
                            count)
    requests = perplexity.window_requests(layout.tokens, layout.windows)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    fingerprint = basefile.tokenizer_fingerprint(llm.get_tokenizer())

    batched = EngineScorer(llm, max_batch=count)

    def base_scores():
        target, top_lp, top_ids, _ = kld.base_pass(batched, layout, top_k)
        return basefile.from_layout(layout, target, top_lp, top_ids, vocab, fingerprint)

    base = base_scores()  # warm-up of every shape the rounds use
    scoring.score(llm, requests, "fast")
    kld.model_pass(batched, layout, base)

    seconds: dict[str, list[float]] = {"fast": [], "base": [], "model": []}

    def one_round():
        for name, run in (("fast", lambda: scoring.score(llm, requests, "fast")),
                          ("base", base_scores),
                          ("model", lambda: kld.model_pass(batched, layout, base))):
            started = time.perf_counter()
            run()
            seconds[name].append((time.perf_counter() - started) / len(requests))

    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    size = base.save(tmp_path / "base.npz")
    info = _common_info(llm, f"kld-base-k{top_k}", context, stride)
    info.update(
        seconds_per_window=median["base"], fast_seconds_per_window=median["fast"],
        model_pass_seconds_per_window=median["model"],
        base_pass_cost_ratio=median["base"] / median["fast"],
        model_pass_cost_ratio=median["model"] / median["fast"],
        base_file_bytes=size, base_file_bytes_per_token=size / base.num_scored,
        scored_tokens=base.num_scored, windows=len(requests), top_k=top_k,
        rounds=ROUNDS, extrapolated=False)
    benchmark.extra_info.update(info)
    print(f"\n{llm.fastpath_name}: fast {median['fast']:.3f} s/window, base pass K={top_k} "
          f"{median['base']:.3f} ({info['base_pass_cost_ratio']:.2f}x), model pass "
          f"{median['model']:.3f} ({info['model_pass_cost_ratio']:.2f}x); base file "
          f"{info['base_file_bytes_per_token']:.1f} bytes per scored token")
