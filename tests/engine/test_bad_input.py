"""Bad target_token_ids are refused at submission, by name, and the engine keeps serving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from fastpath.engine.scoring import ScoreRequest, fast_prompt, score
from tests.helpers import assert_bitwise_equal, vocab_size

pytestmark = [pytest.mark.engine]

PROMPT = list(range(10, 30))  # 20 tokens: 19 scored positions
GOOD = ScoreRequest(PROMPT, PROMPT[1:])


def _bad_cases(vocab: int) -> list[tuple[str, dict, str]]:
    """(case, prompt, expected message fragment)."""
    targets = PROMPT[1:]
    return [
        ("too short", {"prompt_token_ids": PROMPT, "target_token_ids": targets[:-1]},
         "has 18 entries but the prompt has 19 scored positions"),
        ("too long", {"prompt_token_ids": PROMPT, "target_token_ids": PROMPT},
         "has 20 entries"),
        ("negative id", {"prompt_token_ids": PROMPT, "target_token_ids": [-1] + targets[1:]},
         "outside the vocabulary"),
        ("id = vocab", {"prompt_token_ids": PROMPT, "target_token_ids": targets[:-1] + [vocab]},
         "outside the vocabulary"),
        ("float", {"prompt_token_ids": PROMPT, "target_token_ids": [float(t) for t in targets]},
         "expected a flat list"),
        ("nan", {"prompt_token_ids": PROMPT, "target_token_ids": [float("nan")] + targets[1:]},
         "nan"),
        ("float array", {"prompt_token_ids": PROMPT,
                         "target_token_ids": np.asarray(targets, dtype=np.float32)}, "dtype"),
        ("nested", {"prompt_token_ids": PROMPT, "target_token_ids": [[t] for t in targets]},
         "expected a flat list"),
        ("2-D array", {"prompt_token_ids": PROMPT,
                       "target_token_ids": np.asarray(targets)[:, None]}, "shape"),
        ("bool", {"prompt_token_ids": PROMPT, "target_token_ids": [True] * 19}, "bool"),
        ("string", {"prompt_token_ids": PROMPT, "target_token_ids": "abc"}, "got str"),
        ("text prompt", {"prompt": "some text", "target_token_ids": targets},
         "needs a TokensPrompt"),
        ("embeds", {"prompt_embeds": torch.zeros(20, 128), "target_token_ids": targets},
         "cannot be combined with prompt_embeds"),
        ("one token", {"prompt_token_ids": [5], "target_token_ids": []}, "at least 2 tokens"),
        ("zero tokens", {"prompt_token_ids": [], "target_token_ids": []}, ""),
        ("start without targets", {"prompt_token_ids": PROMPT, "target_start": 3},
         "target_start was given without target_token_ids"),
        ("start out of range", {"prompt_token_ids": PROMPT, "target_token_ids": [],
                                "target_start": 19}, "target_start=19 is outside"),
        ("start not int", {"prompt_token_ids": PROMPT, "target_token_ids": targets,
                           "target_start": 1.5}, "target_start must be a non-negative int"),
    ]


@pytest.fixture(scope="module")
def reference(llama_llm):
    (values,) = score(llama_llm, [GOOD], "fast")
    return values


@pytest.mark.parametrize("case", [c[0] for c in _bad_cases(2048)])
def test_refused_with_clear_error_and_engine_keeps_serving(llama_llm, reference, case):
    _, prompt, fragment = next(c for c in _bad_cases(vocab_size(llama_llm)) if c[0] == case)
    params = SamplingParams(max_tokens=1)
    with pytest.raises((ValueError, VLLMValidationError)) as error:
        llama_llm.generate([fast_prompt(GOOD), prompt], params, use_tqdm=False)
    message = str(error.value)
    if case != "zero tokens":  # vLLM refuses an empty prompt itself, before fastpath
        assert "target_token_ids" in message or "target_start" in message, message
    assert fragment.lower() in message.lower(), message
    assert llama_llm.llm_engine.get_num_unfinished_requests() == 0
    (after,) = score(llama_llm, [GOOD], "fast")
    assert_bitwise_equal(after, reference, what=f"good request after {case!r}")


def test_both_apis_at_once_is_refused(llama_llm):
    params = SamplingParams(max_tokens=1, prompt_logprob_token_ids=[[t] for t in PROMPT[1:]])
    with pytest.raises(VLLMValidationError, match="give one of them"):
        llama_llm.generate([fast_prompt(GOOD)], params, use_tqdm=False)
