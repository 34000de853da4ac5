"""KLD statistics (no engine): the top-K + tail bucket divergence and llama.cpp's figures.

Distributions are random log-softmax rows built here in float64; the full-vocabulary KLD is
computed directly, independently of `fastpath.metrics.divergence`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpath.metrics import divergence


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def random_pair(seed: int, rows: int, vocab: int, scale: float, noise: float):
    """(base, model) log-probs [rows, vocab], float64: model = base logits + noise."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, scale, (rows, vocab))
    return log_softmax(logits), log_softmax(logits + rng.normal(0.0, noise, (rows, vocab)))


def full_kld(base: np.ndarray, model: np.ndarray) -> np.ndarray:
    return (np.exp(base) * (base - model)).sum(axis=1)


def top_k_columns(base: np.ndarray, k: int) -> np.ndarray:
    """Ids of the base's top-K per row, descending (as the runner returns them)."""
    return np.argsort(-base, axis=1, kind="stable")[:, :k]


pairs = st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 12), st.integers(2, 300),
                  st.floats(0.1, 8.0), st.floats(0.0, 2.0))


@given(pairs)
def test_full_vocabulary_equals_direct_kld(params):
    seed, rows, vocab, scale, noise = params
    base, model = random_pair(seed, rows, vocab, scale, noise)
    ids = top_k_columns(base, vocab)
    got, tail_b, tail_m = divergence.topk_kld(np.take_along_axis(base, ids, 1),
                                              np.take_along_axis(model, ids, 1),
                                              full_vocabulary=True)
    expected = full_kld(base, model)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-15)
    assert not tail_b.any() and not tail_m.any()


@given(pairs)
def test_lower_bound_and_monotone_in_k(params):
    """Merging the tail never raises the divergence: KLD_K <= KLD_{K+1} <= ... <= full."""
    seed, rows, vocab, scale, noise = params
    base, model = random_pair(seed, rows, vocab, scale, noise)
    expected = full_kld(base, model)
    order = top_k_columns(base, vocab)
    previous = np.zeros(rows)
    for k in sorted({1, 2, 3, vocab // 4, vocab // 2, vocab - 1, vocab} - {0}):
        ids = order[:, :k]
        got, tail, _ = divergence.topk_kld(np.take_along_axis(base, ids, 1),
                                           np.take_along_axis(model, ids, 1),
                                           full_vocabulary=k == vocab)
        slack = 1e-12 * (1 + np.abs(expected))
        assert np.all(got <= expected + slack), (k, (got - expected).max())
        assert np.all(got >= previous - slack), (k, (previous - got).max())
        assert np.all(got >= -1e-15)
        np.testing.assert_allclose(tail, 1 - np.exp(np.take_along_axis(base, ids, 1)).sum(1),
                                   atol=1e-12)
        previous = got


def test_tail_bucket_value():
    """Two outcomes kept of four: the tail bucket's term is T_b log(T_b / T_m)."""
    base = np.log(np.array([[0.5, 0.2, 0.2, 0.1]]))
    model = np.log(np.array([[0.4, 0.4, 0.1, 0.1]]))
    got, tail_b, tail_m = divergence.topk_kld(base[:, :2], model[:, :2])
    expected = 0.5 * math.log(0.5 / 0.4) + 0.2 * math.log(0.2 / 0.4) + 0.3 * math.log(0.3 / 0.2)
    assert got[0] == pytest.approx(expected, rel=1e-12)
    assert tail_b[0] == pytest.approx(0.3) and tail_m[0] == pytest.approx(0.2)


@given(st.integers(0, 2**32 - 1), st.integers(1, 64))
def test_identical_scores_give_exactly_zero(seed, k):
    base, _ = random_pair(seed, 5, 200, 3.0, 0.0)
    values = np.sort(base, axis=1)[:, ::-1][:, :k].astype(np.float32)
    kld, _, _ = divergence.topk_kld(values, values.copy())
    assert np.all(kld == 0.0)


def test_zero_probability_ids_contribute_nothing():
    """Base all on one id: KL = -log q(that id) = 0.1; float32 tails err low, by little."""
    base = np.array([[0.0, -np.inf]], dtype=np.float32)
    model = np.array([[-0.1, -3.0]], dtype=np.float32)
    kld, _, _ = divergence.topk_kld(base, model, vocab_size=2048)
    assert np.isfinite(kld).all()
    assert 0.1 - 1e-4 <= kld[0] <= 0.1 + 1e-7


def test_float32_tail_errs_low():
    """A tail the float32 log-probs cannot resolve (1e-9 vs 1e-12) contributes nothing; a
    resolved one is within its resolution below the exact term."""
    probs_base, probs_model = np.array([0.6, 0.4 - 1e-9]), np.array([0.7, 0.3 - 1e-12])
    base = np.log(probs_base)[None].astype(np.float32)
    model = np.log(probs_model)[None].astype(np.float32)
    kld, _, _ = divergence.topk_kld(base, model, vocab_size=2048)
    exact_top = (probs_base * np.log(probs_base / probs_model)).sum()
    assert abs(kld[0] - exact_top) < 1e-6
    coarse = np.log(np.array([[0.5, 0.2]], dtype=np.float32))  # tails 0.3 and 0.5
    finer = np.log(np.array([[0.4, 0.1]], dtype=np.float32))
    kld, _tail_b, _tail_m = divergence.topk_kld(coarse, finer, vocab_size=2048)
    exact = 0.5 * math.log(0.5 / 0.4) + 0.2 * math.log(2.0) + 0.3 * math.log(0.3 / 0.5)
    assert exact - 1e-5 <= kld[0] <= exact + 1e-7


def _llama_cpp(values: np.ndarray) -> tuple[float, float]:
    """llama-perplexity's mean_and_uncertainty: sums of x and x^2."""
    count = values.size
    f = values.sum() / count
    df = (values * values).sum() / count - f * f
    return f, math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0


@settings(max_examples=30)
@given(st.integers(0, 2**32 - 1), st.integers(20, 400))
def test_summary_matches_llama_cpp_formulas(seed, n):
    rng = np.random.default_rng(seed)
    kld = rng.exponential(0.05, n)
    base_lp = -rng.exponential(2.0, n).astype(np.float32)
    model_lp = (base_lp - rng.normal(0.05, 0.3, n)).astype(np.float32)
    same_top = rng.random(n) < 0.9
    nll, nll_base = -model_lp.astype(np.float64), -base_lp.astype(np.float64)
    result = divergence.Divergence(
        kld=kld, base_logprobs=base_lp, model_logprobs=model_lp, same_top=same_top,
        tail_mass_base=rng.random(n) * 0.1, ppl=math.exp(nll.mean()),
        ppl_base=math.exp(nll_base.mean()), mean_nll=nll.mean(), mean_nll_base=nll_base.mean(),
        top_k=8)
    s = result.summary()
    mean, stderr = _llama_cpp(kld)
    assert s["kld_mean"] == pytest.approx(mean, rel=1e-12)
    assert s["kld_mean_stderr"] == pytest.approx(stderr, rel=1e-6)
    # ln(PPL(Q)/PPL(base)) and its uncertainty with the covariance, as llama.cpp does.
    m, sm = _llama_cpp(nll)
    b, sb = _llama_cpp(nll_base)
    cov = ((nll * nll_base).sum() / n - m * b) / (n - 1)
    assert s["ln_ppl_ratio"] == pytest.approx(m - b, rel=1e-9, abs=1e-12)
    assert s["ln_ppl_ratio_stderr"] == pytest.approx(math.sqrt(sm**2 + sb**2 - 2 * cov), rel=1e-6)
    assert s["ln_ppl_correlation"] == pytest.approx(cov / (sm * sb), rel=1e-6)
    # PPL's uncertainty as llama.cpp gives it: PPL times the stderr of the mean log.
    assert s["ppl_stderr"] == pytest.approx(math.exp(nll.mean()) * sm, rel=1e-6)
    assert s["ppl_base_stderr"] == pytest.approx(math.exp(nll_base.mean()) * sb, rel=1e-6)
    dp = np.exp(model_lp.astype(np.float64)) - np.exp(base_lp.astype(np.float64))
    assert s["rms_delta_p"] == pytest.approx(math.sqrt(_llama_cpp(dp * dp)[0]), rel=1e-12)
    p = same_top.sum() / n
    assert s["top1_agreement"] == p
    assert s["top1_agreement_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    ordered = np.sort(kld)
    for label, q in zip(s["kld_percentiles"], divergence.PERCENTILES, strict=True):
        position = q / 100 * (n - 1)  # llama.cpp's percentile: linear between neighbours
        low = int(position)
        expected = (1 - (position - low)) * ordered[low] + (position - low) * ordered[
            min(low + 1, n - 1)]
        assert s["kld_percentiles"][label] == pytest.approx(expected, rel=1e-9)
    assert sum(s["kld_histogram"]["counts"]) == n
    assert s["kld_max"] == kld.max() and s["kld_is_lower_bound"] is True
    text = divergence.format_summary(s)
    assert "Mean    KLD" in text and "lower bound" in text and "Same top p" in text


@given(pairs)
def test_reverse_kld_is_a_lower_bound_of_the_full_reverse_kld(params):
    """KL(model || base) over the base's top-K + tail (what `kld.compare` computes) never
    exceeds the full-vocabulary KL(model || base), and equals it at K = vocabulary."""
    seed, rows, vocab, scale, noise = params
    base, model = random_pair(seed, rows, vocab, scale, noise)
    full_reverse = full_kld(model, base)
    for k in sorted({1, min(4, vocab), vocab}):
        ids = top_k_columns(base, k)
        got, _, _ = divergence.topk_kld(np.take_along_axis(model, ids, 1),
                                        np.take_along_axis(base, ids, 1),
                                        full_vocabulary=k == vocab)
        assert np.all(got <= full_reverse * (1 + 1e-9) + 1e-12), (k, got, full_reverse)
        if k == vocab:
            np.testing.assert_allclose(got, full_reverse, rtol=1e-9, atol=1e-15)


def test_topk_agreement_is_ordered_and_reads_ties_from_values():
    # model's log-probs on the base's top-3 ids, and the model's own top-3, per row
    on_base = np.array([[-0.1, -1.0, -2.0],   # same order: agrees at k = 1, 2, 3
                        [-1.0, -0.1, -2.0],   # top two swapped: agrees at no k
                        [-0.1, -2.0, -1.0],   # 2nd and 3rd swapped: agrees at k = 1 only
                        [-0.5, -0.5, -3.0]],  # a tie the model broke the other way: agrees
                       dtype=np.float32)
    own = np.array([[-0.1, -1.0, -2.0], [-0.1, -1.0, -2.0], [-0.1, -1.0, -2.0],
                    [-0.5, -0.5, -1.0]], dtype=np.float32)
    agree = divergence.topk_agreement(on_base, own)
    assert agree.tolist() == [[True, True, True], [False, False, False],
                              [True, False, False], [True, True, False]]
    assert divergence.topk_agreement(own, own).all()


def test_summary_carries_reverse_kld_and_topk_agreement():
    n = 50
    rng = np.random.default_rng(3)
    lp = -rng.exponential(1.0, n).astype(np.float32)
    d = divergence.Divergence(
        kld=rng.exponential(0.01, n), base_logprobs=lp, model_logprobs=lp,
        same_top=np.ones(n, bool), tail_mass_base=np.zeros(n), ppl=2.0, ppl_base=2.0,
        mean_nll=0.7, mean_nll_base=0.7, top_k=8, reverse_kld=np.zeros(n),
        topk_agreement=np.tile([True, True, False], (n, 1)))
    s = d.summary()
    assert s["reverse_kld_mean"] == 0.0 and s["reverse_kld_max"] == 0.0
    assert s["topk_agreement"] == {"1": 1.0, "2": 1.0, "3": 0.0}
    text = divergence.format_summary(s)
    assert "K=2 100.00%" in text and "KL(Q || base)" in text
