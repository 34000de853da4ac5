"""The fast path returns, bit for bit, what the standard prompt-logprobs path returns.

Every engine here prefills in chunks of 64 tokens (prompts cross chunk boundaries) with
prefix caching on, on four architectures. The promise is for the same schedule: each
comparison submits a fast batch and a standard batch of the same prompt lengths in the same
order, together (`scoring.submit_together`), so the scheduler lays both out alike whatever
the machine's load; nothing here compares rows computed in different steps.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from fastpath import zoo
from fastpath.engine.scoring import (
    ScoreRequest,
    fast_prompt,
    score,
    split_top_k,
    standard_logprobs,
    submit_together,
    target_logprobs,
)
from tests.helpers import (
    CHUNK,
    assert_bitwise_equal,
    engine_kwargs,
    random_prompt,
    runner_engine,
    vocab_size,
)

pytestmark = [pytest.mark.correctness, pytest.mark.engine]

# Lengths around the chunk size, the smallest prompts, and multi-chunk prompts.
LENGTHS = (2, 3, 17, CHUNK - 1, CHUNK, CHUNK + 1, CHUNK + 2, 200, 300)


def perplexity_requests(llm, seed: int = 0) -> list[ScoreRequest]:
    rng = np.random.default_rng(seed)
    prompts = [random_prompt(rng, n, vocab_size(llm)) for n in LENGTHS]
    return [ScoreRequest(p, p[1:]) for p in prompts]


@pytest.mark.parametrize("k", [0, 1, 20])
def test_fast_equals_standard_bitwise(arch_llm, k):
    requests = perplexity_requests(arch_llm)
    fast = score(arch_llm, requests, "fast")
    standard = score(arch_llm, requests, "standard", k=k)
    for request, f, s in zip(requests, fast, standard, strict=True):
        assert_bitwise_equal(
            f, s, what=f"{arch_llm.fastpath_name} k={k} len={len(request.prompt_token_ids)}"
        )


def test_arbitrary_targets_equal_full_vocabulary(arch_llm):
    """Any in-vocabulary id, the extremes included, against prompt_logprobs=-1."""
    rng = np.random.default_rng(1)
    vocab = vocab_size(arch_llm)
    requests = []
    for n in (2, 3, 5, 9):
        prompt = random_prompt(rng, n, vocab)
        targets = rng.integers(0, vocab, n - 1)
        targets[0] = 0
        targets[-1] = vocab - 1
        requests.append(ScoreRequest(prompt, targets.tolist()))
    fast = score(arch_llm, requests, "fast")
    standard = score(arch_llm, requests, "standard", k=-1)
    for request, f, s in zip(requests, fast, standard, strict=True):
        assert_bitwise_equal(f, s, what=f"{arch_llm.fastpath_name} k=-1 {request}")


def test_partial_rows_equal_standard(arch_llm):
    """target_start computes only the last rows, and they still match bit for bit (each
    against the standard path's rows of the same request in the same batch layout)."""
    rng = np.random.default_rng(2)
    prompt = random_prompt(rng, 200, vocab_size(arch_llm))
    starts = (1, CHUNK - 2, CHUNK - 1, CHUNK, CHUNK + 1, 150, 197, 198)
    requests = [ScoreRequest(prompt, prompt[s + 1 :], start=s) for s in starts]
    full = score(arch_llm, [ScoreRequest(prompt, prompt[1:])] * len(starts), "standard", k=0)
    for request, got, reference in zip(requests, score(arch_llm, requests, "fast"), full,
                                       strict=True):
        assert_bitwise_equal(
            got, reference[request.start :],
            what=f"{arch_llm.fastpath_name} start={request.start}")


def test_mixed_batch(arch_llm):
    """Fast, standard, plain and sample-logprob requests in one batch do not disturb each
    other: the same batch with the fast requests turned into standard ones (the same steps)
    gives the others the same tokens and logprobs, and the fast rows the standard bits."""
    rng = np.random.default_rng(3)
    vocab = vocab_size(arch_llm)
    prompts = [random_prompt(rng, n, vocab) for n in (150, 90, 40, 120, 70)]
    greedy = dict(temperature=0.0, max_tokens=4)
    both = ScoreRequest(prompts[3], prompts[3][31:], start=30)
    batch = [
        (fast_prompt(ScoreRequest(prompts[0], prompts[0][1:])), SamplingParams(**greedy)),
        ({"prompt_token_ids": prompts[1]}, SamplingParams(prompt_logprobs=1, **greedy)),
        ({"prompt_token_ids": prompts[2]}, SamplingParams(**greedy)),
        (fast_prompt(both), SamplingParams(logprobs=3, prompt_logprobs=0, **greedy)),
        ({"prompt_token_ids": prompts[4]}, SamplingParams(logprobs=2, **greedy)),
    ]
    mirror = [({"prompt_token_ids": prompts[0]}, SamplingParams(prompt_logprobs=0, **greedy)),
              *batch[1:3],
              ({"prompt_token_ids": prompts[3]}, SamplingParams(logprobs=3, prompt_logprobs=0,
                                                                **greedy)),
              batch[4]]
    outputs = submit_together(arch_llm, [p for p, _ in batch], [s for _, s in batch])
    standard = submit_together(arch_llm, [p for p, _ in mirror], [s for _, s in mirror])

    for i, (mixed, other) in enumerate(zip(outputs, standard, strict=True)):
        assert mixed.outputs[0].token_ids == other.outputs[0].token_ids, f"request {i}"
    assert_bitwise_equal(sample_logprobs(outputs[4]), sample_logprobs(standard[4]),
                         what="sample logprobs beside fast requests")
    assert_bitwise_equal(standard_logprobs(outputs[1], ScoreRequest(prompts[1], prompts[1][1:])),
                         standard_logprobs(standard[1], ScoreRequest(prompts[1], prompts[1][1:])),
                         what="prompt logprobs beside fast requests")
    assert_bitwise_equal(target_logprobs(outputs[0]),
                         standard_logprobs(standard[0], ScoreRequest(prompts[0], prompts[0][1:])),
                         what="fast in mixed batch")
    assert outputs[0].prompt_logprobs is None
    assert outputs[1].prompt_token_id_logprobs is None
    assert outputs[2].prompt_token_id_logprobs is None and outputs[2].prompt_logprobs is None
    # The request that asked for both gets both, and they agree.
    assert_bitwise_equal(target_logprobs(outputs[3]),
                         standard_logprobs(outputs[3], both), what="fast beside standard")
    assert outputs[3].outputs[0].logprobs is not None
    assert len(outputs[3].outputs[0].logprobs) == 4


def sample_logprobs(output) -> np.ndarray:
    """The sampled tokens' logprobs of a request (float32, one per generated token)."""
    completion = output.outputs[0]
    return np.array([step[token].logprob for step, token in
                     zip(completion.logprobs, completion.token_ids, strict=True)],
                    dtype=np.float32)


def test_upstream_api_two_dimensional_with_padding(llama_llm):
    """Upstream's prompt_logprob_token_ids works on V1: [rows, ids], -1 pads to -inf."""
    rng = np.random.default_rng(4)
    vocab = vocab_size(llama_llm)
    prompt = random_prompt(rng, 9, vocab)
    ids = [[int(t), int(u), -1] for t, u in zip(prompt[1:], rng.integers(0, vocab, 8))]
    ids[2][2] = 7
    params = SamplingParams(max_tokens=1, prompt_logprob_token_ids=ids, prompt_logprobs=-1)
    (out,) = llama_llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    scores = out.prompt_token_id_logprobs
    assert scores.dtype == np.float32 and scores.shape == (8, 3)
    expected = np.full((8, 3), -np.inf, dtype=np.float32)
    for row, row_ids in enumerate(ids):
        for col, token in enumerate(row_ids):
            if token >= 0:
                expected[row, col] = out.prompt_logprobs[row + 1][token].logprob
    assert_bitwise_equal(scores, expected, what="prompt_logprob_token_ids")


def test_upstream_api_with_start(llama_llm):
    rng = np.random.default_rng(5)
    prompt = random_prompt(rng, 100, vocab_size(llama_llm))
    params = SamplingParams(max_tokens=1, prompt_logprob_token_ids=[[t] for t in prompt[41:]],
                            prompt_logprob_start=40)
    (out,) = llama_llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    (reference,) = score(llama_llm, [ScoreRequest(prompt, prompt[1:])], "standard")
    assert_bitwise_equal(out.prompt_token_id_logprobs[:, 0], reference[40:],
                         what="prompt_logprob_start=40")


def test_shared_params_object_is_not_mutated(llama_llm):
    """One SamplingParams for many prompts: each request gets its own targets."""
    rng = np.random.default_rng(6)
    prompts = [random_prompt(rng, n, vocab_size(llama_llm)) for n in (30, 80)]
    params = SamplingParams(max_tokens=1)
    outputs = llama_llm.generate(
        [fast_prompt(ScoreRequest(p, p[1:])) for p in prompts], params, use_tqdm=False
    )
    assert params.prompt_logprob_token_ids is None
    assert [len(target_logprobs(o)) for o in outputs] == [29, 79]


@given(data=st.data())
def test_property_fast_equals_full_vocabulary(llama_llm, data):
    """Random lengths, starts and targets (extremes included) against prompt_logprobs=-1."""
    vocab = vocab_size(llama_llm)
    length = data.draw(st.integers(2, 2 * CHUNK + 3), label="length")
    prompt = data.draw(st.lists(st.integers(0, vocab - 1), min_size=length, max_size=length))
    start = data.draw(st.integers(0, length - 2), label="start")
    token = st.one_of(st.sampled_from([0, vocab - 1]), st.integers(0, vocab - 1))
    targets = data.draw(st.lists(token, min_size=length - 1 - start,
                                 max_size=length - 1 - start), label="targets")
    request = ScoreRequest(prompt, targets, start=start)
    (fast,) = score(llama_llm, [request], "fast")
    (standard,) = score(llama_llm, [request], "standard", k=-1)
    assert_bitwise_equal(fast, standard, what=f"len={length} start={start}")


def test_negative_control_check_fails_when_exactness_breaks(llama_llm):
    """The bitwise check catches a one-position misalignment and a one-ulp change."""
    rng = np.random.default_rng(10)
    prompt = random_prompt(rng, 120, vocab_size(llama_llm))
    (standard,) = score(llama_llm, [ScoreRequest(prompt, prompt[1:])], "standard")
    (shifted,) = score(llama_llm, [ScoreRequest(prompt, prompt[2:] + prompt[:1])], "fast")
    with pytest.raises(AssertionError, match="values differ in bits"):
        assert_bitwise_equal(shifted, standard, what="misaligned targets")
    one_ulp = standard.copy()
    one_ulp[57] = np.nextafter(one_ulp[57], np.float32(0))
    assert np.allclose(one_ulp, standard)  # what an isclose test would have accepted
    with pytest.raises(AssertionError, match="1/119 values differ"):
        assert_bitwise_equal(one_ulp, standard, what="one ulp")


@pytest.mark.parametrize("top_k", [1, 5])
def test_top_k_columns_equal_standard_top_k(llama_llm, top_k):
    """fastpath_top_k gives the standard path's top-K ids and log-probs, bit for bit (V1);
    V2, which has no top-K extension, refuses it at submission, naming it."""
    rng = np.random.default_rng(12)
    prompt = random_prompt(rng, 150, vocab_size(llama_llm))
    request = ScoreRequest(prompt, prompt[21:], start=20)
    params = SamplingParams(max_tokens=1, prompt_logprobs=top_k,
                            extra_args={"fastpath_top_k": top_k})
    if llama_llm.llm_engine.vllm_config.use_v2_model_runner:
        with pytest.raises(VLLMValidationError, match="fastpath_top_k needs the V1 model runner"):
            llama_llm.generate([fast_prompt(request)], params, use_tqdm=False)
        return
    (out,) = llama_llm.generate([fast_prompt(request)], params, use_tqdm=False)
    scores, values, ids = split_top_k(out.prompt_token_id_logprobs, 1, top_k)
    assert_bitwise_equal(scores[:, 0], standard_logprobs(out, request), what="targets")
    for row, position in enumerate(range(21, 150)):
        ranked = sorted((e.rank, token, e.logprob)
                        for token, e in out.prompt_logprobs[position].items()
                        if e.rank <= top_k)
        assert [t for _, t, _ in ranked] == ids[row].tolist(), f"row {row}"
        assert_bitwise_equal(values[row], np.array([v for *_, v in ranked], dtype=np.float32),
                             what=f"top-{top_k} row {row}")
    greedy = scores[:, 0] == values[:, 0]
    ranks = [out.prompt_logprobs[p][t].rank for p, t in zip(range(21, 150), prompt[21:])]
    assert greedy.tolist() == [r == 1 for r in ranks]


# Rows of one request in one step: more than the runner's row chunk (64 on CPU), so the fast
# path scores them in several lm_head calls where the standard path makes one; 64k + 1 rows
# leave a lone last row, computed beside its predecessor.
BIG_STEP = 512
ROW_CHUNK_LENGTHS = (66, 130, 64 * 5 + 2, BIG_STEP - 1)


@pytest.mark.conditions
def test_row_chunks_inside_one_step_equal_standard(runner):
    """Whole prompts (and a late start) prefilled in one step of up to 511 rows: bitwise."""
    with runner_engine(str(zoo.get_model("tiny-llama")), runner,
                       **engine_kwargs(max_num_batched_tokens=BIG_STEP)) as llm:
        rng = np.random.default_rng(21)
        prompts = [random_prompt(rng, n, vocab_size(llm)) for n in ROW_CHUNK_LENGTHS]
        requests = [ScoreRequest(p, p[1:]) for p in prompts]
        long = prompts[-1]
        late = [ScoreRequest(long, long[s + 1:], start=s) for s in (63, 64, 300)]
        standard = score(llm, requests, "standard", k=0)
        for request, fast, full in zip(requests, score(llm, requests, "fast"), standard,
                                       strict=True):
            assert_bitwise_equal(fast, full, what=f"len={len(request.prompt_token_ids)}")
        # The same prompt three times: the second and third are split across steps in this
        # batch, so their reference is the standard path's answer in the same layout.
        late_standard = score(llm, [ScoreRequest(long, long[1:])] * len(late), "standard")
        for request, fast, full in zip(late, score(llm, late, "fast"), late_standard,
                                       strict=True):
            assert_bitwise_equal(fast, full[request.start:], what=f"start={request.start}")
