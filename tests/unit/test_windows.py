"""Window arithmetic: every token after the first is scored exactly once, with context."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastpath.metrics.perplexity import PerplexityResult, assemble
from fastpath.metrics.windows import WindowError, count_windows, make_windows


@st.composite
def stream_and_windows(draw):
    context = draw(st.integers(2, 80))
    stride = draw(st.one_of(st.just(1), st.just(context), st.integers(1, context)))
    length = draw(st.one_of(st.integers(2, 5), st.integers(2, 600)))
    return length, context, stride


@given(stream_and_windows())
def test_each_token_after_the_first_is_scored_once(params):
    length, context, stride = params
    windows = make_windows(length, context, stride)
    scored = np.zeros(length, dtype=int)
    for w in windows:
        assert 0 <= w.begin < w.score_from <= w.end - 1 < length  # >= 1 context token
        assert w.end - w.begin <= context
        assert 0 <= w.first_scored_row < w.end - w.begin - 1 or w.num_scored == 1
        scored[w.score_from : w.end] += 1
    assert scored[0] == 0 and np.all(scored[1:] == 1)
    assert len(windows) == count_windows(length, context, stride)


@given(stream_and_windows())
def test_windows_use_full_context_and_advance_by_stride(params):
    length, context, stride = params
    windows = make_windows(length, context, stride)
    assert windows[0].begin == 0 and windows[0].score_from == 1
    for w in windows[1:]:
        assert w.end - w.begin == context  # later windows are always full
    for w in windows[1:-1]:
        assert w.num_scored == min(stride, context - 1)


def test_stride_equal_to_context_overlaps_by_one_token():
    windows = make_windows(10, 4, 4)
    assert [(w.begin, w.end, w.score_from) for w in windows] == [
        (0, 4, 1), (3, 7, 4), (6, 10, 7)]


def test_hugging_face_example_shape():
    """Context 1024, stride 512 over 4000 tokens: 1023 then 512-token spans, last partial."""
    windows = make_windows(4000, 1024, 512)
    assert [w.num_scored for w in windows] == [1023, 512, 512, 512, 512, 512, 416]


@pytest.mark.parametrize("length, context, stride, fragment", [
    (1, 8, 4, "at least 2"), (0, 8, 4, "at least 2"), (10, 1, 1, "--context-length"),
    (10, 8, 0, "--stride"), (10, 8, -1, "--stride"), (10, 8, 9, "--stride")])
def test_bad_parameters(length, context, stride, fragment):
    with pytest.raises(WindowError, match=fragment):
        make_windows(length, context, stride)


@given(st.lists(st.floats(-20, 0, width=32), min_size=2, max_size=300), st.randoms())
def test_nll_sum_is_order_independent(values, random):
    logprobs = np.array(values, dtype=np.float32)
    shuffled = logprobs.copy()
    random.shuffle(shuffled)
    a, b = PerplexityResult(logprobs, 1), PerplexityResult(shuffled, 1)
    assert a.nll_sum == b.nll_sum
    assert a.perplexity == pytest.approx(math.exp(-np.mean(logprobs.astype(np.float64))))


def test_assemble_rejects_a_missing_window():
    windows = make_windows(20, 8, 4)
    values = [np.zeros(w.num_scored, dtype=np.float32) for w in windows]
    with pytest.raises(AssertionError, match="scored other than once"):
        assemble(20, windows[:-1], values[:-1])
