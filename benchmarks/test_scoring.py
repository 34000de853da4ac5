"""Seconds, objects and bytes per window for each way of scoring, side by side.

Methods (the report's `path` column): `prefill` (no prompt logprobs: prefill alone),
`fast` (target_token_ids, only the scored rows), `standard-kK` (prompt_logprobs=K, K in
0, 1, 20), `standard-k-1` (full vocabulary; short windows only, its 2048-token cost
extrapolated and labelled), and
`floor` (bare torch: lm_head + log-softmax + gather over the scored rows, plus prefill;
the least any scoring can cost, and the only baseline called the floor).
Every figure that is not a time goes into `benchmark.extra_info`; `fastpath report`
turns the saved runs into CSVs and plots.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import vllm

from benchmarks.conftest import steady_windows, stream_tokens
from benchmarks.measure import LogprobBytes, PeakRSS
from fastpath.engine import scoring
from fastpath.engine.runners import device_name, runner_name
from fastpath.metrics import perplexity
from fastpath.testing.measure import result_objects

CONTEXT, STRIDE = 2048, 512
# (path, K, context, stride). The main shape for every path; context 1024 shows the fast
# path's objects do not depend on the context; stride 2048 scores whole windows (2047 rows).
CASES = [
    ("prefill", None, CONTEXT, STRIDE),
    ("fast", None, CONTEXT, STRIDE),
    ("standard", 0, CONTEXT, STRIDE),
    ("standard", 1, CONTEXT, STRIDE),
    ("standard", 20, CONTEXT, STRIDE),
    ("prefill", None, 1024, STRIDE),
    ("fast", None, 1024, STRIDE),
    ("fast", None, CONTEXT, CONTEXT),
    ("standard", 0, CONTEXT, CONTEXT),
]
FULL_VOCAB_CONTEXT, FULL_VOCAB_STRIDE = 8, 4  # k=-1 builds vocab-size dicts per position
# Timed rounds per path, in `test_window` and where `test_floor` times a path beside it.
ROUNDS = {"prefill": 3, "fast": 3, "standard": 2}


def fit_context(llm, context: int) -> int:
    """The context a model can take: vLLM schedules one output token beyond the prompt."""
    return min(context, llm.llm_engine.model_config.max_model_len - 1)


def _path_name(path: str, k: int | None) -> str:
    return path if k is None else f"{path}-k{k}"


def _common_info(llm, path_name: str, context: int, stride: int) -> dict:
    return {
        "model": llm.fastpath_name, "model_shape": llm.fastpath_shape, "path": path_name,
        "context_length": context, "stride": stride,
        "tensor_parallel_size": llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size,
        "device": device_name(), "vllm_version": vllm.__version__,
        "runner": runner_name(llm),
    }


def _window_requests(llm, context: int, stride: int, count: int) -> list:
    """`count` steady-state windows of the bundled text (full context, `stride` scored)."""
    tokens = stream_tokens(llm.llm_engine.model_config.model)
    return perplexity.window_requests(tokens, steady_windows(tokens, context, stride, count))


def _seconds_per_window(llm, requests, path: str, k: int = 0) -> float:
    """Median seconds per window of `ROUNDS[path]` timed rounds, after one untimed round."""
    scoring.score(llm, requests, path, k)  # untimed: kernels for this shape
    seconds = []
    for _ in range(ROUNDS[path]):
        started = time.perf_counter()
        scoring.score(llm, requests, path, k)
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds)) / len(requests)


def _measure_once(llm, requests, path: str, k: int) -> dict:
    """One untimed pass with every counter on: objects, bytes, peak RSS, perplexity."""
    with PeakRSS() as rss, LogprobBytes(llm) as moved:
        outputs = scoring.generate(llm, requests, path, k)
    figures = {
        "objects_per_window": float(np.mean([result_objects(o) for o in outputs])),
        "bytes_per_window": moved.total / len(requests),
        "peak_rss_bytes": rss.peak,
        "scored_tokens": sum(len(r.target_token_ids) for r in requests),
        "windows": len(requests),
    }
    if path == "prefill":
        figures["perplexity"] = float("nan")
    else:
        values = np.concatenate(scoring.read_logprobs(outputs, requests, path))
        figures["perplexity"] = perplexity.PerplexityResult(values, 1).perplexity
    return figures


@pytest.mark.parametrize("path, k, context, stride", CASES,
                         ids=[f"{_path_name(p, k)}-{c}-{s}" for p, k, c, s in CASES])
def test_window(benchmark, bench_engine, request, path, k, context, stride):
    """Seconds per steady-state window (full context, `stride` scored tokens) on one path."""
    llm = bench_engine
    count = request.config.getoption("--bench-windows")
    context, stride = fit_context(llm, context), min(stride, fit_context(llm, context))
    requests = _window_requests(llm, context, stride, count)

    measured = _measure_once(llm, requests, path, k or 0)  # also the warm-up round
    benchmark.pedantic(scoring.score, args=(llm, requests, path, k or 0), rounds=ROUNDS[path],
                       warmup_rounds=0, iterations=1)
    seconds = benchmark.stats.stats.median / len(requests)
    info = _common_info(llm, _path_name(path, k), context, stride)
    info.update(measured, seconds_per_window=seconds, extrapolated=False)
    benchmark.extra_info.update(info)


def test_standard_full_vocabulary_extrapolated(benchmark, bench_engine):
    """prompt_logprobs=-1 on 8-token windows; the 2048-token cost is extrapolated per row."""
    llm = bench_engine
    tokens = stream_tokens(llm.llm_engine.model_config.model)
    windows = steady_windows(tokens, FULL_VOCAB_CONTEXT, FULL_VOCAB_STRIDE, 1)
    requests = perplexity.window_requests(tokens, windows)
    benchmark.pedantic(scoring.score, args=(llm, requests, "standard", -1), rounds=1,
                       warmup_rounds=0, iterations=1)
    # The standard path computes and returns every prompt row, scored or not.
    rows_computed = FULL_VOCAB_CONTEXT - 1
    per_row = benchmark.stats.stats.median / rows_computed
    measured = _measure_once(llm, requests, "standard", -1)
    context = fit_context(llm, CONTEXT)
    info = _common_info(llm, "standard-k-1", context, STRIDE)
    info.update(
        seconds_per_window=per_row * (context - 1),
        objects_per_window=measured["objects_per_window"] / rows_computed * (context - 1),
        bytes_per_window=measured["bytes_per_window"] / rows_computed * (context - 1),
        peak_rss_bytes=measured["peak_rss_bytes"], scored_tokens=STRIDE,
        perplexity=float("nan"), windows=1, extrapolated=True,
        measured_context_length=FULL_VOCAB_CONTEXT, measured_seconds_per_row=per_row,
    )
    benchmark.extra_info.update(info)


def floor_threads(tensor_parallel_size: int) -> int:
    """CPU threads the engine's workers compute with, so the floor gets the same budget.

    vLLM's CPU backend binds one core per worker and, when it picks the cores itself
    (TP 1), keeps one core for the front end ("reserved_cpus" in its start-up log).
    FASTPATH_FLOOR_THREADS overrides.
    """
    if os.environ.get("FASTPATH_FLOOR_THREADS"):
        return int(os.environ["FASTPATH_FLOOR_THREADS"])
    cores = os.cpu_count() or 1
    return max(1, cores - 1) if tensor_parallel_size == 1 else min(cores, tensor_parallel_size)


@pytest.mark.parametrize("stride", [STRIDE, CONTEXT], ids=["strided", "whole-window"])
def test_floor(benchmark, bench_engine, request, stride):
    """The least any exact method does: lm_head + log-softmax + gather on the scored rows.

    Bare torch at the model's shape (hidden states of the same size, the real vocabulary),
    with the workers' thread budget on CPU, plus the engine's prefill time per window.
    Two window shapes: `stride` scored rows, and the whole window (stride = context: every
    row but none scored). This benchmark times, on the engine and the same
    `--bench-windows` windows as `test_window`, `prefill` (the floor's second part),
    `fast` and `standard-k0` itself (one untimed round, then `ROUNDS` timed), so its
    figures and the ratios `fast_over_floor` and `standard-k0_over_floor` in extra_info
    come from this test alone, whichever benchmarks ran before it.
    """
    import torch
    from transformers import AutoConfig

    llm = bench_engine
    tp = llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size
    threads = torch.get_num_threads()
    config = AutoConfig.from_pretrained(llm.llm_engine.model_config.model)
    context = fit_context(llm, CONTEXT)
    stride = min(stride, context)
    rows = min(stride, context - 1)  # a whole window scores every row but its last token's
    generator = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    hidden = torch.randn(rows, config.hidden_size, generator=generator).to(device, dtype)
    weight = (torch.randn(config.vocab_size, config.hidden_size, generator=generator) * 0.02
              ).to(device, dtype)
    targets = torch.randint(0, config.vocab_size, (rows, 1), generator=generator).to(device)

    def floor_once() -> torch.Tensor:
        logits = torch.nn.functional.linear(hidden, weight)
        values = logits.log_softmax(-1, dtype=torch.float32).gather(-1, targets).cpu()
        if device == "cuda":
            torch.cuda.synchronize()
        return values

    if device == "cpu":
        torch.set_num_threads(floor_threads(tp))
    try:
        benchmark.pedantic(floor_once, rounds=5, warmup_rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    requests = _window_requests(llm, context, stride, request.config.getoption("--bench-windows"))
    prefill = _seconds_per_window(llm, requests, "prefill")
    seconds = benchmark.stats.stats.median + prefill
    info = _common_info(llm, "floor", context, stride)
    info.update(seconds_per_window=seconds,
                torch_seconds=benchmark.stats.stats.median, prefill_seconds=prefill,
                floor_threads=floor_threads(tp) if device == "cpu" else None,
                objects_per_window=0.0, bytes_per_window=4.0 * rows, scored_tokens=rows,
                perplexity=float("nan"), windows=1, extrapolated=False)
    info["fast_over_floor"] = _seconds_per_window(llm, requests, "fast") / seconds
    info["standard-k0_over_floor"] = _seconds_per_window(llm, requests, "standard", 0) / seconds
    benchmark.extra_info.update(info)
