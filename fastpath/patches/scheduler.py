"""Patch of vLLM's scheduler (`vllm/v1/core/sched/scheduler.py`, `Scheduler`).

Replaces: `Scheduler.add_request`, `Scheduler.update_from_output` (the async scheduler
inherits both).
Why: (1) a request with fixed-id scores (`prompt_logprob_token_ids`, which
`target_token_ids` becomes) must compute every scored row. Upstream's `SamplingParams` only
turns prefix-cache reads off when `skip_reading_prefix_cache` is None, so a caller's
`False` on a warm cache skipped the scored rows and the V1 runner returned its unwritten
host buffer: values never computed for the request, possibly left by another one.
Choice: such a request always recomputes its prompt (it still writes the cache for
others). A user asking for scores wants the scores, and a refusal would break clients
that set the flag for every request; reading the cache only up to the first scored row
would change how the scored rows are chunked, which the bitwise promise does not cover.
Fixed here in the engine core, where the cache is consulted, so every front end (LLM,
AsyncLLM, the OpenAI server's `/inference/v1/generate`, a hand-built `EngineCoreRequest`)
gets it, on both model runners.
(2) the V1 runner patch emits `FAILED_SCORES` for a request whose scored rows were not all
computed (a guard: nothing known reaches it once (1) holds). This finishes that request
with `FinishReason.ERROR` (HTTP 500 from the server), never with values; the engine and
the other requests go on.
Checked against: vLLM 0.32.0 and 0.33.0 (fingerprints below).
Removal: (1) when upstream forces recomputation for `prompt_logprob_token_ids` whatever
the caller's flag; (2) with the V1 runner patch.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.request import RequestStatus

from fastpath.patches._base import Replacement
from fastpath.worker.fixed_ids import is_failed_scores

logger = logging.getLogger("fastpath")

_original_add_request = Scheduler.add_request
_original_update_from_output = Scheduler.update_from_output


def add_request(self: Scheduler, request: Any) -> None:
    """Upstream's add_request; a request with fixed-id scores never reads the prefix cache."""
    params = request.sampling_params
    if params is not None and params.prompt_logprob_token_ids is not None:
        request.skip_reading_prefix_cache = True
    _original_add_request(self, request)


def update_from_output(self: Scheduler, scheduler_output: Any,
                       model_runner_output: Any) -> dict[int, Any]:
    """Upstream's update; requests whose scores failed finish with an error instead."""
    scores = model_runner_output.prompt_token_id_logprobs_dict
    failed = {req_id for req_id, value in scores.items() if is_failed_scores(value)}
    if not failed:
        return _original_update_from_output(self, scheduler_output, model_runner_output)
    for req_id in failed:
        del scores[req_id]
    clients = {req_id: self.requests[req_id].client_index
               for req_id in failed if req_id in self.requests}
    outputs = _original_update_from_output(self, scheduler_output, model_runner_output)
    answered: set[str] = set()
    for engine_outputs in outputs.values():
        for output in engine_outputs.outputs:
            if output.request_id in failed:
                output.finish_reason = FinishReason.ERROR
                answered.add(output.request_id)
    self.finish_requests([r for r in failed if r in self.requests],
                         RequestStatus.FINISHED_ERROR)
    for req_id, client in clients.items():
        if req_id not in answered:
            outputs.setdefault(client, EngineCoreOutputs()).outputs.append(
                EngineCoreOutput(request_id=req_id, new_token_ids=[],
                                 finish_reason=FinishReason.ERROR))
    logger.error("fastpath: failed %d request(s) whose scored rows were not all computed: %s",
                 len(failed), sorted(failed))
    return outputs


REPLACEMENTS = [
    Replacement(Scheduler, "add_request", add_request, frozenset({"fa2b51cd04a90977"})),
    Replacement(Scheduler, "update_from_output", update_from_output,
                frozenset({"85b29db96051135c", "8067d98a98b620cb"})),
]
