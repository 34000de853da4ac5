"""What the runner and scheduler patches agree on: the top-K request key and the failure marker."""

from __future__ import annotations

from typing import Any

import torch

from fastpath.targets import TOP_K_KEY

# What the runner emits instead of scores when a request's scored rows were not all
# computed: a 1-D empty tensor (real scores are 2-D with at least one row). The scheduler
# patch turns it into an error finish for that request.
FAILED_SCORES = torch.empty(0, dtype=torch.float32)


def is_failed_scores(scores: Any) -> bool:
    """Whether a prompt_token_id_logprobs entry is the runner's failure marker."""
    return isinstance(scores, torch.Tensor) and scores.dim() == 1 and scores.numel() == 0


def top_k_of(sampling_params: Any) -> int:
    """The top-K columns a request asked for with its fixed-id scores (0: none)."""
    return int((getattr(sampling_params, "extra_args", None) or {}).get(TOP_K_KEY, 0) or 0)
