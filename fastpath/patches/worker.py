"""Patch of vLLM's worker base class (`vllm/v1/worker/worker_base.py`, `WorkerBase`).

Replaces: nothing. Adds `WorkerBase.fastpath_exactness`, so that
`llm.collective_rpc("fastpath_exactness")` (and a server's engine client) asks every worker
how it computes fixed-id scores: the V1 scorer's row mode (`verified` by a probe on this
worker's lm_head, or `construction`: the standard path's rows), decided on first use; on
vLLM's V2 runner, which computes the scored rows itself in upstream's 1024-row chunks,
the same probe's verdict on the logits alone (reported, since fastpath cannot change how V2
computes).
Why: whether computing fewer rows than the standard path keeps every bit is a fact about
the kernels of the machine the worker runs on; the front end (`fastpath ppl --json`, the
server's `/fastpath/exactness`) must say which mode answered, and only the worker knows.
Checked against: vLLM 0.32.0 and 0.33.0 (the name is refused if upstream defines it).
Removal: with the V1 runner patch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from vllm.v1.worker.worker_base import WorkerBase

from fastpath.patches._base import Addition

V2_CHUNK_ROWS = 1024  # vllm/v1/worker/gpu/sample/prompt_logprob.py CHUNK_SIZE


def fastpath_exactness(self: WorkerBase) -> dict[str, Any]:
    """How this worker computes fixed-id scores: runner, row mode and the probe's report."""
    from vllm.distributed.parallel_state import get_pp_group, get_tp_group

    from fastpath.patches import gpu_model_runner

    runner = self.model_runner
    where = {"tp_rank": get_tp_group().rank_in_group, "pp_rank": get_pp_group().rank_in_group,
             "kernels": kernels()}
    if not get_pp_group().is_last_rank:
        return {**where, "runner": type(runner).__name__, "lm_head_rows": "none",
                "reason": "no lm_head on this pipeline stage"}
    if isinstance(runner, gpu_model_runner.GPUModelRunner):
        scorer = gpu_model_runner.scorer(runner)
        return {**where, "runner": "V1", **scorer.row_mode().report()}
    from fastpath import rowsubset

    report = rowsubset.probe(runner.model.compute_logits, lambda logits: logits,
                             runner.model_config.get_hidden_size(), runner.model_config.dtype,
                             runner.device, runner.max_num_tokens, V2_CHUNK_ROWS)
    verdict = "verified" if report["exact"] else "not verified"
    return {**where, "runner": "V2", "lm_head_rows": f"upstream V2 ({verdict})",
            "reason": f"vLLM's V2 runner scores rows in chunks of {V2_CHUNK_ROWS} itself; "
            f"fastpath's probe of the logits at those pieces: {verdict}",
            "chunk_rows": V2_CHUNK_ROWS, "probe": report}


def kernels() -> dict[str, Any]:
    """The kernels this process computes with: vLLM's CPU kernel library (which of
    `_C_AVX2`, `_C_AVX512`, `_C` it loaded), PyTorch's CPU capability and thread count."""
    import torch

    libraries = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/maps").read_text().splitlines():
            name = line.rsplit("/", 1)[-1]
            if name.startswith("_C") and name.endswith(".abi3.so"):
                libraries.add(name.split(".", 1)[0])
    return {"vllm_cpu_library": sorted(libraries), "aten": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


REPLACEMENTS: list = []
ADDITIONS = [Addition(WorkerBase, "fastpath_exactness", fastpath_exactness)]
