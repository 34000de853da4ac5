"""Peak memory of one scoring step in the model worker, before and after row chunking.

One whole window fills one step (`max_num_batched_tokens` = 2048 or 8192; the window is
as long as the step allows, every row scored), on the 8B model (the Llama-3 shape twin
on CPU, vocabulary 128,256). Settings per step size:
- `prefill`: no prompt logprobs (what the forward pass alone needs);
- `fast` with FASTPATH_SCORE_CHUNK_ROWS unset (the runner's default chunk, 64 rows on CPU and
  1024 on CUDA: the 'after');
- `fast` with a chunk larger than the step (nothing is chunked: the 'before');
- `fast` with chunks of 64, 256 and 1024 rows (the sweep behind the defaults: memory and time);
- `standard-k0`: `prompt_logprobs=0`, vLLM's own path.
The figure is the worker's peak above what it held right before the step
(`fastpath.testing.measure.WorkerPeakMemory`: the kernel's RSS high-water mark on CPU,
`torch.cuda.max_memory_allocated` on GPU), the largest over the timed rounds. The chunk
setting is an environment variable read in the worker, so each (step, chunk) pair gets a
fresh engine, started with the variable set; one engine is alive at a time.

    pytest benchmarks/test_memory.py --benchmark-save=NAME     # then fastpath report
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import vllm

from benchmarks.conftest import MODELS, resolve, selected_models, stream_tokens
from fastpath.engine import scoring
from fastpath.engine.runners import device_name
from fastpath.testing.measure import WorkerPeakMemory

CHUNK_ENV = "FASTPATH_SCORE_CHUNK_ROWS"
INSECURE_ENV = "VLLM_ALLOW_INSECURE_SERIALIZATION"  # lets collective_rpc send a function
STEPS = (2048, 8192)
MAX_MODEL_LEN = 8192  # the twin's own; caps a real model's KV-cache needs
SWEEP_ROWS = (64, 256, 1024)
# (step tokens, chunk setting, path). "default": the variable unset; "unchunked": a chunk
# of twice the step's tokens, more rows than any step can score; "rows-N": N rows.
CASES = [
    (step, chunk, path)
    for step in STEPS
    for chunk, path in (("default", "prefill"), ("default", "fast"), ("default", "standard-k0"),
                        ("unchunked", "fast"), *((f"rows-{n}", "fast") for n in SWEEP_ROWS))
]
MODEL_8B = next(m for m in MODELS if m.label == "8B")


def chunk_rows_env(step: int, chunk: str) -> str | None:
    """The value of FASTPATH_SCORE_CHUNK_ROWS for a setting (None: unset)."""
    if chunk == "default":
        return None
    if chunk == "unchunked":
        return str(2 * step)
    return chunk.removeprefix("rows-")


class StepEngines:
    """One engine per (step, chunk setting), built on demand; the previous one is shut down."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.key: tuple[int, str] | None = None
        self.llm = None

    def get(self, step: int, chunk: str):
        if self.key == (step, chunk):
            return self.llm
        self.close()
        name, path = resolve(self.config, MODEL_8B)
        kwargs = dict(max_num_batched_tokens=step, max_model_len=MAX_MODEL_LEN,
                      enable_prefix_caching=False)
        if scoring.on_cpu():
            kwargs["kv_cache_memory_bytes"] = 128 << 20
        else:
            kwargs["gpu_memory_utilization"] = 0.8  # headroom: the 'before' must not OOM
        saved = os.environ.pop(CHUNK_ENV, None)
        value = chunk_rows_env(step, chunk)
        if value is not None:
            os.environ[CHUNK_ENV] = value
        try:  # the engine-core and worker processes inherit the variable at start
            self.llm = scoring.build_llm(path, **kwargs)
        finally:
            os.environ.pop(CHUNK_ENV, None)
            if saved is not None:
                os.environ[CHUNK_ENV] = saved
        self.llm.fastpath_name = name
        self.key = (step, chunk)
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            scoring.shutdown(self.llm)
        self.llm, self.key = None, None


@pytest.fixture(scope="module")
def step_engines(request) -> Iterator[StepEngines]:
    if MODEL_8B not in selected_models(request.config):
        pytest.skip("the step-memory benchmarks run on the 8B model (--bench-models)")
    engines = StepEngines(request.config)
    with pytest.MonkeyPatch.context() as env:
        if not scoring.on_cpu():  # the CUDA peak is read in the worker by collective_rpc,
            env.setenv(INSECURE_ENV, "1")  # in every process, for the engines' lifetime
        try:
            yield engines
        finally:
            engines.close()


def whole_window(llm, step: int) -> scoring.ScoreRequest:
    """One window filling the step: every row scored (target i = token i + 1)."""
    context = min(step, llm.llm_engine.model_config.max_model_len - 1)
    tokens = stream_tokens(llm.llm_engine.model_config.model)
    if len(tokens) < context:
        raise RuntimeError(f"bundled text too short for a {context}-token window")
    prompt = tokens[:context]
    return scoring.ScoreRequest(prompt_token_ids=prompt, target_token_ids=prompt[1:])


@pytest.mark.parametrize("step, chunk, path", CASES,
                         ids=[f"step{s}-{c}-{p}" for s, c, p in CASES])
def test_step_memory(benchmark, step_engines, step, chunk, path):
    """Worker peak memory (and seconds) of one whole-window step on one path and chunk setting."""
    llm = step_engines.get(step, chunk)
    request = whole_window(llm, step)
    base_path, k = ("standard", 0) if path == "standard-k0" else (path, 0)
    scoring.generate(llm, [request], base_path, k)  # warm-up: kernels for this shape
    peaks: list[WorkerPeakMemory] = []
    outputs: list = []

    def scored_step() -> None:
        with WorkerPeakMemory(llm) as memory:
            outputs[:] = scoring.generate(llm, [request], base_path, k)
        peaks.append(memory)

    benchmark.pedantic(scored_step, rounds=2, warmup_rounds=0, iterations=1)
    worst = max(peaks, key=lambda m: m.peak_above_baseline)
    config = llm.llm_engine.vllm_config
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rows = len(request.target_token_ids) if path != "prefill" else 0
    benchmark.extra_info.update({
        "table": "memory", "model": llm.fastpath_name, "path": path,
        "chunk_setting": chunk, "chunk_rows_env": chunk_rows_env(step, chunk) or "unset",
        "step_tokens": step,
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "prompt_tokens": len(request.prompt_token_ids), "scored_rows": rows,
        "peak_step_bytes": worst.peak_above_baseline,
        "peak_step_bytes_rounds": [m.peak_above_baseline for m in peaks],
        "baseline_bytes": max(worst.baselines), "memory_kind": worst.kind,
        # one [rows, vocab] float32 tensor: the unit the unchunked step's peak is made of
        "fp32_logits_bytes_all_rows": rows * vocab * 4,
        "seconds_per_step": benchmark.stats.stats.median,
        "tensor_parallel_size": config.parallel_config.tensor_parallel_size,
        "device": device_name(), "vllm_version": vllm.__version__,
        "runner": "V2" if config.use_v2_model_runner else "V1",
    })
    # The step did what the figure claims: every row scored, finite log-probabilities.
    values = scoring.read_logprobs(outputs, [request], base_path)[0]
    assert values.shape == ((rows,) if rows else (0,))
    assert np.all(np.isfinite(values)) and np.all(values <= 0)
