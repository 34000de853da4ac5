"""What each exactness mode costs: seconds per window on the 8B twin (docs/exactness.md).

Four engines, one alive at a time: the schedule (`isolated`: one request per step, prompts
never split, fastpath's default; `batched`: vLLM's chunked prefill and up to 16 requests a
step) times how the scored rows are computed (`verified`: the probe passed, row chunks and
only the scored rows; `construction`: FASTPATH_EXACTNESS=construction, the standard path's
rows in one call). Each scores the same steady-state windows, strided (stride 512: 512
scored rows of 2048) and whole (2047 rows), all submitted together so the batched engine can
put them in one step. `extra_info` carries seconds per window, the probe's own seconds and
the modes the engine reported; `fastpath report` writes `modes.csv` with each mode's time
over (isolated, verified) in the same run, and `modes.png`.

    pytest benchmarks/test_exactness_modes.py --bench-models 8B --benchmark-save=modes
"""

from __future__ import annotations

import os

import pytest

from benchmarks.conftest import resolve, steady_windows, stream_tokens
from benchmarks.test_scoring import fit_context
from fastpath.engine import scoring
from fastpath.metrics import perplexity

MODES = [(schedule, rows) for schedule in ("isolated", "batched")
         for rows in ("verified", "construction")]
LAYOUTS = [(2048, 512), (2048, 2048)]
WINDOWS = 4  # windows per round: one 8192-token step when batched


@pytest.fixture(scope="session", params=MODES, ids=[f"{s}-{r}" for s, r in MODES])
def mode_engine(request, bench_model):
    schedule, rows = request.param
    _, path = resolve(request.config, bench_model)
    kwargs = dict(max_num_batched_tokens=8192, enable_prefix_caching=False)
    if schedule == "batched":
        kwargs.update(max_num_seqs=16, enable_chunked_prefill=True)
    else:
        kwargs.update(scoring.ISOLATED_SCHEDULE)
    if scoring.on_cpu():
        kwargs["kv_cache_memory_bytes"] = 1 << 30
    saved = os.environ.get("FASTPATH_EXACTNESS")
    os.environ["FASTPATH_EXACTNESS"] = "construction" if rows == "construction" else "auto"
    try:
        with scoring.engine(path, **kwargs) as llm:
            report = scoring.exactness(llm)  # probes now, untimed
            assert report["schedule"] == schedule
            if rows == "construction":
                assert report["lm_head_rows"] == "construction"
            yield llm, report
    finally:
        if saved is None:
            os.environ.pop("FASTPATH_EXACTNESS", None)
        else:
            os.environ["FASTPATH_EXACTNESS"] = saved


@pytest.mark.bench_models("8B")
@pytest.mark.parametrize("context, stride", LAYOUTS, ids=[f"{c}-{s}" for c, s in LAYOUTS])
def test_mode(benchmark, bench_model, mode_engine, context, stride):
    llm, report = mode_engine
    context, stride = fit_context(llm, context), min(stride, fit_context(llm, context))
    tokens = stream_tokens(llm.llm_engine.model_config.model)
    requests = perplexity.window_requests(tokens, steady_windows(tokens, context, stride,
                                                                 WINDOWS))
    scoring.score(llm, requests, "fast")  # warm-up: kernels for these shapes
    benchmark.pedantic(scoring.score, args=(llm, requests, "fast"), rounds=2, iterations=1)
    probe = report["workers"][0].get("probe") or {}
    benchmark.extra_info.update({
        "table": "modes", "model": bench_model.label, "context_length": context,
        "stride": stride, "schedule": report["schedule"],
        "lm_head_rows": report["lm_head_rows"],
        "seconds_per_window": benchmark.stats.stats.median / len(requests),
        "probe_seconds": probe.get("seconds", 0.0), "windows": len(requests),
    })
