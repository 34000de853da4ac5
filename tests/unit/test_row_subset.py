"""Row-subset invariance of the scoring kernels, bit for bit, in bare torch (no vLLM imported).

fastpath computes only the scored rows (`target_start > 0`) and scores long prompts in
chunks of rows, so its exactness rests on a row's logits, fp32 log-softmax and gathered
target having the same bits among fewer rows. `fastpath.testing.rowsweep.sweep` checks that at
every zoo lm_head shape (see its docstring for the subsets). This module needs torch and
pytest alone, so it also runs on a GPU machine without vLLM:

- CPU: log-softmax and the gather never change a row's bits among fewer rows (asserted).
  `torch.nn.functional.linear` is *not* row-subset invariant on CPU (MKL's small-M kernels
  round differently, for 1 to 3 rows at least), but vLLM's CPU backend does not use it for
  the lm_head (oneDNN there: `tests/engine/test_row_subset_vllm_cpu.py` checks that kernel); here
  its differences are only bounded.
- CUDA (`gpu`): `torch.nn.functional.linear` is vLLM's lm_head there (cuBLAS); asserted
  invariant for every subset of two or more rows at Llama-3-8B's head in bf16/fp16/fp32 and
  at the zoo shapes. A lone row is reported, not asserted: the patch computes a lone scored
  row beside its predecessor, never alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastpath.testing import rowsweep
from tests.helpers import EPS32, ROW_CHUNK, SHAPES, cpu_plan, describe, shape_id

ROOT = Path(__file__).resolve().parents[2]
@pytest.fixture(scope="module", params=SHAPES, ids=shape_id)
def cpu_linear(request) -> dict:
    """One bare-torch sweep per zoo lm_head shape, shared by the tests below."""
    hidden, vocab = request.param
    return rowsweep.sweep(hidden, vocab, kernel="linear", device="cpu", **cpu_plan(hidden, vocab))


def test_log_softmax_and_gather_keep_a_rows_bits_among_fewer_rows(cpu_linear):
    assert cpu_linear["log_softmax_invariant"], describe(cpu_linear)
    assert cpu_linear["subsets_checked"] >= 10


def test_cpu_linear_differences_are_rounding_only(cpu_linear):
    """torch's CPU linear may round a row differently among fewer rows: bounded, reported."""
    diffs = [m["max_abs_diff"] for m in cpu_linear["mismatches"] + cpu_linear["lone_row_mismatches"]
             if m["stage"] == "logits"]
    bound = cpu_linear["hidden"] * EPS32 * cpu_linear["max_abs_logit"]  # k * u * max|logit|
    assert max(diffs, default=0.0) <= bound, describe(cpu_linear)
    print(rowsweep.summary(cpu_linear), f"max |diff| {max(diffs, default=0.0):.3g}")


def test_subsets_cover_suffixes_chunks_and_lone_rows():
    checked = rowsweep.subsets(2047, 1024)
    spans = {(start, stop) for start, stop, _ in checked}
    assert {(1, 2047), (0, 1024), (1024, 2047), (2046, 2047), (1023, 1024), (1024, 1025),
            (1023, 1025), (0, 2), (2045, 2047)} <= spans
    assert (0, 2047) not in spans  # the full computation itself
    assert all(0 <= start < stop <= 2047 for start, stop in spans)
    assert len(spans) == len(checked)
    with pytest.raises(ValueError, match="rows"):
        rowsweep.subsets(1, 1024)


def test_sweep_finds_a_kernel_that_depends_on_the_row_count(monkeypatch):
    """The sweep can fail: a GEMM that rounds differently for odd row counts is caught."""
    def odd_rounding(kernel, weight):
        def logits(hidden):  # small integers: every kernel's sums are exact
            out = torch.nn.functional.linear(hidden.round(), weight.round())
            return out.nextafter(out + 1) if len(hidden) % 2 else out
        return logits

    monkeypatch.setattr(rowsweep, "lm_head", odd_rounding)
    report = rowsweep.sweep(64, 256, 40, chunk=16, counts=(2, 3, 8))
    odd = {(m["start"], m["stop"]) for m in report["mismatches"] if m["stage"] == "logits"}
    assert not report["invariant"] and report["log_softmax_invariant"]
    assert odd and all((stop - start) % 2 for start, stop in odd)
    assert (0, 3) in odd and (0, 2) not in odd
    # Given the same logits, log-softmax agrees: the difference is blamed on the GEMM alone.
    assert {m["stage"] for m in report["mismatches"]} == {"logits", "log_softmax", "gather"}


def test_standalone_command_prints_json_and_imports_no_vllm():
    script = ("import runpy, sys; sys.argv = ['rowsweep', '--hidden', '64', '--vocab', '512', "
              "'--rows', '40', '--chunk', '16', '--counts', '2', '3']; "
              "code = 0\n"
              "try: runpy.run_module('fastpath.testing.rowsweep', run_name='__main__')\n"
              "except SystemExit as e: code = e.code\n"
              "print('VLLM' if 'vllm' in sys.modules else 'NO-VLLM', code, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    reports = json.loads(done.stdout)
    marker, code = done.stderr.strip().splitlines()[-1].split()
    assert marker == "NO-VLLM", done.stderr
    assert len(reports) == 1 and reports[0]["rows"] == 40
    assert int(code) == (0 if reports[0]["invariant"] else 1)


REAL_SHAPE = (4096, 128_256)  # Llama-3-8B's head


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [1024, 512])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cuda_linear_is_row_subset_invariant_at_llama3_8b(dtype, chunk):
    report = rowsweep.sweep(*REAL_SHAPE, rows=2048, chunk=chunk, dtype=dtype, device="cuda")
    print(json.dumps({k: v for k, v in report.items() if k != "mismatches"}))
    assert report["invariant"], describe(report)
    assert report["log_softmax_invariant"], describe(report)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_cuda_linear_is_row_subset_invariant_at_zoo_shapes(shape, dtype):
    report = rowsweep.sweep(*shape, rows=2047, chunk=ROW_CHUNK, dtype=dtype, device="cuda")
    print(rowsweep.summary(report))
    assert report["invariant"], describe(report)
    assert report["log_softmax_invariant"], describe(report)
