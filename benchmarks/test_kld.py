"""`fastpath kld` costs: the base pass (targets + top-K) and the model pass against fast `ppl`,
the standard path's full-vocabulary route, and several variants in one run against one
run each.

`test_kld_passes`: on each benchmark model (the Llama-3 8B shape twin is the one the
targets are stated for: base pass at K=32 at most 2x a fast `fastpath ppl` window, a
variant's model pass at most 1.2x, context 2048, stride 512), the same steady-state windows
are scored in interleaved rounds: fast path, base pass, model pass (the engine's own model
against its own top-K). Ratios of medians from one run go into `extra_info`, with the base
file's size per scored token, and the full-vocabulary route (prompt_logprobs=-1, which
builds a dict of every id per prompt row: the route llm-compressor#2646 timed) measured on
short windows and extrapolated per row to the same windows.

`test_variants_in_one_run`: `fastpath kld --base-model B --model Q1 --model Q2` against two
runs of one variant each (each with its own base pass), wall time of the whole commands,
engine starts included: the real quantized checkpoints (llm-compressor W8A8 and W4A8) where
the quantizer environment is set (`tox -e quant`), else round-to-nearest int8 and int4
copies run on vLLM's fp32 kernels (said in extra_info).
"""

from __future__ import annotations

import json
import statistics
import time

import pytest

from benchmarks.conftest import steady_windows, stream_tokens
from benchmarks.test_scoring import (
    CONTEXT,
    FULL_VOCAB_CONTEXT,
    FULL_VOCAB_STRIDE,
    STRIDE,
    _common_info,
    fit_context,
)
from fastpath import cli, zoo
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
    full_route = full_vocabulary_route_seconds(llm, layout)
    size = base.save(tmp_path / "base.npz")
    info = _common_info(llm, f"kld-base-k{top_k}", context, stride)
    info.update(
        seconds_per_window=median["base"], fast_seconds_per_window=median["fast"],
        model_pass_seconds_per_window=median["model"],
        base_pass_cost_ratio=median["base"] / median["fast"],
        model_pass_cost_ratio=median["model"] / median["fast"],
        base_file_bytes=size, base_file_bytes_per_token=size / base.num_scored,
        scored_tokens=base.num_scored, windows=len(requests), top_k=top_k,
        own_top_k=kld.own_top_k(base), rounds=ROUNDS, extrapolated=False,
        full_vocabulary_route_seconds_per_window=full_route,
        full_vocabulary_route_over_model_pass=full_route / median["model"],
        full_vocabulary_route_extrapolated=True)
    benchmark.extra_info.update(info)
    print(f"\n{llm.fastpath_name}: fast {median['fast']:.3f} s/window, base pass K={top_k} "
          f"{median['base']:.3f} ({info['base_pass_cost_ratio']:.2f}x), model pass "
          f"{median['model']:.3f} ({info['model_pass_cost_ratio']:.2f}x); base file "
          f"{info['base_file_bytes_per_token']:.1f} bytes per scored token; the "
          f"full-vocabulary route {full_route:.1f} s/window (extrapolated, "
          f"{info['full_vocabulary_route_over_model_pass']:.0f}x the model pass)")


def full_vocabulary_route_seconds(llm, layout: conventions.Layout) -> float:
    """Seconds per window of the layout on the standard path with prompt_logprobs=-1 (the
    full distribution of every prompt row, which that path computes for scored and unscored
    rows alike), extrapolated per row from one short window: at 2048 rows and 128K ids it
    would take tens of minutes."""
    tokens = list(layout.tokens)
    short = perplexity.window_requests(
        tokens, steady_windows(tokens, FULL_VOCAB_CONTEXT, FULL_VOCAB_STRIDE, 1))
    scoring.score(llm, short, "standard", -1)  # untimed: this shape's kernels
    started = time.perf_counter()
    scoring.score(llm, short, "standard", -1)
    per_row = (time.perf_counter() - started) / (FULL_VOCAB_CONTEXT - 1)
    rows_per_window = statistics.mean(w.end - w.begin - 1 for w in layout.windows)
    return per_row * rows_per_window


def variant_checkpoints(name: str) -> tuple[list[str], str]:
    """Two variants of zoo model `name` and how they were made: llm-compressor's W8A8 and
    W4A8 where the quantizer environment is set, else RTN int8 and int4 fp32 copies."""
    from fastpath.testing import quantize

    try:
        quantize.quantizer_python()
    except quantize.QuantizerUnavailable:
        return ([str(quantize.get_quantized(name, bits)) for bits in (8, 4)],
                "RTN int8 and int4 copies, fp32 kernels")
    return ([str(quantize.get_compressed(name, scheme)) for scheme in ("W8A8", "W4A8")],
            "llm-compressor W8A8 and W4A8, vLLM's quantized kernels")


def text_of_tokens(model: str, count: int) -> str:
    """The bundled text's first `count` tokens as text (the model's tokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model).decode(stream_tokens(model)[:count])


def test_variants_in_one_run(benchmark, bench_model, request, tmp_path):
    """Wall seconds of one `fastpath kld` run with two variants against one run per variant
    (each its own base pass), on the same windows; engines start inside each command."""
    if bench_model.zoo_name is None:
        pytest.skip("needs a zoo model to quantize (a real checkpoint brings no variants)")
    base = str(zoo.get_model(bench_model.zoo_name))
    variants, made_by = variant_checkpoints(bench_model.zoo_name)
    count = request.config.getoption("--bench-windows")
    text = tmp_path / "text.txt"  # the bundled text cut to about `count` + 1 windows
    text.write_text(text_of_tokens(base, CONTEXT + STRIDE * count))
    common = ["--base-model", base, "--text-file", str(text), "--context-length",
              str(CONTEXT), "--stride", str(STRIDE), "--top-k", "32", "--noise-floor",
              "none", "--kv-cache-memory-bytes", str(1 << 30)]

    def run(models: list[str], out) -> float:
        started = time.perf_counter()
        assert cli.main(["kld", *common, *[a for m in models for a in ("--model", m)],
                         "--json", str(out)]) == 0
        return time.perf_counter() - started

    together = benchmark.pedantic(run, args=(variants, tmp_path / "together.json"),
                                  rounds=1, warmup_rounds=0, iterations=1)
    together = benchmark.stats.stats.median
    apart = [run([v], tmp_path / f"apart{i}.json") for i, v in enumerate(variants)]
    report = json.loads((tmp_path / "together.json").read_text())
    benchmark.extra_info.update(
        model=bench_model.label, variants=len(variants), made_by=made_by,
        seconds_one_run=together, seconds_separate_runs=sum(apart),
        one_run_over_separate_runs=together / sum(apart),
        seconds_base_pass=report["seconds_base_pass"],
        seconds_model_passes=[v["seconds_model_pass"] for v in report["variants"]],
        windows=report["windows"], context_length=CONTEXT, stride=STRIDE)
    print(f"\n{bench_model.label}: {len(variants)} variants ({made_by}) in one run "
          f"{together:.0f} s, in separate runs {sum(apart):.0f} s "
          f"({together / sum(apart):.2f}x)")
