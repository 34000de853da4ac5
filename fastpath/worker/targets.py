"""The `target_token_ids` prompt field: its form, its checks, and its upstream
equivalent.

Pure (numpy only) so it is unit-tested without an engine. The patches call it at
submission time, in the front-end process, so bad input never reaches the engine core.

Form: `TokensPrompt(prompt_token_ids=ids, target_token_ids=targets, target_start=s)`
- `targets[i]` is scored as the prediction of prompt position `s + i + 1`, i.e. from
  the causal row `s + i`; `len(targets) == len(ids) - 1 - s`.
- `target_start` (default 0) skips the first `s` rows: only the last
  `len(ids) - 1 - s` rows are computed (perplexity with a stride scores only new
  tokens).
- Perplexity: `targets = ids[s + 1:]`. Any in-vocabulary id is allowed, so alternative
  continuations can be scored.

Upstream equivalent (V2 runner, and V1 with fastpath): `SamplingParams(
prompt_logprob_token_ids=targets[:, None], prompt_logprob_start=s)`; the answer is
`RequestOutput.prompt_token_id_logprobs`, float32 of shape [len(targets), 1].
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

TARGET_KEY = "target_token_ids"
START_KEY = "target_start"
TOP_K_KEY = "fastpath_top_k"  # SamplingParams.extra_args key: top-K columns per scored row
RANKS_KEY = "fastpath_ranks"  # extra_args key (True): each fixed id's rank, as upstream's
MAX_EXACT_FLOAT32_ID = 1 << 24  # top-K ids travel as float32: exact only below this
EXPECTED_FORM = (
    "a flat list (or 1-D integer numpy array) of token ids, one per scored prompt "
    "position: len(prompt_token_ids) - 1 - target_start entries "
    "(prompt_token_ids[1:] for perplexity)"
)


class TargetTokenIdsError(ValueError):
    """Invalid `target_token_ids` / `target_start`; the message names the parameter."""

    def __init__(self, message: str, parameter: str = TARGET_KEY):
        super().__init__(message)
        self.parameter = parameter


def check_prompt_kind(prompt: Any) -> None:
    """Refuse `target_token_ids` on prompts that carry no token ids of their own."""
    if not isinstance(prompt, dict) or (
        TARGET_KEY not in prompt and START_KEY not in prompt
    ):
        return
    if TARGET_KEY not in prompt:
        raise TargetTokenIdsError(
            f"{START_KEY} was given without {TARGET_KEY}; expected {TARGET_KEY} as "
            f"{EXPECTED_FORM}",
            parameter=START_KEY,
        )
    if "prompt_embeds" in prompt:
        raise TargetTokenIdsError(
            f"{TARGET_KEY} cannot be combined with prompt_embeds: the targets are "
            "scored against prompt_token_ids; pass a TokensPrompt instead"
        )
    if "prompt_token_ids" not in prompt:
        raise TargetTokenIdsError(
            f"{TARGET_KEY} needs a TokensPrompt (prompt_token_ids=...), not a text "
            "prompt: tokenize the text first so that targets and positions align"
        )


def _as_id_array(targets: Any) -> np.ndarray:
    """`targets` as a 1-D int64 array, refusing floats, bools, strings and nesting."""
    if isinstance(targets, (str, bytes)) or not isinstance(
        targets, (Sequence, np.ndarray)
    ):
        raise TargetTokenIdsError(
            f"{TARGET_KEY} must be {EXPECTED_FORM}; got {type(targets).__name__}"
        )
    if isinstance(targets, np.ndarray):
        array = targets
    else:
        for position, value in enumerate(targets):
            if isinstance(value, (bool, np.bool_)) or not isinstance(
                value, numbers.Integral
            ):
                raise TargetTokenIdsError(
                    f"{TARGET_KEY}[{position}] is {value!r} "
                    f"({type(value).__name__}); expected {EXPECTED_FORM}"
                )
        array = np.asarray(targets, dtype=np.int64) if len(targets) else np.empty(0)
    if array.ndim != 1:
        raise TargetTokenIdsError(
            f"{TARGET_KEY} has shape {array.shape}; expected {EXPECTED_FORM} "
            "(for several ids per position use SamplingParams.prompt_logprob_token_ids)"
        )
    if len(targets) and array.dtype.kind not in "iu":
        raise TargetTokenIdsError(
            f"{TARGET_KEY} has dtype {array.dtype}; expected {EXPECTED_FORM}"
        )
    return array.astype(np.int64, copy=False)


def normalize_targets(
    targets: Any, start: Any, prompt_len: int, vocab_size: int
) -> tuple[np.ndarray, int]:
    """Check targets against the prompt and vocabulary; return
    (int32 ids [R, 1], start).

    Raises TargetTokenIdsError naming the parameter and the expected form.
    """
    if start is None:
        start = 0
    if isinstance(start, (bool, np.bool_)) or not isinstance(start, numbers.Integral):
        raise TargetTokenIdsError(
            f"{START_KEY} must be a non-negative int (first scored prompt row); "
            f"got {start!r}",
            parameter=START_KEY,
        )
    start = int(start)
    if prompt_len < 2:
        raise TargetTokenIdsError(
            f"{TARGET_KEY} needs a prompt of at least 2 tokens (position 0 has no "
            f"prediction to score); the prompt has {prompt_len}"
        )
    if not 0 <= start <= prompt_len - 2:
        raise TargetTokenIdsError(
            f"{START_KEY}={start} is outside [0, {prompt_len - 2}] for a prompt of "
            f"{prompt_len} tokens",
            parameter=START_KEY,
        )
    ids = _as_id_array(targets)
    expected = prompt_len - 1 - start
    if len(ids) != expected:
        raise TargetTokenIdsError(
            f"{TARGET_KEY} has {len(ids)} entries but the prompt has {expected} "
            f"scored positions (len(prompt_token_ids) - 1 - {START_KEY} = "
            f"{prompt_len} - 1 - {start}); expected {EXPECTED_FORM}"
        )
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = int(np.flatnonzero((ids < 0) | (ids >= vocab_size))[0])
        raise TargetTokenIdsError(
            f"{TARGET_KEY}[{bad}] = {int(ids[bad])} is outside the vocabulary "
            f"[0, {vocab_size})"
        )
    return np.ascontiguousarray(ids.astype(np.int32)[:, None]), start
