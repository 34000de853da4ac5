"""Sliding-window perplexity through vLLM: windows -> requests -> one logprob per token.

Windows are scored through a `fastpath.engine.scorer.Scorer` (an in-process engine or servers);
the window arithmetic is in `fastpath.metrics.windows`. Results are exact sums (`math.fsum`),
independent of order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastpath.engine import scoring
from fastpath.engine.scorer import Progress, Scorer
from fastpath.metrics import conventions
from fastpath.metrics.windows import Window, make_windows


@dataclass
class PerplexityResult:
    """Per-token logprobs of the scored tokens and the statistics derived from them.

    With the default convention the scored tokens are stream tokens 1..N-1 (`logprobs[i]`
    scores token i + 1); other conventions give `positions`. `weights` (the HF guide's
    window weighting) turn the mean NLL into a weighted mean; None is a plain mean.
    """

    logprobs: np.ndarray  # float32 [scored tokens], in stream order
    num_windows: int
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    positions: np.ndarray | None = None  # int64 stream index of each scored token
    weights: np.ndarray | None = None  # float64 per-token weight of the mean NLL

    @property
    def num_tokens(self) -> int:
        return int(self.logprobs.size)

    @property
    def nll_sum(self) -> float:
        return -math.fsum(self.logprobs.astype(np.float64).tolist())

    @property
    def mean_nll(self) -> float:
        if self.weights is None:
            return self.nll_sum / self.num_tokens
        nll = -self.logprobs.astype(np.float64)
        return math.fsum((self.weights * nll).tolist()) / math.fsum(self.weights.tolist())

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def token_perplexity(self) -> float:
        """exp of the plain per-token mean NLL (= perplexity unless weighted)."""
        return math.exp(self.nll_sum / self.num_tokens)

    @property
    def perplexity_stderr(self) -> float:
        """Standard error of the PPL by the delta method (as llama-perplexity reports it)."""
        if self.num_tokens < 2:
            return float("nan")
        nll = -self.logprobs.astype(np.float64)
        return self.perplexity * float(nll.std(ddof=1)) / math.sqrt(self.num_tokens)

    def summary(self) -> dict[str, Any]:
        per_window = self.seconds / self.num_windows if self.num_windows else float("nan")
        figures = {
            "perplexity": self.perplexity,
            "perplexity_stderr": self.perplexity_stderr,
            "nll_sum": self.nll_sum,
            "mean_nll": self.mean_nll,
            "scored_tokens": self.num_tokens,
            "windows": self.num_windows,
            "seconds": self.seconds,
            "seconds_per_window": per_window,
            "tokens_per_second": self.num_tokens / self.seconds if self.seconds else float("nan"),
        }
        if self.weights is not None:
            figures["token_perplexity"] = self.token_perplexity
        return {**figures, **self.extra}


def window_requests(tokens: Sequence[int], windows: Sequence[Window]) -> list[scoring.ScoreRequest]:
    """One scoring request per window: its tokens, targets = the tokens it scores."""
    return [
        scoring.ScoreRequest(
            prompt_token_ids=w.prompt(tokens),
            target_token_ids=list(tokens[w.score_from : w.end]),
            start=w.first_scored_row,
        )
        for w in windows
    ]


def assemble(num_tokens: int, windows: Sequence[Window],
             per_window: Sequence[np.ndarray]) -> np.ndarray:
    """Place each window's scores at its stream positions; check every token is scored once."""
    logprobs = np.full(num_tokens - 1, np.nan, dtype=np.float32)
    filled = np.zeros(num_tokens - 1, dtype=np.int32)
    for window, values in zip(windows, per_window, strict=True):
        if values.shape != (window.num_scored,):
            raise AssertionError(f"{window}: got {values.shape[0]} scores for "
                                 f"{window.num_scored} tokens")
        logprobs[window.score_from - 1 : window.end - 1] = values
        filled[window.score_from - 1 : window.end - 1] += 1
    if not np.all(filled == 1):
        raise AssertionError(f"tokens scored other than once: {np.flatnonzero(filled != 1)[:10]}")
    return logprobs


def warm_up(scorer: Scorer, layout: conventions.Layout) -> None:
    """Score the first two windows once, untimed: the kernels for both window shapes (all
    rows; the strided rows) are built on first use (oneDNN on CPU: seconds per new shape)."""
    scorer.warm_up(window_requests(layout.tokens, layout.windows[:2]))


def score_stream(scorer: Scorer, tokens: Sequence[int], context_length: int, stride: int,
                 progress: Progress | None = None) -> PerplexityResult:
    """Score a token stream with fastpath's sliding windows; `logprobs[i]` scores token i + 1.

    `progress(n)` is called as n more windows are answered (a tqdm bar's update).
    """
    windows = make_windows(len(tokens), context_length, stride)
    result = score_windows(scorer, tokens, windows, progress)
    result.logprobs = assemble(len(tokens), windows, _split(result.logprobs, windows))
    result.positions = None
    return result


def score_layout(scorer: Scorer, layout: conventions.Layout,
                 progress: Progress | None = None) -> PerplexityResult:
    """Score a convention's layout; the mean NLL weighted as the convention's tool weights it."""
    result = score_windows(scorer, layout.tokens, layout.windows, progress)
    result.weights = layout.token_weights()
    result.extra["convention"] = layout.convention
    return result


def score_windows(scorer: Scorer, tokens: Sequence[int], windows: Sequence[Window],
                  progress: Progress | None = None) -> PerplexityResult:
    """Score windows through `scorer` (an engine or servers); logprobs in window order."""
    requests = window_requests(tokens, windows)
    started = time.perf_counter()
    answers = scorer.score(requests, progress)
    seconds = time.perf_counter() - started
    return PerplexityResult(logprobs=concatenate(windows, [a.targets for a in answers]),
                            num_windows=len(windows), seconds=seconds,
                            extra={"method": scorer.method},
                            positions=window_positions(windows))


def window_positions(windows: Sequence[Window]) -> np.ndarray:
    """Stream index of each token the windows score, in window order."""
    if not windows:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([np.arange(w.score_from, w.end, dtype=np.int64) for w in windows])


def concatenate(windows: Sequence[Window], per_window: Sequence[np.ndarray]) -> np.ndarray:
    """Each window's scores, checked against its size, one after another (float32)."""
    for window, values in zip(windows, per_window, strict=True):
        if values.shape != (window.num_scored,):
            raise AssertionError(f"{window}: got {values.shape} scores for "
                                 f"{window.num_scored} tokens")
    if not per_window:
        return np.empty(0, dtype=np.float32)
    return np.concatenate(per_window).astype(np.float32, copy=False)


def _split(values: np.ndarray, windows: Sequence[Window]) -> list[np.ndarray]:
    """Inverse of `concatenate`: one array per window."""
    edges = np.cumsum([w.num_scored for w in windows])[:-1]
    return np.split(values, edges)


def bitwise_mismatches(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Positions where two float32 arrays differ in bit pattern."""
    a32 = np.ascontiguousarray(a, dtype=np.float32).view(np.int32)
    b32 = np.ascontiguousarray(b, dtype=np.float32).view(np.int32)
    return np.flatnonzero(a32 != b32)
