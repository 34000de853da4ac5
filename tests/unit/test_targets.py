"""The target_token_ids form, checked without an engine (fastpath.worker.targets)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpath.worker.targets import TargetTokenIdsError, check_prompt_kind, normalize_targets

VOCAB = 100


@settings(deadline=None)  # timing is not what these properties test
@given(length=st.integers(2, 300), data=st.data())
def test_valid_targets_round_trip(length, data):
    start = data.draw(st.integers(0, length - 2))
    targets = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=length - 1 - start,
                                 max_size=length - 1 - start))
    ids, first = normalize_targets(targets, start, length, VOCAB)
    assert first == start
    assert ids.dtype == np.int32 and ids.shape == (length - 1 - start, 1)
    assert ids[:, 0].tolist() == targets


@settings(deadline=None)  # timing is not what these properties test
@given(length=st.integers(2, 300), wrong=st.integers(-3, 3).filter(bool))
def test_every_wrong_length_is_refused(length, wrong):
    count = max(length - 1 + wrong, 0)
    if count == length - 1:
        return
    with pytest.raises(TargetTokenIdsError, match="scored positions"):
        normalize_targets([1] * count, 0, length, VOCAB)


@pytest.mark.parametrize(
    "targets, fragment",
    [
        ([1, 2, 3.0], r"target_token_ids\[2\] is 3.0"),
        ([1, float("nan"), 3], "nan"),
        ([1, True, 3], "bool"),
        ([[1], [2], [3]], "expected a flat list"),
        (np.zeros((3, 1), dtype=np.int64), "shape"),
        (np.zeros(3, dtype=np.float64), "dtype"),
        ("abc", "got str"),
        (None, "got NoneType"),
        ([1, 2, VOCAB], r"target_token_ids\[2\] = 100 is outside"),
        ([1, -1, 2], r"target_token_ids\[1\] = -1 is outside"),
        (np.array([1, 2, 2**40]), "outside"),
    ],
)
def test_bad_targets_name_the_parameter(targets, fragment):
    with pytest.raises(TargetTokenIdsError, match=fragment) as error:
        normalize_targets(targets, 0, 4, VOCAB)
    assert "target_token_ids" in str(error.value)


def test_numpy_integer_arrays_and_scalars_are_accepted():
    ids, _ = normalize_targets(np.array([1, 2, 3], dtype=np.uint16), None, 4, VOCAB)
    assert ids[:, 0].tolist() == [1, 2, 3]
    ids, _ = normalize_targets([np.int64(1), 2, np.int32(3)], 0, 4, VOCAB)
    assert ids[:, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("prompt_len", [0, 1])
def test_prompts_without_a_scored_position_are_refused(prompt_len):
    with pytest.raises(TargetTokenIdsError, match="at least 2 tokens"):
        normalize_targets([], 0, prompt_len, VOCAB)


@pytest.mark.parametrize("start", [-1, 3, 1.0, True, "1"])
def test_bad_start(start):
    with pytest.raises(TargetTokenIdsError) as error:
        normalize_targets([1], start, 4, VOCAB)
    assert error.value.parameter == "target_start"


@pytest.mark.parametrize(
    "prompt, fragment",
    [
        ({"prompt": "text", "target_token_ids": [1]}, "needs a TokensPrompt"),
        ({"prompt_embeds": object(), "target_token_ids": [1]}, "prompt_embeds"),
        ({"prompt_token_ids": [1, 2], "target_start": 0}, "without target_token_ids"),
    ],
)
def test_prompt_kinds_that_cannot_carry_targets(prompt, fragment):
    with pytest.raises(TargetTokenIdsError, match=fragment):
        check_prompt_kind(prompt)


@pytest.mark.parametrize("prompt", [{"prompt": "text"}, "a string prompt",
                                    {"prompt_token_ids": [1, 2], "target_token_ids": [2]},
                                    {"prompt_token_ids": [1, 2, 3], "target_token_ids": [3],
                                     "target_start": 1}])
def test_prompts_without_a_kind_problem_pass_untouched(prompt):
    """Plain prompts and TokensPrompts with targets pass, unchanged; the same targets on
    a prompt without token ids of its own are refused (the check does look)."""
    before = copy.deepcopy(prompt)
    assert check_prompt_kind(prompt) is None
    assert prompt == before
    if isinstance(prompt, dict) and "target_token_ids" in prompt:
        text_prompt = {"prompt": "text", "target_token_ids": prompt["target_token_ids"]}
        with pytest.raises(TargetTokenIdsError, match="needs a TokensPrompt"):
            check_prompt_kind(text_prompt)


