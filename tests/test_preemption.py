"""Fast-path scores survive preemption and recomputation when the KV cache runs out."""

from __future__ import annotations

import numpy as np
import pytest
from vllm import SamplingParams

from fastpath import zoo
from fastpath.scoring import ScoreRequest, fast_prompt, score, target_logprobs
from tests.conftest import assert_bitwise_equal, engine_kwargs, random_prompt, runner_engine

pytestmark = [pytest.mark.correctness, pytest.mark.engine]

# tiny-llama holds 2 KiB of fp32 KV per token: this cache is 5 blocks of 128 tokens. Eight
# 100-token prompts fit one block each and are admitted together; when their decodes
# need a second block each, the scheduler must preempt and later recompute.
SMALL_KV_BYTES = 1400 << 10


def _preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_scores_exact_under_preemption(runner):
    with runner_engine(
        str(zoo.get_model("tiny-llama")), runner,
        **engine_kwargs(kv_cache_memory_bytes=SMALL_KV_BYTES, enable_prefix_caching=False,
                        disable_log_stats=False, max_model_len=480),
    ) as llm:
        rng = np.random.default_rng(9)
        prompts = [random_prompt(rng, 100, 2048) for _ in range(8)]
        decode = SamplingParams(max_tokens=300, min_tokens=300, temperature=0.0)
        before = _preemptions(llm)
        outputs = llm.generate([fast_prompt(ScoreRequest(p, p[1:])) for p in prompts], decode,
                               use_tqdm=False)
        assert _preemptions(llm) > before, "the batch was never preempted: test is not testing"
        for prompt, output in zip(prompts, outputs, strict=True):
            (alone,) = score(llm, [ScoreRequest(prompt, prompt[1:])], "standard", k=0)
            assert_bitwise_equal(target_logprobs(output), alone, what="after preemption")
            assert len(output.outputs[0].token_ids) == 300
