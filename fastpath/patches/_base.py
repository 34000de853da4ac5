"""What every patch module shares: fingerprints of the upstream code it replaces, and binding."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastpath.source_text import decode, fingerprint_text, has_attribute


class PatchRefused(RuntimeError):
    """The installed vLLM's code is not the code a patch was written against."""


def fingerprint(func: Callable[..., Any]) -> str:
    """Short sha256 of a function's source: changes whenever upstream edits the function."""
    return fingerprint_text(inspect.getsource(func))


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

    @property
    def module(self) -> str:
        """The upstream module that defines the replaced function."""
        return self.owner.__module__

    @property
    def local_name(self) -> str:
        """`Class.function` inside that module."""
        return f"{self.owner.__qualname__}.{self.name}"

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


# `Borrowed.used_by` of the names fastpath.server.serve's request checks borrow (no patch module:
# they are checked with the "serve" scope, in the API server processes that run those checks).
SERVE_CHECKS = "serve"


@dataclass(frozen=True)
class Borrowed:
    """A private upstream name a patch uses without replacing it: checked, never bound.

    With `fingerprints`, `qualname` names a function whose source must be one of them; without,
    it names a class attribute (`Class.attr`) that must be defined: at class level, as a method
    or property, or assigned to `self.attr` in one of the class's methods.
    """

    module: str  # e.g. "vllm.v1.worker.gpu_model_runner"
    qualname: str  # e.g. "GPUModelRunner._sync_device", "InputBatch.req_id_to_index"
    used_by: str  # the patch module that relies on it, or SERVE_CHECKS
    fingerprints: frozenset[str] = frozenset()

    @property
    def full_name(self) -> str:
        return f"{self.module}.{self.qualname}"

    @property
    def is_function(self) -> bool:
        return bool(self.fingerprints)

    def check(self, vllm_version: str) -> None:
        """Raise PatchRefused unless the installed vLLM defines it, in a known version."""
        if self.is_function:
            target: Any = importlib.import_module(self.module)
            for part in self.qualname.split("."):
                target = inspect.getattr_static(target, part, None)
                if target is None:
                    break
            target = getattr(target, "__func__", target)
            found = None if target is None else fingerprint(target)
            if found in self.fingerprints:
                return
            what = "is missing" if found is None else f"has changed (fingerprint {found})"
        else:
            spec = importlib.util.find_spec(self.module)
            origin = spec.origin if spec else None
            text = decode(Path(origin).read_bytes()) if origin else None
            cls, _, attr = self.qualname.rpartition(".")
            if text is not None and has_attribute(text, cls, attr):
                return
            what = "is missing"
        user = ("fastpath serve's request checks" if self.used_by == SERVE_CHECKS
                else f"the {self.used_by} patch")
        raise PatchRefused(
            f"fastpath refuses to patch vLLM {vllm_version}: {self.full_name}, which "
            f"{user} relies on, {what}. Upgrade fastpath, pin a supported vLLM "
            "(see fastpath.patches.SUPPORTED_VLLM), or run without it: FASTPATH_DISABLE=1."
        )


@dataclass(frozen=True)
class Addition:
    """A name fastpath adds to an upstream class (an RPC target), never one upstream has:
    refused where the installed vLLM already defines it, so nothing upstream is shadowed."""

    owner: type
    name: str
    new: Callable[..., Any]

    @property
    def qualname(self) -> str:
        return f"{self.owner.__module__}.{self.owner.__qualname__}.{self.name}"

    def check(self, vllm_version: str) -> None:
        """Raise PatchRefused where upstream itself defines the name."""
        existing = inspect.getattr_static(self.owner, self.name, None)
        if existing is not None and not getattr(existing, "__fastpath_patch__", False):
            raise PatchRefused(
                f"fastpath refuses to add {self.qualname} in vLLM {vllm_version}: upstream "
                "defines that name already. Upgrade fastpath, pin a supported vLLM (see "
                "fastpath.patches.SUPPORTED_VLLM), or run without it: FASTPATH_DISABLE=1.")

    def bind(self) -> None:
        self.new.__fastpath_patch__ = True  # type: ignore[attr-defined]
        setattr(self.owner, self.name, self.new)

    def is_bound(self) -> bool:
        return getattr(self.owner.__dict__.get(self.name), "__fastpath_patch__", False)
