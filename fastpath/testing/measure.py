"""Counters the tests and benchmarks share: the objects a result holds, and the peak memory
of vLLM's worker processes during one scoring step (its functions run inside those
processes through `collective_rpc`, so they live in an importable fastpath module)."""

from __future__ import annotations

import gc
from typing import Any


def reachable_objects(*roots: Any) -> int:
    """Number of distinct objects reachable from `roots` (roots included, None excluded).

    Follows gc.get_referents, which sees the elements of containers (dicts, lists,
    dataclass attributes) and an ndarray's base; an ndarray's numbers are one buffer,
    not objects. Floats and ints count like any object.
    """
    seen: set[int] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, type):
            continue
        seen.add(id(obj))
        stack.extend(gc.get_referents(obj))
        if hasattr(obj, "__dict__"):  # instance attributes, however the object stores them
            stack.append(vars(obj))
    return len(seen)


def result_objects(output: Any) -> int:
    """Objects a RequestOutput holds for its prompt scores (either path)."""
    return reachable_objects(output.prompt_logprobs, output.prompt_token_id_logprobs)


# --- Peak memory of the worker processes during one scoring step --------------------------


def _cuda_reset_peak(worker: Any) -> int:
    """Run in each worker: restart CUDA's peak counter; bytes allocated now (the baseline)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return int(torch.cuda.memory_allocated())


def _cuda_peak(worker: Any) -> int:
    """Run in each worker: the most bytes allocated since the last reset."""
    import torch

    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def engine_core_pids(llm: Any) -> list[int]:
    """Process ids of this engine's engine-core processes (from the client's own handles)."""
    manager = getattr(getattr(llm.llm_engine.engine_core, "resources", None),
                      "engine_manager", None)
    processes = getattr(manager, "processes", None)
    if not processes:
        raise RuntimeError("this engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0?): "
                           "no engine-core process to measure")
    return [int(p.pid) for p in processes]


def worker_pids(llm: Any) -> list[int]:
    """Process ids of the engine's model workers.

    vLLM names its worker processes `VLLM::Worker...` (children of the engine core, TP > 1
    or the multiprocessing executor); with one worker in the engine-core process
    (TP 1 on CPU) that process is the worker. No RPC: vLLM refuses to serialize a
    callable for `collective_rpc` unless VLLM_ALLOW_INSECURE_SERIALIZATION is set.
    """
    import psutil

    pids = []
    for core in engine_core_pids(llm):
        workers = []
        for child in psutil.Process(core).children(recursive=True):
            try:
                title = " ".join(child.cmdline()) or child.name()
            except psutil.Error:
                continue
            if "Worker" in title:
                workers.append(child.pid)
        pids.extend(sorted(workers) or [core])
    return pids


def _proc_status_bytes(pid: int, field: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM) in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def _reset_rss_peak(pid: int) -> None:
    """Set the kernel's peak-RSS mark (VmHWM) of `pid` to its current RSS (Linux >= 4.0)."""
    with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


class WorkerPeakMemory:
    """Peak memory of the model workers while the block runs, above what they held before.

    CPU: the kernel's own high-water mark of each worker's resident memory. Right before
    the block the mark is reset to the current RSS (`/proc/PID/clear_refs` = 5) and that
    RSS is the baseline; after the block the mark (`VmHWM`) is read. The kernel keeps the
    mark on every page fault, so no short peak is missed (unlike sampling), and unlike
    `ru_maxrss` it is not a lifetime peak. It counts memory the step touched anew; memory
    the allocator kept from earlier steps and reuses is in the baseline (tensors of
    scoring size are mmap'd by glibc and returned on free, so they are counted each step).
    GPU: `torch.cuda.reset_peak_memory_stats()` before, `max_memory_allocated()` after,
    in each worker through `collective_rpc` (the engine must have been started with
    VLLM_ALLOW_INSECURE_SERIALIZATION=1, which lets vLLM send a function): bytes in live
    tensors, not the caching allocator's reserve.
    `peak_above_baseline` is the largest, over workers, of (peak - baseline).
    """

    def __init__(self, llm: Any):
        self.llm = llm
        self.kind = "cuda_max_allocated" if _engine_on_cuda(llm) else "worker_rss_hwm"
        self.pids: list[int] = []
        self.baselines: list[int] = []
        self.peaks: list[int] = []

    def __enter__(self) -> WorkerPeakMemory:
        if self.kind == "cuda_max_allocated":
            self.baselines = [int(b) for b in self.llm.collective_rpc(_cuda_reset_peak)]
        else:
            self.pids = worker_pids(self.llm)
            self.baselines = []
            for pid in self.pids:
                _reset_rss_peak(pid)
                self.baselines.append(_proc_status_bytes(pid, "VmRSS"))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "cuda_max_allocated":
            self.peaks = [int(p) for p in self.llm.collective_rpc(_cuda_peak)]
        else:
            self.peaks = [_proc_status_bytes(pid, "VmHWM") for pid in self.pids]

    @property
    def peak_above_baseline(self) -> int:
        return max(p - b for p, b in zip(self.peaks, self.baselines, strict=True))

    @property
    def peak(self) -> int:
        return max(self.peaks)


def _engine_on_cuda(llm: Any) -> bool:
    """Whether the engine's workers compute on a CUDA device."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda_alike())
