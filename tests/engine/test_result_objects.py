"""The fast result is one array: the objects it holds do not grow with the prompt length."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from fastpath.engine.scoring import ScoreRequest, generate
from fastpath.testing.measure import result_objects
from tests.helpers import random_prompt, vocab_size

pytestmark = [pytest.mark.engine]

LENGTHS = (8, 64, 256, 500)


def _outputs(llm, path: str):
    rng = np.random.default_rng(8)
    prompts = [random_prompt(rng, n, vocab_size(llm)) for n in LENGTHS]
    return generate(llm, [ScoreRequest(p, p[1:]) for p in prompts], path, k=0)


def test_fast_result_objects_constant_in_prompt_length(llama_llm):
    counts = [result_objects(o) for o in _outputs(llama_llm, "fast")]
    assert len(set(counts)) == 1, dict(zip(LENGTHS, counts))
    assert counts[0] <= 3, counts  # the array (and at most its base and buffer owner)
    for output, length in zip(_outputs(llama_llm, "fast"), LENGTHS):
        assert output.prompt_token_id_logprobs.nbytes == 4 * (length - 1)


def test_standard_result_objects_grow_with_prompt_length(llama_llm):
    """Control: the counter does see the dict path's per-position objects."""
    counts = [result_objects(o) for o in _outputs(llama_llm, "standard")]
    assert all(b > a for a, b in pairwise(counts)), dict(zip(LENGTHS, counts))
    assert counts[-1] >= 3 * (LENGTHS[-1] - 1), counts  # dict, Logprob, float per position
