"""What every patch module shares: fingerprints of the upstream code it replaces, and binding."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

TOP_K_KEY = "fastpath_top_k"  # SamplingParams.extra_args key: top-K columns per scored row

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


class PatchRefused(RuntimeError):
    """The installed vLLM's code is not the code a patch was written against."""


def fingerprint(func: Callable[..., Any]) -> str:
    """Short sha256 of a function's source: changes whenever upstream edits the function."""
    return hashlib.sha256(inspect.getsource(func).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Replacement:
    """One upstream attribute (`owner.name`) and the function that replaces it."""

    owner: type
    name: str
    new: Callable[..., Any]
    known_fingerprints: frozenset[str]

    @property
    def qualname(self) -> str:
        return f"{self.owner.__module__}.{self.owner.__qualname__}.{self.name}"

    def original(self) -> Callable[..., Any]:
        return self.owner.__dict__[self.name]

    def check(self, vllm_version: str) -> None:
        """Raise PatchRefused unless the upstream function is one we were checked against."""
        found = fingerprint(self.original())
        if found not in self.known_fingerprints:
            raise PatchRefused(
                f"fastpath refuses to patch {self.qualname} in vLLM {vllm_version}: its "
                f"source (fingerprint {found}) is not a version fastpath was checked "
                f"against ({', '.join(sorted(self.known_fingerprints))}). Upgrade "
                "fastpath, pin a supported vLLM (see fastpath.patches.SUPPORTED_VLLM), "
                "or run without it: FASTPATH_DISABLE=1."
            )

    def bind(self) -> None:
        """Install the replacement, remembering the original on the new function."""
        self.new.__wrapped__ = self.original()  # type: ignore[attr-defined]
        self.new.__fastpath_patch__ = True  # type: ignore[attr-defined]
        setattr(self.owner, self.name, self.new)

    def is_bound(self) -> bool:
        return getattr(self.owner.__dict__.get(self.name), "__fastpath_patch__", False)
