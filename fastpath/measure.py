"""Counters used by tests and benchmarks: objects a result holds, logprob bytes moved, memory."""

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


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0

    def __enter__(self) -> PeakRSS:
        import threading

        import psutil

        process = psutil.Process()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, process.memory_info().rss)
                self._stop.wait(self.interval)

        self.peak = process.memory_info().rss
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class LogprobBytes:
    """Bytes of prompt-logprob data arriving in the front end, from the real messages.

    Wraps this engine's `OutputProcessor.process_outputs` and adds up `nbytes` of the
    tensors each `EngineCoreOutput` carries: `new_prompt_logprobs_tensors` (ids, logprobs,
    ranks; the standard path) and `prompt_token_id_logprobs` (the fast path). The engine
    core forwards these tensors unchanged from the worker's ModelRunnerOutput.
    """

    def __init__(self, llm: Any):
        self.processor = llm.llm_engine.output_processor
        self.total = 0

    @staticmethod
    def _nbytes(output: Any) -> int:
        size = 0
        tensors = getattr(output, "new_prompt_logprobs_tensors", None)
        if tensors is not None:
            size += sum(t.nbytes for t in (tensors.logprob_token_ids, tensors.logprobs,
                                           tensors.selected_token_ranks) if t is not None)
        fixed = getattr(output, "prompt_token_id_logprobs", None)
        if fixed is not None:
            size += fixed.nbytes
        return size

    def __enter__(self) -> LogprobBytes:
        original = self.processor.process_outputs

        def counting(engine_core_outputs: Any, *args: Any, **kwargs: Any) -> Any:
            self.total += sum(self._nbytes(o) for o in engine_core_outputs)
            return original(engine_core_outputs, *args, **kwargs)

        self.processor.process_outputs = counting
        return self

    def __exit__(self, *exc: object) -> None:
        del self.processor.process_outputs  # back to the class's method
