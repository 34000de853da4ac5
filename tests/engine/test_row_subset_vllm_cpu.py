"""Row-subset invariance of the lm_head kernel vLLM's CPU backend really runs.

On CPU vLLM does not call `torch.nn.functional.linear` for the lm_head: at load it
dispatches the layer to oneDNN (`onednn_mm`), or to sgl-kernel's `weight_packed_linear` for
16-bit weights on AMX CPUs (`vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`).
This sweeps that kernel (`fastpath.testing.rowsweep`, kernel `vllm-cpu`) at every zoo lm_head
shape in float32, what fastpath's CPU engines run: every subset of two or more rows must
give each row its bits (asserted), runs of 64 rows (the CPU default chunk) and chunks of
1024 among them. (A measurement on this machine's native kernels: engines do not rely on
it, each worker probes its own lm_head before it scores.) 16-bit weights
are measured and bounded: on AMX CPUs sgl-kernel was seen to round a row differently among
fewer rows, so a 16-bit CPU engine cannot rely on the invariance.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastpath.testing import rowsweep
from tests.helpers import EPS32, ROW_CHUNK, SHAPES, cpu_plan, describe, shape_id

pytest.importorskip("vllm")


def _vllm_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# slow: the engines' own probe checks their lm_head in every CI run; this wider sweep is
# the nightly's.
pytestmark = [pytest.mark.skipif(not _vllm_on_cpu(), reason="vLLM's platform here is not CPU"),
              pytest.mark.slow]


def _record_sweep(record_property, report: dict) -> None:
    """A sweep's figures as the test's properties (junit XML, the report)."""
    record_property("sweep", rowsweep.summary(report))
    record_property("subsets_checked", report["subsets_checked"])
    record_property("rows_checked", report["rows_checked"])
    record_property("multi_row_mismatches", len(report["mismatches"]))
    record_property("lone_row_mismatches", len(report["lone_row_mismatches"]))
    record_property("max_abs_logit", report["max_abs_logit"])


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_vllm_cpu_lm_head_is_row_subset_invariant_in_float32(shape, record_property):
    report = rowsweep.sweep(*shape, kernel="vllm-cpu", device="cpu",
                             **cpu_plan(*shape, chunk=ROW_CHUNK))
    _record_sweep(record_property, report)
    assert report["invariant"], describe(report)
    assert report["log_softmax_invariant"], describe(report)


def test_vllm_cpu_lm_head_is_row_subset_invariant_on_one_thread():
    """A TP worker on these machines runs one thread per core: the same, on one thread.

    In a fresh process: where vLLM already set up its CPU threads, torch keeps that count.
    """
    code = ("import json; from fastpath.testing import rowsweep; from tests.helpers import "
            "cpu_plan; print(json.dumps(rowsweep.sweep(128, 2048, kernel='vllm-cpu', "
            "threads=1, **cpu_plan(128, 2048))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[2], timeout=600)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["threads"] == 1
    assert report["invariant"] and report["log_softmax_invariant"], describe(report)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_vllm_cpu_lm_head_in_16_bit_differs_by_rounding_at_most(dtype, record_property):
    """Measured, not relied on: 1100 rows, where AMX's bf16 kernel rounded a row differently."""
    report = rowsweep.sweep(128, 2048, rows=1100, chunk=ROW_CHUNK, dtype=dtype, kernel="vllm-cpu",
                             counts=(2, 3, 8, 255, 1024))
    _record_sweep(record_property, report)
    assert report["log_softmax_invariant"], describe(report)
    unit = 2.0**-8 if dtype == "bfloat16" else 2.0**-11  # 16-bit rounding of the output
    diffs = [m["max_abs_diff"] for m in report["mismatches"] + report["lone_row_mismatches"]
             if m["stage"] == "logits"]
    bound = (unit + 128 * EPS32) * report["max_abs_logit"]
    record_property("max_abs_logits_diff", max(diffs, default=0.0))
    record_property("bound_abs_logits_diff", bound)
    assert max(diffs, default=0.0) <= bound, describe(report)
