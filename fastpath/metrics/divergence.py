"""KL divergence of a model against a base model from top-K scores: the statistics, in numpy.

Per scored token the base pass stores the base model's top-K log-probs (and ids); the model
pass scores the model on exactly those ids. The divergence is computed over K + 1 outcomes:
the K ids, and one tail bucket holding everything else (base mass `1 - sum(top-K)`, model
mass `1 - sum(model on those ids)`). Merging outcomes never increases a KL divergence (the
log-sum inequality), so this is a lower bound of the full-vocabulary KLD, equal to it when
K is the vocabulary; growing K never lowers it. All arithmetic is float64, and where the
float32 inputs cannot resolve a tail mass the tail term errs low (see `topk_kld`).

Statistics follow llama.cpp's `llama-perplexity --kl-divergence` (mean KLD with its
uncertainty, percentiles, same top token, delta-p, PPL of both and ln of their ratio with
the covariance), computed with numpy; sums that must not depend on order use math.fsum.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)
LOWER_BOUND_NOTE = (
    "KLD is over the base model's top-K tokens plus one tail bucket: a lower bound of the "
    "full-vocabulary KLD (equal when K is the vocabulary)")
REVERSE_NOTE = (
    "reverse KLD is KL(model || base) over the same K + 1 outcomes (the base's top-K ids and "
    "one tail bucket): a lower bound of the full-vocabulary KL(model || base); mass the "
    "model moves to ids outside the base's top-K counts only through the tail bucket")
# Per-token KLD histogram kept in every JSON report: a bin for values below 1e-8 (zero
# included), then quarter-decade bins up to 100.
HISTOGRAM_EDGES = np.concatenate([[0.0], 10.0 ** np.arange(-8.0, 2.01, 0.25)])
# The base model's confidence (its top-1 probability) by which the KLD is bucketed: where the
# base is sure, a variant's divergence matters more than where it hesitates anyway.
CONFIDENCE_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def _logsumexp(values: np.ndarray) -> np.ndarray:
    """log(sum(exp)) over the last axis, float64, -inf for an all -inf row."""
    top = values.max(axis=-1, keepdims=True)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(values - safe).sum(axis=-1)) + safe[..., 0])


def tail_mass(logprobs: np.ndarray) -> np.ndarray:
    """1 - sum(exp(logprobs)) per row, in [0, 1] (float64)."""
    return np.clip(-np.expm1(_logsumexp(logprobs.astype(np.float64))), 0.0, 1.0)


def tail_resolution(logprobs: np.ndarray, vocab_size: int | None = None) -> np.ndarray:
    """How well `tail_mass` is known per row: two ulps (of the input's float type) of the
    scales its error comes from, the rounding of the K log-probs (sum p |log p|) and of the
    log-softmax's normalizer (at most log of the vocabulary; 16 where it is not given)."""
    eps = float(np.finfo(logprobs.dtype if logprobs.dtype.kind == "f" else np.float64).eps)
    values = logprobs.astype(np.float64)
    with np.errstate(invalid="ignore"):
        spread = np.where(np.isfinite(values), -np.exp(values) * values, 0.0).sum(axis=-1)
    normalizer = math.log(vocab_size) if vocab_size else 16.0
    return 2 * eps * (normalizer + spread)


def generalized_kl(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x log(x/y) - x + y, elementwise: >= 0, zero only where x == y (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(x > 0, x * (np.log(x) - np.log(y)), 0.0) - x + y
    return np.maximum(value, 0.0)


def topk_kld(base_logprobs: np.ndarray, model_logprobs: np.ndarray,
             full_vocabulary: bool = False, vocab_size: int | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row KL(base || model) over the K scored ids + one tail bucket (float64).

    Returns (kld, base tail mass, model tail mass). Written as a sum of generalized KL
    terms, p log(p/q) - p + q over the K ids and over the tail bucket, each >= 0: the same
    value as the plain sum when both sides sum to one, and insensitive (to first order) to
    a log-softmax normalizer that is off by a rounding error. The tail masses are known
    only within `tail_resolution`; the tail term is taken at the point of that uncertainty
    closest to equality (zero where it includes equality), so it never overstates. With
    `full_vocabulary` (K is the whole vocabulary) there is no tail bucket.
    """
    if np.shape(base_logprobs) != np.shape(model_logprobs) or np.ndim(base_logprobs) != 2:
        raise ValueError(f"base and model scores must both be [rows, K]: "
                         f"{np.shape(base_logprobs)} vs {np.shape(model_logprobs)}")
    base = np.asarray(base_logprobs, dtype=np.float64)
    model = np.asarray(model_logprobs, dtype=np.float64)
    kld = generalized_kl(np.exp(base), np.exp(model)).sum(axis=1)
    if full_vocabulary:
        zeros = np.zeros(base.shape[0])
        return kld, zeros, zeros
    tail_base, tail_model = tail_mass(base), tail_mass(model)
    delta_base = tail_resolution(np.asarray(base_logprobs), vocab_size)
    delta_model = tail_resolution(np.asarray(model_logprobs), vocab_size)
    direction = np.sign(tail_base - tail_model)
    resolved = np.abs(tail_base - tail_model) > delta_base + delta_model
    x = np.clip(tail_base - direction * delta_base, 0.0, 1.0)
    y = np.clip(tail_model + direction * delta_model, 0.0, 1.0)
    tail = np.where(resolved, generalized_kl(x, y), 0.0)
    return kld + tail, tail_base, tail_model


def topk_agreement(model_on_base_top: np.ndarray, model_own_top: np.ndarray) -> np.ndarray:
    """Per row and k = 1 .. k_max: the model's k best ids are the base's k best, in order
    (exllamav3's top-K agreement), read tie-aware from values: the model's log-prob of the
    base's j-th id equals its own j-th best for every j < k. Both come from one log-softmax
    row, so a model identical to the base agrees exactly. bool [n, k_max]."""
    k_max = model_own_top.shape[1]
    equal = model_on_base_top[:, :k_max] == model_own_top
    return np.logical_and.accumulate(equal, axis=1)


def mean_stderr(values: np.ndarray) -> tuple[float, float]:
    """Mean (math.fsum) and its standard error (sample std / sqrt(n))."""
    n = values.size
    mean = math.fsum(values.tolist()) / n if n else float("nan")
    stderr = float(values.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return mean, stderr


@dataclass
class Divergence:
    """Per-token figures of one model against its base, and their statistics."""

    kld: np.ndarray  # float64 [n]
    base_logprobs: np.ndarray  # float32 [n]: base log-prob of the target
    model_logprobs: np.ndarray  # float32 [n]: model log-prob of the target
    same_top: np.ndarray  # bool [n]: the model's top token is the base's top token
    tail_mass_base: np.ndarray  # float64 [n]
    top1_outside_base_topk: int = 0  # rows whose model top token is not a base top-K id
    top1_undecided: int = 0
    ppl: float = float("nan")  # computed by PerplexityResult (convention weighting included)
    ppl_base: float = float("nan")
    mean_nll: float = float("nan")
    mean_nll_base: float = float("nan")
    top_k: int = 0
    base_top1_logprobs: np.ndarray | None = None  # float32 [n]: the base's best log-prob
    reverse_kld: np.ndarray | None = None  # float64 [n]: KL(model || base), REVERSE_NOTE
    topk_agreement: np.ndarray | None = None  # bool [n, k]: see `topk_agreement`
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def delta_p(self) -> np.ndarray:
        """p_model(target) - p_base(target), float64."""
        return (np.exp(self.model_logprobs.astype(np.float64))
                - np.exp(self.base_logprobs.astype(np.float64)))

    def summary(self) -> dict[str, Any]:
        """Every statistic, JSON-able (llama.cpp's names where it has them)."""
        n = int(self.kld.size)
        kld_mean, kld_stderr = mean_stderr(self.kld)
        agree = float(self.same_top.mean()) if n else float("nan")
        agree_stderr = math.sqrt(agree * (1 - agree) / (n - 1)) if n > 1 else float("nan")
        nll = -self.model_logprobs.astype(np.float64)
        nll_base = -self.base_logprobs.astype(np.float64)
        ratio_stderr = float((nll - nll_base).std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
        with np.errstate(invalid="ignore", divide="ignore"):
            correlation = float(np.corrcoef(nll, nll_base)[0, 1]) if n > 1 else float("nan")
        dp = self.delta_p
        dp2_mean, dp2_stderr = mean_stderr(dp * dp)
        rms = math.sqrt(dp2_mean)
        dp_mean, dp_stderr = mean_stderr(dp)
        counts, _ = np.histogram(np.clip(self.kld, 0.0, None), bins=HISTOGRAM_EDGES)
        return {
            "scored_tokens": n,
            "top_k": self.top_k,
            "kld_mean": kld_mean,
            "kld_mean_stderr": kld_stderr,
            "kld_max": float(self.kld.max()) if n else float("nan"),
            "kld_min": float(self.kld.min()) if n else float("nan"),
            "kld_median": float(np.percentile(self.kld, 50)) if n else float("nan"),
            "kld_percentiles": {_label(q): float(np.percentile(self.kld, q)) for q in PERCENTILES}
            if n else {},
            "kld_is_lower_bound": True,
            "kld_note": LOWER_BOUND_NOTE,
            "tail_mass_mean": mean_stderr(self.tail_mass_base)[0],
            "tail_mass_max": float(self.tail_mass_base.max()) if n else float("nan"),
            "top1_agreement": agree,
            "top1_agreement_stderr": agree_stderr,
            "top1_undecided": self.top1_undecided,
            "top1_outside_base_topk": self.top1_outside_base_topk,
            "ppl": self.ppl,
            "ppl_stderr": self.ppl * float(nll.std(ddof=1)) / math.sqrt(n) if n > 1
            else float("nan"),
            "ppl_base": self.ppl_base,
            "ppl_base_stderr": self.ppl_base * float(nll_base.std(ddof=1)) / math.sqrt(n)
            if n > 1 else float("nan"),
            "ppl_ratio": self.ppl / self.ppl_base,
            "ln_ppl_ratio": self.mean_nll - self.mean_nll_base,
            "ln_ppl_ratio_stderr": ratio_stderr,
            "ln_ppl_correlation": correlation,
            "delta_p_mean": dp_mean,
            "delta_p_mean_stderr": dp_stderr,
            "delta_p_max": float(dp.max()) if n else float("nan"),
            "delta_p_min": float(dp.min()) if n else float("nan"),
            "delta_p_percentiles": {_label(q): float(np.percentile(dp, q)) for q in PERCENTILES}
            if n else {},
            "rms_delta_p": rms,
            "rms_delta_p_stderr": 0.5 / rms * dp2_stderr if rms > 0 else 0.0,
            "kld_histogram": {"edges": HISTOGRAM_EDGES.tolist(), "counts": counts.tolist()},
            "kld_by_base_confidence": self.kld_by_confidence(),
            **self.reverse_summary(),
            "topk_agreement": ({str(k + 1): float(share) for k, share
                                in enumerate(self.topk_agreement.mean(axis=0))}
                               if self.topk_agreement is not None and n else {}),
            "non_finite_share": self.non_finite_share(),
            **self.extra,
        }

    def reverse_summary(self) -> dict[str, Any]:
        """Mean (± stderr), median, p99 and max of the reverse KLD; empty without it."""
        if self.reverse_kld is None or not self.reverse_kld.size:
            return {}
        mean, stderr = mean_stderr(self.reverse_kld)
        return {"reverse_kld_mean": mean, "reverse_kld_mean_stderr": stderr,
                "reverse_kld_median": float(np.percentile(self.reverse_kld, 50)),
                "reverse_kld_p99": float(np.percentile(self.reverse_kld, 99)),
                "reverse_kld_max": float(self.reverse_kld.max()),
                "reverse_kld_note": REVERSE_NOTE}

    def kld_by_confidence(self) -> list[dict[str, Any]]:
        """Mean KLD (math.fsum) and token count per bucket of the base's top-1 probability
        (CONFIDENCE_EDGES; the last bucket includes 1.0); empty without the base's top-1."""
        if self.base_top1_logprobs is None:
            return []
        confidence = np.exp(self.base_top1_logprobs.astype(np.float64))
        buckets = np.clip(np.searchsorted(CONFIDENCE_EDGES, confidence, side="right") - 1,
                          0, len(CONFIDENCE_EDGES) - 2)
        rows = []
        for i, (low, high) in enumerate(itertools.pairwise(CONFIDENCE_EDGES)):
            values = self.kld[buckets == i]
            rows.append({"base_top1_p_low": low, "base_top1_p_high": high,
                         "tokens": int(values.size),
                         "kld_mean": math.fsum(values.tolist()) / values.size
                         if values.size else None})
        return rows

    def non_finite_share(self) -> float:
        """Share of tokens whose KLD or model log-prob of the target is not finite (a NaN or
        -inf from a broken variant shows here instead of poisoning the means unseen)."""
        n = self.kld.size
        bad = ~np.isfinite(self.kld) | ~np.isfinite(self.model_logprobs)
        return float(bad.sum()) / n if n else float("nan")

    def per_token(self) -> dict[str, np.ndarray]:
        """Arrays for --save-per-token."""
        return {"kld": self.kld, "delta_p": self.delta_p,
                "logprob_base": self.base_logprobs, "logprob_model": self.model_logprobs,
                "tail_mass_base": self.tail_mass_base, "same_top": self.same_top,
                **({"reverse_kld": self.reverse_kld} if self.reverse_kld is not None else {})}


def _label(q: float) -> str:
    return f"{q:g}"


def format_summary(s: dict[str, Any]) -> str:
    """The statistics as llama-perplexity prints them (values in % where it uses %)."""
    lines = [
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {s['ppl']:10.6f} ± {s['ppl_stderr']:10.6f}",
        f"Mean PPL(base)                : {s['ppl_base']:10.6f} ± {s['ppl_base_stderr']:10.6f}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s['ln_ppl_correlation']:6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {s['ln_ppl_ratio']:10.6f} ± "
        f"{s['ln_ppl_ratio_stderr']:10.6f}",
        f"Mean PPL(Q)/PPL(base)         : {s['ppl_ratio']:10.6f}",
        "",
        f"====== KL divergence statistics (top-{s['top_k']} + tail bucket) ======",
        f"Mean    KLD: {s['kld_mean']:10.6f} ± {s['kld_mean_stderr']:10.6f}",
        f"Maximum KLD: {s['kld_max']:10.6f}",
    ]
    for q, value in s["kld_percentiles"].items():
        name = "Median " if q == "50" else f"{float(q):4.1f}%  "
        lines.append(f"{name} KLD: {value:10.6f}")
    lines += [
        f"Minimum KLD: {s['kld_min']:10.6f}",
        f"Base tail mass (outside top-{s['top_k']}): mean {s['tail_mass_mean']:.3e}, "
        f"max {s['tail_mass_max']:.3e}",
        f"Note: {LOWER_BOUND_NOTE}.",
        "",
        "====== Token probability statistics ======",
        f"Mean    Δp: {100 * s['delta_p_mean']:6.3f} ± {100 * s['delta_p_mean_stderr']:5.3f} %",
        f"Maximum Δp: {100 * s['delta_p_max']:6.3f}%",
        f"Minimum Δp: {100 * s['delta_p_min']:6.3f}%",
        f"RMS Δp    : {100 * s['rms_delta_p']:6.3f} ± {100 * s['rms_delta_p_stderr']:5.3f} %",
        f"Same top p: {100 * s['top1_agreement']:6.3f} ± "
        f"{100 * s['top1_agreement_stderr']:5.3f} %  (undecided rows: {s['top1_undecided']})",
    ]
    if s.get("topk_agreement"):
        lines.append("Top-K agreement (the same K best ids, in order): " + ", ".join(
            f"K={k} {100 * share:.2f}%" for k, share in s["topk_agreement"].items()))
    if "reverse_kld_mean" in s:
        lines += ["", "====== Reverse KL divergence, KL(Q || base) (same outcomes) ======",
                  f"Mean    KLD: {s['reverse_kld_mean']:10.6f} ± "
                  f"{s['reverse_kld_mean_stderr']:10.6f}",
                  f"Median  KLD: {s['reverse_kld_median']:10.6f}",
                  f"99.0%   KLD: {s['reverse_kld_p99']:10.6f}",
                  f"Maximum KLD: {s['reverse_kld_max']:10.6f}",
                  f"Note: {REVERSE_NOTE}."]
    return "\n".join(lines)
