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

Per-request state has an owner and a lifecycle (`FixedIdScorer`, after upstream V2's
`PromptLogprobsWorker`): added when the runner adds the request (`_update_states`), reset
when a request preempted before its scores were sent is resumed, removed when it finishes
or is aborted, and popped the moment its scores are emitted, so a re-used request id
starts fresh and nothing is emitted twice. Scores start as NaN and every row written is
recorded; a request whose scored rows were not all written is never answered with them:
the runner emits `FAILED_SCORES` instead, which the scheduler patch turns into an error
finish for that request alone (the engine keeps serving).

Memory: rows are scored at most `FASTPATH_SCORE_CHUNK_ROWS` at a time (default: 64 on CPU,
1024 elsewhere, as measured below), so the logits and log-softmax a step materialises are
bounded by the chunk, not by `max_num_batched_tokens`.
Exactness: each value is a gather from the fp32 log-softmax of the same logits the standard
path computes. The standard path computes a request's rows of a step in one lm_head call;
here they may be computed in chunks, or (with `prompt_logprob_start > 0`) only the scored
rows. Both rely on a row's logits having the same bits among fewer rows, which
`fastpath.rowsubset` sweeps per backend and dtype (`row_subsets_exact` below records the
verdicts); a one-row GEMM never qualifies, so a lone row is computed beside its
predecessor. Where the sweep failed (bf16 on CPU, fp32 on CUDA) the patch computes every
row of the step, as the standard path does, unchunked: exact, but memory is then bounded
by the step.
Checked against: vLLM 0.32.0 and 0.33.0 (fingerprints below).
Removal: when upstream's V1 runner answers `prompt_logprob_token_ids` itself, or V1 is retired.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from vllm.v1.worker.gpu_model_runner import AsyncGPUModelRunnerOutput, GPUModelRunner

from fastpath.patches._base import Replacement
from fastpath.patches._scores import FAILED_SCORES, top_k_of

logger = logging.getLogger("fastpath")

_original_update_states = GPUModelRunner._update_states
_original_get_prompt_logprobs_dict = GPUModelRunner._get_prompt_logprobs_dict
_original_sample_tokens = GPUModelRunner.sample_tokens

CHUNK_ROWS_ENV = "FASTPATH_SCORE_CHUNK_ROWS"
# Measured defaults (benchmarks/test_memory.py; benchmarks/gpu_step_memory.py). CPU, 8B twin,
# fp32, 8,192-token whole-window step: 64 rows 6.2 s and 0.12 GiB, 256 rows 8.3 s, 1024 rows
# 8.2 s and 1.47 GiB, unchunked 11.6 s and 7.8 GiB (a chunk's logits stay in cache). H200,
# 8B head in bf16: 1024 rows 1.13x the unchunked time, 256 rows 1.19x (fewer rows per GEMM).
DEFAULT_CHUNK_ROWS = {"cpu": 64}
DEFAULT_CHUNK_ROWS_ELSEWHERE = 1024
_SCORER = "_fastpath_scorer"  # runner attribute: the FixedIdScorer
_STEP_OUTPUT = "_fastpath_step_output"  # runner attribute: this step's finished scores


def chunk_rows_setting(device_type: str) -> int:
    """Rows scored per lm_head/log-softmax call: env FASTPATH_SCORE_CHUNK_ROWS (>= 2), else
    the measured default for the device type."""
    raw = os.environ.get(CHUNK_ROWS_ENV, "")
    if not raw:
        return DEFAULT_CHUNK_ROWS.get(device_type, DEFAULT_CHUNK_ROWS_ELSEWHERE)
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 2:
        raise ValueError(f"{CHUNK_ROWS_ENV} must be an integer >= 2, got {raw!r}")
    return value


@dataclass
class _RequestScores:
    """Fixed-id scores of one request, filled chunk by chunk until its prompt is done."""

    token_ids: torch.Tensor  # [rows, ids] int64 on the device, padding clamped to 0
    padding: np.ndarray  # [rows, ids] bool, True where the request padded with -1
    start: int  # first scored prompt row
    top_k: int  # extra top-K columns (0: none)
    scores: torch.Tensor  # [rows, ids + 2 * top_k] float32 on the host, NaN until written
    written: np.ndarray  # [rows] bool, rows computed for this request so far

    def reset(self) -> None:
        """Forget every written row (the prompt is being computed again)."""
        self.scores.fill_(float("nan"))
        self.written[:] = False


class FixedIdScorer:
    """Owns the fixed-id scoring state of every request of one runner."""

    def __init__(self, device: torch.device, chunk_rows: int, row_subsets_exact: bool = True):
        self.device = device
        self.chunk_rows = chunk_rows
        self.row_subsets_exact = row_subsets_exact
        self.requests: dict[str, _RequestScores] = {}

    def add_request(self, req_id: str, sampling_params: Any) -> None:
        """A new request: fresh state, whatever an earlier request of this id left."""
        ids = np.array(sampling_params.prompt_logprob_token_ids, dtype=np.int64, copy=True)
        top_k = top_k_of(sampling_params)
        self.requests[req_id] = _RequestScores(
            token_ids=torch.from_numpy(ids.clip(min=0)).to(self.device),
            padding=ids < 0,
            start=sampling_params.prompt_logprob_start or 0,
            top_k=top_k,
            scores=torch.full((ids.shape[0], ids.shape[1] + 2 * top_k), float("nan"),
                              dtype=torch.float32),
            written=np.zeros(ids.shape[0], dtype=bool),
        )

    def remove_request(self, req_id: str) -> None:
        """Finished or aborted: drop its state."""
        self.requests.pop(req_id, None)

    def resume_request(self, req_id: str) -> None:
        """Resumed after preemption: a prompt not yet answered is computed from scratch."""
        state = self.requests.get(req_id)
        if state is not None:
            state.reset()

    def score_step(self, runner: Any, hidden_states: torch.Tensor,
                   num_scheduled_tokens: dict[str, int]) -> dict[str, torch.Tensor]:
        """Score this step's rows of every tracked request; return the finished requests'."""
        raw_logits = runner.model_config.logprobs_mode in ("raw_logits", "processed_logits")
        finished: dict[str, _RequestScores] = {}
        copied = False
        for req_id, state in self.requests.items():
            num_tokens = num_scheduled_tokens.get(req_id)
            request = runner.requests.get(req_id)
            if num_tokens is None or request is None or request.prompt_token_ids is None:
                continue
            prompt_len = len(request.prompt_token_ids)
            chunk_start = request.num_computed_tokens
            chunk_end = chunk_start + num_tokens
            if chunk_start >= prompt_len:
                continue  # decoding; the prompt was answered (or failed) already
            offset = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]])
            lo, hi = max(state.start, chunk_start), min(chunk_end, prompt_len - 1)
            for a, b, first in self._pieces(lo, hi, chunk_start):
                rows = hidden_states[offset + first - chunk_start : offset + b - chunk_start]
                logits = runner.model.compute_logits(rows)
                scores = (logits.to(torch.float32) if raw_logits
                          else runner.sampler.compute_logprobs(logits))[a - first :]
                self._write(state, a - state.start, b - state.start, scores)
                copied = True
            if chunk_end >= prompt_len:
                finished[req_id] = state
        if copied:
            runner._sync_device()
        output = {}
        for req_id, state in finished.items():
            del self.requests[req_id]  # popped on emission: never emitted twice
            output[req_id] = self._emit(req_id, state)
        return output

    def _pieces(self, lo: int, hi: int, chunk_start: int) -> list[tuple[int, int, int]]:
        """(a, b, first): write rows [a, b) from an lm_head call over rows [first, b).

        Where subsets are exact: chunks of `chunk_rows`, a lone row computed beside its
        predecessor (a one-row GEMM rounds differently). Elsewhere: every row of the step
        from `chunk_start`, in one call, exactly as the standard path computes them.
        """
        if lo >= hi:
            return []
        if not self.row_subsets_exact:
            return [(lo, hi, chunk_start)]
        pieces = []
        for a in range(lo, hi, self.chunk_rows):
            b = min(a + self.chunk_rows, hi)
            pieces.append((a, b, a - 1 if b - a == 1 and a > chunk_start else a))
        return pieces

    @staticmethod
    def _write(state: _RequestScores, lo: int, hi: int, scores: torch.Tensor) -> None:
        """Gather rows [lo, hi) of the request (and its top-K) into the host buffer."""
        num_ids = state.token_ids.shape[1]
        state.scores[lo:hi, :num_ids].copy_(scores.gather(-1, state.token_ids[lo:hi]),
                                            non_blocking=True)
        if state.top_k:
            values, indices = torch.topk(scores, state.top_k, dim=-1)
            state.scores[lo:hi, num_ids : num_ids + state.top_k].copy_(values, non_blocking=True)
            state.scores[lo:hi, num_ids + state.top_k :].copy_(indices.to(torch.float32),
                                                               non_blocking=True)
        state.written[lo:hi] = True

    @staticmethod
    def _emit(req_id: str, state: _RequestScores) -> torch.Tensor:
        """The request's scores, or FAILED_SCORES when any scored row was never computed."""
        if not state.written.all():
            missing = np.flatnonzero(~state.written)
            logger.error(
                "fastpath: request %s reached the end of its prompt with %d of %d scored "
                "rows never computed (first: prompt row %d); failing it instead of "
                "returning unwritten scores", req_id, missing.size, state.written.size,
                int(missing[0]) + state.start)
            return FAILED_SCORES
        if state.padding.any():
            num_ids = state.token_ids.shape[1]
            state.scores[:, :num_ids][torch.from_numpy(state.padding)] = float("-inf")
        return state.scores


def row_subsets_exact(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the lm_head gives a row the same bits among any >= 2 rows, as swept.

    CPU (vLLM's oneDNN lm_head): yes in float32 and float16; no in bfloat16, which goes to
    another kernel that rounded a row of a 3-row run differently. CUDA (cuBLAS, swept on an
    H200 at hidden 4096 x vocabulary 128,256): yes in bfloat16 and float16; no in float32,
    where runs of 2-8 rows differ from the same rows among 2048. Unknown backends: no.
    """
    if device_type == "cpu":
        return dtype in (torch.float32, torch.float16)
    if device_type == "cuda":
        return dtype in (torch.bfloat16, torch.float16)
    return False


def scorer(runner: GPUModelRunner) -> FixedIdScorer:
    """The runner's FixedIdScorer, created on first use."""
    found = runner.__dict__.get(_SCORER)
    if found is None:
        exact = row_subsets_exact(runner.device.type, runner.model_config.dtype)
        found = runner.__dict__[_SCORER] = FixedIdScorer(runner.device,
                                                         chunk_rows_setting(runner.device.type),
                                                         exact)
    return found


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
            tracker.add_request(new_request.req_id, params)
    return result


def _get_prompt_logprobs_dict(
    self: GPUModelRunner, hidden_states: torch.Tensor, num_scheduled_tokens: dict[str, int]
) -> Any:
    """Upstream's prompt logprobs, plus this step's fixed-id scores kept for sample_tokens."""
    result = _original_get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens)
    self.__dict__[_STEP_OUTPUT] = scorer(self).score_step(self, hidden_states,
                                                          num_scheduled_tokens)
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
