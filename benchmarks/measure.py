"""Front-end counters of the benchmarks: peak resident memory of this process, and the bytes
of prompt-logprob data that reach vLLM's front end."""

from __future__ import annotations

from typing import Any


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
