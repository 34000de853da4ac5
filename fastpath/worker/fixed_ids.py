"""The fixed-id scorer: what the V1 runner patch computes, with every input explicit.

After upstream V2's `PromptLogprobsWorker`: the scorer owns the per-request state and
scores one step from what it is handed (hidden states, the step's scheduled prompts as
`ScheduledPrompt`, a logits function and a log-softmax function); it reads nothing of a
runner. `fastpath.patches.gpu_model_runner` binds it to vLLM's `GPUModelRunner`, and the
engine-free tests drive it directly.

Lifecycle: a request's state is added when the runner adds the request, reset when a
request preempted before its scores were sent is resumed, removed when it finishes or is
aborted, and popped the moment its scores are emitted, so a re-used request id starts
fresh and nothing is emitted twice. Scores start as NaN and every row written is
recorded; a request whose scored rows were not all written is never answered with them:
the scorer emits `FAILED_SCORES` instead, which the scheduler patch turns into an error
finish for that request alone (the engine keeps serving).

Memory: rows are scored at most `FASTPATH_SCORE_CHUNK_ROWS` at a time (default: 64 on
CPU, 1024 elsewhere, as measured below), so the logits and log-softmax a step
materialises are bounded by the chunk, not by `max_num_batched_tokens`.

Exactness, for the same schedule (the same rows in the same steps): each value is a
gather from the fp32 log-softmax of logits of the same hidden states the standard path
uses. The standard path computes a request's rows of a step in one lm_head call;
chunking, and computing only the scored rows (`prompt_logprob_start > 0`), call it on
fewer rows, which is exact only where the kernel gives a row the same bits among fewer
rows. That is a fact about one machine's kernels, so it is decided on the machine, once
per worker, before the first scored row (`RowMode`, `decide_rows`):
- `verified`: a probe on the real lm_head and log-softmax
  (`fastpath.worker.rowsubset.probe`): every piece size the scorer uses, against
  steps of several sizes, in the model's dtype, on this worker's threads, found
  every row bitwise equal: rows are chunked and only the scored rows computed;
- `construction`: the probe found a difference, or `FASTPATH_EXACTNESS=construction`:
  every row of the step from the request's first row of the step, in one lm_head and one
  log-softmax call, exactly as the standard path calls them; exact by construction,
  memory bounded by the step.
With tensor parallelism the ranks agree on the mode (any rank's mismatch means
`construction` for all).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("fastpath")

CHUNK_ROWS_ENV = "FASTPATH_SCORE_CHUNK_ROWS"
EXACTNESS_ENV = "FASTPATH_EXACTNESS"
EXACTNESS_CHOICES = ("auto", "construction")  # auto: probe, fall back to construction
# Measured defaults (benchmarks/test_memory.py; benchmarks/gpu_step_memory.py). CPU, 8B
# twin, fp32, 8,192-token whole-window step: 64 rows 6.2 s and 0.12 GiB, 256 rows 8.3 s,
# 1024 rows 8.2 s and 1.47 GiB, unchunked 11.6 s and 7.8 GiB (a chunk's logits stay in
# cache). H200, 8B head in bf16: 1024 rows 1.13x the unchunked time, 256 rows 1.19x
# (fewer rows per GEMM).
DEFAULT_CHUNK_ROWS = {"cpu": 64}
DEFAULT_CHUNK_ROWS_ELSEWHERE = 1024

Tensor = torch.Tensor

# What the scorer emits instead of scores when a request's scored rows were not all
# computed: a 1-D empty tensor (real scores are 2-D with at least one row). The
# scheduler patch turns it into an error finish for that request.
FAILED_SCORES = torch.empty(0, dtype=torch.float32)


def is_failed_scores(scores: Any) -> bool:
    """Whether a prompt_token_id_logprobs entry is the scorer's failure marker."""
    return isinstance(scores, torch.Tensor) and scores.dim() == 1 and scores.numel() == 0


def chunk_rows_setting(device_type: str) -> int:
    """Rows scored per lm_head/log-softmax call: env FASTPATH_SCORE_CHUNK_ROWS (>= 2),
    else the measured default for the device type."""
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


@dataclass(frozen=True)
class RowMode:
    """How the scorer computes rows on this worker, and why (see the module
    docstring)."""

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


def decide_rows(logits: Callable[[Tensor], Tensor], logprobs: Callable[[Tensor], Tensor],
                hidden_size: int, dtype: torch.dtype, device: torch.device, max_rows: int,
                chunk_rows: int) -> RowMode:
    """Probe this worker's lm_head (`logits`) and log-softmax (`logprobs`) unless told
    not to, on steps of up to `max_rows` rows; agree across tensor-parallel ranks."""
    if exactness_setting() == "construction":
        return RowMode("construction", f"{EXACTNESS_ENV}=construction", chunk_rows)
    from fastpath.worker import rowsubset

    report = rowsubset.probe(logits, logprobs, hidden_size, dtype, device, max_rows, chunk_rows)
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
    """Whether every rank of this worker's tensor-parallel group found its rows
    exact."""
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


@dataclass(frozen=True)
class ScheduledPrompt:
    """One request's part of this step, in its prompt's coordinates: positions
    [computed, computed + num_tokens) are this step's rows from `offset` on."""

    req_id: str
    prompt_len: int
    computed: int  # prompt positions computed before this step (the step's first position)
    num_tokens: int  # positions scheduled in this step
    offset: int  # row of the step's hidden states that holds position `computed`

    @property
    def end(self) -> int:
        return self.computed + self.num_tokens

    def row(self, position: int) -> int:
        """The step's row that holds prompt position `position`."""
        return self.offset + position - self.computed


@dataclass(frozen=True)
class Piece:
    """One lm_head call: prompt positions [call_from, end) go in, the scores of
    positions [write_from, end) are kept (call_from < write_from where a row is computed
    beside rows it does not score)."""

    call_from: int
    write_from: int
    end: int


@dataclass
class RequestScores:
    """Fixed-id scores of one request, filled piece by piece until its prompt is
    done."""

    token_ids: Tensor  # [rows, ids] int64 on the device, padding clamped to 0
    padding: np.ndarray  # [rows, ids] bool, True where the request padded with -1
    start: int  # first scored prompt row
    top_k: int  # extra top-K columns (0: none)
    scores: Tensor  # [rows, ids + 2 * top_k (+ ids)] float32 on the host, NaN until written
    written: np.ndarray  # [rows] bool, rows computed for this request so far
    ranks: bool = False  # one more column per id: its rank, as the standard path counts it

    def reset(self) -> None:
        """Forget every written row (the prompt is being computed again)."""
        self.scores.fill_(float("nan"))
        self.written[:] = False


def count_at_least(scores: Tensor, values: Tensor) -> Tensor:
    """[rows, n] int32: how many entries of each row of `scores` [rows, vocab] are >=
    each of that row's `values` [rows, n] (the standard path's rank).

    Plain tensor operations, not vLLM's compiled `batched_count_greater_than`: a kernel
    that inductor's on-disk cache hands over can have been compiled for another vector
    ISA (the cache is not keyed by `ATEN_CPU_CAPABILITY`), and then it counts wrong.
    On CPU one row at a time, so that the comparison's mask stays in cache: 3.3x
    faster than one [rows, vocab] mask at a 128K vocabulary.
    """
    counts = torch.empty(values.shape, dtype=torch.int32, device=scores.device)
    block = 1 if scores.device.type == "cpu" else scores.shape[0]
    for row in range(0, scores.shape[0], block):
        rows = slice(row, row + block)
        for column in range(values.shape[1]):  # one [block, vocab] mask at a time
            torch.sum(scores[rows] >= values[rows, column : column + 1], -1, dtype=torch.int32,
                      out=counts[rows, column])
    return counts


class FixedIdScorer:
    """Owns the fixed-id scoring state of every request of one runner.

    `decide` gives this worker's `RowMode`; it is asked once, before the first scored
    row.
    """

    def __init__(self, device: torch.device, chunk_rows: int,
                 decide: Callable[[], RowMode]) -> None:
        self.device = device
        self.chunk_rows = chunk_rows
        self._decide = decide
        self._row_mode: RowMode | None = None
        self.requests: dict[str, RequestScores] = {}

    def row_mode(self) -> RowMode:
        """This worker's RowMode, decided on first use."""
        if self._row_mode is None:
            self._row_mode = self._decide()
        return self._row_mode

    def add_request(self, req_id: str, token_ids: Any, start: int, top_k: int,
                    ranks: bool = False) -> None:
        """A new request ([rows, ids] ids, -1 for padding): fresh state, whatever an
        earlier request of this id left. Columns: the ids' scores, `top_k` values and
        `top_k` ids, and with `ranks` each id's rank."""
        ids = np.array(token_ids, dtype=np.int64, copy=True)
        columns = ids.shape[1] * (2 if ranks else 1) + 2 * top_k
        self.requests[req_id] = RequestScores(
            token_ids=torch.from_numpy(ids.clip(min=0)).to(self.device),
            padding=ids < 0,
            start=start,
            top_k=top_k,
            scores=torch.full((ids.shape[0], columns), float("nan"), dtype=torch.float32),
            written=np.zeros(ids.shape[0], dtype=bool),
            ranks=ranks,
        )

    def remove_request(self, req_id: str) -> None:
        """Finished or aborted: drop its state."""
        self.requests.pop(req_id, None)

    def resume_request(self, req_id: str) -> None:
        """Resumed after preemption: a prompt not yet answered is computed from
        scratch."""
        state = self.requests.get(req_id)
        if state is not None:
            state.reset()

    def score_step(self, hidden_states: Tensor, scheduled: Sequence[ScheduledPrompt],
                   logits: Callable[[Tensor], Tensor], logprobs: Callable[[Tensor], Tensor],
                   sync: Callable[[], None] | None = None) -> dict[str, Tensor]:
        """Score this step's rows of every tracked request that is `scheduled`; return
        the finished requests' scores. `logits(rows)` is the lm_head, `logprobs(logits)`
        the fp32 log-softmax (or the raw logits in a raw-logits mode); `sync()` waits
        for the device copies to the host."""
        exact = self.row_mode().subsets_exact if self.requests else False
        finished: dict[str, RequestScores] = {}
        copied = False
        for prompt in scheduled:
            state = self.requests.get(prompt.req_id)
            if state is None or prompt.computed >= prompt.prompt_len:
                continue  # untracked, or decoding: the prompt was answered (or failed)
            for piece in self.pieces(state, prompt, exact):
                rows = hidden_states[prompt.row(piece.call_from) : prompt.row(piece.end)]
                scores = logprobs(logits(rows))[piece.write_from - piece.call_from :]
                self._write(state, piece.write_from - state.start, piece.end - state.start,
                            scores)
                copied = True
            if prompt.end >= prompt.prompt_len:
                finished[prompt.req_id] = state
        if copied and sync is not None:
            sync()
        output = {}
        for req_id, state in finished.items():
            del self.requests[req_id]  # popped on emission: never emitted twice
            output[req_id] = self._emit(req_id, state)
        return output

    def pieces(self, state: RequestScores, prompt: ScheduledPrompt,
               subsets_exact: bool) -> list[Piece]:
        """The lm_head calls that score this step's scored rows of one request.

        Scored rows are prompt positions [start, prompt_len - 1). Where subsets are
        exact (`verified`): pieces of `chunk_rows`, a lone row computed beside its
        predecessor (a one-row GEMM rounds differently). Otherwise (`construction`):
        every row of the step from its first position, in one call, exactly as the
        standard path computes them.
        """
        lo = max(state.start, prompt.computed)
        hi = min(prompt.end, prompt.prompt_len - 1)
        if lo >= hi:
            return []
        if not subsets_exact:
            return [Piece(prompt.computed, lo, hi)]
        pieces = []
        for a in range(lo, hi, self.chunk_rows):
            b = min(a + self.chunk_rows, hi)
            lone = b - a == 1 and a > prompt.computed
            pieces.append(Piece(a - 1 if lone else a, a, b))
        return pieces

    @staticmethod
    def _write(state: RequestScores, lo: int, hi: int, scores: Tensor) -> None:
        """Gather rows [lo, hi) of the request (its top-K, its ranks) into the host
        buffer. A rank is what the standard path reports (`batched_count_greater_than`):
        the number of vocabulary entries whose score is >= the id's (`count_at_least`),
        exact in float32 below 2**24 entries."""
        num_ids = state.token_ids.shape[1]
        gathered = scores.gather(-1, state.token_ids[lo:hi])
        state.scores[lo:hi, :num_ids].copy_(gathered, non_blocking=True)
        top_end = num_ids + 2 * state.top_k
        if state.top_k:
            values, indices = torch.topk(scores, state.top_k, dim=-1)
            state.scores[lo:hi, num_ids : num_ids + state.top_k].copy_(values, non_blocking=True)
            state.scores[lo:hi, num_ids + state.top_k : top_end].copy_(
                indices.to(torch.float32), non_blocking=True)
        if state.ranks:
            state.scores[lo:hi, top_end:].copy_(
                count_at_least(scores, gathered).to(torch.float32), non_blocking=True)
        state.written[lo:hi] = True

    @staticmethod
    def _emit(req_id: str, state: RequestScores) -> Tensor:
        """The request's scores, or FAILED_SCORES when any scored row was never
        computed."""
        if not state.written.all():
            missing = np.flatnonzero(~state.written)
            logger.error(
                "fastpath: request %s reached the end of its prompt with %d of %d "
                "scored rows never computed (first: prompt row %d); failing it "
                "instead of returning unwritten scores", req_id, missing.size, state.written.size,
                int(missing[0]) + state.start)
            return FAILED_SCORES
        if state.padding.any():
            num_ids = state.token_ids.shape[1]
            state.scores[:, :num_ids][torch.from_numpy(state.padding)] = float("-inf")
            if state.ranks:  # a padded entry has no rank
                rank_columns = state.scores[:, num_ids + 2 * state.top_k :]
                rank_columns[torch.from_numpy(state.padding)] = float("nan")
        return state.scores
