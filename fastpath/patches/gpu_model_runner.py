"""Patch of vLLM's V1 model runner (`vllm/v1/worker/gpu_model_runner.py`, `GPUModelRunner`).

Replaces: `GPUModelRunner._get_prompt_logprobs_dict`, `GPUModelRunner.sample_tokens`
(the CPU runner inherits both).
Why: upstream answers `prompt_logprob_token_ids` only in the V2 runner
(`vllm/v1/worker/gpu/sample/prompt_logprob.py`). This adds the same answer to V1: for each
request with fixed ids, the logits of its scored rows in this step, upstream's own fp32
`Sampler.compute_logprobs` (the log-softmax the `prompt_logprobs=k` path uses), then a
gather of the requested ids on the device. Only [rows, ids] float32 is copied to the host,
into `ModelRunnerOutput.prompt_token_id_logprobs_dict`, which the scheduler, the
engine-core output and `LogprobsProcessor` already carry to
`RequestOutput.prompt_token_id_logprobs`. No top-k, no ranks, no detokenization.
Exactness: with `prompt_logprob_start=0` the logits are computed over exactly the rows the
standard path computes in the same step, so every value is bitwise the standard one.
With a later start only the scored rows are computed; a lone scored row is computed
beside its predecessor so the lm_head never runs as a one-row GEMM where the standard path
runs a multi-row one (one-row GEMMs round differently on CPU).
Checked against: vLLM 0.32.0 (fingerprints below).
Removal: when upstream's V1 runner answers `prompt_logprob_token_ids` itself, or V1 is retired.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from vllm.v1.worker.gpu_model_runner import AsyncGPUModelRunnerOutput, GPUModelRunner

from fastpath.patches._base import Replacement

_original_get_prompt_logprobs_dict = GPUModelRunner._get_prompt_logprobs_dict
_original_sample_tokens = GPUModelRunner.sample_tokens

_PENDING = "_fastpath_pending"  # runner attribute: req_id -> _PendingScores
_STEP_OUTPUT = "_fastpath_step_output"  # runner attribute: this step's finished scores


@dataclass
class _PendingScores:
    """Fixed-id scores of one request, filled chunk by chunk until its prompt is done."""

    token_ids: torch.Tensor  # [rows, ids] int64 on the device, padding clamped to 0
    padding: np.ndarray  # [rows, ids] bool, True where the request padded with -1
    start: int  # first scored prompt row
    scores: torch.Tensor  # [rows, ids] float32 on the host
    emitted: bool = False


def _new_pending(sampling_params: Any, device: torch.device) -> _PendingScores:
    ids = np.asarray(sampling_params.prompt_logprob_token_ids)
    return _PendingScores(
        token_ids=torch.from_numpy(ids.astype(np.int64).clip(min=0)).to(device),
        padding=ids < 0,
        start=sampling_params.prompt_logprob_start or 0,
        scores=torch.empty(ids.shape, dtype=torch.float32),
    )


def score_fixed_ids(
    runner: GPUModelRunner, hidden_states: torch.Tensor, num_scheduled_tokens: dict[str, int]
) -> dict[str, torch.Tensor]:
    """Scores of fixed ids for this step; returns those of requests whose prompt is done."""
    pending: dict[str, _PendingScores] = runner.__dict__.setdefault(_PENDING, {})
    for req_id in [r for r in pending if r not in runner.requests]:
        del pending[req_id]  # finished or aborted
    raw_logits = runner.model_config.logprobs_mode in ("raw_logits", "processed_logits")
    finished: dict[str, _PendingScores] = {}
    copied = False
    for req_id, num_tokens in num_scheduled_tokens.items():
        request = runner.requests.get(req_id)
        params = None if request is None else request.sampling_params
        if params is None or params.prompt_logprob_token_ids is None:
            continue
        if request.prompt_token_ids is None:
            continue  # prompt embeddings: refused at submission
        state = pending.get(req_id)
        if state is None:
            state = pending[req_id] = _new_pending(params, runner.device)
        prompt_len = len(request.prompt_token_ids)
        chunk_start = request.num_computed_tokens
        chunk_end = chunk_start + num_tokens
        if state.emitted or chunk_start >= prompt_len:
            continue  # decode step, or recomputation after the scores were sent
        lo, hi = max(state.start, chunk_start), min(chunk_end, prompt_len - 1)
        if lo < hi:
            first = lo - 1 if hi - lo == 1 and lo > chunk_start else lo
            offset = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]])
            logits = runner.model.compute_logits(
                hidden_states[offset + first - chunk_start : offset + hi - chunk_start]
            )
            scores = (
                logits.to(torch.float32) if raw_logits else runner.sampler.compute_logprobs(logits)
            )
            rows = slice(lo - state.start, hi - state.start)
            gathered = scores[lo - first :].gather(-1, state.token_ids[rows])
            state.scores[rows].copy_(gathered, non_blocking=True)
            copied = True
        if chunk_end >= prompt_len:
            finished[req_id] = state
    if copied:
        runner._sync_device()
    output = {}
    for req_id, state in finished.items():
        if state.padding.any():
            state.scores[torch.from_numpy(state.padding)] = float("-inf")
        state.emitted = True
        output[req_id] = state.scores
    return output


def _get_prompt_logprobs_dict(
    self: GPUModelRunner, hidden_states: torch.Tensor, num_scheduled_tokens: dict[str, int]
) -> Any:
    """Upstream's prompt logprobs, plus this step's fixed-id scores kept for sample_tokens."""
    result = _original_get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens)
    self.__dict__[_STEP_OUTPUT] = score_fixed_ids(self, hidden_states, num_scheduled_tokens)
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
    Replacement(GPUModelRunner, "_get_prompt_logprobs_dict", _get_prompt_logprobs_dict,
                frozenset({"889fdb068dfc37dd"})),
    Replacement(GPUModelRunner, "sample_tokens", sample_tokens,
                frozenset({"047e6a4738dead56"})),
]
