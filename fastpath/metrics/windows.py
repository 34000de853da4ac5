"""Sliding windows over a token stream, and which positions each window scores.

Pure arithmetic, no vLLM. The method is Hugging Face's "perplexity of fixed-length
models": windows of `context_length` tokens advancing by `stride`, each scoring only the
tokens no earlier window scored; the first window scores all but its first token.
Two choices make the accounting exact (every token after the first scored once):
- a scored token always has at least one token of context inside its window, so with
  `stride == context_length` consecutive windows overlap by one token (HF's loop would
  leave the first token of each such window unscored);
- every window but a short stream's only one is a full `context_length` tokens: the last
  window ends at the stream's end and reaches back as far as the context allows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


class WindowError(ValueError):
    """Window parameters that cannot describe a valid evaluation."""


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) of the stream; tokens [score_from, end) are scored.

    `first_token`, where set, replaces token `begin` in the prompt (llama.cpp's convention
    starts every chunk with BOS); that token is context only, never scored.
    """

    begin: int
    end: int
    score_from: int
    first_token: int | None = None

    def prompt(self, tokens: Sequence[int]) -> list[int]:
        """The prompt token ids of this window."""
        ids = list(tokens[self.begin : self.end])
        if self.first_token is not None:
            ids[0] = self.first_token
        return ids

    @property
    def first_scored_row(self) -> int:
        """The causal row (within the window) that predicts token `score_from`."""
        return self.score_from - self.begin - 1

    @property
    def num_scored(self) -> int:
        return self.end - self.score_from


def check_shape(context_length: int, stride: int) -> None:
    """Raise WindowError naming the flag when the window shape itself is invalid."""
    if context_length < 2:
        raise WindowError(f"--context-length must be at least 2, got {context_length}")
    if not 1 <= stride <= context_length:
        raise WindowError(
            f"--stride must be in [1, --context-length={context_length}], got {stride}"
        )


def check_parameters(num_tokens: int, context_length: int, stride: int) -> None:
    """Raise WindowError naming the parameter when windows cannot be built."""
    check_shape(context_length, stride)
    if num_tokens < 2:
        raise WindowError(
            f"the text has {num_tokens} token(s); perplexity needs at least 2 "
            "(nothing to predict otherwise)"
        )


def iter_windows(num_tokens: int, context_length: int, stride: int) -> Iterator[Window]:
    """The windows over a stream of `num_tokens` tokens, in order."""
    check_parameters(num_tokens, context_length, stride)
    step = min(stride, context_length - 1)
    end = min(context_length, num_tokens)
    yield Window(0, end, 1)
    while end < num_tokens:
        new_end = min(end + step, num_tokens)
        yield Window(max(0, new_end - context_length), new_end, end)
        end = new_end


def make_windows(num_tokens: int, context_length: int, stride: int) -> list[Window]:
    return list(iter_windows(num_tokens, context_length, stride))


def count_windows(num_tokens: int, context_length: int, stride: int) -> int:
    """How many windows `make_windows` returns, without building them."""
    check_parameters(num_tokens, context_length, stride)
    remaining = num_tokens - min(context_length, num_tokens)
    return 1 + math.ceil(remaining / min(stride, context_length - 1))
