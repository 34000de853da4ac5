"""The peers' window rules and log-prob parsing, as fastpath.testing.peers redoes them."""

from __future__ import annotations

import math

import pytest

from fastpath.testing.peers import (
    PeerResult,
    get_rolling_token_windows,
    lm_eval_rolling_windows,
    make_disjoint_window,
    parse_prompt_logprobs,
)


def test_rolling_windows_predict_every_token_once():
    """lm-eval's own example: 34 tokens, max_seq_len 10, one token of context."""
    windows = list(get_rolling_token_windows(list(range(34)), -100, 10, 1))
    assert windows == [
        ([-100, 0, 1, 2, 3, 4, 5, 6, 7, 8], list(range(10))),
        (list(range(9, 19)), list(range(10, 20))),
        (list(range(19, 29)), list(range(20, 30))),
        (list(range(23, 33)), [30, 31, 32, 33]),
    ]
    assert make_disjoint_window(windows[1]) == ([9], list(range(10, 20)))
    assert make_disjoint_window(windows[3]) == (list(range(23, 30)), [30, 31, 32, 33])


@pytest.mark.parametrize("length", [1, 5, 8, 9, 30, 31])
def test_lm_eval_requests_score_each_token_once_within_max_length(length):
    tokens = list(range(100, 100 + length))
    requests = lm_eval_rolling_windows(tokens, prefix_token=-1, max_length=8)
    scored = [t for inputs, ctxlen in requests for t in inputs[ctxlen:]]
    assert scored == tokens
    assert all(len(inputs) <= 8 and ctxlen >= 1 for inputs, ctxlen in requests)
    assert requests[0][0][0] == -1  # the first window starts from the prefix token
    for inputs, ctxlen in requests[1:]:  # later ones: the token before, as in the stream
        assert inputs[ctxlen - 1] + 1 == inputs[ctxlen]


def test_rolling_windows_refuse_bad_context():
    with pytest.raises(ValueError, match="context_len"):
        list(get_rolling_token_windows([1, 2], 0, 4, 0))


class _Logprob:
    def __init__(self, value: float):
        self.logprob = value


def test_parse_sums_continuation_and_checks_greedy():
    """Sums the target entries after the context; is_greedy with the target winning ties."""
    tokens = [7, 1, 2, 3]
    dicts = [None, {1: _Logprob(-0.5), 4: _Logprob(-1.0)},
             {2: _Logprob(-0.25)}, {3: _Logprob(-2.0), 5: _Logprob(-2.0)}]
    total, greedy = parse_prompt_logprobs(tokens, dicts, ctxlen=1)
    assert total == -2.75 and greedy
    dicts[2] = {2: _Logprob(-3.0), 6: _Logprob(-0.1)}
    total, greedy = parse_prompt_logprobs(tokens, dicts, ctxlen=2)
    assert total == -5.0 and not greedy


def test_peer_result_perplexity():
    assert PeerResult(nll_sum=2.0 * math.log(3.0), scored_tokens=2, windows=1).perplexity == (
        pytest.approx(3.0))


def test_hf_guide_loop_matches_transformers_per_window():
    """With stride = window length the guide's windows are independent chunks: its NLL is the
    sum of each chunk's own token NLLs (from fastpath.testing.reference), up to fp32 rounding."""
    import numpy as np

    from fastpath import zoo
    from fastpath.testing import reference
    from fastpath.testing.peers import hf_guide_nll

    model = reference.load_model(str(zoo.get_model("tiny-llama")))
    tokens = list(np.random.default_rng(0).integers(0, 2048, 16 * 3 + 5))
    result = hf_guide_nll(model, tokens, max_length=16, stride=16)
    chunks = [tokens[i : i + 16] for i in range(0, len(tokens), 16)]
    expected = -sum(float(reference.score_stream(model, c, len(c), len(c)).astype(np.float64).sum())
                    for c in chunks)
    assert result.windows == 4
    assert result.scored_tokens == sum(len(c) - 1 for c in chunks)
    assert result.nll_sum == pytest.approx(expected, rel=1e-5)
