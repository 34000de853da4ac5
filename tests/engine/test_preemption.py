"""Fast-path scores survive preemption and recomputation when the KV cache runs out."""

from __future__ import annotations

import numpy as np
import pytest
from vllm import SamplingParams

from fastpath import zoo
from fastpath.engine.scoring import (
    ScoreRequest,
    fast_prompt,
    standard_logprobs,
    submit_together,
    target_logprobs,
)
from tests.helpers import assert_bitwise_equal, engine_kwargs, random_prompt, runner_engine

pytestmark = [pytest.mark.correctness, pytest.mark.engine]

# tiny-llama holds 2 KiB of fp32 KV per token: this cache is 5 blocks of 128 tokens. Eight
# 100-token prompts fit one block each and are admitted together; when their decodes
# need a second block each, the scheduler must preempt and later recompute.
SMALL_KV_BYTES = 1400 << 10


def _preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_scores_exact_under_preemption(runner):
    """A batch preempted and recomputed: each request's fast scores are the standard path's
    in the same batch layout (the same prompts and decodes submitted together, so the same
    steps and the same preemptions)."""
    with runner_engine(
        str(zoo.get_model("tiny-llama")), runner,
        **engine_kwargs(kv_cache_memory_bytes=SMALL_KV_BYTES, enable_prefix_caching=False,
                        disable_log_stats=False, max_model_len=480),
    ) as llm:
        rng = np.random.default_rng(9)
        prompts = [random_prompt(rng, 100, 2048) for _ in range(8)]
        decode = dict(max_tokens=300, min_tokens=300, temperature=0.0)
        before = _preemptions(llm)
        outputs = submit_together(llm, [fast_prompt(ScoreRequest(p, p[1:])) for p in prompts],
                                  SamplingParams(**decode))
        fast_preempted = _preemptions(llm) - before
        assert fast_preempted > 0, "the batch was never preempted: test is not testing"
        standard = submit_together(llm, [{"prompt_token_ids": p} for p in prompts],
                                   SamplingParams(prompt_logprobs=0, **decode))
        assert _preemptions(llm) - before == 2 * fast_preempted, "not the same schedule"
        for prompt, output, reference in zip(prompts, outputs, standard, strict=True):
            assert_bitwise_equal(target_logprobs(output),
                                 standard_logprobs(reference, ScoreRequest(prompt, prompt[1:])),
                                 what="after preemption")
            assert len(output.outputs[0].token_ids) == 300
