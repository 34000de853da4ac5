"""A script that leaves its engine to interpreter exit exits 0 (issue 28, item 4).

The issue's script, run as a script several times: `build_llm` with chunked prefill and
prefix caching on, `score` ten times with one request per call, no `shutdown`. On the
reporter's machine it exited 134 ("terminate called without an active exception") in 2 of 4
runs, after printing its results. Every run here must finish scoring, exit 0 and print no
such line (fastpath's exit hook stops the engine as `shutdown` would: scoring.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

from fastpath import zoo

pytestmark = [pytest.mark.engine]

ROOT = Path(__file__).resolve().parents[2]
# One run starts an engine: about 50 s on 2 idle cores, so CI runs the script once and the
# nightly three times (the reported failure came in 2 of 4 runs); FASTPATH_EXIT_RUNS sets it.
RUNS = int(os.environ.get("FASTPATH_EXIT_RUNS")
           or (3 if settings.get_current_profile_name() == "nightly" else 1))
ABORT_TEXT = "terminate called"

SCRIPT = '''
import sys

import numpy as np

from fastpath.engine.scoring import ScoreRequest, build_llm, score

if __name__ == "__main__":  # vLLM spawns its processes: they import this file again
    llm = build_llm(sys.argv[1], enable_chunked_prefill=True, enable_prefix_caching=True,
                    max_model_len=256, kv_cache_memory_bytes=64 << 20)
    rng = np.random.default_rng(0)
    for _ in range(10):
        ids = rng.integers(0, 500, 24).tolist()
        (logprobs,) = score(llm, [ScoreRequest(ids, ids[1:])], "fast")
        print(float(logprobs.sum()), flush=True)
    print("SCORED", flush=True)
'''


def test_script_that_never_shuts_its_engine_down_exits_cleanly(tmp_path):
    script = tmp_path / "score_and_leave.py"
    script.write_text(SCRIPT)
    model = str(zoo.get_model("tiny-llama"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    failures = []
    for run in range(1, RUNS + 1):
        done = subprocess.run([sys.executable, str(script), model], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        output = done.stdout + done.stderr
        problems = [what for what, bad in (
            (f"exit status {done.returncode}", done.returncode != 0),
            (f"{ABORT_TEXT!r} in its output", ABORT_TEXT in output),
            ("it did not finish scoring", "SCORED" not in done.stdout)) if bad]
        if problems:
            failures.append(f"run {run}: {'; '.join(problems)}\n{output[-3000:]}")
    assert not failures, f"{len(failures)} of {RUNS} runs failed:\n" + "\n".join(failures)
