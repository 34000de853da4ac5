"""Stateful property: every score any request receives was computed for that request.

A Hypothesis state machine drives a live engine step by step (`LLMEngine`: requests added
with chosen ids, `step()`, `abort_request`), over engine settings drawn per run, with random
sequences of: `target_token_ids` (with and without `target_start`, with `fastpath_top_k`
and `fastpath_ranks`: what fastpath serve's /v1/completions asks), upstream's 2-D
`prompt_logprob_token_ids` with -1 padding, standard `prompt_logprobs=K`, both at once on
one request, plain generation and sample logprobs; prompts from 2 tokens
to 400 (past the CPU attention's 224-row tile) that share prefixes; the caller's
`skip_reading_prefix_cache` drawn from None/True/False; aborts, and resubmission under a
finished request's id (internal ids kept: request-id randomization is off). The engine
core runs in its own process and steps as requests arrive, so the arrival order and the
steps they share vary with the machine's load.

Invariant, per engine setting:
- isolated (fastpath's default schedule: one request per step, prompts never split):
  every returned prompt score is bitwise the value the standard path (`prompt_logprobs=-1`)
  gives for that (prompt, row, id) in a separate cold engine; a top-K answer is that
  reference's top-K; a rank is the count of the reference row's entries >= the id's value.
  The schedule cannot change a bit there, so it must not.
- batched (chunked prefill, requests sharing steps, preemption): a row's bits may depend on
  how the schedule split and grouped it (docs/exactness.md), so values are held within
  `SCHEDULE_BOUND` of the cold reference (a value computed for another row, request or id
  is off by orders of magnitude more), and a request asking for both its targets and
  `prompt_logprobs` must get the same bits (and the same ranks) from both (one request,
  one schedule).
- always: a request is answered with its own kind of scores or refused with a clear error
  at submission, and the engine keeps serving.
`HYPOTHESIS_PROFILE=nightly` runs every setting, many more and longer sequences.
With `FASTPATH_ANSWER_RECORD=BASE`, each isolated answer's digest is recorded (BASE.plugin or
BASE.native, `fastpath.upstream.record_answer`), the machine's and those of 40 fixed requests
(the same in every run, so two builds always share them), so that a run against a vLLM carrying the
upstream series can be compared with the plugin's run of the same derandomized sequences
(`fastpath upstream compare-answers BASE`; `tox -e test` does).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from fastpath import upstream, zoo
from fastpath.engine.scoring import split_top_k
from fastpath.worker.targets import RANKS_KEY, TOP_K_KEY
from tests.helpers import (
    assert_bitwise_equal,
    ci_or_slow,
    engine_kwargs,
    isolated_engine_kwargs,
    runner_engine,
)

pytestmark = [pytest.mark.correctness, pytest.mark.engine]

MODEL = "tiny-llama"
VOCAB = 2048
MAX_PROMPT = 400
MAX_MODEL_LEN = 512
LONG = 100  # output tokens of a burst's requests: enough to outgrow the small KV cache
# Largest difference a batched schedule may make to a logprob here: chunk boundaries and
# step groups changed values by up to 3.8e-6 on vLLM's CPU attention (AVX2); a value
# computed for another row or id differs by ~1 or more.
SCHEDULE_BOUND = 1e-4


@dataclass(frozen=True)
class EngineSetting:
    """Engine flags drawn per run: each exercises a different way rows reach the runner."""

    name: str
    max_num_batched_tokens: int | None
    enable_prefix_caching: bool
    kv_cache_memory_bytes: int = 64 << 20
    isolated: bool = False

    def kwargs(self) -> dict[str, Any]:
        flags = dict(enable_prefix_caching=self.enable_prefix_caching,
                     kv_cache_memory_bytes=self.kv_cache_memory_bytes, block_size=32,
                     max_model_len=MAX_MODEL_LEN,
                     disable_log_stats=False)  # the preemption counter
        if self.isolated:
            return isolated_engine_kwargs(**flags)
        return engine_kwargs(max_num_batched_tokens=self.max_num_batched_tokens,
                             max_num_seqs=8, **flags)


SETTINGS = (
    # one request per step, whole prompts: the same bits whatever the arrival order
    EngineSetting("isolated-cache", None, True, isolated=True),
    # chunked prefill in 32-token pieces, prefix cache shared by the prompts
    EngineSetting("chunk32-cache", 32, True),
    # tiny-llama keeps 2 KiB of KV per token: 1.4 MiB is ~22 blocks of 32, so a few
    # long prompts with long decodes force preemption and recomputation
    EngineSetting("preempt-cache", 64, True, kv_cache_memory_bytes=1400 << 10),
    # prompts never split, but several per step; no cache
    EngineSetting("whole-nocache", 2048, False),
)
DEFAULT_SETTINGS = ("isolated-cache", "preempt-cache")  # every run but the nightly's four
CI_SETTINGS = ("isolated-cache",)  # the others are marked slow: CI's test run skips them


def _settings_for_this_run() -> list[EngineSetting]:
    if os.environ.get("HYPOTHESIS_PROFILE") == "nightly":
        return list(SETTINGS)
    return [s for s in SETTINGS if s.name in DEFAULT_SETTINGS]


class Reference:
    """The cold standard path: full-vocabulary prompt logprobs, one engine, cached per prompt."""

    def __init__(self, llm: Any):
        self.llm = llm
        self.cache: dict[tuple[int, ...], np.ndarray] = {}

    def logprobs(self, prompt: tuple[int, ...]) -> np.ndarray:
        """float32 [len(prompt) - 1, VOCAB]: row r predicts prompt[r + 1]."""
        if prompt not in self.cache:
            # detokenize=False: the values, without a string per (row, vocabulary entry)
            (out,) = self.llm.generate([{"prompt_token_ids": list(prompt)}],
                                       SamplingParams(max_tokens=1, prompt_logprobs=-1,
                                                      detokenize=False),
                                       use_tqdm=False)
            table = np.full((len(prompt) - 1, VOCAB), np.nan, dtype=np.float32)
            for row, entries in enumerate(out.prompt_logprobs[1:]):
                ids = np.fromiter(entries.keys(), dtype=np.int64, count=len(entries))
                table[row, ids] = np.fromiter((e.logprob for e in entries.values()),
                                              dtype=np.float32, count=len(entries))
            assert not np.isnan(table).any()
            self.cache[prompt] = table
        return self.cache[prompt]


@pytest.fixture(scope="module")
def reference(runner):
    """The standard path on the runner under test (V1 and V2 log-softmaxes differ by ulps)."""
    with runner_engine(str(zoo.get_model(MODEL)), runner,
                       **isolated_engine_kwargs(enable_prefix_caching=False,
                                                max_model_len=MAX_MODEL_LEN)) as llm:
        yield Reference(llm)


def _params() -> list:
    """The settings of this run; all but CI's are slow (nightly and `-m correctness` run them)."""
    return ci_or_slow(_settings_for_this_run(), CI_SETTINGS, ids=lambda s: s.name)


@pytest.fixture(scope="module", params=_params())
def engine_under_test(request, runner):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", "1")  # ids reach the runner as given
        with runner_engine(str(zoo.get_model(MODEL)), runner, **request.param.kwargs()) as llm:
            yield request.param, llm


# Prompts that share prefixes: three roots, each cut and extended in several ways.
_ROOTS = [np.random.default_rng(s).integers(0, VOCAB, MAX_PROMPT).tolist() for s in (1, 2, 3)]
prompts = st.builds(
    lambda root, cut, tail_seed, tail: tuple(
        (_ROOTS[root][:cut] + np.random.default_rng(tail_seed).integers(0, VOCAB, tail).tolist())
        [:MAX_PROMPT]),
    root=st.integers(0, 2), cut=st.sampled_from([1, 2, 32, 33, 64, 149, 223, 250, 300, 399]),
    tail_seed=st.integers(0, 1), tail=st.sampled_from([0, 1, 17]),
).filter(lambda p: len(p) >= 2)
REUSE = st.one_of(st.none(), st.integers(0, 50))
token = st.one_of(st.sampled_from([0, VOCAB - 1]), st.integers(0, VOCAB - 1))


def expected_scores(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The fixed ids' values read from a prompt's full-vocabulary table; -inf for padding."""
    expected = np.take_along_axis(table, ids.clip(min=0), 1)
    expected[ids < 0] = -np.inf
    return expected


def expected_ranks(table: np.ndarray, values: np.ndarray, ids: np.ndarray,
                   slack: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The range of ranks (entries of the row >= the value, as vLLM counts) that `values`
    may have in a prompt's table: one rank when `slack` is 0; NaN for padding."""
    def count(bound: np.ndarray) -> np.ndarray:
        counts = (table[:, None, :] >= bound[:, :, None]).sum(-1).astype(np.float32)
        counts[ids < 0] = np.nan
        return counts

    low = count(values + slack)
    return low, (low if slack == 0 else count(values - slack))


@dataclass
class Submitted:
    """What was asked, so the answer can be checked against the reference."""

    prompt: tuple[int, ...]
    kind: str
    ids: np.ndarray | None = None  # [rows, n] fixed ids (-1 = padding)
    start: int = 0
    top_k: int = 0
    prompt_logprobs: int | None = None
    ranks: bool = False  # fastpath_ranks: one more column per id
    aborted: bool = False
    seen: list[Any] = field(default_factory=list)


class RequestSpace(RuleBasedStateMachine):
    """Random submissions, steps and aborts against one live engine."""

    setting: EngineSetting
    llm: Any
    reference: Reference
    stats: dict[str, int]

    def __init__(self):
        super().__init__()
        self.engine = self.llm.llm_engine
        # fastpath's top-K extension lives in its V1 runner patch; V2 refuses it (checked in
        # tests/engine/test_fast_vs_standard.py), so on V2 the space has no top-K requests.
        self.top_k_drawn = not self.engine.vllm_config.use_v2_model_runner
        self.live: dict[str, Submitted] = {}
        self.used: list[str] = []  # every id submitted so far, in order
        # Only ids of requests that finished are reused. An aborted request can still have
        # outputs on their way from the engine core, which the front end would hand to a
        # new request of the same id, and an add racing its abort stops vLLM on "duplicate
        # request id": why vLLM randomizes ids by default. Abort + resubmission under one id
        # at the runner is covered by tests/unit/test_runner_patch.py.
        self.ever_aborted: set[str] = set()
        self.ids = itertools.count()
        _drain(self.engine)  # what an earlier, failed sequence left in flight

    # ---- submissions -------------------------------------------------------------------

    def _submit(self, req_id: str, prompt: tuple[int, ...], params: SamplingParams,
                sub: Submitted, extra: dict[str, Any] | None = None) -> None:
        engine_prompt = {"prompt_token_ids": list(prompt), **(extra or {})}
        try:
            self.engine.add_request(req_id, engine_prompt, params)
        except VLLMValidationError as error:
            assert error.parameter, f"refusal without a parameter name: {error}"
            self.stats["refused"] += 1
            return
        self.live[req_id] = sub
        self.stats[sub.kind] += 1
        self.stats["longest_prompt"] = max(self.stats["longest_prompt"], len(prompt))

    def _new_id(self, reuse: int | None) -> str:
        """A fresh id, or (reuse = an index) an earlier request's id if it is not in flight.

        What is drawn never depends on the engine's progress (Hypothesis replays the draws),
        only what the draw selects does.
        """
        if reuse is not None and self.used:
            old = self.used[reuse % len(self.used)]
            if old not in self.live and old not in self.ever_aborted:
                self.stats["reused_id"] += 1
                return old
        req_id = f"r{next(self.ids)}"
        self.used.append(req_id)
        return req_id

    KINDS = ("targets", "targets", "two_dimensional", "standard", "both", "plain",
             "bad_length")

    @rule(kind=st.sampled_from(KINDS), prompt=prompts, data=st.data())
    def submit(self, kind, prompt, data):
        """One request of a kind drawn evenly (Hypothesis draws rules less evenly)."""
        getattr(self, f"_submit_{kind}")(prompt, data)

    @rule(count=st.integers(3, 6), data=st.data())
    def burst(self, count, data):
        """Several long requests at once: the small-cache setting must preempt (an isolated
        engine runs one request at a time, so there long decodes would only take time)."""
        for _ in range(count):
            kind = data.draw(st.sampled_from(self.KINDS[:-1]))
            getattr(self, f"_submit_{kind}")(data.draw(prompts), data,
                                             long=not self.setting.isolated)

    def _submit_targets(self, prompt, data, long=False):
        reuse = data.draw(REUSE)
        skip = data.draw(st.sampled_from([None, True, False]))
        max_tokens = LONG if long else data.draw(st.sampled_from([1, 3, 40]))
        top_k = data.draw(st.sampled_from([0, 0, 1, 4] if self.top_k_drawn else [0]))
        start = data.draw(st.sampled_from(sorted({0, 1, len(prompt) // 2, len(prompt) - 2})))
        start = min(start, len(prompt) - 2)
        ranks = self.top_k_drawn and data.draw(st.booleans())
        targets = data.draw(st.lists(token, min_size=len(prompt) - 1 - start,
                                     max_size=len(prompt) - 1 - start))
        extra = {"target_token_ids": targets}
        if start or data.draw(st.booleans()):
            extra["target_start"] = start
        extra_args = {**({TOP_K_KEY: top_k} if top_k else {}),
                      **({RANKS_KEY: True} if ranks else {})}
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                skip_reading_prefix_cache=skip, extra_args=extra_args or None)
        sub = Submitted(prompt, "targets", np.asarray(targets)[:, None], start, top_k,
                        ranks=ranks)
        self._submit(self._new_id(reuse), prompt, params, sub, extra)

    def _submit_two_dimensional(self, prompt, data, long=False):
        reuse = data.draw(REUSE)
        skip = data.draw(st.sampled_from([None, True, False]))
        width = data.draw(st.integers(1, 3))
        start = data.draw(st.integers(0, len(prompt) - 2))
        rows = len(prompt) - 1 - start
        ids = data.draw(st.lists(st.lists(st.one_of(token, st.just(-1)), min_size=width,
                                          max_size=width), min_size=rows, max_size=rows))
        # the kld model pass asks for top-1
        top_k = data.draw(st.sampled_from([0, 1, 3] if self.top_k_drawn else [0]))
        params = SamplingParams(max_tokens=LONG if long else 2, temperature=0.0,
                                extra_args={"fastpath_top_k": top_k} if top_k else None,
                                prompt_logprob_token_ids=ids,
                                prompt_logprob_start=start or None,
                                skip_reading_prefix_cache=skip)
        sub = Submitted(prompt, "two_dimensional", np.asarray(ids), start, top_k)
        self._submit(self._new_id(reuse), prompt, params, sub)

    def _submit_standard(self, prompt, data, long=False):
        k = data.draw(st.sampled_from([0, 1, 5]))
        reuse = data.draw(REUSE)
        skip = data.draw(st.sampled_from([None, True]))
        params = SamplingParams(max_tokens=LONG if long else 2, temperature=0.0, prompt_logprobs=k,
                                skip_reading_prefix_cache=skip)
        self._submit(self._new_id(reuse), prompt, params,
                     Submitted(prompt, "standard", prompt_logprobs=k))

    def _submit_both(self, prompt, data, long=False):
        """Targets (the prompt's own next tokens) and prompt_logprobs on one request: the
        two answers come from the same rows of the same steps, so must be the same bits."""
        start = data.draw(st.sampled_from(sorted({0, len(prompt) // 2, len(prompt) - 2})))
        extra = {"target_token_ids": list(prompt[start + 1:]), "target_start": start}
        ranks = self.top_k_drawn and data.draw(st.booleans())  # as /v1/completions asks
        params = SamplingParams(max_tokens=LONG if long else 2, temperature=0.0,
                                prompt_logprobs=0,
                                extra_args={RANKS_KEY: True} if ranks else None)
        sub = Submitted(prompt, "both", np.asarray(prompt[start + 1:])[:, None], start,
                        prompt_logprobs=0, ranks=ranks)
        self._submit(self._new_id(data.draw(REUSE)), prompt, params, sub, extra)

    def _submit_plain(self, prompt, data, long=False):
        logprobs = data.draw(st.sampled_from([None, 2]))
        max_tokens = LONG if long else data.draw(st.sampled_from([1, 30]))
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=logprobs)
        kind = "plain" if logprobs is None else "sample_logprobs"
        self._submit(self._new_id(None), prompt, params, Submitted(prompt, kind))

    def _submit_bad_length(self, prompt, data, long=False):
        """A wrong target count is refused at submission, naming the parameter."""
        wrong = data.draw(st.sampled_from([-1, 1]))
        targets = list(prompt[1:]) + [0] if wrong > 0 else list(prompt[2:])
        with pytest.raises(VLLMValidationError, match="target_token_ids"):
            self.engine.add_request(self._new_id(None), {"prompt_token_ids": list(prompt),
                                                          "target_token_ids": targets},
                                    SamplingParams(max_tokens=1))
        self.stats["refused"] += 1

    # ---- engine steps and aborts ---------------------------------------------------------

    @rule(steps=st.integers(1, 6))
    def step(self, steps):
        for _ in range(steps):
            if not self.engine.has_unfinished_requests():
                break
            for output in self.engine.step():
                self._receive(output)

    @precondition(lambda self: self.used)
    @rule(pick=st.integers(0, 50))
    def abort(self, pick):
        """Abort an earlier request: in flight (then it must never answer) or already done."""
        req_id = self.used[pick % len(self.used)]
        self.engine.abort_request([req_id])
        if req_id in self.live and not self.live[req_id].aborted:
            self.live[req_id].aborted = True
            self.ever_aborted.add(req_id)
            self.stats["aborted"] += 1

    def _receive(self, output: Any) -> None:
        sub = self.live.get(output.request_id)
        assert sub is not None, f"output for a request not in flight: {output.request_id}"
        assert not sub.aborted, f"aborted request {output.request_id} still answered"
        self.check(output, sub)
        if output.finished:
            del self.live[output.request_id]

    # ---- the invariant ---------------------------------------------------------------

    def check(self, output: Any, sub: Submitted) -> None:
        what = f"{self.setting.name} {output.request_id} {sub.kind} len={len(sub.prompt)}"
        if output.outputs and output.outputs[0].finish_reason == "error":
            raise AssertionError(f"{what}: finished with an error")
        scores = output.prompt_token_id_logprobs
        if sub.ids is None:
            assert scores is None, f"{what}: scores it never asked for"
        elif scores is not None:
            self._check_fixed_ids(scores, sub, what)
            self.stats["checked_rows"] += scores.shape[0]
            if self.setting.isolated:  # schedule-free answers: comparable across vLLM builds
                upstream.record_answer(self.setting.name, sub.prompt, sub.start, sub.ids,
                                       sub.top_k, scores, ranks=sub.ranks)
        elif output.finished:
            raise AssertionError(f"{what}: finished without its scores")
        if sub.prompt_logprobs is not None and output.prompt_logprobs is not None:
            self._check_standard(output.prompt_logprobs, sub, what, output.finished)
            if scores is not None:  # "both": one request, one schedule, the same bits
                same = [output.prompt_logprobs[sub.start + 1 + i][int(t)]
                        for i, t in enumerate(sub.ids[:, 0])]
                assert_bitwise_equal(scores[:, 0], np.array([e.logprob for e in same],
                                                            dtype=np.float32),
                                     what=f"{what} targets vs its own prompt_logprobs")
                if sub.ranks:  # ours were held to the row's own count above: a
                    # difference here is vLLM's rank (its compiled batched_count_greater_than
                    # counted wrong once it loaded a kernel cached for another vector ISA)
                    assert_bitwise_equal(scores[:, -1], np.array([e.rank for e in same],
                                                                 dtype=np.float32),
                                         what=f"{what} ranks vs its own prompt_logprobs")
                    self.stats["same_request_ranks"] += len(same)
                self.stats["same_request_rows"] += len(same)

    def _agrees(self, got: np.ndarray, reference: np.ndarray, what: str) -> None:
        """Bitwise where the schedule cannot matter (isolated); else within SCHEDULE_BOUND,
        with the bitwise-equal rows counted."""
        if self.setting.isolated:
            assert_bitwise_equal(got, reference, what=what)
            return
        got = np.ascontiguousarray(got, dtype=np.float32)
        reference = np.ascontiguousarray(reference, dtype=np.float32)
        assert got.shape == reference.shape, f"{what}: shape {got.shape} != {reference.shape}"
        finite = np.isfinite(reference)
        assert np.array_equal(finite, np.isfinite(got)) and np.array_equal(
            got[~finite], reference[~finite]), f"{what}: infinities differ"
        diff = np.abs(got[finite].astype(np.float64) - reference[finite])
        worst = float(diff.max(initial=0.0))
        assert worst <= SCHEDULE_BOUND, (
            f"{what}: differs from the cold reference by {worst:.3e} (bound {SCHEDULE_BOUND}: "
            "more than a schedule can make; a value computed for something else)")
        self.stats["max_schedule_diff"] = max(self.stats["max_schedule_diff"], worst)
        self.stats["bitwise_equal_values"] += int((diff == 0).sum())
        self.stats["differing_values"] += int((diff != 0).sum())

    def _check_fixed_ids(self, scores: np.ndarray, sub: Submitted, what: str) -> None:
        table = self.reference.logprobs(sub.prompt)[sub.start:]
        num_ids = sub.ids.shape[1]
        if sub.ranks:
            assert scores.shape[1] == num_ids * 2 + 2 * sub.top_k, f"{what}: {scores.shape}"
            ranks, scores = scores[:, -num_ids:], scores[:, :-num_ids]
            slack = 0.0 if self.setting.isolated else SCHEDULE_BOUND
            low, high = expected_ranks(table, scores[:, :num_ids], sub.ids, slack)
            if self.setting.isolated:
                assert_bitwise_equal(ranks, low, what=f"{what} ranks")
            else:
                padded = np.isnan(low)
                assert np.array_equal(padded, np.isnan(ranks)), f"{what}: padding ranks"
                assert np.all((low <= ranks) & (ranks <= high) | padded), f"{what}: ranks"
            self.stats["checked_ranks"] += int((~np.isnan(low)).sum())
        if sub.top_k:
            scores, values, top_ids = split_top_k(scores, num_ids, sub.top_k)
            if self.setting.isolated:
                ref_ids = np.argsort(-table, axis=1, kind="stable")[:, : sub.top_k]
                self._agrees(values, np.take_along_axis(table, ref_ids, 1),
                             what=f"{what} top-{sub.top_k} values")
            else:  # near-ties may order differently: the values are held, not the order
                assert np.all(np.diff(values, axis=1) <= 0), f"{what}: top-K not descending"
                kth = -np.sort(-table, axis=1)[:, sub.top_k - 1 : sub.top_k]
                assert np.all(values[:, -1:] >= kth - SCHEDULE_BOUND), f"{what}: not the top-K"
            self._agrees(np.take_along_axis(table, top_ids.astype(np.int64), 1), values,
                         what=f"{what} top-{sub.top_k} ids")
        expected = expected_scores(table, sub.ids)
        self._agrees(scores, expected, what=what)

    def _check_standard(self, prompt_logprobs: list, sub: Submitted, what: str,
                        finished: bool) -> None:
        """Every value upstream's standard path returned agrees with the reference (it may
        return fewer rows than the prompt has: counted, since no value is wrong then)."""
        table = self.reference.logprobs(sub.prompt)
        assert prompt_logprobs[0] is None and len(prompt_logprobs) <= len(sub.prompt)
        if finished and len(prompt_logprobs) < len(sub.prompt):
            self.stats["standard_incomplete"] += 1
        for row, entries in enumerate(prompt_logprobs[1:]):
            ids = np.fromiter(entries.keys(), dtype=np.int64, count=len(entries))
            got = np.fromiter((e.logprob for e in entries.values()), dtype=np.float32,
                              count=len(entries))
            self._agrees(got, table[row, ids], what=f"{what} standard row {row}")
        self.stats["checked_rows"] += len(sub.prompt) - 1

    @invariant()
    def engine_serves(self):
        """The engine core process is alive (vLLM marks its client when it dies)."""
        assert not self.engine.engine_core.resources.engine_dead, "the engine core died"

    def teardown(self):
        """Finish everything in flight; every answer is checked on the way."""
        for _ in range(10_000):
            if not self.engine.has_unfinished_requests():
                break
            for output in self.engine.step():
                self._receive(output)
        assert not self.engine.has_unfinished_requests(), "requests never finished"
        leftover = [r for r, s in self.live.items() if not s.aborted]
        assert not leftover, f"requests that never answered: {leftover}"


def _drain(engine: Any) -> None:
    """Abort every request still in flight and step until the engine is idle."""
    leftover = list(engine.output_processor.request_states)
    if leftover:
        engine.abort_request(leftover)
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            return
        engine.step()
    raise AssertionError("the engine did not become idle")


STATS_KEYS = ("targets", "two_dimensional", "standard", "both", "plain", "sample_logprobs",
              "refused", "aborted", "reused_id", "checked_rows", "checked_ranks",
              "same_request_rows", "same_request_ranks",
              "standard_incomplete", "bitwise_equal_values", "differing_values",
              "max_schedule_diff", "longest_prompt")


@pytest.mark.conditions  # CI runs the isolated setting again on forced AVX2, cores busy
def test_request_space(engine_under_test, reference, record_property):
    setting, llm = engine_under_test
    stats = dict.fromkeys(STATS_KEYS, 0)
    preempted_before = _preemptions(llm)
    machine = type("RequestSpaceRun", (RequestSpace,),
                   {"setting": setting, "llm": llm, "reference": reference, "stats": stats})
    run_state_machine_as_test(machine, settings=_run_settings())
    stats["preemptions"] = int(_preemptions(llm) - preempted_before)
    for key, value in stats.items():
        record_property(f"request_space_{setting.name}_{key}", value)
    record_property(f"request_space_{setting.name}", stats)
    assert stats["checked_rows"] > 0, "no score was ever checked: the test is not testing"
    assert stats["longest_prompt"] > 256, "no prompt past the attention's first tile"
    if setting.kv_cache_memory_bytes < (2 << 20):
        assert stats["preemptions"] > 0, "the small-cache setting never preempted"


FIXED_REQUESTS = 40


def fixed_requests(count: int = FIXED_REQUESTS) -> list[tuple[tuple[int, ...], int, np.ndarray,
                                                              int]]:
    """(prompt, start, ids [rows, n] with -1 padding, top-K) drawn from a fixed seed: the
    same requests in every run, whatever the engine's timing (the state machine's sequences
    diverge with it), so two builds always answer these same requests."""
    rng = np.random.default_rng(2026)
    requests = []
    for _ in range(count):
        root = _ROOTS[int(rng.integers(3))]
        prompt = tuple(root[: int(rng.integers(2, MAX_PROMPT + 1))])
        start = int(rng.integers(0, len(prompt) - 1))
        rows, width = len(prompt) - 1 - start, int(rng.choice([1, 1, 3]))
        ids = rng.integers(0, VOCAB, (rows, width))
        if width > 1:
            ids[rng.random((rows, width)) < 0.2] = -1
            ids[:, 0] = np.abs(ids[:, 0])
        requests.append((prompt, start, ids, int(rng.choice([0, 0, 4]))))
    return requests


def test_fixed_requests_answer_the_reference_and_are_recorded(engine_under_test, reference):
    """The same fixed requests in every run, one at a time: bitwise the reference's values
    on an isolated setting (recorded for `fastpath upstream compare-answers`, so the
    plugin and the series always share these requests); elsewhere within SCHEDULE_BOUND."""
    setting, llm = engine_under_test
    if not setting.isolated:
        pytest.skip("the fixed requests are compared across builds on the isolated setting")
    _drain(llm.llm_engine)  # what a failed state-machine run left in flight
    top_k_allowed = not llm.llm_engine.vllm_config.use_v2_model_runner  # V2 refuses top-K
    for index, (prompt, start, ids, top_k) in enumerate(fixed_requests()):
        top_k = top_k if top_k_allowed else 0
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprob_token_ids=ids,
                                prompt_logprob_start=start,
                                extra_args={TOP_K_KEY: top_k} if top_k else None)
        (output,) = llm.generate([{"prompt_token_ids": list(prompt)}], params, use_tqdm=False)
        scores = output.prompt_token_id_logprobs
        assert scores is not None, f"fixed request {index}: no scores"
        table = reference.logprobs(prompt)[start:]
        expected = expected_scores(table, ids)
        assert_bitwise_equal(scores[:, : ids.shape[1]], expected,
                             what=f"fixed request {index} (len {len(prompt)}, start {start})")
        if top_k:
            top = np.sort(table, axis=1)[:, ::-1][:, :top_k]
            assert_bitwise_equal(scores[:, ids.shape[1] : ids.shape[1] + top_k], top,
                                 what=f"fixed request {index} top-{top_k}")
        upstream.record_answer(f"fixed-{setting.name}", prompt, start, ids, top_k, scores)


def _run_settings() -> settings:
    """Sequences per engine setting: a few short ones by default, many long ones nightly."""
    if os.environ.get("HYPOTHESIS_PROFILE") == "nightly":
        return settings(settings(), max_examples=60, stateful_step_count=80)
    return settings(settings(), max_examples=int(os.environ.get("FASTPATH_STATEFUL_RUNS", 6)),
                    stateful_step_count=25)


def _preemptions(llm: Any) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
