"""The two ways users' machines differ from a quiet developer machine, reproduced on demand:
another CPU kernel build, and other work on the cores.

Kernel build (`FASTPATH_CPU_ISA`, pytest `--cpu-isa`): vLLM ships three x86 builds of its
CPU kernels and imports one at start-up (`vllm/platforms/cpu.py::import_kernels`):
`_C_AVX2`, `_C_AVX512`, or `_C` (AVX-512 with BF16, AMX paths), by what
`torch.cpu._is_avx512_supported()` and `_is_avx512_bf16_supported()` say; its CPU
attention picks its AMX path by `torch.cpu._is_amx_tile_supported()`. Under the kernels
vLLM calls are PyTorch's own (`ATEN_CPU_CAPABILITY`), oneDNN's (`ONEDNN_MAX_CPU_ISA`) and
MKL's (`MKL_ENABLE_INSTRUCTIONS`). Forcing `avx2` on an AVX-512 machine sets all three
libraries' caps and makes torch deny AVX-512 and AMX, in every process of the run: the
environment reaches vLLM's engine processes, and `engine_site/sitecustomize.py` (on their
PYTHONPATH) applies the torch part there before vLLM is imported. A machine cannot be
forced up: `avx512` on a CPU without AVX-512 is refused. A forced run also keeps its own
compile caches (`TORCHINDUCTOR_CACHE_DIR`, `VLLM_CACHE_ROOT`), as a separate machine of that
ISA would: PyTorch 2.13's inductor cache is not keyed by the vector ISA it generated code
for, and a kernel cached under one `ATEN_CPU_CAPABILITY` and loaded under another computes
wrong results (measured: vLLM's compiled `batched_count_greater_than`, the standard path's
prompt-logprob ranks, off by up to the vocabulary size; docs/exactness.md).

Load (`busy`, pytest `--busy-cores`): processes that keep cores busy with arithmetic and
memory traffic while the tests run, so timing differs from a quiet machine's (a process
scheduled late, requests arriving one by one), as on a user's machine running other work.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

from fastpath.engine.runners import SITE_DIR

ISA_ENV = "FASTPATH_CPU_ISA"
ISAS = ("native", "avx2", "avx512")
# The libraries' own caps for each forced ISA.
LIBRARY_CAPS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}
# What torch.cpu must deny so that vLLM picks the forced build (and no AMX path).
DENIED = {
    "avx2": ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_avx512_vnni_supported",
             "_is_amx_tile_supported", "_is_amx_fp16_supported"),
    "avx512": ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"),
}
# The vLLM kernel library each forced ISA loads (x86).
VLLM_LIBRARY = {"avx2": "_C_AVX2", "avx512": "_C_AVX512"}
# /proc/cpuinfo flags the forced ISA needs.
REQUIRED_FLAGS = {"avx2": ("avx2", "fma"), "avx512": ("avx512f", "avx512bw", "avx512vl")}


class IsaUnavailable(RuntimeError):
    """The forced instruction set cannot run here; the message says why."""


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_build() -> str:
    """The kernel build this CPU loads unforced, as ISAS names it: avx512 where it has
    AVX-512 (vLLM's `_C_AVX512` or `_C`), else avx2."""
    return "avx512" if all(f in cpu_flags() for f in REQUIRED_FLAGS["avx512"]) else "avx2"


def check_isa(isa: str) -> None:
    """Raise ValueError for an unknown name, IsaUnavailable where this CPU lacks the ISA."""
    if isa not in ISAS:
        raise ValueError(f"{ISA_ENV} must be one of {ISAS}, got {isa!r}")
    if isa == "native":
        return
    missing = [f for f in REQUIRED_FLAGS[isa] if f not in cpu_flags()]
    if missing:
        raise IsaUnavailable(f"{ISA_ENV}={isa} needs CPU flags {missing}, which this CPU "
                             "lacks: a kernel build can only be forced down, not up")


def isa_env(isa: str) -> dict[str, str]:
    """The environment that forces `isa` in every process started with it, with compile
    caches of its own (see the module's docstring)."""
    check_isa(isa)
    if isa == "native":
        return {}
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
               if p and p != str(SITE_DIR)]
    return {ISA_ENV: isa, **LIBRARY_CAPS[isa],
            "PYTHONPATH": os.pathsep.join([str(SITE_DIR), *entries]),
            **isa_cache_dirs(isa)}


def isa_cache_dirs(isa: str) -> dict[str, str]:
    """Inductor's and vLLM's cache directories for runs forced to `isa`: the usual ones
    with `-fastpath-<isa>` appended (once: the result is stable when applied again)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    usual = {"TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR")
             or default_cache_dir(),
             "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT")
             or os.path.join(os.environ.get("XDG_CACHE_HOME")
                             or os.path.join(os.path.expanduser("~"), ".cache"), "vllm")}
    suffix = f"-fastpath-{isa}"
    return {name: path if path.endswith(suffix) else path + suffix
            for name, path in usual.items()}


def apply_in_process() -> None:
    """Make torch deny what the forced ISA excludes, in this process (before vLLM is
    imported: vLLM reads it once when it loads its kernels)."""
    isa = os.environ.get(ISA_ENV, "native") or "native"
    check_isa(isa)
    if isa == "native":
        return
    import torch.cpu

    for name in DENIED[isa]:
        if hasattr(torch.cpu, name):
            setattr(torch.cpu, name, _denied)


def _denied() -> bool:
    """What torch.cpu answers for an instruction set the forced ISA excludes."""
    return False


def _spin(seed: int) -> None:
    """Keep one core busy until killed: small matrix products and a copy through memory."""
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"
    import numpy as np

    rng = np.random.default_rng(seed)
    a, b = rng.random((192, 192)), rng.random((192, 192))
    big = rng.random(1 << 20)
    while True:
        a = (a @ b) / 192.0
        big = big[::-1].copy()


@contextlib.contextmanager
def busy(cores: int) -> Iterator[list[int]]:
    """`cores` processes, each keeping a core busy while the block runs; their pids."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_spin, args=(i,), daemon=True) for i in range(cores)]
    for worker in workers:
        worker.start()
    try:
        yield [w.pid for w in workers if w.pid is not None]
    finally:
        for worker in workers:
            worker.kill()
        for worker in workers:
            worker.join(timeout=10)


def busy_cores_setting(value: str | int | None) -> int:
    """How many busy processes `--busy-cores` asks for: a number, or `all` (one per core)."""
    if value in (None, "", 0, "0"):
        return 0
    if value == "all":
        return os.cpu_count() or 1
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = -1
    if count < 0:
        raise ValueError(f"--busy-cores must be a number of processes or 'all', got {value!r}")
    return count
