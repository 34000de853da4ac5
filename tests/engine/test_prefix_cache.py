"""Fixed-id scores on a warm prefix cache are the cold engine's bits, whatever the caller says.

The case that once returned an unwritten host buffer: `skip_reading_prefix_cache=False`
with `prompt_logprob_token_ids` after the same prompt warmed the cache. The engine core
now recomputes every scoring request's prompt; these tests hold it to the cold bits through
`LLM`, through `target_token_ids`, and through an `EngineCoreRequest` built by hand (no
front-end check in the way), and the failure guard behind it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from vllm import SamplingParams

from fastpath import zoo
from fastpath.engine import scoring
from fastpath.engine.scoring import ScoreRequest, fast_prompt, target_logprobs
from tests.helpers import assert_bitwise_equal, engine_kwargs, runner_engine

pytestmark = [pytest.mark.correctness, pytest.mark.engine]

ROOT = Path(__file__).resolve().parents[2]
IDS = list(range(5, 205))  # the issue's prompt: 200 tokens, many full 32-token blocks


@pytest.fixture(scope="module")
def cached_llm(runner):
    """Prefix caching on (block size 32: the CPU backend's smallest common size)."""
    with runner_engine(str(zoo.get_model("tiny-llama")), runner,
                       **engine_kwargs(block_size=32, enable_prefix_caching=True)) as llm:
        yield llm


def _fixed_ids(ids, **extra):
    return SamplingParams(max_tokens=1, prompt_logprob_token_ids=[[t] for t in ids[1:]],
                          **extra)


def _warm(llm, ids) -> None:
    llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1), use_tqdm=False)


def _cached_tokens(output) -> int:
    return output.num_cached_tokens or 0


def test_issue_example_warm_equals_cold(cached_llm):
    (cold,) = cached_llm.generate([{"prompt_token_ids": IDS}], _fixed_ids(IDS), use_tqdm=False)
    _warm(cached_llm, IDS)
    (warm,) = cached_llm.generate([{"prompt_token_ids": IDS}],
                                  _fixed_ids(IDS, skip_reading_prefix_cache=False),
                                  use_tqdm=False)
    assert _cached_tokens(warm) == 0, "a scoring request read the prefix cache"
    assert_bitwise_equal(warm.prompt_token_id_logprobs, cold.prompt_token_id_logprobs,
                         what="warm cache, skip_reading_prefix_cache=False")


def test_target_token_ids_with_caller_false(cached_llm):
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 2048, 150).tolist()
    request = ScoreRequest(ids, ids[41:], start=40)
    (cold,) = scoring.score(cached_llm, [request], "fast")
    _warm(cached_llm, ids)
    (warm,) = cached_llm.generate([fast_prompt(request)],
                                  SamplingParams(max_tokens=1, skip_reading_prefix_cache=False),
                                  use_tqdm=False)
    assert _cached_tokens(warm) == 0
    assert_bitwise_equal(target_logprobs(warm), cold, what="target_token_ids, warm cache")


def test_plain_requests_still_use_the_cache(cached_llm):
    """The fix is narrow: a request without fixed-id scores keeps its cache hits."""
    ids = list(range(300, 460))
    _warm(cached_llm, ids)
    (again,) = cached_llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1),
                                   use_tqdm=False)
    assert _cached_tokens(again) >= 128


def test_hand_built_engine_core_request_is_recomputed(cached_llm):
    """No front-end check in the way: the engine core itself refuses to read the cache."""
    engine = cached_llm.llm_engine
    ids = list(range(600, 760))
    (cold,) = cached_llm.generate([{"prompt_token_ids": ids}], _fixed_ids(ids), use_tqdm=False)
    _warm(cached_llm, ids)
    request = engine.input_processor.process_inputs(
        "hand-built", {"prompt_token_ids": ids}, _fixed_ids(ids),
        supported_tasks=engine.get_supported_tasks())
    request.sampling_params.skip_reading_prefix_cache = False
    engine.add_request(request.request_id, request, request.sampling_params)
    finished = []
    while engine.has_unfinished_requests():
        finished.extend(o for o in engine.step() if o.finished)
    (warm,) = finished
    assert_bitwise_equal(warm.prompt_token_id_logprobs, cold.prompt_token_id_logprobs,
                         what="hand-built EngineCoreRequest, warm cache")


@pytest.mark.v1_only(reason="the guard is fastpath's V1 scorer (plugin or upstream series); on "
                     "V2 the engine-core fix above is what keeps cached rows out (its tests "
                     "run on V2)")
def test_guard_fails_a_request_whose_rows_were_not_computed():
    """With the engine-core fix lifted, the runner's guard fails the request alone.

    The engine core runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so upstream's
    add_request can be put back: the cache is then read and rows go uncomputed. It runs in a
    fresh interpreter: this test process carries the stand-in Triton backend of the V2 tests
    (fastpath/engine/runners.py), which an in-process V1 engine would try to compile with.
    """
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    done = subprocess.run([sys.executable, "-c", "from tests.engine.test_prefix_cache import "
                           "guard_scenario; guard_scenario(); print('GUARD-SCENARIO-OK')"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "GUARD-SCENARIO-OK" in done.stdout, done.stderr[-4000:]


def guard_scenario() -> None:
    """The guard test's body; asserts, so a failure exits the interpreter non-zero."""
    from vllm.v1.core.sched.scheduler import Scheduler

    ids = list(range(900, 1100))
    with runner_engine(str(zoo.get_model("tiny-llama")), "v1",
                       **engine_kwargs(block_size=32, enable_prefix_caching=True)) as llm:
        # Read only now: vLLM loads the plugin (which patches add_request) with the engine.
        fixed_add_request = Scheduler.add_request  # the plugin's, or the upstream series'

        def add_request_without_the_fix(self, request):
            """The fix forces recomputation in add_request; undo it before scheduling."""
            fixed_add_request(self, request)
            request.skip_reading_prefix_cache = False

        (cold,) = llm.generate([{"prompt_token_ids": ids}], _fixed_ids(ids), use_tqdm=False)
        _warm(llm, ids)
        Scheduler.add_request = add_request_without_the_fix
        try:
            (failed,) = llm.generate([{"prompt_token_ids": ids}],
                                     _fixed_ids(ids, skip_reading_prefix_cache=False),
                                     use_tqdm=False)
        finally:
            Scheduler.add_request = fixed_add_request
        assert failed.prompt_token_id_logprobs is None
        assert failed.outputs[0].finish_reason == "error"
        with pytest.raises(scoring.ScoringFailed, match="finished with an error"):
            target_logprobs(failed)
        (again,) = llm.generate([{"prompt_token_ids": ids}],
                                _fixed_ids(ids, skip_reading_prefix_cache=False), use_tqdm=False)
        assert_bitwise_equal(again.prompt_token_id_logprobs, cold.prompt_token_id_logprobs,
                             what="the next request after a failed one")
