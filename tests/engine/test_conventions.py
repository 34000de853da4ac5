"""Conventions: each tool's windows, and fastpath's perplexity under them against that tool's loop.

Pure checks (no engine): the positions each convention scores are the positions the tool's
own loop scores (transcribed in `tests/engine/convention_loops.py`; lm-eval's functions themselves
too where lm-eval is installed). Engine checks: vLLM through fastpath against the
transformers transcription of each loop on one zoo model: PPL within a stated relative
bound, the same positions in the same order, each token within a stated bound.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastpath import zoo
from fastpath.data import bundled_text
from fastpath.engine.scorer import EngineScorer
from fastpath.metrics import conventions, perplexity
from fastpath.metrics.windows import WindowError
from fastpath.testing import reference
from tests.engine import convention_loops

# As in test_perplexity: fp32 vLLM against fp32 transformers on the tiny models.
REFERENCE_PPL_RTOL = 1e-6
REFERENCE_TOKEN_ATOL = 5e-5
# The HF guide sums window losses in float32 and exponentiates a float32 mean, so its PPL
# carries the float32 rounding of the mean NLL (one ulp at NLL 14 is 9.5e-7 relative in
# PPL); measured 1.3e-6 on tiny-llama (NLL ~14).
HF_GUIDE_PPL_RTOL = 1e-5
BOS = 7  # a stand-in BOS id for the pure checks


@given(st.integers(2, 600), st.integers(2, 80), st.data())
def test_hf_positions_are_the_guides(length, context, data):
    stride = data.draw(st.one_of(st.just(context), st.integers(1, context)))
    layout = conventions.layout("hf", range(length), context, stride)
    _, expected, _ = convention_loops.hf_guide(None, list(range(length)), context, stride)
    positions = layout.positions()
    np.testing.assert_array_equal(positions, expected)
    for w in layout.windows:
        assert w.end - w.begin <= context and w.first_token is None
    if stride == context and length > context:
        # stride == context: each later window's first token is never scored.
        assert set(range(context, length, context)).isdisjoint(positions.tolist())


@given(st.integers(1, 600), st.integers(2, 80))
def test_lm_eval_windows_are_rolling_disjoint_windows(text_tokens, context):
    """[prefix] + tokens as stream indices: each (context, continuation) pair of lm-eval is
    window [begin, end) scoring [score_from, end)."""
    token_list = list(range(1, text_tokens + 1))  # stream index of each text token
    pairs = list(map(convention_loops.disjoint_window, convention_loops.rolling_token_windows(
        token_list, 0, context - 1, 1)))
    layout = conventions.layout("lm-eval", range(text_tokens + 1), context, None)
    assert len(pairs) == len(layout.windows)
    for (ctx, continuation), w in zip(pairs, layout.windows, strict=True):
        assert ctx + continuation == list(range(w.begin, w.end))
        assert continuation == list(range(w.score_from, w.end))
        assert len(ctx) == 1 or w is layout.windows[-1]  # one token of context, but the last
    np.testing.assert_array_equal(layout.positions(), token_list)


@given(st.integers(1, 300), st.integers(2, 60))
def test_lm_eval_windows_equal_lm_eval_itself(text_tokens, context):
    utils = pytest.importorskip("lm_eval.utils", reason="lm-eval not installed")
    token_list = list(range(1, text_tokens + 1))
    theirs = list(map(utils.make_disjoint_window, utils.get_rolling_token_windows(
        token_list=token_list, prefix_token=0, max_seq_len=context - 1, context_len=1)))
    ours = conventions.layout("lm-eval", range(text_tokens + 1), context, None).windows
    assert [(list(range(w.begin, w.score_from)), list(range(w.score_from, w.end)))
            for w in ours] == [(list(c), list(t)) for c, t in theirs]


@given(st.integers(2, 80), st.data())
def test_llama_cpp_chunks(context, data):
    context = max(context, 3)
    length = data.draw(st.integers(2 * context, 6 * context + 5))
    layout = conventions.layout("llama.cpp", range(length), context, None, bos=BOS)
    _, expected, _ = convention_loops.llama_cpp_perplexity(None, list(range(length)), context,
                                                         BOS)
    np.testing.assert_array_equal(layout.positions(), expected)
    assert len(layout.windows) == length // context
    for i, w in enumerate(layout.windows):
        assert (w.begin, w.end, w.first_token) == (i * context, (i + 1) * context, BOS)
        assert w.prompt(layout.tokens)[0] == BOS
        assert w.num_scored == context - 1 - context // 2


def test_fastpath_convention_is_fastpath_windows():
    layout = conventions.layout("fastpath", range(1000), 128, 48)
    np.testing.assert_array_equal(layout.positions(), np.arange(1, 1000))
    assert layout.token_weights() is None


def test_hf_weights_are_the_guides_window_weights():
    """Window 0: 9 labels, 8 scored, weight 8; overlapping windows: 4 labels, all 4 scored,
    weight 3 (the guide multiplies their mean by labels - 1)."""
    layout = conventions.layout("hf", range(21), 9, 4)
    spans = [(w.begin, w.end, w.score_from) for w in layout.windows]
    assert spans == [(0, 9, 1), (4, 13, 9), (8, 17, 13), (12, 21, 17)]
    weights = layout.token_weights()
    np.testing.assert_array_equal(weights, [1.0] * 8 + [0.75] * 12)


@pytest.mark.parametrize("convention, context, stride, message", [
    ("lm-eval", 64, 32, "--stride does not apply to --convention lm-eval"),
    ("llama.cpp", 64, 16, "--stride does not apply"),
    ("llama.cpp", 2, None, "--context-length must be at least 3"),
    ("hf", 64, 65, "--stride must be in [1, --context-length=64]"),
    ("nope", 64, None, "--convention must be one of"),
])
def test_bad_flags_named(convention, context, stride, message):
    with pytest.raises(WindowError, match=message.replace("[", r"\[").replace("]", r"\]")):
        conventions.layout(convention, range(500), context, stride)


def test_llama_cpp_needs_two_chunks():
    with pytest.raises(WindowError, match="at least 2 \\* --context-length = 128"):
        conventions.layout("llama.cpp", range(127), 64, None)


# ------------------------------------------------------------------ engine


ENGINE_CASES = [("fastpath", 64, 17), ("hf", 64, 24), ("hf", 64, 64), ("lm-eval", 64, None),
                ("llama.cpp", 64, None)]
TEXT = bundled_text()[:1400]


@pytest.fixture(scope="module")
def hf_model():
    return reference.load_model(str(zoo.get_model("tiny-llama")))


def _reference(convention, model, tokenizer, layout, context, stride):
    """(perplexity as the tool computes it, positions, log-probs) from the tool's loop."""
    tokens = list(layout.tokens)
    if convention == "fastpath":
        values = reference.score_stream(model, tokens, context, stride)
        return float(np.exp(-values.astype(np.float64).mean())), np.arange(1, len(tokens)), values
    if convention == "hf":
        assert len(tokens) % context != 1  # the guide's NaN case
        return convention_loops.hf_guide(model, tokens, context, stride)
    if convention == "lm-eval":
        total, positions, values = convention_loops.lm_eval_rolling(model, tokens[1:], tokens[0],
                                                                  context - 1)
        return float(np.exp(-total / len(positions))), positions, values
    return convention_loops.llama_cpp_perplexity(model, tokens, context, tokenizer.bos_token_id)


@pytest.mark.engine
@pytest.mark.correctness
@pytest.mark.parametrize("convention, context, stride", ENGINE_CASES)
def test_convention_agrees_with_the_tools_loop(llama_llm, hf_model, convention, context, stride,
                                               record_property):
    tokenizer = llama_llm.get_tokenizer()
    layout = conventions.build(convention, tokenizer, TEXT, context, stride)
    got = perplexity.score_layout(EngineScorer(llama_llm), layout)
    ppl, positions, values = _reference(convention, hf_model, tokenizer, layout, context, stride)
    np.testing.assert_array_equal(got.positions, positions)
    rel = abs(got.perplexity - ppl) / ppl
    worst = float(np.max(np.abs(got.logprobs.astype(np.float64) - values)))
    record_property("tokens", len(layout.tokens))
    record_property("scored_tokens", got.num_tokens)
    record_property("ppl_fastpath", got.perplexity)
    record_property("ppl_tool_loop", ppl)
    record_property("ppl_rel_diff", rel)
    record_property("max_abs_token_logprob_diff", worst)
    assert rel <= (HF_GUIDE_PPL_RTOL if convention == "hf" else REFERENCE_PPL_RTOL)
    assert worst <= REFERENCE_TOKEN_ATOL

