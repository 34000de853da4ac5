"""Patch of vLLM's worker base class (`vllm/v1/worker/worker_base.py`, `WorkerBase`).

Replaces: nothing. Adds `WorkerBase.fixed_id_exactness`, so that
`llm.collective_rpc("fixed_id_exactness")` (and a server's engine client) asks every worker
how it computes fixed-id scores: the V1 scorer's row mode (`verified` by a probe on this
worker's lm_head, or `construction`: the standard path's rows), decided on first use; on
vLLM's V2 runner, which computes the scored rows itself in upstream's 1024-row chunks,
the same probe's verdict on the logits alone (reported, since fastpath cannot change how V2
computes).
Why: whether computing fewer rows than the standard path keeps every bit is a fact about
the kernels of the machine the worker runs on; the front end (`fastpath ppl --json`, the
server's `/fastpath/exactness`) must say which mode answered, and only the worker knows.
The report is `fastpath.worker.fixed_id_runner.exactness_report`, shared with the upstream
series.
Checked against: vLLM 0.32.0 and 0.33.0 (the name is refused if upstream defines it).
Removal: with the V1 runner patch.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.worker.worker_base import WorkerBase

from fastpath.patches._base import Addition
from fastpath.worker import fixed_id_runner


def fixed_id_exactness(self: WorkerBase) -> dict[str, Any]:
    """How this worker computes fixed-id scores: runner, row mode and the probe's report."""
    return fixed_id_runner.exactness_report(self)


REPLACEMENTS: list = []
ADDITIONS = [Addition(WorkerBase, "fixed_id_exactness", fixed_id_exactness)]
