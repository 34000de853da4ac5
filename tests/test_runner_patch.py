"""The V1 runner patch's bookkeeping, without an engine: a fake runner drives it step by step.

The fake's hidden states and lm_head are small integers, so every logit is exact in float32
and a row's scores cannot depend on which rows it was computed with: any difference from
the reference is a bookkeeping error (wrong row, wrong request, stale state), never
rounding. `compute_logits` records the rows it was given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.worker.gpu_model_runner import AsyncGPUModelRunnerOutput

from fastpath import rowsubset
from fastpath.patches import _scores as _base
from fastpath.patches import gpu_model_runner as patch
from fastpath.patches import scheduler as scheduler_patch
from fastpath.scoring import split_top_k
from tests.conftest import assert_bitwise_equal

VOCAB, HIDDEN = 11, 4


def _hidden(req_seed: int, position: int) -> torch.Tensor:
    """The hidden state of a request's prompt position: small integers, deterministic."""
    g = torch.Generator().manual_seed(req_seed * 100_003 + position)
    return torch.randint(-3, 4, (HIDDEN,), generator=g).to(torch.float32)


LM_HEAD = torch.randint(-3, 4, (VOCAB, HIDDEN), generator=torch.Generator().manual_seed(7)).to(
    torch.float32)


def reference_logprobs(seed: int, prompt_len: int) -> torch.Tensor:
    """Every prompt row's log-softmax, computed at once: [prompt_len - 1, VOCAB]."""
    hidden = torch.stack([_hidden(seed, p) for p in range(prompt_len - 1)])
    return torch.log_softmax(hidden @ LM_HEAD.T, dim=-1, dtype=torch.float32)


@dataclass
class FakeRequest:
    prompt_token_ids: list[int]
    num_computed_tokens: int = 0
    seed: int = 0


@dataclass
class FakeRunner:
    """What the patch reads from a GPUModelRunner, and a log of the lm_head calls."""

    requests: dict[str, FakeRequest] = field(default_factory=dict)
    calls: list[int] = field(default_factory=list)
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        self.device = torch.device("cpu")
        self.max_num_tokens = 64
        self.model_config = SimpleNamespace(logprobs_mode="raw_logprobs", dtype=self.dtype,
                                            get_hidden_size=lambda: HIDDEN)
        self.model = SimpleNamespace(compute_logits=self._compute_logits)
        self.sampler = SimpleNamespace(
            compute_logprobs=lambda logits: torch.log_softmax(logits, -1, dtype=torch.float32))
        self.query_start_loc = SimpleNamespace(np=np.zeros(1, dtype=np.int32))
        self.input_batch = SimpleNamespace(req_id_to_index={})

    def _compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls.append(hidden.shape[0])
        return hidden @ LM_HEAD.T

    def _sync_device(self) -> None:
        pass

    def step(self, schedule: dict[str, int]) -> dict[str, torch.Tensor]:
        """One engine step: lay out the scheduled tokens, score, advance the requests."""
        order = list(schedule)
        self.input_batch.req_id_to_index = {r: i for i, r in enumerate(order)}
        starts = np.cumsum([0] + [schedule[r] for r in order])
        self.query_start_loc.np = starts.astype(np.int32)
        rows = []
        for req_id in order:
            req = self.requests[req_id]
            first = req.num_computed_tokens
            rows += [_hidden(req.seed, p) for p in range(first, first + schedule[req_id])]
        hidden = torch.stack(rows) if rows else torch.empty(0, HIDDEN)
        out = patch.scorer(self).score_step(self, hidden, schedule)
        for req_id, n in schedule.items():
            self.requests[req_id].num_computed_tokens += n
        return out


def fixed_params(targets: np.ndarray, start: int = 0, top_k: int = 0):
    extra = {_base.TOP_K_KEY: top_k} if top_k else None
    return SimpleNamespace(prompt_logprob_token_ids=np.asarray(targets),
                           prompt_logprob_start=start, extra_args=extra)


def add(runner: FakeRunner, req_id: str, prompt_len: int, start: int = 0, seed: int = 0,
        targets: np.ndarray | None = None, top_k: int = 0, computed: int = 0) -> np.ndarray:
    """Register a new request with the runner and the scorer, as _update_states does."""
    if targets is None:
        targets = np.random.default_rng(seed).integers(0, VOCAB, (prompt_len - 1 - start, 1))
    runner.requests[req_id] = FakeRequest(list(range(prompt_len)), computed, seed)
    patch.scorer(runner).add_request(req_id, fixed_params(targets, start, top_k))
    return targets


def expected(seed: int, prompt_len: int, start: int, targets: np.ndarray) -> np.ndarray:
    ref = reference_logprobs(seed, prompt_len)[start:]
    clamped = torch.from_numpy(np.asarray(targets, dtype=np.int64).clip(min=0))
    values = ref.gather(-1, clamped).numpy()
    values[np.asarray(targets) < 0] = -np.inf
    return values


def run_schedule(runner: FakeRunner, req_id: str, chunks: list[int]) -> list[dict]:
    return [runner.step({req_id: n}) for n in chunks]


def split(total: int, cuts: list[int]) -> list[int]:
    """Chunk sizes that cover `total` tokens, cut at the given positions."""
    points = sorted({c for c in cuts if 0 < c < total})
    edges = [0, *points, total]
    return [b - a for a, b in pairwise(edges)]


VERIFIED = patch.RowMode("verified", "the fake's integer lm_head is exact", 3)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Row chunks of 3, and the fake's lm_head taken as verified (its sums are exact)."""
    monkeypatch.setattr(patch, "chunk_rows_setting", lambda device_type: 3)
    monkeypatch.setattr(patch, "decide_rows", lambda runner, chunk_rows: VERIFIED)


@given(prompt_len=st.integers(2, 14), data=st.data())
def test_every_start_and_chunk_schedule_gives_the_reference_once(prompt_len, data):
    """Any start, any prefill chunking, row chunks of 3: the reference rows, emitted once."""
    start = data.draw(st.integers(0, prompt_len - 2), label="start")
    cuts = data.draw(st.lists(st.integers(1, prompt_len - 1), max_size=5), label="cuts")
    runner = FakeRunner()
    targets = add(runner, "r", prompt_len, start, seed=prompt_len)
    outputs = run_schedule(runner, "r", split(prompt_len, cuts))
    emitted = [o["r"] for o in outputs if "r" in o]
    assert len(emitted) == 1 and "r" in outputs[-1]
    assert_bitwise_equal(emitted[0].numpy(), expected(prompt_len, prompt_len, start, targets),
                         what=f"len={prompt_len} start={start} cuts={cuts}")
    assert all(n <= 3 for n in runner.calls), runner.calls  # memory bounded by the chunk
    assert "r" not in patch.scorer(runner).requests  # popped on emission
    assert runner.step({"r": 1}) == {}  # decode steps emit nothing


def test_lone_row_is_computed_beside_its_predecessor():
    runner = FakeRunner()
    add(runner, "r", prompt_len=10, start=8)
    run_schedule(runner, "r", [10])
    assert runner.calls == [2]


def test_lone_row_at_chunk_start_has_no_predecessor_to_borrow():
    """The standard path computes that step's one row alone too."""
    runner = FakeRunner()
    add(runner, "r", prompt_len=10, start=0)
    run_schedule(runner, "r", [8, 2])
    assert runner.calls == [3, 3, 2, 1]


def test_row_chunk_remainder_of_one_borrows_a_row():
    runner = FakeRunner()
    add(runner, "r", prompt_len=8, start=0)  # 7 scored rows in chunks of 3: 3, 3, 1 -> 2
    run_schedule(runner, "r", [8])
    assert runner.calls == [3, 3, 2]


def test_by_construction_every_step_row_is_computed_at_once(monkeypatch):
    """Where the probe failed: the standard path's rows of the step, in one call."""
    construction = patch.RowMode("construction", "probe failed", 3)
    monkeypatch.setattr(patch, "decide_rows", lambda runner, chunk_rows: construction)
    runner = FakeRunner()
    targets = add(runner, "r", prompt_len=12, start=7, seed=8)
    outputs = run_schedule(runner, "r", [5, 7])
    assert runner.calls == [6]  # rows 5..10 of the second step, not only the scored 7..10
    assert_bitwise_equal(outputs[1]["r"].numpy(), expected(8, 12, 7, targets),
                         what="construction")


def _row_by_row(hidden: torch.Tensor) -> torch.Tensor:
    """An lm_head exact among any rows by construction: each row is its own 1-row product."""
    return torch.stack([LM_HEAD @ row for row in hidden])


def _odd_counts_round_up(hidden: torch.Tensor) -> torch.Tensor:
    """An lm_head whose last bit depends on the number of rows, as some GEMMs' do."""
    out = _row_by_row(hidden)
    return out.nextafter(out + 1) if len(hidden) % 2 else out


@pytest.mark.parametrize("logits_of, mode", [(_row_by_row, "verified"),
                                             (_odd_counts_round_up, "construction")])
def test_the_probe_decides_the_mode_on_the_real_lm_head(monkeypatch, logits_of, mode):
    monkeypatch.undo()  # the real decide_rows
    monkeypatch.delenv(patch.EXACTNESS_ENV, raising=False)
    runner = FakeRunner()
    runner.model.compute_logits = logits_of
    decided = patch.decide_rows(runner, chunk_rows=8)
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
    monkeypatch.undo()
    monkeypatch.setenv(patch.EXACTNESS_ENV, "construction")
    runner = FakeRunner()
    decided = patch.decide_rows(runner, chunk_rows=3)
    assert decided.mode == "construction" and decided.probe is None and runner.calls == []
    monkeypatch.setenv(patch.EXACTNESS_ENV, "fastest")
    with pytest.raises(ValueError, match="FASTPATH_EXACTNESS must be one of"):
        patch.decide_rows(runner, chunk_rows=3)


def test_resume_after_preemption_mid_prompt_recomputes_and_emits_once(monkeypatch):
    runner = FakeRunner()
    targets = add(runner, "r", prompt_len=12, start=2, seed=3)
    assert run_schedule(runner, "r", [5]) == [{}]
    runner.requests["r"].num_computed_tokens = 0  # preempted: the KV cache is gone
    _drive_update_states(monkeypatch, runner, resumed={"r"})
    assert np.isnan(patch.scorer(runner).requests["r"].scores.numpy()).all()
    outputs = run_schedule(runner, "r", [4, 8])
    assert outputs[0] == {}
    assert_bitwise_equal(outputs[1]["r"].numpy(), expected(3, 12, 2, targets),
                         what="after resume")


def test_resume_after_emission_emits_nothing_again(monkeypatch):
    runner = FakeRunner()
    add(runner, "r", prompt_len=6)
    assert "r" in run_schedule(runner, "r", [6])[0]
    runner.requests["r"].num_computed_tokens = 0  # preempted while decoding, recomputed
    _drive_update_states(monkeypatch, runner, resumed={"r"})
    assert run_schedule(runner, "r", [7]) == [{}]


def test_abort_and_resubmit_under_the_same_id_starts_fresh(monkeypatch):
    runner = FakeRunner()
    add(runner, "r", prompt_len=12, seed=1)
    run_schedule(runner, "r", [6])  # half the prompt, then aborted
    new_targets = np.random.default_rng(9).integers(0, VOCAB, (7, 2))
    new = fixed_params(new_targets, start=2)
    runner.requests["r"] = FakeRequest(list(range(10)), 0, seed=2)
    _drive_update_states(monkeypatch, runner, finished={"r"}, new=[("r", new)])
    (out,) = run_schedule(runner, "r", [10])
    assert_bitwise_equal(out["r"].numpy(), expected(2, 10, 2, new_targets), what="resubmitted")


def test_finished_request_state_is_removed(monkeypatch):
    runner = FakeRunner()
    add(runner, "r", prompt_len=12)
    run_schedule(runner, "r", [4])
    _drive_update_states(monkeypatch, runner, finished={"r"})
    assert patch.scorer(runner).requests == {}


def test_rows_never_computed_fail_instead_of_emitting():
    """A prompt whose first chunk starts past the first scored row (cache hit) fails."""
    runner = FakeRunner()
    add(runner, "r", prompt_len=12, start=1, computed=4)
    (out,) = run_schedule(runner, "r", [8])
    assert _base.is_failed_scores(out["r"])


def test_two_requests_in_one_step_get_their_own_rows():
    runner = FakeRunner()
    a = add(runner, "a", prompt_len=9, start=0, seed=4)
    b = add(runner, "b", prompt_len=7, start=3, seed=5)
    first = runner.step({"a": 4, "b": 7})
    second = runner.step({"a": 5})
    assert_bitwise_equal(first["b"].numpy(), expected(5, 7, 3, b), what="b")
    assert_bitwise_equal(second["a"].numpy(), expected(4, 9, 0, a), what="a")


def test_padding_is_minus_infinity_and_top_k_matches_topk():
    runner = FakeRunner()
    targets = np.array([[1, -1], [2, 3], [-1, 4], [0, 10], [5, -1]])
    add(runner, "r", prompt_len=6, targets=targets, top_k=3, seed=6)
    (out,) = run_schedule(runner, "r", [6])
    scores, top_values, top_ids = split_top_k(out["r"].numpy(), 2, 3)
    assert_bitwise_equal(scores, expected(6, 6, 0, targets), what="ids with padding")
    values, indices = torch.topk(reference_logprobs(6, 6), 3, dim=-1)
    assert_bitwise_equal(top_values, values.numpy(), what="top-k values")
    assert np.array_equal(top_ids, indices.numpy())


def _drive_update_states(monkeypatch, runner, finished=(), resumed=(), new=()):
    """Call the patched _update_states with upstream's part replaced by a no-op."""
    monkeypatch.setattr(patch, "_original_update_states", lambda self, out: None)
    scheduler_output = SimpleNamespace(
        finished_req_ids=set(finished),
        scheduled_cached_reqs=SimpleNamespace(resumed_req_ids=set(resumed)),
        scheduled_new_reqs=[SimpleNamespace(req_id=r, sampling_params=p) for r, p in new],
    )
    patch._update_states(runner, scheduler_output)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_sample_tokens_attaches_scores_to_either_output(monkeypatch, asynchronous):
    """The AsyncGPUModelRunnerOutput branch (async scheduling, off on CPU) too."""
    scores = torch.ones(3, 1)
    inner = ModelRunnerOutput(req_ids=["x"], req_id_to_index={"x": 0},
                              prompt_token_id_logprobs_dict={"old": torch.zeros(1, 1)})
    if asynchronous:
        wrapped = AsyncGPUModelRunnerOutput.__new__(AsyncGPUModelRunnerOutput)
        wrapped._model_runner_output = inner
    else:
        wrapped = inner

    def upstream_sample_tokens(self, *args, **kwargs):
        self.__dict__[patch._STEP_OUTPUT] = {"x": scores}
        return wrapped

    monkeypatch.setattr(patch, "_original_sample_tokens", upstream_sample_tokens)
    runner = FakeRunner()
    assert patch.sample_tokens(runner, None) is wrapped
    assert inner.prompt_token_id_logprobs_dict["x"] is scores
    assert "old" in inner.prompt_token_id_logprobs_dict
    assert patch._STEP_OUTPUT not in runner.__dict__


def test_scheduler_turns_failed_scores_into_an_error_finish(monkeypatch):
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

    class FakeScheduler:
        def __init__(self):
            self.requests = {"bad": SimpleNamespace(client_index=0),
                             "quiet": SimpleNamespace(client_index=1),
                             "good": SimpleNamespace(client_index=0)}
            self.finished = []

        def finish_requests(self, ids, status):
            self.finished.append((sorted(ids), status))
            for req_id in ids:
                self.requests.pop(req_id)

    def upstream(self, scheduler_output, runner_output):
        assert set(runner_output.prompt_token_id_logprobs_dict) == {"good"}
        return {0: EngineCoreOutputs(outputs=[
            EngineCoreOutput(request_id="bad", new_token_ids=[5]),
            EngineCoreOutput(request_id="good", new_token_ids=[6])])}

    monkeypatch.setattr(scheduler_patch, "_original_update_from_output", upstream)
    runner_output = SimpleNamespace(prompt_token_id_logprobs_dict={
        "bad": _base.FAILED_SCORES, "quiet": _base.FAILED_SCORES, "good": torch.ones(2, 1)})
    fake = FakeScheduler()
    outputs = scheduler_patch.update_from_output(fake, None, runner_output)
    by_id = {o.request_id: o for eco in outputs.values() for o in eco.outputs}
    assert by_id["bad"].finish_reason == FinishReason.ERROR
    assert by_id["quiet"].finish_reason == FinishReason.ERROR  # had no output: one is added
    assert by_id["good"].finish_reason is None
    (ids, status), = fake.finished
    assert ids == ["bad", "quiet"] and status.name == "FINISHED_ERROR"
    assert set(fake.requests) == {"good"}
