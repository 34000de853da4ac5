"""Evaluation conventions: which tokens each tool scores, with which context, and how it averages.

A convention turns a text into a token stream and windows over it (`Layout`); the engine
scores the windows the same way whatever the convention. Pure arithmetic (no vLLM), so each
convention is unit-tested against a transcription of the tool's own loop.

- `fastpath` (default): `fastpath.metrics.windows`: every token after the first scored exactly
  once, each with at least one token of context; the last window is full length.
- `hf`: the loop of Hugging Face's "Perplexity of fixed-length models" guide, literally:
  windows start every `stride` tokens and stop at the first one that reaches the end (so
  the last one is shorter); a window scores the tokens after the previous window's end,
  except that nothing predicts a window's first token (with `stride == context_length`
  that token is never scored). The guide averages window losses weighted by their label
  count minus one; `Layout.token_weights` reproduces that weighting.
- `lm-eval`: lm-evaluation-harness `loglikelihood_rolling` (`get_rolling_token_windows`
  with `context_len=1`, then `make_disjoint_window`): the text without special tokens,
  behind one prefix token (BOS, else EOS); the first window predicts from the prefix,
  each later one predicts `context_length - 1` new tokens from one token of context, and
  the last reaches back to fill its window. Every text token is scored once.
  `context_length` is the length of context + continuation: lm-eval's `max_seq_len + 1`.
- `llama.cpp`: `llama-perplexity`: `len(tokens) // context_length` chunks of
  `context_length` tokens; each chunk's first token is replaced by BOS (where the
  tokenizer has one), the first half is context only and the second half is scored
  (rows `n_ctx/2 .. n_ctx-2`). At least `2 * context_length` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastpath.metrics.windows import (
    Window,
    WindowError,
    check_parameters,
    check_shape,
    make_windows,
)

CONVENTIONS = ("fastpath", "hf", "lm-eval", "llama.cpp")
DEFAULT_CONVENTION = "fastpath"
DEFAULT_STRIDE = 512
STRIDED = frozenset({"fastpath", "hf"})  # the conventions that take --stride


@dataclass(frozen=True)
class Layout:
    """A convention applied to one token stream: its windows and how perplexity averages."""

    convention: str
    tokens: tuple[int, ...]
    windows: tuple[Window, ...]
    context_length: int
    stride: int | None

    @property
    def num_scored(self) -> int:
        return sum(w.num_scored for w in self.windows)

    def positions(self) -> np.ndarray:
        """Stream index of each scored token, in scoring order (strictly increasing)."""
        if not self.windows:
            return np.empty(0, dtype=np.int64)
        return np.concatenate([np.arange(w.score_from, w.end, dtype=np.int64)
                               for w in self.windows])

    def targets(self) -> np.ndarray:
        """The scored tokens, in scoring order (int32)."""
        return np.asarray(self.tokens, dtype=np.int64)[self.positions()].astype(np.int32)

    def token_weights(self) -> np.ndarray | None:
        """Per-token weights of the mean NLL, or None for a plain per-token mean.

        The HF guide adds each window's mean loss times (its valid labels - 1); spread over
        the window's scored tokens, that is `(labels - 1) / scored` per token.
        """
        if self.convention != "hf":
            return None
        weights, previous_end = [], 0
        for w in self.windows:
            labels = min(w.end - previous_end, w.end - w.begin)
            weights.append(np.full(w.num_scored, (labels - 1) / w.num_scored))
            previous_end = w.end
        return np.concatenate(weights)

    def describe(self) -> dict[str, Any]:
        """The layout in JSON-able form (for reports and the base file)."""
        return {"convention": self.convention, "context_length": self.context_length,
                "stride": self.stride, "windows": len(self.windows),
                "stream_tokens": len(self.tokens), "scored_tokens": self.num_scored}


def check_convention(convention: str, context_length: int, stride: int | None) -> int | None:
    """The stride to use (None where the convention takes none); WindowError naming the flag."""
    if convention not in CONVENTIONS:
        raise WindowError(f"--convention must be one of {', '.join(CONVENTIONS)}, "
                          f"got {convention!r}")
    if convention in STRIDED:
        stride = DEFAULT_STRIDE if stride is None else stride
        check_shape(context_length, stride)
        return stride
    if stride is not None:
        raise WindowError(
            f"--stride does not apply to --convention {convention} (its windows are set by "
            "--context-length alone); leave --stride out")
    minimum = 3 if convention == "llama.cpp" else 2
    if context_length < minimum:
        raise WindowError(f"--context-length must be at least {minimum} for --convention "
                          f"{convention}, got {context_length}")
    return None


def stream(convention: str, tokenizer: Any, text: str) -> list[int]:
    """The token stream a convention scores: the tokenizer's own encoding, or lm-eval's."""
    if convention != "lm-eval":
        return list(tokenizer.encode(text))
    prefix = tokenizer.bos_token_id
    if prefix is None:
        prefix = tokenizer.eos_token_id
    if prefix is None:
        raise WindowError("--convention lm-eval needs a prefix token: the tokenizer has "
                          "neither a BOS nor an EOS token")
    return [int(prefix), *tokenizer.encode(text, add_special_tokens=False)]


def bos_token(tokenizer: Any) -> int | None:
    """The BOS id llama.cpp's convention starts each chunk with (None: chunks left as they are)."""
    return tokenizer.bos_token_id


def windows(convention: str, num_tokens: int, context_length: int, stride: int | None,
            bos: int | None = None) -> list[Window]:
    """The windows of `convention` over a stream of `num_tokens` tokens."""
    stride = check_convention(convention, context_length, stride)
    if convention == "fastpath":
        return make_windows(num_tokens, context_length, stride)
    if convention == "lm-eval":
        # get_rolling_token_windows(max_seq_len=C-1, context_len=1) + make_disjoint_window,
        # over [prefix] + text: exactly fastpath's windows with stride C - 1.
        if num_tokens < 2:
            raise WindowError("the text has no tokens; --convention lm-eval needs at least one")
        return make_windows(num_tokens, context_length, context_length - 1)
    if convention == "hf":
        return _hf_windows(num_tokens, context_length, stride)
    return _llama_cpp_windows(num_tokens, context_length, bos)


def _hf_windows(num_tokens: int, context_length: int, stride: int) -> list[Window]:
    """The HF guide's loop: windows at 0, stride, 2*stride, ... until one reaches the end."""
    check_parameters(num_tokens, context_length, stride)
    result, previous_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context_length, num_tokens)
        score_from = max(begin + 1, previous_end)
        if score_from < end:  # a 1-token window scores nothing (the guide's loss is NaN)
            result.append(Window(begin, end, score_from))
        previous_end = end
        if end == num_tokens:
            break
    return result


def _llama_cpp_windows(num_tokens: int, context_length: int, bos: int | None) -> list[Window]:
    """llama-perplexity's chunks: BOS first, rows n_ctx/2 .. n_ctx-2 scored."""
    if num_tokens < 2 * context_length:
        raise WindowError(
            f"--convention llama.cpp needs at least 2 * --context-length = {2 * context_length} "
            f"tokens (as llama-perplexity does), the text has {num_tokens}")
    first = context_length // 2
    return [Window(begin, begin + context_length, begin + first + 1, first_token=bos)
            for begin in range(0, (num_tokens // context_length) * context_length,
                               context_length)]


def layout(convention: str, tokens: Sequence[int], context_length: int, stride: int | None,
           bos: int | None = None) -> Layout:
    """Windows of `convention` over `tokens` (a stream built by `stream`)."""
    stride = check_convention(convention, context_length, stride)
    return Layout(convention, tuple(int(t) for t in tokens),
                  tuple(windows(convention, len(tokens), context_length, stride, bos)),
                  context_length, stride)


def build(convention: str, tokenizer: Any, text: str, context_length: int,
          stride: int | None) -> Layout:
    """Tokenize `text` as `convention` does and lay out its windows."""
    check_convention(convention, context_length, stride)
    return layout(convention, stream(convention, tokenizer, text), context_length, stride,
                  bos_token(tokenizer) if convention == "llama.cpp" else None)
