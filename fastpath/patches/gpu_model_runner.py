"""Patch of vLLM's V1 model runner (`vllm/v1/worker/gpu_model_runner.py`, `GPUModelRunner`).

Replaces: `GPUModelRunner._update_states`, `GPUModelRunner._get_prompt_logprobs_dict`,
`GPUModelRunner.sample_tokens` (the CPU runner inherits all three).
Why: upstream answers `prompt_logprob_token_ids` only in the V2 runner
(`vllm/v1/worker/gpu/sample/prompt_logprob.py`). This adds the same answer to V1: for each
request with fixed ids, the logits of its scored rows in this step, upstream's own fp32
`Sampler.compute_logprobs` (the log-softmax the `prompt_logprobs=k` path uses), then a
gather of the requested ids on the device. Only [rows, ids] float32 is copied to the host,
into `ModelRunnerOutput.prompt_token_id_logprobs_dict`, which the scheduler, the
engine-core output and `LogprobsProcessor` already carry to
`RequestOutput.prompt_token_id_logprobs`. No ranks, no detokenization.
With `SamplingParams.extra_args["fastpath_top_k"] = K` the same log-softmax also gives each
row's top-K log-probs and ids (torch.topk, as the standard path's), appended as 2K columns.

The scoring itself (request lifecycle, row pieces, exactness modes, memory bound) is
`fastpath.fixed_ids.FixedIdScorer`, which takes explicit inputs; this module only binds it
to the runner: which requests it tracks (`_update_states`), what this step scheduled
(`scheduled_prompts`), the runner's lm_head and log-softmax, and where the finished scores
go (`sample_tokens`). `WorkerBase.fastpath_exactness` (patches/worker.py) reports the mode.
Checked against: vLLM 0.32.0 and 0.33.0 (fingerprints below).
Removal: when upstream's V1 runner answers `prompt_logprob_token_ids` itself, or V1 is retired.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.worker.gpu_model_runner import AsyncGPUModelRunnerOutput, GPUModelRunner

from fastpath.fixed_ids import (
    FixedIdScorer,
    RowMode,
    ScheduledPrompt,
    chunk_rows_setting,
    decide_rows,
)
from fastpath.patches._base import Replacement
from fastpath.patches._scores import top_k_of

_original_update_states = GPUModelRunner._update_states
_original_get_prompt_logprobs_dict = GPUModelRunner._get_prompt_logprobs_dict
_original_sample_tokens = GPUModelRunner.sample_tokens

_SCORER = "_fastpath_scorer"  # runner attribute: the FixedIdScorer
_STEP_OUTPUT = "_fastpath_step_output"  # runner attribute: this step's finished scores


def row_mode(runner: GPUModelRunner, chunk_rows: int) -> RowMode:
    """`decide_rows` on this runner's own lm_head and log-softmax, at its step size."""
    return decide_rows(runner.model.compute_logits, runner.sampler.compute_logprobs,
                       runner.model_config.get_hidden_size(), runner.model_config.dtype,
                       runner.device, runner.max_num_tokens, chunk_rows)


def scorer(runner: GPUModelRunner) -> FixedIdScorer:
    """The runner's FixedIdScorer, created on first use."""
    found = runner.__dict__.get(_SCORER)
    if found is None:
        chunk_rows = chunk_rows_setting(runner.device.type)
        found = runner.__dict__[_SCORER] = FixedIdScorer(
            runner.device, chunk_rows, lambda: row_mode(runner, chunk_rows))
    return found


def scheduled_prompts(runner: GPUModelRunner, tracked: Any,
                      num_scheduled_tokens: dict[str, int]) -> list[ScheduledPrompt]:
    """This step's part of each tracked request, read from the runner's batch."""
    scheduled = []
    for req_id in tracked:
        num_tokens = num_scheduled_tokens.get(req_id)
        request = runner.requests.get(req_id)
        if num_tokens is None or request is None or request.prompt_token_ids is None:
            continue
        index = runner.input_batch.req_id_to_index[req_id]
        scheduled.append(ScheduledPrompt(req_id, len(request.prompt_token_ids),
                                         request.num_computed_tokens, num_tokens,
                                         int(runner.query_start_loc.np[index])))
    return scheduled


def scores_function(runner: GPUModelRunner) -> Any:
    """What a row's scores are: the fp32 log-softmax, or the logits in a raw-logits mode."""
    if runner.model_config.logprobs_mode in ("raw_logits", "processed_logits"):
        return lambda logits: logits.to(torch.float32)
    return runner.sampler.compute_logprobs


def _update_states(self: GPUModelRunner, scheduler_output: Any) -> Any:
    """Upstream's state update, with the fixed-id scoring state following each request."""
    tracker = scorer(self)
    for req_id in scheduler_output.finished_req_ids:
        tracker.remove_request(req_id)
    for req_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
        tracker.resume_request(req_id)
    result = _original_update_states(self, scheduler_output)
    for new_request in scheduler_output.scheduled_new_reqs:
        params = new_request.sampling_params
        if params is not None and params.prompt_logprob_token_ids is not None:
            tracker.add_request(new_request.req_id, params.prompt_logprob_token_ids,
                                params.prompt_logprob_start or 0, top_k_of(params))
    return result


def _get_prompt_logprobs_dict(
    self: GPUModelRunner, hidden_states: torch.Tensor, num_scheduled_tokens: dict[str, int]
) -> Any:
    """Upstream's prompt logprobs, plus this step's fixed-id scores kept for sample_tokens."""
    result = _original_get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens)
    tracker = scorer(self)
    self.__dict__[_STEP_OUTPUT] = tracker.score_step(
        hidden_states, scheduled_prompts(self, tracker.requests, num_scheduled_tokens),
        self.model.compute_logits, scores_function(self), self._sync_device)
    return result


def sample_tokens(self: GPUModelRunner, *args: Any, **kwargs: Any) -> Any:
    """Upstream's step output, with the fixed-id scores attached to the ModelRunnerOutput."""
    self.__dict__[_STEP_OUTPUT] = {}
    output = _original_sample_tokens(self, *args, **kwargs)
    scores = self.__dict__.pop(_STEP_OUTPUT, None)
    if scores:
        target = (
            output._model_runner_output
            if isinstance(output, AsyncGPUModelRunnerOutput)
            else output
        )
        target.prompt_token_id_logprobs_dict = {
            **target.prompt_token_id_logprobs_dict,
            **scores,
        }
    return output


REPLACEMENTS = [
    Replacement(GPUModelRunner, "_update_states", _update_states,
                frozenset({"326599f31b273b94"})),
    Replacement(GPUModelRunner, "_get_prompt_logprobs_dict", _get_prompt_logprobs_dict,
                frozenset({"889fdb068dfc37dd"})),
    Replacement(GPUModelRunner, "sample_tokens", sample_tokens,
                frozenset({"047e6a4738dead56"})),
]
