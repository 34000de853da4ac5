"""`fastpath kld`: KL divergence of a model (e.g. a quantization) against its base model.

Two passes over the same windows (`fastpath.protocols`):
1. base pass: the base model scores the targets on the fast path and, through fastpath's
   top-K extension (`SamplingParams.extra_args["fastpath_top_k"]`), also returns each
   scored row's top-K log-probs and ids from the same fp32 log-softmax; no Python object
   per position. The result is the base file (`fastpath.basefile`), reusable by later runs.
2. model pass: the model scores exactly the base's top-K ids and the target on each row,
   through upstream's 2-D `prompt_logprob_token_ids` ([rows, K + 1]) with
   `prompt_logprob_start`, plus its own top-1 (for "same top token").
The statistics are in `fastpath.divergence`. The target columns of both passes are the
values `fastpath ppl` computes, so PPL and PPL(base) equal its figures bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastpath import basefile, divergence, protocols, scoring
from fastpath.perplexity import PerplexityResult, window_requests
from fastpath.windows import Window

TOP_K_KEY = "fastpath_top_k"  # SamplingParams.extra_args key of the runner's top-K extension
DEFAULT_TOP_K = 32


def base_params(top_k: int):
    """SamplingParams of the base pass: targets on the fast path + the top-K extension."""
    return scoring.scoring_params("fast", extra_args={TOP_K_KEY: top_k})


def model_params(ids: np.ndarray, start: int):
    """SamplingParams of the model pass: fixed ids per row + the model's own top-1."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprob_token_ids=ids,
                          prompt_logprob_start=start, extra_args={TOP_K_KEY: 1})


def _batches(windows: Sequence[Window], size: int) -> list[tuple[int, Sequence[Window]]]:
    return [(first, windows[first : first + size]) for first in range(0, len(windows), size)]


@dataclass
class PassTiming:
    seconds: float
    windows: int


def base_pass(llm: Any, layout: protocols.Layout, top_k: int, max_batch_windows: int = 16,
              progress: Callable[[int], None] | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, PassTiming]:
    """(target logprobs [n], top-K logprobs [n, K], top-K ids [n, K], timing) for a layout."""
    from fastpath.scoring import split_top_k

    targets, top_logprobs, top_ids = [], [], []
    params = base_params(top_k)
    started = time.perf_counter()
    for _, batch in _batches(layout.windows, max_batch_windows):
        requests = window_requests(layout.tokens, batch)
        outputs = scoring.submit_together(llm, [scoring.fast_prompt(r) for r in requests],
                                          params)
        for window, output in zip(batch, outputs, strict=True):
            scores, logprobs, ids = split_top_k(scoring.fixed_id_scores(output), 1, top_k)
            if scores.shape != (window.num_scored, 1):
                raise AssertionError(f"{window}: {scores.shape[0]} rows for "
                                     f"{window.num_scored} scored tokens")
            targets.append(scores[:, 0])
            top_logprobs.append(logprobs)
            top_ids.append(ids)
        if progress is not None:
            progress(len(batch))
    seconds = time.perf_counter() - started
    return (np.concatenate(targets), np.concatenate(top_logprobs), np.concatenate(top_ids),
            PassTiming(seconds, len(layout.windows)))


@dataclass
class ModelScores:
    """The model pass's answer: the model on the base's top-K ids, the target, its top-1."""

    topk_logprobs: np.ndarray  # float32 [n, K]: model log-probs of the base's top-K ids
    target_logprobs: np.ndarray  # float32 [n]
    top1_logprobs: np.ndarray  # float32 [n]: the model's own best log-prob
    top1_ids: np.ndarray  # int32 [n]
    timing: PassTiming


def model_pass(llm: Any, layout: protocols.Layout, base: basefile.BaseScores,
               max_batch_windows: int = 16, progress: Callable[[int], None] | None = None
               ) -> ModelScores:
    """Score the model on each row's base top-K ids and target (the target column is left
    out when K is the whole vocabulary: it is then one of the K ids)."""
    from fastpath.scoring import split_top_k

    k = base.top_k
    full = k == base.vocab_size
    targets_all = layout.targets()
    edges = np.concatenate([[0], np.cumsum([w.num_scored for w in layout.windows])])
    topk, target, top1, top1_ids = [], [], [], []
    started = time.perf_counter()
    for first, batch in _batches(layout.windows, max_batch_windows):
        prompts, params, rows = [], [], []
        for i, window in enumerate(batch, start=first):
            lo, hi = int(edges[i]), int(edges[i + 1])
            ids = base.topk_ids[lo:hi]
            if not full:
                ids = np.concatenate([ids, targets_all[lo:hi, None]], axis=1)
            prompts.append({"prompt_token_ids": window.prompt(layout.tokens)})
            params.append(model_params(np.ascontiguousarray(ids, dtype=np.int32),
                                       window.first_scored_row))
            rows.append((lo, hi))
        outputs = scoring.submit_together(llm, prompts, params)
        for (lo, hi), output in zip(rows, outputs, strict=True):
            n_ids = k if full else k + 1
            scores, best, best_ids = split_top_k(scoring.fixed_id_scores(output), n_ids, 1)
            if scores.shape != (hi - lo, n_ids):
                raise AssertionError(f"rows {lo}:{hi}: got scores of shape {scores.shape}")
            topk.append(scores[:, :k])
            if full:
                column = np.argmax(base.topk_ids[lo:hi] == targets_all[lo:hi, None], axis=1)
                target.append(np.take_along_axis(scores, column[:, None], axis=1)[:, 0])
            else:
                target.append(scores[:, k])
            top1.append(best[:, 0])
            top1_ids.append(best_ids[:, 0])
        if progress is not None:
            progress(len(batch))
    seconds = time.perf_counter() - started
    return ModelScores(np.concatenate(topk), np.concatenate(target), np.concatenate(top1),
                       np.concatenate(top1_ids), PassTiming(seconds, len(layout.windows)))


def compare(layout: protocols.Layout, base: basefile.BaseScores,
            model: ModelScores) -> divergence.Divergence:
    """The per-token divergence and both perplexities (as `fastpath ppl` computes them)."""
    full = base.top_k == base.vocab_size
    kld, tail_base, _ = divergence.topk_kld(base.topk_logprobs, model.topk_logprobs,
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
        mean_nll_base=ppl_base.mean_nll, top_k=base.top_k)
