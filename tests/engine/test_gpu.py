"""On a CUDA device, in the dtypes people run there: still bit for bit the standard path.

Marked `gpu`: skipped with the reason on machines without CUDA (conftest.py). On GPU
runners `benchmarks/gpu.sh` runs these under both model runners (V1: fastpath's patch;
V2: upstream's implementation, which `target_token_ids` maps onto).
"""

from __future__ import annotations

import numpy as np
import pytest

from fastpath import zoo
from fastpath.engine.scoring import ScoreRequest, score
from tests.helpers import assert_bitwise_equal, engine_kwargs, random_prompt, runner_engine

pytestmark = [pytest.mark.gpu, pytest.mark.correctness, pytest.mark.engine]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fast_equals_standard_in_half_precision(dtype, runner):
    with runner_engine(str(zoo.get_model("llama3-8b-twin")), runner,
                       **engine_kwargs(dtype=dtype, max_model_len=4096,
                                       max_num_batched_tokens=1024,
                                       gpu_memory_utilization=0.3,
                                       kv_cache_memory_bytes=None)) as llm:
        rng = np.random.default_rng(11)
        prompts = [random_prompt(rng, n, 128256) for n in (2, 100, 1500, 2048)]
        requests = [ScoreRequest(p, p[1:]) for p in prompts]
        requests += [ScoreRequest(prompts[-1], prompts[-1][1537:], start=1536)]
        fast = score(llm, requests, "fast")
        for k in (0, 20):
            for request, f, s in zip(requests, fast, score(llm, requests, "standard", k=k),
                                     strict=True):
                assert_bitwise_equal(f, s, what=f"{dtype} k={k} start={request.start}")
