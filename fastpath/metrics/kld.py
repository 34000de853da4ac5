"""`fastpath kld`: KL divergence of a model (e.g. a quantization) against its base model.

Two passes over the same windows (`fastpath.metrics.conventions`):
1. base pass: the base model scores the targets on the fast path and, through fastpath's
   top-K extension (`SamplingParams.extra_args["fastpath_top_k"]`), also returns each
   scored row's top-K log-probs and ids from the same fp32 log-softmax; no Python object
   per position. The result is the base file (`fastpath.metrics.basefile`), reusable by later runs.
2. model pass: the model scores exactly the base's top-K ids and the target on each row,
   through upstream's 2-D `prompt_logprob_token_ids` ([rows, K + 1]) with
   `prompt_logprob_start`, plus its own top-`AGREEMENT_K` (for "same top token" and the
   top-K agreement).
Both passes ask a `fastpath.engine.scorer.Scorer`: an in-process engine or `fastpath serve`
servers give the same values. The statistics are in `fastpath.metrics.divergence`. The target
columns of both passes are the values `fastpath ppl` computes, so PPL and PPL(base) equal
its figures bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fastpath.engine.scorer import Progress, Scorer
from fastpath.engine.scoring import ScoreRequest
from fastpath.metrics import basefile, conventions, divergence
from fastpath.metrics.perplexity import PerplexityResult, window_requests

DEFAULT_TOP_K = 32
AGREEMENT_K = 5  # the model pass's own top-K: top-1 .. top-5 agreement, as exllamav3 reports


@dataclass
class PassTiming:
    seconds: float
    windows: int


def base_pass(scorer: Scorer, layout: conventions.Layout, top_k: int,
              progress: Progress | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, PassTiming]:
    """(target logprobs [n], top-K logprobs [n, K], top-K ids [n, K], timing) for a layout:
    each window's targets with the top-K of the same rows."""
    requests = [replace(r, top_k=top_k) for r in window_requests(layout.tokens, layout.windows)]
    started = time.perf_counter()
    answers = scorer.score(requests, progress)
    seconds = time.perf_counter() - started
    return (_rows(a.targets for a in answers), _rows(a.top_logprobs for a in answers),
            _rows(a.top_ids for a in answers), PassTiming(seconds, len(layout.windows)))


def _rows(parts: Any) -> np.ndarray:
    return np.concatenate(list(parts))


@dataclass
class ModelScores:
    """The model pass's answer: the model on the base's top-K ids, the target, and the
    model's own top few (AGREEMENT_K or the base's K, the smaller)."""

    topk_logprobs: np.ndarray  # float32 [n, K]: model log-probs of the base's top-K ids
    target_logprobs: np.ndarray  # float32 [n]
    own_top_logprobs: np.ndarray  # float32 [n, k]: the model's own best log-probs, descending
    own_top_ids: np.ndarray  # int32 [n, k]
    timing: PassTiming

    @property
    def top1_logprobs(self) -> np.ndarray:
        """float32 [n]: the model's own best log-prob."""
        return self.own_top_logprobs[:, 0]

    @property
    def top1_ids(self) -> np.ndarray:
        """int32 [n]: the model's own best id."""
        return self.own_top_ids[:, 0]


def model_requests(layout: conventions.Layout, base: basefile.BaseScores) -> list[ScoreRequest]:
    """Per window: each row's base top-K ids and its target ([rows, K + 1]; the target is
    left out when K is the whole vocabulary, where it is one of the K), plus the model's own
    top few (`own_top_k`)."""
    full = base.top_k == base.vocab_size
    targets = layout.targets()
    edges = np.concatenate([[0], np.cumsum([w.num_scored for w in layout.windows])])
    requests = []
    for i, window in enumerate(layout.windows):
        lo, hi = int(edges[i]), int(edges[i + 1])
        ids = base.topk_ids[lo:hi]
        if not full:
            ids = np.concatenate([ids, targets[lo:hi, None]], axis=1)
        requests.append(ScoreRequest(window.prompt(layout.tokens),
                                     np.ascontiguousarray(ids, dtype=np.int32),
                                     window.first_scored_row, top_k=own_top_k(base)))
    return requests


def own_top_k(base: basefile.BaseScores) -> int:
    """How many of the model's own best ids the model pass fetches."""
    return min(AGREEMENT_K, base.top_k)


def model_pass(scorer: Scorer, layout: conventions.Layout, base: basefile.BaseScores,
               progress: Progress | None = None) -> ModelScores:
    """Score the model on each row's base top-K ids and target, and its own top few."""
    k = base.top_k
    full = k == base.vocab_size
    started = time.perf_counter()
    answers = scorer.score(model_requests(layout, base), progress)
    seconds = time.perf_counter() - started
    scores = _rows(a.ids for a in answers)
    if full:
        column = np.argmax(base.topk_ids == layout.targets()[:, None], axis=1)
        target = np.take_along_axis(scores, column[:, None], axis=1)[:, 0]
    else:
        target = scores[:, k]
    return ModelScores(np.ascontiguousarray(scores[:, :k]), np.ascontiguousarray(target),
                       _rows(a.top_logprobs for a in answers), _rows(a.top_ids for a in answers),
                       PassTiming(seconds, len(layout.windows)))


def compare(layout: conventions.Layout, base: basefile.BaseScores,
            model: ModelScores) -> divergence.Divergence:
    """The per-token divergence and both perplexities (as `fastpath ppl` computes them)."""
    full = base.top_k == base.vocab_size
    kld, tail_base, _ = divergence.topk_kld(base.topk_logprobs, model.topk_logprobs,
                                            full_vocabulary=full, vocab_size=base.vocab_size)
    # KL(model || base) over the same K + 1 outcomes: a lower bound of the full-vocabulary
    # reverse KLD by the same log-sum argument (divergence.REVERSE_NOTE).
    reverse, _, _ = divergence.topk_kld(model.topk_logprobs, base.topk_logprobs,
                                        full_vocabulary=full, vocab_size=base.vocab_size)
    # Same top token: the model's log-prob of the base's top id equals its own best (ties:
    # the base's top wins). Both come from the same log-softmax row, so this is exact.
    same_top = model.topk_logprobs[:, 0] == model.top1_logprobs
    outside = ~(base.topk_ids == model.top1_ids[:, None]).any(axis=1) & ~same_top
    weights = layout.token_weights()
    ppl = PerplexityResult(model.target_logprobs, len(layout.windows), weights=weights)
    ppl_base = PerplexityResult(base.target_logprobs, len(layout.windows), weights=weights)
    return divergence.Divergence(
        kld=kld, base_logprobs=base.target_logprobs, model_logprobs=model.target_logprobs,
        same_top=same_top, tail_mass_base=tail_base,
        top1_outside_base_topk=int(outside.sum()), top1_undecided=0,
        ppl=ppl.perplexity, ppl_base=ppl_base.perplexity, mean_nll=ppl.mean_nll,
        mean_nll_base=ppl_base.mean_nll, top_k=base.top_k,
        base_top1_logprobs=base.topk_logprobs[:, 0], reverse_kld=reverse,
        topk_agreement=divergence.topk_agreement(model.topk_logprobs, model.own_top_logprobs))
