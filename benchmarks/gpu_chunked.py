"""Bare-torch cost of row-chunked scoring at the Llama-3-8B head shape on a GPU (no vLLM).

What fastpath's runner patch does for one step of R scored rows: lm_head (bf16), fp32
log-softmax, gather of the target — either over all R rows at once or `chunk` rows at a
time. Records, per (R, chunk): the peak device memory the scoring adds above the inputs
(`torch.cuda.max_memory_allocated`), the median time, and whether every gathered value has
the same bits as the unchunked computation (row-subset invariance at the real shape).
Writes JSON to the path given (default stdout).

    python benchmarks/gpu_chunked.py out.json
"""

from __future__ import annotations

import json
import sys

import torch

HIDDEN, VOCAB = 4096, 128_256


def score(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
          chunk: int) -> torch.Tensor:
    """Target logprobs, `chunk` rows at a time (chunk >= rows: all at once)."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for a in range(0, hidden.shape[0], chunk):
        b = min(a + chunk, hidden.shape[0])
        logits = torch.nn.functional.linear(hidden[a:b], weight)
        logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)
        out[a:b] = logprobs.gather(-1, targets[a:b, None])[:, 0]
    return out


def measure(rows: int, chunk: int, weight: torch.Tensor, dtype: torch.dtype) -> dict:
    g = torch.Generator(device="cuda").manual_seed(rows)
    hidden = torch.randn(rows, HIDDEN, device="cuda", dtype=dtype, generator=g)
    targets = torch.randint(0, VOCAB, (rows,), device="cuda", generator=g)
    reference = score(hidden, weight, targets, rows)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = score(hidden, weight, targets, chunk)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        score(hidden, weight, targets, chunk)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    same = (got.view(torch.int32) == reference.view(torch.int32))
    return {"rows": rows, "chunk": chunk, "dtype": str(dtype).removeprefix("torch."),
            "peak_scoring_bytes": int(peak), "median_ms": sorted(times)[len(times) // 2],
            "bitwise_equal_to_unchunked": bool(same.all()),
            "mismatched_rows": int((~same).sum())}


def main() -> None:
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "shape": {"hidden": HIDDEN, "vocab": VOCAB}, "runs": []}
    for dtype in (torch.bfloat16, torch.float16):
        weight = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=dtype,
                             generator=torch.Generator(device="cuda").manual_seed(0)) * 0.02
        for rows in (2048, 8192):
            for chunk in (rows, 1024, 512):
                results["runs"].append(measure(rows, chunk, weight, dtype))
                print(json.dumps(results["runs"][-1]), file=sys.stderr, flush=True)
        del weight
        torch.cuda.empty_cache()
    text = json.dumps(results, indent=2)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
