"""vLLM's V2 model runner on CPU in the tests: starting a V2 engine, proving it is V2.

`fastpath.engine.runners` sets a process up for V2 on CPU (the stand-in Triton backend, Triton's
interpreter, `VLLM_USE_V2_MODEL_RUNNER=1`); this module adds what the tests need on top: an
engine on a chosen runner, a check that every worker really runs V2 (so nothing passes on
V1 while claiming V2), and, where a vLLM or Triton change stops V2 from starting here,
`V2Unavailable` saying why (the tests turn it into a skip with that reason). Bits seen here
say nothing about a GPU's bits; those come from a GPU runner (`benchmarks/gpu.sh`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from fastpath.engine.runners import RUNNER_ENV, apply_env, cpu_build, runner_env, runner_environment

V2_RUNNER_CLASS = "vllm.v1.worker.cpu.model_runner.CPUModelRunner"
# vLLM's `worker_extension_cls`: lets `collective_rpc("fastpath_model_runner")` ask each
# worker which runner class it built, so nothing passes on V1 while claiming V2.
PROBE_EXTENSION = "fastpath.testing.v2cpu.RunnerProbe"


class V2Unavailable(RuntimeError):
    """vLLM's V2 runner cannot run on this machine as set up here; the message says why."""


_PREFLIGHT = """
import triton.backends
import vllm.triton_utils.importing as importing
assert "cpu" in triton.backends.backends, "no 'cpu' Triton backend in the engine process"
assert importing.HAS_TRITON, "vllm.triton_utils found no usable Triton"
import torch
from vllm.v1.worker.cpu.model_runner import CPUModelRunner
from vllm.v1.worker.gpu.sample.logprob import compute_token_logprobs
x = torch.randn(3, 37)
got = compute_token_logprobs(x, torch.tensor([[0], [5], [36]]))[:, 0]
want = torch.log_softmax(x, -1)[[0, 1, 2], [0, 5, 36]]
assert torch.allclose(got, want, atol=1e-5), (got, want)
print("V2-ON-CPU-OK")
"""


def preflight(timeout: float = 300) -> None:
    """Raise V2Unavailable with the reason unless a fresh process in the V2 environment sees
    the stand-in, imports the CPU V2 runner and runs one interpreted V2 kernel correctly."""
    if not cpu_build():
        return
    if "vllm" in sys.modules:
        from vllm.triton_utils import HAS_TRITON

        if not HAS_TRITON:
            raise V2Unavailable("vLLM was imported in this process before fastpath's stand-in "
                                "Triton backend was installed (call prepare_process() first)")
    env = dict(os.environ)
    apply_env(env, runner_env("v2"))
    result = subprocess.run([sys.executable, "-c", _PREFLIGHT], env=env, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0 or "V2-ON-CPU-OK" not in result.stdout:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise V2Unavailable("vLLM's V2 runner cannot run on this CPU through Triton's "
                            "interpreter: " + " | ".join(tail))


class RunnerProbe:
    """Worker extension: `llm.collective_rpc("fastpath_model_runner")` names each runner class."""

    def fastpath_model_runner(self) -> str:
        runner = type(self.model_runner)  # type: ignore[attr-defined]
        return f"{runner.__module__}.{runner.__qualname__}"


def check_v2(llm: Any) -> None:
    """Raise V2Unavailable unless the front end and every worker run vLLM's V2 runner."""
    if not llm.llm_engine.vllm_config.use_v2_model_runner:
        raise V2Unavailable(f"the front end does not see the V2 runner ({RUNNER_ENV} is not 1 "
                            "here while requests are made)")
    runners = llm.collective_rpc("fastpath_model_runner")
    expected = V2_RUNNER_CLASS if cpu_build() else "vllm.v1.worker.gpu.model_runner"
    if not runners or any(not r.startswith(expected) for r in runners):
        raise V2Unavailable(f"the workers run {runners}, not vLLM's V2 runner {expected}")


@contextlib.contextmanager
def engine(model: str, runner: str, **engine_kwargs: Any) -> Iterator[Any]:
    """`fastpath.engine.scoring.engine` on `runner`; V2Unavailable (with why) where V2 cannot run.

    The runner environment is set while the engine starts; keep it set around requests too
    (`runner_environment`). A V2 engine carries `RunnerProbe` and is checked to be V2.
    """
    from fastpath.engine import scoring

    if runner == "v2":
        engine_kwargs.setdefault("worker_extension_cls", PROBE_EXTENSION)
    with runner_environment(runner):
        try:
            llm = scoring.build_llm(model, **engine_kwargs)
        except Exception as error:
            if runner == "v2":
                preflight()  # raises V2Unavailable where V2 cannot run here at all
            raise error
    try:
        if runner == "v2":
            with runner_environment(runner):
                check_v2(llm)
        yield llm
    finally:
        scoring.shutdown(llm)
