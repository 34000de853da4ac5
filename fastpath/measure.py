"""Counters used by tests and benchmarks: objects held, objects created, bytes, memory."""

from __future__ import annotations

import gc
import sys
from typing import Any


def reachable_objects(*roots: Any) -> int:
    """Number of distinct objects reachable from `roots` (roots included, None excluded).

    Follows gc.get_referents, which sees the elements of containers (dicts, lists,
    dataclass attributes) and an ndarray's base; an ndarray's numbers are one buffer,
    not objects. Floats and ints count like any object.
    """
    seen: set[int] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, type):
            continue
        seen.add(id(obj))
        stack.extend(gc.get_referents(obj))
        if hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack.append(vars(obj))
    return len(seen)


def result_objects(output: Any) -> int:
    """Objects a RequestOutput holds for its prompt scores (either path)."""
    return reachable_objects(output.prompt_logprobs, output.prompt_token_id_logprobs)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
