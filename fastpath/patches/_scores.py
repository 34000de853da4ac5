"""What the runner and scheduler patches agree on: the top-K request key and the failure marker."""

from __future__ import annotations

from typing import Any

from fastpath.fixed_ids import FAILED_SCORES, is_failed_scores  # noqa: F401  (the patches' names)
from fastpath.targets import TOP_K_KEY


def top_k_of(sampling_params: Any) -> int:
    """The top-K columns a request asked for with its fixed-id scores (0: none)."""
    return int((getattr(sampling_params, "extra_args", None) or {}).get(TOP_K_KEY, 0) or 0)
