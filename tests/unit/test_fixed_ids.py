"""The fixed-id scorer (`FixedIdScorer`), driven step by step without an engine.

Each step hands the scorer explicit inputs: the step's `ScheduledPrompt`s, hidden states
and an lm_head. The hidden states and lm_head are small integers, so every logit is
exact in float32 and a row's scores cannot depend on which rows it was computed with:
any difference from the reference is a bookkeeping error (wrong row, wrong request,
stale state), never rounding. The lm_head records the rows it was given.

Self-contained on purpose (numpy, torch, hypothesis and the modules it tests): the
upstream patch series carries this file as vLLM's own unit test of the scorer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpath.worker import fixed_ids, rowsubset
from fastpath.worker.fixed_ids import FixedIdScorer, RowMode, ScheduledPrompt


def assert_bitwise_equal(got: np.ndarray, reference: np.ndarray, *, what: str) -> None:
    """Equal float32 bit patterns everywhere (NaN and -inf included), else every
    mismatch."""
    got = np.ascontiguousarray(got, dtype=np.float32)
    reference = np.ascontiguousarray(reference, dtype=np.float32)
    assert got.shape == reference.shape, f"{what}: shape {got.shape} != {reference.shape}"
    mismatched = np.flatnonzero(got.view(np.uint32) != reference.view(np.uint32))
    assert mismatched.size == 0, (f"{what}: {mismatched.size}/{got.size} values differ in "
                                  f"bits; positions {mismatched[:10].tolist()}")


def split_top_k(scores: np.ndarray, num_ids: int, top_k: int):
    """(id scores, top-K values, top-K ids) columns of a top-K answer."""
    return (scores[:, :num_ids], scores[:, num_ids:num_ids + top_k],
            scores[:, num_ids + top_k:].astype(np.int32))


VOCAB, HIDDEN = 11, 4
CHUNK = 3
VERIFIED = RowMode("verified", "the integer lm_head is exact", CHUNK)


def _hidden(req_seed: int, position: int) -> torch.Tensor:
    """The hidden state of a request's prompt position: small integers,
    deterministic."""
    g = torch.Generator().manual_seed(req_seed * 100_003 + position)
    return torch.randint(-3, 4, (HIDDEN,), generator=g).to(torch.float32)


LM_HEAD = torch.randint(-3, 4, (VOCAB, HIDDEN), generator=torch.Generator().manual_seed(7)).to(
    torch.float32)


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, -1, dtype=torch.float32)


def reference_logprobs(seed: int, prompt_len: int) -> torch.Tensor:
    """Every prompt row's log-softmax, computed at once: [prompt_len - 1, VOCAB]."""
    hidden = torch.stack([_hidden(seed, p) for p in range(prompt_len - 1)])
    return log_softmax(hidden @ LM_HEAD.T)


@dataclass
class Prompt:
    prompt_len: int
    computed: int = 0
    seed: int = 0


@dataclass
class Steps:
    """Drives a FixedIdScorer as the runner does: per step, the scheduled prompts'
    hidden states laid out one request after another, and a log of the lm_head calls."""

    mode: RowMode = VERIFIED
    prompts: dict[str, Prompt] = field(default_factory=dict)
    calls: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.scorer = FixedIdScorer(torch.device("cpu"), CHUNK, lambda: self.mode)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls.append(hidden.shape[0])
        return hidden @ LM_HEAD.T

    def step(self, schedule: dict[str, int]) -> dict[str, torch.Tensor]:
        """One engine step: lay out the scheduled tokens, score, advance the prompts."""
        scheduled, rows, offset = [], [], 0
        for req_id, n in schedule.items():
            prompt = self.prompts[req_id]
            scheduled.append(ScheduledPrompt(req_id, prompt.prompt_len, prompt.computed, n,
                                             offset))
            rows += [_hidden(prompt.seed, p) for p in range(prompt.computed, prompt.computed + n)]
            offset += n
        hidden = torch.stack(rows) if rows else torch.empty(0, HIDDEN)
        out = self.scorer.score_step(hidden, scheduled, self.lm_head, log_softmax)
        for req_id, n in schedule.items():
            self.prompts[req_id].computed += n
        return out


def add(steps: Steps, req_id: str, prompt_len: int, start: int = 0, seed: int = 0,
        targets: np.ndarray | None = None, top_k: int = 0, computed: int = 0,
        ranks: bool = False) -> np.ndarray:
    """A new request, as the runner adds it: its prompt, and its ids to the scorer."""
    if targets is None:
        targets = np.random.default_rng(seed).integers(0, VOCAB, (prompt_len - 1 - start, 1))
    steps.prompts[req_id] = Prompt(prompt_len, computed, seed)
    steps.scorer.add_request(req_id, targets, start, top_k, ranks)
    return targets


def expected(seed: int, prompt_len: int, start: int, targets: np.ndarray) -> np.ndarray:
    ref = reference_logprobs(seed, prompt_len)[start:]
    clamped = torch.from_numpy(np.asarray(targets, dtype=np.int64).clip(min=0))
    values = ref.gather(-1, clamped).numpy()
    values[np.asarray(targets) < 0] = -np.inf
    return values


def run_schedule(steps: Steps, req_id: str, chunks: list[int]) -> list[dict]:
    return [steps.step({req_id: n}) for n in chunks]


def split(total: int, cuts: list[int]) -> list[int]:
    """Chunk sizes that cover `total` tokens, cut at the given positions."""
    points = sorted({c for c in cuts if 0 < c < total})
    edges = [0, *points, total]
    return [b - a for a, b in pairwise(edges)]


@settings(deadline=None)  # timing is not what these properties test
@given(prompt_len=st.integers(2, 14), data=st.data())
def test_every_start_and_chunk_schedule_gives_the_reference_once(prompt_len, data):
    """Any start, any prefill chunking, row chunks of 3: the reference rows, emitted
    once."""
    start = data.draw(st.integers(0, prompt_len - 2), label="start")
    cuts = data.draw(st.lists(st.integers(1, prompt_len - 1), max_size=5), label="cuts")
    steps = Steps()
    targets = add(steps, "r", prompt_len, start, seed=prompt_len)
    outputs = run_schedule(steps, "r", split(prompt_len, cuts))
    emitted = [o["r"] for o in outputs if "r" in o]
    assert len(emitted) == 1 and "r" in outputs[-1]
    assert_bitwise_equal(emitted[0].numpy(), expected(prompt_len, prompt_len, start, targets),
                         what=f"len={prompt_len} start={start} cuts={cuts}")
    assert all(n <= CHUNK for n in steps.calls), steps.calls  # memory bounded by the chunk
    assert "r" not in steps.scorer.requests  # popped on emission
    assert steps.step({"r": 1}) == {}  # decode steps emit nothing


def test_lone_row_is_computed_beside_its_predecessor():
    steps = Steps()
    add(steps, "r", prompt_len=10, start=8)
    run_schedule(steps, "r", [10])
    assert steps.calls == [2]


def test_lone_row_at_chunk_start_has_no_predecessor_to_borrow():
    """The standard path computes that step's one row alone too."""
    steps = Steps()
    add(steps, "r", prompt_len=10, start=0)
    run_schedule(steps, "r", [8, 2])
    assert steps.calls == [3, 3, 2, 1]


def test_row_chunk_remainder_of_one_borrows_a_row():
    steps = Steps()
    add(steps, "r", prompt_len=8, start=0)  # 7 scored rows in chunks of 3: 3, 3, 1 -> 2
    run_schedule(steps, "r", [8])
    assert steps.calls == [3, 3, 2]


def test_pieces_name_what_is_computed_and_what_is_kept():
    steps = Steps()
    add(steps, "r", prompt_len=12, start=4)
    state = steps.scorer.requests["r"]
    prompt = ScheduledPrompt("r", 12, computed=2, num_tokens=10, offset=5)
    assert steps.scorer.pieces(state, prompt, subsets_exact=True) == [
        fixed_ids.Piece(4, 4, 7), fixed_ids.Piece(7, 7, 10), fixed_ids.Piece(9, 10, 11)]
    assert steps.scorer.pieces(state, prompt, subsets_exact=False) == [fixed_ids.Piece(2, 4, 11)]
    assert (prompt.row(2), prompt.row(11), prompt.end) == (5, 14, 12)


def test_by_construction_every_step_row_is_computed_at_once():
    """Where the probe failed: the standard path's rows of the step, in one call."""
    steps = Steps(mode=RowMode("construction", "probe failed", CHUNK))
    targets = add(steps, "r", prompt_len=12, start=7, seed=8)
    outputs = run_schedule(steps, "r", [5, 7])
    assert steps.calls == [6]  # rows 5..10 of the second step, not only the scored 7..10
    assert_bitwise_equal(outputs[1]["r"].numpy(), expected(8, 12, 7, targets),
                         what="construction")


def test_the_mode_is_decided_once_and_only_when_a_request_is_scored():
    asked = []
    scorer = FixedIdScorer(torch.device("cpu"), CHUNK, lambda: asked.append(1) or VERIFIED)
    assert scorer.score_step(torch.empty(0, HIDDEN), [], LM_HEAD.matmul, log_softmax) == {}
    assert asked == []
    scorer.add_request("r", [[1], [2]], 0, 0)
    prompt = ScheduledPrompt("r", 3, 0, 3, 0)
    hidden = torch.stack([_hidden(0, p) for p in range(3)])
    scorer.score_step(hidden, [prompt], lambda h: h @ LM_HEAD.T, log_softmax)
    assert scorer.row_mode() is VERIFIED and asked == [1]


def _row_by_row(hidden: torch.Tensor) -> torch.Tensor:
    """An lm_head exact among any rows by construction: each row is its own 1-row
    product."""
    return torch.stack([LM_HEAD @ row for row in hidden])


def _odd_counts_round_up(hidden: torch.Tensor) -> torch.Tensor:
    """An lm_head whose last bit depends on the number of rows, as some GEMMs' do."""
    out = _row_by_row(hidden)
    return out.nextafter(out + 1) if len(hidden) % 2 else out


def decide(logits, chunk_rows: int) -> RowMode:
    return fixed_ids.decide_rows(logits, log_softmax, HIDDEN, torch.float32,
                                 torch.device("cpu"), 64, chunk_rows)


@pytest.mark.parametrize("logits_of, mode", [(_row_by_row, "verified"),
                                             (_odd_counts_round_up, "construction")])
def test_the_probe_decides_the_mode_on_the_real_lm_head(monkeypatch, logits_of, mode):
    monkeypatch.delenv(fixed_ids.EXACTNESS_ENV, raising=False)
    decided = decide(logits_of, chunk_rows=8)
    assert decided.mode == mode and decided.chunk_rows == 8
    assert decided.probe["piece_sizes"] == "2-8" and decided.probe["exact"] is (mode == "verified")
    if mode == "construction":
        assert "differs" in decided.reason and decided.probe["mismatches"]


def test_probe_checks_every_piece_size_the_scorer_uses():
    rows, references, checked = rowsubset.probe_plan(budget=512, chunk=64)
    sizes = {stop - start for start, stop, _ in checked}
    assert set(range(2, 65)) <= sizes and rows == 512
    assert {65, 511, 512} <= set(references)
    assert rowsubset.probe_plan(budget=40, chunk=64)[0] == 40  # never more rows than a step


def test_construction_setting_skips_the_probe(monkeypatch):
    calls = []
    monkeypatch.setenv(fixed_ids.EXACTNESS_ENV, "construction")
    decided = decide(lambda h: calls.append(h) or h @ LM_HEAD.T, chunk_rows=3)
    assert decided.mode == "construction" and decided.probe is None and calls == []
    monkeypatch.setenv(fixed_ids.EXACTNESS_ENV, "fastest")
    with pytest.raises(ValueError, match="FASTPATH_EXACTNESS must be one of"):
        decide(_row_by_row, chunk_rows=3)


def test_resume_after_preemption_mid_prompt_recomputes_and_emits_once():
    steps = Steps()
    targets = add(steps, "r", prompt_len=12, start=2, seed=3)
    assert run_schedule(steps, "r", [5]) == [{}]
    steps.prompts["r"].computed = 0  # preempted: the KV cache is gone
    steps.scorer.resume_request("r")
    assert np.isnan(steps.scorer.requests["r"].scores.numpy()).all()
    outputs = run_schedule(steps, "r", [4, 8])
    assert outputs[0] == {}
    assert_bitwise_equal(outputs[1]["r"].numpy(), expected(3, 12, 2, targets),
                         what="after resume")


def test_resume_after_emission_emits_nothing_again():
    steps = Steps()
    add(steps, "r", prompt_len=6)
    assert "r" in run_schedule(steps, "r", [6])[0]
    steps.prompts["r"].computed = 0  # preempted while decoding, recomputed
    steps.scorer.resume_request("r")
    assert run_schedule(steps, "r", [7]) == [{}]


def test_abort_and_resubmit_under_the_same_id_starts_fresh():
    steps = Steps()
    add(steps, "r", prompt_len=12, seed=1)
    run_schedule(steps, "r", [6])  # half the prompt, then aborted
    steps.scorer.remove_request("r")
    new_targets = np.random.default_rng(9).integers(0, VOCAB, (7, 2))
    add(steps, "r", prompt_len=10, start=2, seed=2, targets=new_targets)
    (out,) = run_schedule(steps, "r", [10])
    assert_bitwise_equal(out["r"].numpy(), expected(2, 10, 2, new_targets), what="resubmitted")


def test_rows_never_computed_fail_instead_of_emitting():
    """A prompt whose first chunk starts past the first scored row (cache hit) fails."""
    steps = Steps()
    add(steps, "r", prompt_len=12, start=1, computed=4)
    (out,) = run_schedule(steps, "r", [8])
    assert fixed_ids.is_failed_scores(out["r"])


def test_two_requests_in_one_step_get_their_own_rows():
    steps = Steps()
    a = add(steps, "a", prompt_len=9, start=0, seed=4)
    b = add(steps, "b", prompt_len=7, start=3, seed=5)
    first = steps.step({"a": 4, "b": 7})
    second = steps.step({"a": 5})
    assert_bitwise_equal(first["b"].numpy(), expected(5, 7, 3, b), what="b")
    assert_bitwise_equal(second["a"].numpy(), expected(4, 9, 0, a), what="a")


def test_padding_is_minus_infinity_and_top_k_matches_topk():
    steps = Steps()
    targets = np.array([[1, -1], [2, 3], [-1, 4], [0, 10], [5, -1]])
    add(steps, "r", prompt_len=6, targets=targets, top_k=3, seed=6)
    (out,) = run_schedule(steps, "r", [6])
    scores, top_values, top_ids = split_top_k(out["r"].numpy(), 2, 3)
    assert_bitwise_equal(scores, expected(6, 6, 0, targets), what="ids with padding")
    values, indices = torch.topk(reference_logprobs(6, 6), 3, dim=-1)
    assert_bitwise_equal(top_values, values.numpy(), what="top-k values")
    assert np.array_equal(top_ids, indices.numpy())


def test_ranks_count_every_entry_at_or_above_the_id_ties_included():
    """The rank column is the standard path's rank (vLLM's
    `batched_count_greater_than`: entries >= the id's score); the integer lm_head
    makes ties common. Padded entries have no rank (NaN); the top-K columns sit
    between the ids and the ranks."""
    steps = Steps()
    targets = np.array([[1, -1], [2, 3], [-1, 4], [0, 10], [5, 6], [7, 8], [9, 1]])
    add(steps, "r", prompt_len=8, targets=targets, top_k=2, seed=9, ranks=True)
    (out,) = run_schedule(steps, "r", [3, 5])[1:]
    answer = out["r"].numpy()
    assert answer.shape == (7, 2 + 2 * 2 + 2)
    ref = reference_logprobs(9, 8)
    clamped = torch.from_numpy(targets.clip(min=0))
    want = (ref.unsqueeze(1) >= ref.gather(-1, clamped).unsqueeze(-1)).sum(-1).numpy()
    ranks = answer[:, 6:]
    assert np.array_equal(np.isnan(ranks), targets < 0)
    assert np.array_equal(ranks[targets >= 0], want[targets >= 0].astype(np.float32))
    tied = ref.gather(-1, clamped)
    assert any((ref[r] == tied[r, c]).sum() > 1 for r in range(7) for c in range(2)), \
        "no tie: the test would not tell >= from >"
    scores, _, _ = split_top_k(answer[:, :6], 2, 2)
    assert_bitwise_equal(scores, expected(9, 8, 0, targets), what="ids beside ranks")
