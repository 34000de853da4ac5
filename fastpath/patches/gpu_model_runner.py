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
Exactness, for the same schedule (the same rows in the same steps): each value is a gather
from the fp32 log-softmax of logits of the same hidden states the standard path uses. The
standard path computes a request's rows of a step in one lm_head call; chunking, and
computing only the scored rows (`prompt_logprob_start > 0`), call it on fewer rows, which
is exact only where the kernel gives a row the same bits among fewer rows. That is a fact
about one machine's kernels, so the scorer decides it on the machine, once per worker,
before it scores (`RowMode`):
- `verified`: a probe on the real lm_head and log-softmax (`fastpath.rowsubset.probe`:
  every piece size the scorer uses, against steps of several sizes, in the model's dtype,
  on this worker's threads) found every row bitwise equal: rows are chunked and only the
  scored rows computed;
- `construction`: the probe found a difference, or `FASTPATH_EXACTNESS=construction`: every
  row of the step from the request's first row of the step, in one lm_head and one
  log-softmax call, exactly as the standard path calls them; exact by construction, memory
  bounded by the step.
With tensor parallelism the ranks agree on the mode (any rank's mismatch means
`construction` for all). `WorkerBase.fastpath_exactness` (patches/worker.py) reports it.
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
EXACTNESS_ENV = "FASTPATH_EXACTNESS"
EXACTNESS_CHOICES = ("auto", "construction")  # auto: probe, fall back to construction
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


@dataclass(frozen=True)
class RowMode:
    """How the scorer computes rows on this worker, and why (see the module docstring)."""

    mode: str  # "verified" | "construction"
    reason: str
    chunk_rows: int
    probe: dict[str, Any] | None = None

    @property
    def subsets_exact(self) -> bool:
        return self.mode == "verified"

    def report(self) -> dict[str, Any]:
        return {"lm_head_rows": self.mode, "reason": self.reason,
                "chunk_rows": self.chunk_rows, "probe": self.probe}


def exactness_setting() -> str:
    """FASTPATH_EXACTNESS: `auto` (default: probe the lm_head) or `construction`."""
    value = os.environ.get(EXACTNESS_ENV, "auto").strip().lower() or "auto"
    if value not in EXACTNESS_CHOICES:
        raise ValueError(f"{EXACTNESS_ENV} must be one of {EXACTNESS_CHOICES}, got {value!r}")
    return value


def decide_rows(runner: Any, chunk_rows: int) -> RowMode:
    """Probe this worker's lm_head unless told not to; agree across tensor-parallel ranks."""
    if exactness_setting() == "construction":
        return RowMode("construction", f"{EXACTNESS_ENV}=construction", chunk_rows)
    from fastpath import rowsubset

    report = rowsubset.probe(runner.model.compute_logits, runner.sampler.compute_logprobs,
                             runner.model_config.get_hidden_size(), runner.model_config.dtype,
                             runner.device, runner.max_num_tokens, chunk_rows)
    exact = _all_ranks_agree(report["exact"])
    if exact:
        reason = (f"probe on this worker's lm_head: pieces of {report['piece_sizes']} rows "
                  f"against steps of {report['references']} rows, {report['dtype']}: "
                  "every row bitwise equal")
    elif report["exact"]:
        reason = "another tensor-parallel rank's probe found a row that differs"
    else:
        first = report["mismatches"][0]
        reason = (f"probe on this worker's lm_head: {first['subset']} differs in "
                  f"{first['rows']} rows (max |diff| {first['max_abs_diff']:.3g})")
    if not exact:
        logger.warning("fastpath: %s; computing every row of a step as the standard path "
                       "does (exact by construction, memory bounded by the step)", reason)
    return RowMode("verified" if exact else "construction", reason, chunk_rows, report)


def _all_ranks_agree(exact: bool) -> bool:
    """Whether every rank of this worker's tensor-parallel group found its rows exact."""
    if not torch.distributed.is_initialized():
        return exact  # one process, no group to ask
    from vllm.distributed.parallel_state import get_tp_group

    group = get_tp_group()
    if group.world_size == 1:
        return exact
    flag = torch.tensor([int(exact)], dtype=torch.int32)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN,
                                 group=group.cpu_group)
    return bool(flag.item())


class FixedIdScorer:
    """Owns the fixed-id scoring state of every request of one runner."""

    def __init__(self, device: torch.device, chunk_rows: int):
        self.device = device
        self.chunk_rows = chunk_rows
        self.row_mode: RowMode | None = None  # decided on first use (`rows_for`)
        self.requests: dict[str, _RequestScores] = {}

    def rows_for(self, runner: Any) -> RowMode:
        """This worker's RowMode, probed once, before the first scored row."""
        if self.row_mode is None:
            self.row_mode = decide_rows(runner, self.chunk_rows)
        return self.row_mode

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
        exact = self.rows_for(runner).subsets_exact if self.requests else False
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
            for a, b, first in self._pieces(lo, hi, chunk_start, exact):
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

    def _pieces(self, lo: int, hi: int, chunk_start: int,
                subsets_exact: bool) -> list[tuple[int, int, int]]:
        """(a, b, first): write rows [a, b) from an lm_head call over rows [first, b).

        Where subsets are exact (`verified`): chunks of `chunk_rows`, a lone row computed
        beside its predecessor (a one-row GEMM rounds differently). Otherwise
        (`construction`): every row of the step from `chunk_start`, in one call, exactly as
        the standard path computes them.
        """
        if lo >= hi:
            return []
        if not subsets_exact:
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


def scorer(runner: GPUModelRunner) -> FixedIdScorer:
    """The runner's FixedIdScorer, created on first use."""
    found = runner.__dict__.get(_SCORER)
    if found is None:
        found = runner.__dict__[_SCORER] = FixedIdScorer(runner.device,
                                                         chunk_rows_setting(runner.device.type))
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
