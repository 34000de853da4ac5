"""Row-subset invariance on a live engine: does a row get the same bits when
computed among fewer rows?

The exactness argument for `target_start > 0` and for row-chunked scoring is that a
row's logits (the lm_head GEMM) and its fp32 log-softmax have the same bit pattern
whether the row is computed among all the prompt rows of a step (what the standard
`prompt_logprobs` path computes) or among a subset of them (what the fast path
computes). That is a property of the kernels, not of the mathematics, so it is
checked where it is relied on.

`probe` runs that check on a live engine's own lm_head (`compute_logits`) and
log-softmax, on each worker before it scores: the subsets it checks are exactly the
piece sizes the scorer will use (`probe_plan`), and its verdict decides whether the
worker chunks rows or computes the standard path's rows. Offline sweeps of a kernel
over many shapes measure the same property; the probe is the decision.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

_INT_OF = {4: torch.int32, 2: torch.int16}

Subset = tuple[int, int, str]  # [start, stop) and why it is checked


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same bit pattern everywhere (NaNs and -0.0 included)."""
    kind = _INT_OF[a.element_size()]
    return a.shape == b.shape and torch.equal(a.contiguous().view(kind), b.contiguous().view(kind))


def differing_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Indices of the rows whose bit patterns differ anywhere (NaNs and -0.0
    included)."""
    kind = _INT_OF[a.element_size()]
    return (a.contiguous().view(kind) != b.contiguous().view(kind)).any(dim=-1).nonzero()[:, 0]


def probe_plan(budget: int, chunk: int) -> tuple[int, list[int], list[Subset]]:
    """What `probe` checks for an engine step of at most `budget` rows scored `chunk`
    rows at a time: (rows, reference row counts, subsets).

    The scorer computes rows in pieces of `chunk` rows and a remainder of 2..chunk rows
    (a lone row is computed beside its predecessor); the standard path computes a step's
    rows of a request in one call of any size up to the budget. So: references over the
    first M rows for a few M (each must agree with the largest on their common rows),
    every piece size 2..chunk at one offset, and whole chunks at both ends.
    """
    if budget < 2 or chunk < 2:
        raise ValueError(f"budget and chunk must be at least 2, got {budget} and {chunk}")
    rows = min(budget, max(2 * chunk + 3, 1024))
    references = sorted({rows, rows - 1, min(rows, chunk + 1)} - {1})
    checked: dict[tuple[int, int], str] = {}
    for size in range(2, min(chunk, rows - 1) + 1):
        checked.setdefault((1, 1 + size), f"piece of {size}")
    if chunk < rows:
        checked.setdefault((0, chunk), f"chunk of {chunk}")
        checked.setdefault((rows - chunk, rows), f"chunk of {chunk}")
    return rows, references, [(a, b, why) for (a, b), why in sorted(checked.items())]


def probe(logits_of: Callable[[torch.Tensor], torch.Tensor],
          logprobs_of: Callable[[torch.Tensor], torch.Tensor], hidden_size: int,
          dtype: torch.dtype, device: torch.device | str, budget: int, chunk: int,
          seed: int = 0) -> dict[str, Any]:
    """Check, on a real lm_head (`logits_of`) and log-softmax (`logprobs_of`), that a
    row gets the same bits among the rows the scorer computes as among the rows the
    standard path computes (see `probe_plan`); a JSON-ready report, `exact` the verdict.

    Every check runs whatever the earlier ones found, so the sequence of `logits_of`
    calls is the same on every tensor-parallel rank (it may gather across them).
    """
    started = time.perf_counter()
    rows, references, checked = probe_plan(budget, chunk)
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(rows, hidden_size, generator=generator).to(device=device, dtype=dtype)
    mismatches: list[dict[str, Any]] = []

    def compare(what: str, start: int, got: torch.Tensor, want: torch.Tensor) -> None:
        if not bitwise_equal(got, want):
            bad = differing_rows(got, want)
            diff = (got[bad].double() - want[bad].double()).abs().max()
            mismatches.append({"subset": what, "rows": int(bad.numel()),
                               "first_row": start + int(bad[0]), "max_abs_diff": float(diff)})

    with torch.inference_mode():
        full = logits_of(states)
        full_lp = logprobs_of(full)
        for count in references[:-1]:
            sub = logits_of(states[:count])
            compare(f"step of {count} rows (logits)", 0, sub, full[:count])
            compare(f"step of {count} rows (log-softmax)", 0, logprobs_of(sub), full_lp[:count])
        for start, stop, why in checked:
            sub = logits_of(states[start:stop])
            compare(f"{why} at row {start} (logits)", start, sub, full[start:stop])
            compare(f"{why} at row {start} (log-softmax)", start, logprobs_of(sub),
                    full_lp[start:stop])
    return {
        "exact": not mismatches, "rows": rows, "references": references, "chunk": chunk,
        "piece_sizes": f"2-{min(chunk, rows - 1)}", "subsets_checked": len(checked),
        "dtype": str(dtype).removeprefix("torch."), "seconds": time.perf_counter() - started,
        "mismatches": mismatches[:5], "mismatch_count": len(mismatches),
    }
