"""What every patch module shares: fingerprints of the upstream code it replaces, and binding."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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
